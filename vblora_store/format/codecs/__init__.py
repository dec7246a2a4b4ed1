"""One codec per storage form; :mod:`vblora_store.storage_forms` is their registry.

``base`` says what every codec does; ``full``, ``topk`` and ``packed`` are the
built-in forms.  A new form is one module with a codec object, registered
with :func:`vblora_store.storage_forms.register_form`.
"""

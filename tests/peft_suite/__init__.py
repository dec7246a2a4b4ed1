"""PEFT 0.21.2's own VB-LoRA test cases, run against vblora_store (tests/test_peft_suite.py).

Nothing of PEFT's test code lives in this repository: :mod:`.sdist` fetches PEFT's
source distribution with pip at test time and extracts its ``tests/``;
:mod:`.plugin` is the pytest plugin the selection runs under (stand-ins for the
Hub ids, the shim when the target is ours, a per-case outcome file);
:mod:`.suite` runs the selection in a subprocess and reads the outcomes;
``differences.toml`` lists every case PEFT passes and we do not, with its reason
(a row of docs/engine.md's table of differences).

``python tests/peft_suite/suite.py`` prints the figure docs/engine.md quotes.
"""

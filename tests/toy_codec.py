"""A storage form made up for the tests: PEFT's top-k tensors under other names, marked in the metadata.

Registering it must be all it takes for ``convert --to``, reading, the report
and the model card to know it (tests/test_codecs.py).
"""

from vblora_store.format.codecs.base import Codec, Decoded
from vblora_store.format.codecs.topk import CODEC as TOPK

PREFIX, MARK = "toy.", "vblora_store.toy"


class ToyCodec(Codec):
    label = "toy"
    report_label = "toy form stores"
    card_note = "- **toy**: PEFT's top-k tensors under other names (a form made up for the tests)."

    def detect(self, specs, metadata):
        return bool(metadata) and MARK in metadata

    def decode_tensors(self, specs, reader, metadata, config, path):
        views = {key.removeprefix(PREFIX): spec for key, spec in specs.items()}
        return Decoded(views, lambda key: reader(PREFIX + key))

    def encode(self, adapter, **options):
        tensors, _ = TOPK.encode(adapter)
        return {PREFIX + key: value for key, value in tensors.items()}, {MARK: "1"}

    def savable_params(self, counts, packing=None):
        return TOPK.savable_params(counts) + 1  # one more, to be told apart

    def data_bytes(self, counts):
        return TOPK.data_bytes(counts)


CODEC = ToyCodec()

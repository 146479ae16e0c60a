"""StructKV: structure-aware prefill and KV-cache compression for Hugging Face decoder models.

Three lines from a notebook::

    import structkv
    lm = structkv.load("smollm2-135m")
    print(lm.generate("Summarise: ...", method="structkv", chat=True).text)
"""

from structkv.errors import StructKVError
from structkv.generate import decode_step, generate_ids, generate_text
from structkv.methods import METHODS, get_method
from structkv.models import LoadedModel, load

__all__ = [
    "METHODS",
    "LoadedModel",
    "StructKVError",
    "decode_step",
    "generate_ids",
    "generate_text",
    "get_method",
    "load",
]

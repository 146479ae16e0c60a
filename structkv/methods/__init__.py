"""Registry of compression methods (kvpress style): one small dataclass per file.

Tests iterate :data:`METHODS`, so a method added here is covered by the shared checks.
"""

from __future__ import annotations

from structkv.errors import StructKVError
from structkv.methods.base import Method, prefill_shared
from structkv.methods.fastkv import FastKV
from structkv.methods.full import Full
from structkv.methods.gemfilter import GemFilter
from structkv.methods.pyramidkv import PyramidKV
from structkv.methods.snapkv import SnapKV
from structkv.methods.streamingllm import StreamingLLM
from structkv.methods.structkv import StructKV, StructKVPaper

METHODS: dict[str, type[Method]] = {
    cls.name: cls
    for cls in (Full, StreamingLLM, SnapKV, PyramidKV, GemFilter, FastKV, StructKVPaper, StructKV)
}


def get_method(name: str, **knobs) -> Method:
    """Instantiate a registered method; knobs left as None keep the method's defaults."""
    if name not in METHODS:
        raise StructKVError(f"unknown method {name!r}; choose one of {', '.join(METHODS)}")
    cls = METHODS[name]
    given = {k: v for k, v in knobs.items() if v is not None}
    unknown = sorted(set(given) - set(cls.knobs()))
    if unknown:
        raise StructKVError(
            f"method {name} has no parameter {', '.join(unknown)}; its parameters: "
            f"{', '.join(cls.knobs())}"
        )
    method = cls(**given)
    method.check_knobs()
    return method


def method_from_dict(config: dict) -> Method:
    """Inverse of :meth:`Method.to_dict`: the method a manifest or results file describes,
    validated like any other (so a hand-edited manifest cannot smuggle in a bad knob)."""
    if not isinstance(config, dict) or "name" not in config:
        raise StructKVError(f"not a method configuration: {config!r}")
    knobs = {k: v for k, v in config.items() if k != "name"}
    return get_method(config["name"], **knobs)


__all__ = ["METHODS", "Method", "get_method", "method_from_dict", "prefill_shared"] + [
    c.__name__ for c in METHODS.values()
]

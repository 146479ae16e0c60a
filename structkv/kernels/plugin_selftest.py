"""Run the TensorRT plugin's own ``enqueue`` on torch CUDA tensors, without TensorRT's library.

Why: ``StructKVCompact``'s device path (cubins, driver-API launcher, each kernel's arguments and
grid, the workspace layout) has to be checked on a GPU against the torch selection, and a GPU
machine may have no TensorRT. ``libstructkv_plugin_selftest.so`` (plugins_trt/tests/
pluginSelftest.cpp, built by CMake with the plugin) creates the plugin through its creator and
calls ``enqueue`` as TensorRT's runtime would; this module feeds it tensors and returns the
outputs. ``scripts/gpu_check.py`` (check ``plugin-enqueue``) compares them exactly with
:func:`reference`, the functions the ONNX Runtime reference op runs.
"""

from __future__ import annotations

import ctypes
from fractions import Fraction
from pathlib import Path

import torch

from structkv.selection import budget, gather_tokens, select_tokens, selected_count

_TYPES = {torch.float32: b"float32", torch.float16: b"float16", torch.bfloat16: b"bfloat16",
          torch.int64: b"int64", torch.int32: b"int32"}  # fmt: skip


class PluginError(RuntimeError):
    """The plugin refused its attributes/inputs or its enqueue failed (details on stderr)."""


def _ratio(r: float) -> tuple[int, int]:
    f = Fraction(r).limit_denominator(1_000_000)
    return f.numerator, f.denominator


def kept_count(r: float, n_prompt: int, n: int, window: int, chunk: int = 0) -> int:
    """Tokens a row of ``n`` scores keeps: min(ceil(R·N), n − w) + w, or in chunk mode the whole
    chunks, remainder and window :func:`structkv.selection.selected_count` counts (as the plugin
    declares)."""
    return selected_count(n, budget(r, n_prompt), window, chunk)


def reference(mode: str, inputs: list[torch.Tensor], r: float, window: int, pooling: int,
              pool_mode: str, chunk: int = 0) -> list[torch.Tensor]:  # fmt: skip
    """The torch path's selection and gather for the plugin's inputs (on their device). Chunk
    means are summed on the CPU: torch's CPU cumsum accumulates in float64 in index order (what
    the kernel reproduces), its CUDA cumsum in float32 by a parallel scan."""

    def keep_of(scores: torch.Tensor, k: int) -> torch.Tensor:
        on = scores.cpu() if chunk > 1 else scores
        return select_tokens(on, k, window, pooling, pool_mode, chunk).to(scores.device)

    if mode == "compact":
        hidden, centrality = inputs
        keep = keep_of(centrality, budget(r, centrality.shape[0]))
        return [hidden[:, keep], keep.to(torch.int64)]
    keys, values, saliency, positions, prompt_len = inputs
    keep = keep_of(saliency, budget(r, prompt_len.shape[0]))
    return [gather_tokens(keys, keep), gather_tokens(values, keep), positions[keep]]


class PluginSelftest:
    """The selftest library at ``path`` (``build/plugins_trt/libstructkv_plugin_selftest.so``)."""

    def __init__(self, path: str | Path) -> None:
        self.lib = ctypes.CDLL(str(path))
        args = [ctypes.c_char_p, ctypes.c_int32, ctypes.c_int32, ctypes.c_int32, ctypes.c_int32,
                ctypes.c_char_p, ctypes.c_int32, ctypes.c_int32, ctypes.POINTER(ctypes.c_int32),
                ctypes.POINTER(ctypes.c_int64), ctypes.POINTER(ctypes.c_char_p)]  # fmt: skip
        self.lib.structkv_selftest_workspace.argtypes = args
        self.lib.structkv_selftest_workspace.restype = ctypes.c_int64
        pointers = [ctypes.POINTER(ctypes.c_void_p)] * 2 + [ctypes.c_void_p] * 2
        self.lib.structkv_selftest_enqueue.argtypes = args + pointers
        self.lib.structkv_selftest_enqueue.restype = ctypes.c_int32

    @staticmethod
    def _describe(inputs: list[torch.Tensor]):
        n = len(inputs)
        nb = (ctypes.c_int32 * n)(*[t.dim() for t in inputs])
        dims = (ctypes.c_int64 * (8 * n))()
        for i, t in enumerate(inputs):
            for d, size in enumerate(t.shape):
                dims[8 * i + d] = size
        types = (ctypes.c_char_p * n)(*[_TYPES[t.dtype] for t in inputs])
        return n, nb, dims, types

    def run(self, mode: str, inputs: list[torch.Tensor], r: float = 0.2, window: int = 8,
            pooling: int = 7, pool_mode: str = "max",
            chunk: int = 0) -> list[torch.Tensor]:  # fmt: skip
        """The plugin's outputs for ``inputs`` (contiguous tensors on one CUDA device)."""
        num, den = _ratio(r)
        attrs = (mode.encode(), num, den, window, pooling, pool_mode.encode(), chunk)
        inputs = [t.contiguous() for t in inputs]
        described = self._describe(inputs)
        ws = self.lib.structkv_selftest_workspace(*attrs, *described)
        if ws < 0:
            raise PluginError(f"the plugin refused mode={mode!r} or its inputs (see stderr)")
        if mode == "compact":
            hidden, centrality = inputs
            k = kept_count(r, centrality.shape[0], centrality.shape[0], window, chunk)
            outputs = [hidden.new_empty((1, k, hidden.shape[2])),
                       torch.empty(k, dtype=torch.int64, device=hidden.device)]  # fmt: skip
        else:
            keys, _, saliency, _, prompt_len = inputs
            k = kept_count(r, prompt_len.shape[0], saliency.shape[-1], window, chunk)
            shape = (*keys.shape[:2], k)
            outputs = [keys.new_empty((*shape, keys.shape[3])) for _ in range(2)]
            outputs.append(torch.empty(shape, dtype=torch.int64, device=keys.device))
        device = inputs[0].device
        workspace = torch.empty(max(int(ws), 1), dtype=torch.uint8, device=device)
        ins = (ctypes.c_void_p * len(inputs))(*[t.data_ptr() for t in inputs])
        outs = (ctypes.c_void_p * len(outputs))(*[t.data_ptr() for t in outputs])
        stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
        status = self.lib.structkv_selftest_enqueue(*attrs, *described, ins, outs,
                                                    workspace.data_ptr(), stream)  # fmt: skip
        if status != 0:
            raise PluginError(f"the plugin's enqueue failed with status {status} (see stderr)")
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return outputs

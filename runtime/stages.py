"""The engine's stage backends: run a named graph on numpy inputs, return numpy outputs.

``OrtStages`` opens one ONNX Runtime session per graph (CPUExecutionProvider here; CUDA /
TensorRT execution providers when onnxruntime-gpu offers them). ``TorchStages`` runs the same
stage modules (:mod:`structkv.graphs`) eagerly on the Hugging Face model: the oracle the parity
tests compare ONNX Runtime with.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from structkv.errors import StructKVError
from structkv.graphs import GRAPH_NAMES

BACKENDS = ("onnxruntime", "torch")
GRAPHS = GRAPH_NAMES


class OrtStages:
    """One ONNX Runtime session per graph; ``run(name, **inputs)`` returns numpy outputs."""

    def __init__(
        self,
        directory: Path,
        threads: int | None = None,
        attention: str = "contrib",
        providers: list | None = None,
    ) -> None:
        import onnxruntime as ort

        available = ort.get_available_providers()
        if providers is None:  # the fastest this onnxruntime build offers
            providers = [
                p for p in ("TensorrtExecutionProvider", "CUDAExecutionProvider") if p in available
            ] + ["CPUExecutionProvider"]
        missing = [p for p in providers if (p if isinstance(p, str) else p[0]) not in available]
        if missing:
            raise StructKVError(
                f"execution provider(s) {missing} are not in this onnxruntime build (it has "
                f"{available}); install onnxruntime-gpu for CUDA, or run on CPU"
            )
        # names only, e.g. "CUDAExecutionProvider" (options such as device_id stay in sessions)
        self.providers = [p if isinstance(p, str) else p[0] for p in providers]
        from structkv.kernels import plugin_reference

        self.sessions = {}
        for name in GRAPHS:
            path = directory / f"{name}.onnx"
            options = self._options(name, threads, attention)
            if name in ("compact", "kv_select") and plugin_reference.is_plugin_graph(path):
                # a --target tensorrt engine: the StructKVCompact node by its reference op
                self.sessions[name] = plugin_reference.session(path, options, providers)
            else:
                self.sessions[name] = ort.InferenceSession(str(path), options, providers=providers)

    @staticmethod
    def _options(name: str, threads: int | None, attention: str):
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # ONNX Runtime sizes its pool from the machine's cores; a process pinned to fewer CPUs
        # (taskset, container cpusets) would oversubscribe them. Use the CPUs we may run on.
        opts.intra_op_num_threads = threads or len(os.sched_getaffinity(0))
        if attention == "structkv" and name in ("pre_pivot", "post_pivot"):
            from structkv.kernels import ort_ops

            ort_ops.register(opts)  # the prefill graphs' attention is StructKV's CPU kernel
            # Its own worker threads share the cores with ONNX Runtime's pool, whose threads
            # otherwise spin after each operator and steal them: 25 % of the attention time
            # at 4K on 2 cores (ORT profile, docs/BENCHMARKS.md).
            opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        return opts

    def run(self, name: str, **inputs) -> list[np.ndarray]:
        return self.sessions[name].run(None, inputs)


class TorchStages:
    """The same stage modules, run eagerly on the Hugging Face model (the parity oracle)."""

    def __init__(self, manifest: dict) -> None:
        import torch

        from structkv.graphs import DTYPES, stage_modules
        from structkv.manifest import method_from_manifest
        from structkv.models import load

        self.torch = torch
        model = load(manifest["model_id"]).model.to(DTYPES[manifest["dtype"]]).eval()
        self.modules = stage_modules(model, method_from_manifest(manifest))
        self.providers = ["torch"]

    def run(self, name: str, **inputs) -> list[np.ndarray]:
        torch = self.torch
        with torch.inference_mode():
            args = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in inputs.items()}
            out = self.modules[name](**args)
        # numpy has no bfloat16; fp32/fp16 stages hand over their own dtype, as ONNX Runtime does
        return [o.float().numpy() if o.dtype == torch.bfloat16 else o.numpy() for o in out]

"""The engine's stage backends: run a named graph on numpy inputs, return numpy outputs.

``OrtStages`` opens one ONNX Runtime session per graph (CPUExecutionProvider here; CUDA /
TensorRT execution providers when onnxruntime-gpu offers them). ``TorchStages`` runs the same
stage modules (:mod:`structkv.graphs`) eagerly on the Hugging Face model: the oracle the parity
tests compare ONNX Runtime with. ``TrtStages`` builds a TensorRT engine per graph of a
``--target tensorrt`` engine (with the StructKVCompact plugin library) and runs it on the GPU.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from structkv.errors import StructKVError
from structkv.graphs import GRAPH_NAMES
from structkv.selection import min_engine_tokens

BACKENDS = ("onnxruntime", "torch", "tensorrt")
#: A single-cut engine's graphs; a two-stage one has ``refine`` and ``post_refine`` too (its
#: manifest's ``graphs`` lists them).
GRAPHS = GRAPH_NAMES
#: The graphs that run prefill attention (StructKV's CPU attention kernel where registered).
PREFILL_GRAPHS = ("pre_pivot", "post_pivot", "post_refine")
#: The graphs a --target tensorrt engine holds as StructKVCompact plugin nodes.
SELECTION_GRAPHS = ("compact", "kv_select", "refine")


class OrtStages:
    """One ONNX Runtime session per graph; ``run(name, **inputs)`` returns numpy outputs."""

    def __init__(
        self,
        directory: Path,
        threads: int | None = None,
        attention: str = "contrib",
        providers: list | None = None,
        names: tuple[str, ...] = GRAPHS,
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

        self.names, self.sessions = tuple(names), {}
        for name in names:
            path = directory / f"{name}.onnx"
            options = self._options(name, threads, attention)
            if name in SELECTION_GRAPHS and plugin_reference.is_plugin_graph(path):
                # a --target tensorrt engine: the StructKVCompact node by its reference op
                self.sessions[name] = plugin_reference.session(path, options, providers)
            else:
                self.sessions[name] = _session(ort, path, options, providers)

    @staticmethod
    def _options(name: str, threads: int | None, attention: str):
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # ONNX Runtime sizes its pool from the machine's cores; a process pinned to fewer CPUs
        # (taskset, container cpusets) would oversubscribe them. Use the CPUs we may run on.
        opts.intra_op_num_threads = threads or len(os.sched_getaffinity(0))
        from structkv.kernels import ort_ops

        if attention in ort_ops.KERNELS and name in PREFILL_GRAPHS:
            ort_ops.register(opts)  # the prefill graphs' attention is StructKV's CPU kernel
            # Its own worker threads share the cores with ONNX Runtime's pool, whose threads
            # otherwise spin after each operator and steal them: 25 % of the attention time
            # at 4K on 2 cores (ORT profile, docs/BENCHMARKS.md).
            opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        return opts

    def run(self, name: str, **inputs) -> list[np.ndarray]:
        return self.sessions[name].run(None, inputs)


def _ort_device(device: str) -> tuple[str, int]:
    """A torch device string as IOBinding names it: ("cuda", 0) or ("cpu", 0)."""
    kind, _, index = device.partition(":")
    return kind, int(index or 0)


_ELEMENT = {"float32": np.float32, "float16": np.float16, "int64": np.int64}


def run_bound(session, device: str, transfers, host: dict, resident: dict, outputs: dict) -> None:
    """Run ``session`` with IOBinding: ``host`` numpy inputs are uploaded (counted in
    ``transfers``: they are the O(batch) ones), ``resident`` and ``outputs`` are torch tensors
    already on ``device``, read and written in place (no copy, whatever their size)."""
    import torch

    kind, index = _ort_device(device)
    io = session.io_binding()
    keep = []  # the uploaded tensors must outlive the run

    def bind(name: str, t, output: bool = False) -> None:
        t = t.contiguous()
        keep.append(t)
        element = _ELEMENT[str(t.dtype).removeprefix("torch.")]
        fn = io.bind_output if output else io.bind_input
        fn(name, kind, index, element, list(t.shape), t.data_ptr())

    for name, array in host.items():
        bind(name, transfers.upload(array, device))
    for name, t in resident.items():
        bind(name, t)
    for name, t in outputs.items():
        if not t.is_contiguous():
            raise ValueError(f"output {name} must be contiguous to be written in place")
        bind(name, t, output=True)
    if kind == "cuda":
        torch.cuda.synchronize(device)  # the pool's scatters (torch's stream) before ORT reads
    session.run_with_iobinding(io)
    io.synchronize_outputs()


def exact_u8s8_products() -> bool:
    """Whether ONNX Runtime's u8 x s8 integer products sum exactly on this CPU.

    A w8a8 engine's products are ``MatMulIntegerToFloat`` with uint8 activations and int8
    weights: the format VNNI and AMX multiply-add natively. x86 CPUs without them (AVX2 or
    AVX-512 without VNNI: AMD Zen 1-3, Intel before Cascade Lake) run ONNX Runtime's
    ``vpmaddubsw`` kernel, which adds each pair of products into a *saturating* int16: with
    activations near 255 and weights near ±127 the sum (up to 64 770) clips at 32 767 and the
    result is silently wrong (12 % relative error on random rows, tests/test_quant.py). ONNX
    Runtime's u8 x u8 kernel widens to int16 before multiplying and is exact everywhere.
    """
    import platform

    if platform.machine().lower() not in ("x86_64", "amd64", "i386", "i686"):
        return True  # ARM's kernels (NEON widening, UDOT/SDOT) accumulate in int32
    from structkv.kernels.ort_ops import cpu_flags

    return bool({"avx512_vnni", "avx_vnni", "amx_int8"} & set(cpu_flags().split()))


def unsigned_products(model) -> int:
    """Rewrite, in place, each ``MatMulIntegerToFloat`` whose weight is int8 (an initializer,
    or its ``Transpose``) into the exact u8 x u8 form: weight + 128 as uint8, zero point 128.
    The weights stay where they are (external data is not loaded); ONNX Runtime folds the
    ``Cast``/``Add`` chain into a uint8 constant when the session is created, so running the
    rewritten graph costs what an engine exported in that form would. Returns the count."""
    from onnx import TensorProto, helper

    graph = model.graph
    int8 = {t.name for t in graph.initializer if t.data_type == TensorProto.INT8}
    producers = {out: n for n in graph.node for out in n.output}

    def is_int8(name: str) -> bool:
        node = producers.get(name)
        if name in int8:
            return True
        return node is not None and node.op_type == "Transpose" and node.input[0] in int8

    nodes, count = [], 0
    for node in graph.node:
        if (
            node.op_type == "MatMulIntegerToFloat"
            and node.domain == "com.microsoft"
            and is_int8(node.input[1])
            and (len(node.input) < 6 or not node.input[5])
        ):
            b, tag = node.input[1], f"{node.name or node.output[0]}_u8"
            nodes += [
                helper.make_node("Cast", [b], [f"{tag}_i32"], to=TensorProto.INT32),
                helper.make_node("Add", [f"{tag}_i32", f"{tag}_128"], [f"{tag}_sum"]),
                helper.make_node("Cast", [f"{tag}_sum"], [f"{tag}_b"], to=TensorProto.UINT8),
            ]
            graph.initializer.extend([
                helper.make_tensor(f"{tag}_128", TensorProto.INT32, [], [128]),
                helper.make_tensor(f"{tag}_zp", TensorProto.UINT8, [], [128]),
            ])  # fmt: skip
            inputs = list(node.input) + [""] * (6 - len(node.input))
            inputs[1], inputs[5] = f"{tag}_b", f"{tag}_zp"
            del node.input[:]
            node.input.extend(inputs)
            count += 1
        nodes.append(node)
    if count:
        del graph.node[:]
        graph.node.extend(nodes)
    return count


def _session(ort, path: Path, options, providers):
    """An ONNX Runtime session, or one clear error when this build cannot run the graph (a
    quantised engine's ``MatMulNBits`` on a runtime without it, a dtype without kernels).
    On a CPU whose u8 x s8 products saturate (:func:`exact_u8s8_products`) a w8a8 graph is
    opened in the exact u8 x u8 form instead."""
    try:
        cpu = (providers[0] if isinstance(providers[0], str) else providers[0][0]).startswith("CPU")
        if cpu and not exact_u8s8_products():
            import onnx

            model = onnx.load(str(path), load_external_data=False)
            if unsigned_products(model):
                folder = "session.model_external_initializers_file_folder_path"
                options.add_session_config_entry(folder, str(path.parent.resolve()))
                return ort.InferenceSession(model.SerializeToString(), options, providers=providers)
        return ort.InferenceSession(str(path), options, providers=providers)
    except Exception as e:  # onnxruntime raises its own (unexported) exception types
        text = str(e)
        if (
            "NOT_IMPLEMENTED" not in text
            and "implementation" not in text
            and ("Unrecognized" not in text and "not a registered" not in text)
        ):
            raise
        ops = ("MatMulNBits", "GatherBlockQuantized", "MatMulIntegerToFloat")
        op = next((w for w in ops if w in text), None)
        hint = (
            f"this onnxruntime {ort.__version__} build has no {op} kernel for "
            f"{', '.join(p if isinstance(p, str) else p[0] for p in providers)}: the engine was "
            "exported with --quant; install onnxruntime >= 1.22 (CPU) or onnxruntime-gpu, or "
            "re-export without --quant"
            if op
            else "this onnxruntime build cannot run one of its operators; re-export the engine "
            "with the defaults (--dtype fp32, no --quant) or use a newer onnxruntime"
        )
        first = text.strip().splitlines()[0][:300]
        raise StructKVError(f"{path.name}: {hint} ({first})") from None


class TorchStages:
    """The same stage modules, run eagerly on the Hugging Face model (the parity oracle)."""

    def __init__(self, manifest: dict) -> None:
        import torch

        from structkv.graphs import DTYPES, stage_modules
        from structkv.manifest import method_from_manifest
        from structkv.models import load

        self.torch = torch
        model = load(manifest["model_id"]).model.to(DTYPES[manifest["dtype"]]).eval()
        if manifest.get("quant"):  # the same quantised weights the engine's graphs hold
            from structkv.quant import QuantSpec, fake_quantize

            fake_quantize(model, QuantSpec.from_dict(manifest["quant"]))
        self.modules = stage_modules(model, method_from_manifest(manifest))
        self.names, self.providers = tuple(self.modules), ["torch"]

    def run(self, name: str, **inputs) -> list[np.ndarray]:
        torch = self.torch
        with torch.inference_mode():
            args = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in inputs.items()}
            out = self.modules[name](**args)
        # numpy has no bfloat16; fp32/fp16 stages hand over their own dtype, as ONNX Runtime does
        return [o.float().numpy() if o.dtype == torch.bfloat16 else o.numpy() for o in out]


#: Ranges of the dynamic axes (named by the exporter, manifest ``graphs[g]["dynamic"]``) for
#: TensorRT's optimisation profile, as functions of the engine's limits.
def _axis_ranges(manifest: dict, num_blocks: int, block: int, max_batch: int) -> dict:
    window = manifest["method"]["window"]
    least = min_engine_tokens(window, manifest["method"].get("chunk", 0))
    tokens = manifest.get("max_prompt_tokens") or 4096
    layers = manifest["config"]["num_hidden_layers"]
    per_seq = -(-tokens // block) + 1
    return {
        "n": (least, 512, tokens),
        "prompt": (least, 512, tokens),
        "kept": (window + 1, 256, tokens),
        "propagated": (least, 256, tokens),  # a two-stage engine's refine input
        "layers": (1, layers, layers),
        "batch": (1, min(8, max_batch), max_batch),
        "max_blocks": (1, min(8, per_seq), per_seq),
        "blocks": (1, num_blocks, num_blocks),
        "block": (block, block, block),
    }


class TrtStages:
    """TensorRT engines of the engine's graphs (five; seven when it refines), built at load
    (one optimisation profile each, ranges from the engine's limits) and run on the current
    CUDA device through torch tensors.

    Needs a ``--target tensorrt`` engine (plugin nodes, attention TensorRT builds), the
    ``tensorrt`` package, a GPU and the plugin library (``STRUCTKV_TRT_PLUGIN``, default
    ``build/plugins_trt/libnvinfer_plugin_structkv.so`` of this checkout). Inputs and outputs
    stay numpy, like the other backends: the paged KV pool is host memory and crosses to the
    device at every decode step (a device-resident pool is future work, issue 17)."""

    def __init__(self, directory: Path, manifest: dict, num_blocks: int, block: int) -> None:
        try:
            import tensorrt as trt
            import torch
        except ImportError as e:
            raise StructKVError(f"the tensorrt backend needs tensorrt and torch: {e}") from None
        if not torch.cuda.is_available():
            raise StructKVError("the tensorrt backend needs a CUDA device; none is visible")
        if manifest.get("target") != "tensorrt":
            raise StructKVError(
                f"{directory} was exported for ONNX Runtime; re-export it with --target tensorrt"
            )
        if any("dynamic" not in io for io in manifest["graphs"].values()):
            raise StructKVError(f"{directory} predates TensorRT support; re-export it")
        plugin = Path(
            os.environ.get("STRUCTKV_TRT_PLUGIN")
            or Path(__file__).resolve().parents[1]
            / "build/plugins_trt/libnvinfer_plugin_structkv.so"
        )
        if not plugin.is_file():
            raise StructKVError(
                f"StructKVCompact plugin library not found at {plugin}: build it (cmake -S . -B "
                "build && cmake --build build) or set STRUCTKV_TRT_PLUGIN"
            )
        self.trt, self.torch = trt, torch
        self.logger = trt.Logger(trt.Logger.WARNING)
        trt.get_plugin_registry().load_library(str(plugin))
        ranges = _axis_ranges(manifest, num_blocks, block, max_batch=16)
        fp16 = manifest["dtype"] == "fp16"
        self.names, self.engines, self.contexts = tuple(manifest["graphs"]), {}, {}
        for name in manifest["graphs"]:
            engine = self._build(directory / f"{name}.onnx", manifest["graphs"][name], ranges, fp16)
            self.engines[name] = engine
            self.contexts[name] = engine.create_execution_context()
        self.providers = ["TensorRT"]
        self.stream = torch.cuda.Stream()

    def _build(self, path: Path, io: dict, ranges: dict, fp16: bool):
        trt = self.trt
        builder = trt.Builder(self.logger)
        network = builder.create_network(0)
        parser = trt.OnnxParser(network, self.logger)
        if not parser.parse_from_file(str(path)):
            raise StructKVError(f"TensorRT cannot parse {path.name}: {parser.get_error(0)}")
        config = builder.create_builder_config()
        if fp16 and hasattr(trt.BuilderFlag, "FP16"):
            config.set_flag(trt.BuilderFlag.FP16)
        profile = builder.create_optimization_profile()
        declared = {i["name"]: i["shape"] for i in io["inputs"]}
        for tensor, axes in io["dynamic"].items():
            shape = declared[tensor]
            lo, opt, hi = ([d if isinstance(d, int) else 1 for d in shape] for _ in range(3))
            for axis, dim in axes.items():
                lo[int(axis)], opt[int(axis)], hi[int(axis)] = ranges[dim]
            profile.set_shape(tensor, lo, opt, hi)
        config.add_optimization_profile(profile)
        blob = builder.build_serialized_network(network, config)
        if blob is None:
            raise StructKVError(f"TensorRT could not build {path.name} (see its log above)")
        return trt.Runtime(self.logger).deserialize_cuda_engine(blob)

    def run(self, name: str, **inputs) -> list[np.ndarray]:
        trt, torch = self.trt, self.torch
        engine, context = self.engines[name], self.contexts[name]
        keep = []
        for key, value in inputs.items():
            tensor = torch.from_numpy(np.ascontiguousarray(value)).cuda()
            keep.append(tensor)
            context.set_input_shape(key, tuple(value.shape))
            context.set_tensor_address(key, tensor.data_ptr())
        dtypes = {
            trt.float32: torch.float32,
            trt.float16: torch.float16,
            trt.int64: torch.int64,
            trt.int32: torch.int32,
        }
        outputs = []
        for i in range(engine.num_io_tensors):
            key = engine.get_tensor_name(i)
            if engine.get_tensor_mode(key) != trt.TensorIOMode.OUTPUT:
                continue
            out = torch.empty(
                tuple(context.get_tensor_shape(key)),
                dtype=dtypes[engine.get_tensor_dtype(key)],
                device="cuda",
            )
            context.set_tensor_address(key, out.data_ptr())
            outputs.append(out)
        if not context.execute_async_v3(self.stream.cuda_stream):
            raise StructKVError(f"TensorRT failed to run {name}")
        self.stream.synchronize()
        return [o.cpu().numpy() for o in outputs]

"""``structkv-export``: trace a supported model into a two-phase StructKV engine directory.

Why torch.onnx's dynamo exporter (``torch.export`` + ONNX opset 23): it keeps the sequence axes
symbolic through our data-dependent budgets (``ceil(R · N)`` becomes a shape expression), and
maps SDPA / RMSNorm / RoPE to the opset-23 ``Attention``, ``RMSNormalization`` and
``RotaryEmbedding`` operators that ONNX Runtime fuses; the TorchScript exporter specialises the
lengths and unrolls attention into MatMul/Softmax.

Layout of an engine (see :mod:`structkv.manifest` for the manifest):
``pre_pivot.onnx``, ``compact.onnx``, ``post_pivot.onnx``, ``kv_select.onnx``, ``decode.onnx``
(a two-stage engine, ``--refine-layer``, also ``refine.onnx`` and ``post_refine.onnx``),
``weights.bin`` (every weight once, graphs reference it by offset), ``tokenizer/``,
``manifest.json``. It is built in a temporary sibling directory and renamed into place, so an
interrupted export never leaves a half-written engine.

The weights are never all in memory (export/checkpoint.py): the graphs are traced from a model
of placeholder parameters, then each weight is streamed from the checkpoint's safetensors into
``weights.bin`` once, so models larger than the machine's memory export.
"""

from __future__ import annotations

import errno
import io as io_module
import logging
import os
import resource
import shutil
import sys
import tempfile
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from structkv.errors import StructKVError
from structkv.export.checkpoint import (
    SafetensorsCheckpoint,
    StateDictCheckpoint,
    bind_weights,
    check_disk_space,
    checkpoint_names,
    defer_weights,
    pending_tensors,
    placeholder_model,
    unvalued,
    vectors,
)
from structkv.export.fusion import fuse_causal_attention
from structkv.export.quant import quantize_graph, stream_if_quantized
from structkv.export.weights import WeightStore
from structkv.graphs import DTYPES, graph_names, stage_modules
from structkv.kernels import ort_ops
from structkv.knobs import add_method_args, method_knobs
from structkv.layers import head_dims
from structkv.manifest import FORMAT_VERSION, describe_io, write_manifest
from structkv.methods import StructKV, get_method
from structkv.profile import find_profile
from structkv.quant import QuantSpec
from structkv.selection import min_engine_tokens

OPSET = 23
ATTENTION = ("auto", "structkv", "structkv-bf16", "contrib", "onnx", "explicit")
#: onnxruntime: every stage as ONNX graphs ONNX Runtime runs. tensorrt: the selection graphs as
#: StructKVCompact plugin nodes, attention in a form TensorRT builds (export/tensorrt.py).
TARGETS = ("onnxruntime", "tensorrt")


@dataclass
class ExportSettings:
    """What an export bakes in: the method's configuration (the same :class:`StructKV` type the
    CLI, the manifest and the engine read; ``pivot`` "auto" reads the model's calibration
    profile and calibrates when there is none) plus the engine's dtype and attention kernel."""

    method: StructKV = field(default_factory=StructKV)
    dtype: str = "fp32"
    #: Causal attention in the prefill graphs. "structkv": StructKV's CPU kernel, an ONNX
    #: Runtime custom op built on first use (``structkv.kernels.ort_ops``; fp32; fastest on
    #: CPU); "structkv-bf16": the same kernel with both products in bf16 (fp32 accumulation and
    #: softmax; 2x faster where the CPU has AVX512-BF16); "contrib": ONNX Runtime's
    #: GroupQueryAttention (CPU and CUDA, no extra library);
    #: "onnx": the standard opset-23 Attention operator, for other runtimes (TensorRT's parser).
    #: "explicit": MatMul / Softmax, plain operators every TensorRT builds in any dtype and with
    #: the decode step's mask (where TensorRT has no dedicated Attention kernel).
    #: "auto": structkv for fp32 when a C++ compiler can build it here, else contrib.
    attention: str = "auto"
    target: str = "onnxruntime"
    #: Weight-only quantisation (``--quant int8|int4 --group-size G``): every weight matrix as
    #: ONNX Runtime's MatMulNBits / GatherBlockQuantized (export/quant.py); None: the dtype.
    quant: QuantSpec | None = None
    #: A calibration profile file made elsewhere (``structkv calibrate --out``, on a machine
    #: that holds the model); default: the one found for the model id, if any.
    profile: Path | None = None

    def resolved_attention(self) -> str:
        """The attention kernel this export will use ("auto" decided for this machine)."""
        if self.attention != "auto":
            return self.attention
        if self.target == "tensorrt":
            return "explicit"
        return "structkv" if self.dtype == "fp32" and ort_ops.available() else "contrib"

    def check(self) -> None:
        if self.dtype not in DTYPES:
            raise StructKVError(
                f"unsupported --dtype {self.dtype!r}; choose one of {', '.join(DTYPES)}"
            )
        if self.attention not in ATTENTION:
            raise StructKVError(
                f"unsupported --attention {self.attention!r}; choose one of {', '.join(ATTENTION)}"
            )
        if self.target not in TARGETS:
            raise StructKVError(
                f"unsupported --target {self.target!r}; choose one of {', '.join(TARGETS)}"
            )
        if self.target == "tensorrt" and self.attention in (*ort_ops.KERNELS, "contrib"):
            raise StructKVError(
                f"--attention {self.attention} is an ONNX Runtime operator TensorRT cannot parse; "
                "with --target tensorrt use --attention explicit (the default) or onnx"
            )
        if self.attention in ort_ops.KERNELS and self.dtype != "fp32":
            raise StructKVError(
                f"--attention {self.attention} is an fp32 CPU kernel (fp32 tensors in and out); "
                f"with --dtype {self.dtype} use "
                "--attention contrib (ONNX Runtime's GroupQueryAttention also runs on CUDA)"
            )
        if self.quant is not None and self.target == "tensorrt":
            raise StructKVError(
                "--quant makes ONNX Runtime MatMulNBits nodes, which TensorRT's ONNX parser does "
                "not read; export --target tensorrt without --quant (TensorRT quantises itself)"
            )
        if self.quant is not None and self.quant.per_token and self.dtype != "fp32":
            raise StructKVError(
                f"--quant w8a8 with --dtype {self.dtype}: ONNX Runtime's MatMulIntegerToFloat "
                "produces fp32 here; use --dtype fp32 (the default) with --quant w8a8"
            )
        if self.quant is not None and self.dtype == "bf16":
            raise StructKVError(
                "--quant with --dtype bf16: ONNX Runtime's CPU MatMulNBits takes fp32 "
                "activations (and its CPU provider has no bf16 kernels at all); use --dtype fp32 "
                "(the default) or fp16 with --quant"
            )
        self.method.check_knobs()
        self.method.check_engine()  # the budgets; the pivot is checked once the model is known


# torch.onnx announces every optional torchvision op it cannot register; not our business.
logging.getLogger("torch.onnx").setLevel(logging.ERROR)


def _log(msg: str) -> None:
    print(f"[structkv-export] {msg}", file=sys.stderr, flush=True)


def check_out_dir(out: Path, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise StructKVError(f"--out {out} exists and is not a directory; choose another path")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise StructKVError(
            f"--out {out} exists and is not empty; pass --force to replace it or choose another"
        )


#: The paper's operating point, which an engine without a profile is exported at: prefill
#: compute reduced by 40 % (the deepest fixed pivot whose compute fraction is <= 0.6).
PAPER_COMPUTE = 0.6


def resolve_method(src, settings: ExportSettings, log=_log) -> tuple[StructKV, str, dict | None]:
    """The StructKV configuration the engine bakes in, where its pivot came from, and the
    calibration profile it was read from. Without a profile the export does not calibrate (a
    model too big for this machine's memory cannot be): it says so and uses the paper preset
    with a fixed pivot, the deepest layer at the paper's compute fraction 0.6; ``--pivot`` and
    ``--lambda`` override."""
    from structkv.calibration import max_pivot_under_cap
    from structkv.methods.structkv import PAPER_LAMBDA

    num_layers = src.config.num_hidden_layers
    method, profile = settings.method, None
    if method.pivot == "auto":
        profile = read_profile(settings.profile, num_layers) if settings.profile else None
        profile = profile or find_profile(src.model_id)
        source = f"calibration profile {settings.profile}" if settings.profile else (
            "calibration profile")  # fmt: skip
        if profile is None:
            pivot = max_pivot_under_cap(num_layers, method.r_struct, PAPER_COMPUTE)
            lam = method.lam if method.lam is not None else PAPER_LAMBDA
            log(
                f"no calibration profile for {src.model_id}: exporting the paper preset (lambda "
                f"{lam}, fixed pivot {pivot}: prefill compute fraction <= {PAPER_COMPUTE}); "
                f"pass --pivot/--lambda to choose, or calibrate on a machine that holds the model "
                f"(`structkv calibrate --model {src.model_id}`, docs/DEPLOY.md) and export again"
            )
            method = replace(method, pivot=pivot, lam=lam)
            source = "paper preset (no calibration profile)"
    else:
        source = "fixed by --pivot"
    method, _ = method.with_profile(profile)
    method.check_engine(num_layers)
    return method, source, profile


def read_profile(path: Path, num_layers: int) -> dict:
    """A profile file given with ``--profile``: it must be a profile of a model of this depth."""
    import json

    try:
        profile = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise StructKVError(f"--profile {path}: cannot read it ({e}); pass a profile JSON "
                            "written by `structkv calibrate --out`") from None  # fmt: skip
    if not isinstance(profile, dict) or "pivot" not in profile or "lambda" not in profile:
        raise StructKVError(f"--profile {path} is not a calibration profile (no pivot/lambda)")
    if profile.get("num_layers") != num_layers:
        raise StructKVError(
            f"--profile {path} was calibrated for a {profile.get('num_layers')}-layer model; "
            f"this one has {num_layers} layers: calibrate this model"
        )
    return profile


def _export(
    module,
    args: tuple,
    dynamic: dict,
    names: tuple[list[str], list[str]],
    attention: str,
    quant: QuantSpec | None = None,
):
    """Trace ``module`` (a stage of a placeholder model) to an ``onnx_ir`` model whose weights
    are pending (:func:`structkv.export.checkpoint.defer_weights`)."""
    from contextlib import nullcontext

    from structkv.layers import explicit_attention

    spelled = explicit_attention() if attention == "explicit" else nullcontext()
    with warnings.catch_warnings(), spelled:
        warnings.simplefilter("ignore")
        # Budgets such as min(ceil(R·N), N - w) are beyond the shape solver: keep them as
        # runtime asserts instead of failing (or silently specialising N).
        exported = torch.export.export(
            module,
            args,
            dynamic_shapes=dynamic,
            strict=False,
            prefer_deferred_runtime_asserts_over_guards=True,
        )
        program = torch.onnx.export(
            exported,
            dynamo=True,
            opset_version=OPSET,
            input_names=names[0],
            output_names=names[1],
            verbose=False,
            optimize=False,  # first the weights: the optimizer would fold their transposes
        )
        pending = defer_weights(program.model, checkpoint_names(module))
        with unvalued(pending), _without_slices_split():
            program.optimize()
    if attention in ("contrib", *ort_ops.KERNELS):
        fuse_causal_attention(program.model, attention)
    if quant is not None:
        quantize_graph(program.model, quant)
    return program.model


#: onnxscript rewrite rules left out of ``program.optimize()``. SlicesSplit matches a pair of
#: Slice nodes (a two-root pattern), which its matcher searches pairwise over the whole graph: on
#: the 30-layer SmolLM2 decode graph it took 73 of the optimizer's 82 s, and it never fires on
#: our graphs (their Slices are not the halves of a known last dimension), so the optimized
#: graphs are the same without it (tests/test_export.py compares them).
SKIPPED_REWRITES = frozenset({"SlicesSplit"})


@contextmanager
def _without_slices_split():
    """onnxscript's optimizer with the rules in :data:`SKIPPED_REWRITES` left out, for the
    duration of one ``optimize()`` call. The rule table is a private module global that
    ``optimize_ir`` reads at call time; where a future onnxscript no longer has it, nothing is
    changed (the export is only slower)."""
    from onnxscript import rewriter

    rules = getattr(rewriter, "_DEFAULT_REWRITE_RULES", None)
    if not isinstance(rules, tuple):
        yield
        return
    rewriter._DEFAULT_REWRITE_RULES = tuple(
        r for r in rules if getattr(r, "name", None) not in SKIPPED_REWRITES
    )
    try:
        yield
    finally:
        rewriter._DEFAULT_REWRITE_RULES = rules


def build_graphs(model, method, dtype: torch.dtype):
    """(name, module, example args, dynamic shapes, input names, output names) per graph: a
    flat table of what to trace (the modules themselves are :func:`structkv.graphs.stage_modules`).
    """
    cfg = model.config
    num_layers = len(model.model.layers)
    _, g, d = head_dims(model)
    modules = stage_modules(model, method)
    e = cfg.hidden_size
    # the shortest prompt, and the fewest tokens a selection keeps: with chunks, the window
    # and one whole chunk (the chunk selection needs one to choose; select_tokens)
    least = min_engine_tokens(method.window, method.chunk)
    fewest = method.window + (method.chunk if method.chunk > 1 else 1)
    n_dim = torch.export.Dim("n", min=least)
    k_dim = torch.export.Dim("kept", min=fewest)
    big_n = torch.export.Dim("prompt", min=least)
    l_dim = torch.export.Dim("layers", min=1)
    n, kept = max(64, 4 * least), max(29, 2 * least + 1)  # example sizes: distinct, > least
    ids = torch.randint(0, cfg.vocab_size, (1, n))
    hidden = torch.randn(1, n, e, dtype=dtype)
    b_dim, m_dim = torch.export.Dim("batch", min=1), torch.export.Dim("max_blocks", min=1)
    nb_dim, blk_dim = torch.export.Dim("blocks", min=1), torch.export.Dim("block", min=1)
    b, m, nb, blk = 2, 3, 7, 5
    return [
        (
            "pre_pivot",
            modules["pre_pivot"],
            (ids,),
            {"input_ids": {1: n_dim}},
            ["input_ids"],
            ["hidden", "keys", "values", "saliency", "centrality", "metrics"],
        ),
        (
            "compact",
            modules["compact"],
            (hidden, torch.rand(n)),
            {"hidden": {1: n_dim}, "centrality": {0: n_dim}},
            ["hidden", "centrality"],
            ["hidden_compact", "positions"],
        ),
        *(
            _refine_graphs(modules, hidden[:, :kept], n, big_n, k_dim, least)
            or [
                (
                    "post_pivot",
                    modules["post_pivot"],
                    (hidden[:, :kept], torch.arange(kept) * 2),
                    {"hidden": {1: k_dim}, "positions": {0: k_dim}},
                    ["hidden", "positions"],
                    ["keys", "values", "saliency", "logits"],
                )
            ]
        ),
        (
            "kv_select",
            modules["kv_select"],
            (
                torch.randn(3, g, kept, d, dtype=dtype),
                torch.randn(3, g, kept, d, dtype=dtype),
                torch.rand(3, g, kept),
                torch.arange(kept) * 2,
                torch.zeros(n, dtype=torch.int64),
            ),
            {
                "keys": {0: l_dim, 2: k_dim},
                "values": {0: l_dim, 2: k_dim},
                "saliency": {0: l_dim, 2: k_dim},
                "positions": {0: k_dim},
                "prompt_len": {0: big_n},
            },
            ["keys", "values", "saliency", "positions", "prompt_len"],
            ["kept_keys", "kept_values", "kept_positions"],
        ),
        (
            "decode",
            modules["decode"],
            (
                torch.randint(0, cfg.vocab_size, (b,)),
                torch.tensor([40, 50]),
                torch.randint(0, nb, (b, m)),
                torch.tensor([9, 14]),
                torch.randn(num_layers, nb, g, blk, d, dtype=dtype),
                torch.randn(num_layers, nb, g, blk, d, dtype=dtype),
                torch.randint(0, 40, (num_layers, nb, g, blk)),
            ),
            {
                "input_ids": {0: b_dim},
                "positions": {0: b_dim},
                "block_tables": {0: b_dim, 1: m_dim},
                "context_lens": {0: b_dim},
                "k_pool": {1: nb_dim, 3: blk_dim},
                "v_pool": {1: nb_dim, 3: blk_dim},
                "pos_pool": {1: nb_dim, 3: blk_dim},
            },
            [
                "input_ids",
                "positions",
                "block_tables",
                "context_lens",
                "k_pool",
                "v_pool",
                "pos_pool",
            ],
            ["logits", "new_keys", "new_values"],
        ),
    ]


def _refine_graphs(modules: dict, hidden: torch.Tensor, n: int, big_n, k_dim, least: int) -> list:
    """A two-stage engine's graphs (:data:`structkv.graphs.REFINE_GRAPH_NAMES`): its
    ``post_pivot`` also takes the centrality and hands the folded one on, ``refine`` cuts
    again, ``post_refine`` runs the last layers. [] for a single-cut engine.

    ``refine`` selects, so it takes what ``compact`` takes: at least ``least`` tokens (axis
    "propagated"). Fewer are propagated only at token level with one non-window token, which
    any refinement keeps whole; the runtime then skips the graph (Engine.prefill)."""
    if "refine" not in modules:
        return []
    kept = hidden.shape[1]
    positions = torch.arange(kept) + (n - kept)  # ascending original positions, inside [0, n)
    p_dim = torch.export.Dim("propagated", min=least)
    layer_out = ["keys", "values", "saliency"]
    return [
        (
            "post_pivot",
            modules["post_pivot"],
            (hidden, positions, torch.rand(n)),
            {"hidden": {1: k_dim}, "positions": {0: k_dim}, "centrality": {0: big_n}},
            ["hidden", "positions", "centrality"],
            [*layer_out, "hidden_out", "centrality_out"],
        ),
        (
            "refine",
            modules["refine"],
            (hidden, positions, torch.rand(kept), torch.zeros(n, dtype=torch.int64)),
            {
                "hidden": {1: p_dim},
                "positions": {0: p_dim},
                "centrality": {0: p_dim},
                "prompt_len": {0: big_n},
            },
            ["hidden", "positions", "centrality", "prompt_len"],
            ["hidden_refined", "positions_refined"],
        ),
        (
            "post_refine",
            modules["post_refine"],
            (hidden, positions),
            {"hidden": {1: k_dim}, "positions": {0: k_dim}},
            ["hidden", "positions"],
            [*layer_out, "logits"],
        ),
    ]


def export_engine(
    model_name: str,
    out: Path,
    settings: ExportSettings,
    force: bool = False,
    log=_log,
    progress: bool = True,
    jobs: int | None = None,
) -> Path:
    """Export ``model_name`` to the engine directory ``out`` (a progress bar per graph on
    stderr unless ``progress`` is False) with ``jobs`` tracing processes (default: 2 where two
    CPUs are usable); returns ``out``."""
    from structkv.models import locate

    settings.check()
    jobs = jobs or default_jobs()
    out = Path(out)
    check_out_dir(out, force)
    start = time.perf_counter()
    attention = settings.resolved_attention()
    if attention in ort_ops.KERNELS:
        ort_ops.library_path()  # build it now: a compiler problem fails before any tracing
    if attention == "structkv-bf16" and not ort_ops.has_bf16():
        log("attention kernel: structkv-bf16 computes in fp32 on this CPU (no AVX512-BF16)")
    log(f"attention kernel: {attention}")
    src = locate(model_name)
    if settings.quant is not None:
        check_quant_widths(src.config, settings.quant)
    dtype = DTYPES[settings.dtype]
    method, source, profile = resolve_method(src, settings, log)
    quant = "" if settings.quant is None else (
        ", weights int8 per channel, activations int8 per token (w8a8)"
        if settings.quant.per_token else
        f", weights {settings.quant.name} in groups of {settings.quant.group}")  # fmt: skip
    log(
        f"{src.model_id}: pivot {method.pivot} ({source}), lambda {method.lam}, "
        f"dtype {settings.dtype}{quant}"
    )
    if src.directory is not None:
        checkpoint = SafetensorsCheckpoint(src.directory)
    else:
        checkpoint = StateDictCheckpoint(src.model)
    small, names = vectors(checkpoint), frozenset(checkpoint.names())
    model = placeholder_model(src.config, dtype, small, names)

    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        remove_stale(out)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-{os.getpid()}-", dir=out.parent))
    except OSError as e:
        raise StructKVError(
            f"cannot write the engine next to --out {out}: {e.strerror or e} in {out.parent}; "
            "choose a writable directory"
        ) from None
    try:
        store = WeightStore(tmp)
        io = _trace_graphs(
            (src.config, small, names), model, method, settings.dtype, attention, store, tmp, log,
            progress, jobs, settings.quant,
        )  # fmt: skip
        _stream_weights(tmp, graph_names(method), checkpoint, store, dtype, log, progress)
        for name in io:
            onnx_check(tmp / f"{name}.onnx")
        if settings.target == "tensorrt":
            _plugin_graphs(tmp, method, io, log)
        peak_mb = _finish_engine(tmp, src, method, source, profile, settings, attention, io,
                                 store, start, jobs)  # fmt: skip
        _move_into_place(tmp, out)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if e.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT):
            raise StructKVError(
                f"the disk under {out.parent} is full or a file size limit was reached while "
                f"writing the engine ({e.strerror}); nothing was kept: free space (or raise the "
                "limit, `ulimit -f`) and export again"
            ) from None
        raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log(
        f"engine written to {out} in {time.perf_counter() - start:.0f} s "
        f"(format {FORMAT_VERSION}, peak RSS {peak_mb:.0f} MiB, weights "
        f"{store.bytes / 2**20:.0f} MiB)"
    )
    return out


def check_quant_widths(config, spec: QuantSpec) -> None:
    """Before any tracing: the group must divide the input width of every quantised matrix
    (hidden size, attention output width, MLP width)."""
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    for width, what in (
        (config.hidden_size, "q/k/v, gate/up, the LM head and the embedding (hidden size)"),
        (heads * head_dim, "o_proj (heads x head_dim)"),
        (config.intermediate_size, "down_proj (MLP width)"),
    ):
        spec.check_width(width, what)


def onnx_check(path: Path) -> None:
    import onnx

    onnx.checker.check_model(str(path), full_check=True)


def _stream_weights(tmp: Path, names, checkpoint, store, dtype, log, progress) -> None:
    """Every graph's pending weights from the checkpoint into ``weights.bin``, each tensor
    read once; refused up front when the disk cannot hold them."""
    from tqdm import tqdm

    graphs = [tmp / f"{name}.onnx" for name in names]
    pending = pending_tensors(graphs)
    total = sum(pending.values())
    check_disk_space(tmp, total + 2**20)
    t = time.perf_counter()
    bar = tqdm(total=total, desc="weights", unit="B", unit_scale=True, file=sys.stderr,
               disable=not progress)  # fmt: skip
    try:
        bind_weights(graphs, checkpoint, store, dtype, bar, derived=stream_if_quantized)
    finally:
        bar.close()
        store.close()
    log(
        f"{len(pending)} weights ({total / 2**20:.0f} MiB) streamed from the checkpoint in "
        f"{time.perf_counter() - t:.1f} s"
    )


def _plugin_graphs(tmp: Path, method, io: dict, log) -> None:
    """--target tensorrt: the selection graphs as StructKVCompact nodes, checked like the rest
    (their entries in ``io`` updated; the dynamic axes are the traced graphs')."""
    import onnx

    from structkv.export.tensorrt import rewrite_engine_graphs

    rewritten = rewrite_engine_graphs(tmp, method)
    for name in rewritten:
        onnx.checker.check_model(str(tmp / f"{name}.onnx"), full_check=True)
        io[name].update(describe_io(onnx.load(str(tmp / f"{name}.onnx"), load_external_data=False)))
    files = " and ".join(f"{name}.onnx" for name in rewritten)
    log(f"{files}: StructKVCompact plugin nodes (TensorRT target)")


def _finish_engine(tmp, src, method, source, profile, settings, attention, io, store, start, jobs):
    """Tokenizer and manifest (hashes of every file) into ``tmp``; returns the peak RSS (MiB)."""
    if src.tokenizer is not None:
        src.tokenizer.save_pretrained(tmp / "tokenizer")
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    # the decode graph's tracing process (jobs > 1), alive at the same time as this one
    worker_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    write_manifest(
        tmp,
        model_id=src.model_id,
        config=src.config.to_dict(),
        method=method,
        pivot_source=source,
        profile=profile,
        dtype=settings.dtype,
        attention=attention,
        target=settings.target,
        quant=None if settings.quant is None else settings.quant.to_dict(),
        graphs=io,
        export_stats={
            "seconds": round(time.perf_counter() - start, 1),
            "peak_rss_mb": round(peak_mb, 1),
            "peak_rss_worker_mb": round(worker_mb, 1),
            "jobs": jobs,
            "weights_bytes": store.bytes,
            "torch": torch.__version__,
            "onnx": _onnx_version(),
        },
    )
    return peak_mb


def _onnx_version() -> str:
    import onnx

    return onnx.__version__


def _trace(
    model, method, dtype, attention, store, directory: Path, names, log, bar, quant=None
) -> dict:
    """Trace the graphs ``names`` into ``directory``, weights externalised into ``store``."""
    import onnx
    import onnx_ir

    io = {}
    with torch.inference_mode(False), torch.no_grad():
        for name, module, args, dynamic, in_names, out_names in build_graphs(model, method, dtype):
            if name not in names:
                continue
            if bar is not None:
                bar.set_postfix_str(f"tracing {name}")
            t = time.perf_counter()
            ir_model = _export(module, args, dynamic, (in_names, out_names), attention, quant)
            store.externalize_ir(ir_model)
            path = directory / f"{name}.onnx"
            onnx_ir.save(ir_model, path)
            del ir_model
            io[name] = describe_io(onnx.load(path, load_external_data=False))
            # the dynamic axes by meaning ("n", "batch", ...): ONNX keeps only symbol names, and
            # a TensorRT build needs a range per axis (runtime.stages.TrtStages)
            io[name]["dynamic"] = {
                inp: {str(axis): dim.__name__ for axis, dim in axes.items()}
                for inp, axes in dynamic.items()
            }
            if log is not None:
                log(f"{name}.onnx traced in {time.perf_counter() - t:.1f} s")
            if bar is not None:
                bar.update(1)
    return io


def _trace_worker(
    source, dtype: str, method: dict, attention: str, directory: str, verbose: bool, quant=None
):
    """A spawned process's share of an export: the decode graph (its small constants into its
    own weights file; its weights stay pending)."""
    from structkv.methods import method_from_dict

    config, packed, names = source
    small = torch.load(io_module.BytesIO(packed), weights_only=True)
    model = placeholder_model(config, DTYPES[dtype], small, names)
    out = Path(directory)
    store = WeightStore(out, PART_WEIGHTS)
    log = _log if verbose else None
    io = _trace(
        model, method_from_dict(method), DTYPES[dtype], attention, store, out, REMOTE, log, None,
        quant,
    )  # fmt: skip
    store.close()
    return io


#: Traced in a second process when ``jobs`` > 1: the largest graph (every layer), about half of
#: the tracing time; torch.export and the ONNX passes run on one core, so the other one idles.
REMOTE = ("decode",)
PART_WEIGHTS = "weights.part.bin"


def default_jobs() -> int:
    return min(2, len(os.sched_getaffinity(0)))


def _trace_graphs(
    source, model, method, dtype_name, attention, store, tmp, log, progress, jobs, quant=None
):
    """Trace every stage graph into ``tmp`` (constants in ``store``, weights pending; with
    ``jobs`` > 1 the decode graph in a spawned process at the same time), and return their I/O
    descriptions for the manifest."""
    import multiprocessing

    from tqdm import tqdm

    remote = REMOTE if jobs > 1 else ()
    wanted = graph_names(method)
    local = [n for n in wanted if n not in remote]
    bar = tqdm(
        total=len(wanted), desc="export", unit="graph", file=sys.stderr, disable=not progress
    )
    part = tmp / ".part"
    # A Pool, not a ProcessPoolExecutor: on an error or Ctrl-C here the worker is terminated
    # instead of waited for; on success it is closed and joined (no leaked semaphores).
    pool = multiprocessing.get_context("spawn").Pool(1) if remote else None
    try:
        pending = None
        if pool is not None:
            part.mkdir()
            verbose = log is _log
            # tensors as torch.save bytes: pickling them through the pool passes shared-memory
            # handles, which a spawned worker could not always open
            config, small, names = source
            packed = io_module.BytesIO()
            torch.save(small, packed)
            args = ((config, packed.getvalue(), names), dtype_name, method.to_dict(), attention,
                    str(part), verbose, quant)  # fmt: skip
            pending = pool.apply_async(_trace_worker, args)
        io = _trace(
            model, method, DTYPES[dtype_name], attention, store, tmp, local, log, bar, quant
        )
        if pending is not None:
            io.update(pending.get())
            bar.update(len(remote))
            pool.close()
    except BaseException:
        if pool is not None:
            pool.terminate()
        raise
    finally:
        if pool is not None:
            pool.join()
        bar.close()  # also on an error: its line ends, so `error:` starts its own
    for name in remote:
        os.replace(part / f"{name}.onnx", tmp / f"{name}.onnx")
        store.absorb(tmp / f"{name}.onnx", part / PART_WEIGHTS)
    shutil.rmtree(part, ignore_errors=True)
    return {name: io[name] for name in wanted}


def remove_stale(out: Path) -> None:
    """Temporary directories of exports to ``out`` whose process is gone (killed: no cleanup
    ran) are removed; they never load (the manifest is written last), but they take space."""
    for path in out.parent.glob(f".{out.name}.tmp-*-*"):
        pid = path.name.removeprefix(f".{out.name}.tmp-").split("-", 1)[0]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(path, ignore_errors=True)
    for path in out.parent.glob(f".{out.name}.old-*"):  # --force without an atomic swap
        if _alive_any(path):
            continue
        if not out.exists() and (path / "engine").is_dir():  # killed between its two renames
            os.replace(path / "engine", out)
        shutil.rmtree(path, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _alive_any(path: Path) -> bool:
    """An ``.old-PID-`` directory's owner is alive (older spelling without a pid: assume not)."""
    pid = path.name.rsplit(".old-", 1)[-1].split("-", 1)[0]
    return pid.isdigit() and _alive(int(pid))


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    done = renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange)
    return done == 0


def _move_into_place(tmp: Path, out: Path) -> None:
    """Atomic when ``out`` does not exist; with --force the old engine goes only after the new
    one is complete. mkdtemp/mkstemp create owner-only modes: give the engine normal ones."""
    umask = os.umask(0)
    os.umask(umask)
    for path in (tmp, *tmp.rglob("*")):
        path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)
    if out.exists():
        # --force: one atomic swap, so `out` is the old engine or the new one at every instant
        # (a kill after it leaves the old one in tmp, removed by the next export)
        if _exchange(tmp, out):
            shutil.rmtree(tmp, ignore_errors=True)
            return
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-{os.getpid()}-", dir=out.parent))
        os.replace(out, old / "engine")
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)


def build_parser():
    """``structkv-export``'s options (the method knobs are :mod:`structkv.knobs`'s table)."""

    from structkv.knobs import Parser

    p = Parser(prog="structkv-export", description="Export a model to a two-phase StructKV engine.")
    p.add_argument("--model", default="smollm2-135m", help="alias, HF directory or .gguf")
    p.add_argument("--out", required=True, help="engine directory (refused if not empty)")
    p.add_argument("--force", action="store_true", help="replace a non-empty --out")
    p.add_argument(
        "--jobs",
        type=int,
        help="tracing processes: 2 traces the decode graph beside the others (default: 2 where "
        "two CPUs are usable, else 1; neither holds the weights)",
    )
    add_method_args(p)
    p.add_argument(
        "--profile",
        help="a calibration profile JSON made on another machine (`structkv calibrate --out`); "
        "default: the model's own profile if calibrated here, else the paper preset",
    )
    p.add_argument("--dtype", default="fp32", help="fp32 (default) | fp16 | bf16")
    p.add_argument(
        "--quant",
        default="none",
        help="none (default) | int8 | int4: weight-only block quantisation of every weight "
        "matrix (projections, MLP, LM head, embedding) as ONNX Runtime MatMulNBits / "
        "GatherBlockQuantized, activations quantised to int8 per block inside the product | "
        "w8a8: int8 weights per output channel and int8 activations per token, integer GEMMs "
        "(MatMulIntegerToFloat; the fastest prefill on CPUs with VNNI/AMX)",
    )
    p.add_argument(
        "--quant-compute",
        default="int8",
        choices=("int8", "fp32"),
        help="with --quant: int8 (default; activations quantised per block, int8 dot products: "
        "MatMulNBits accuracy_level 4) | fp32 (weights dequantised, fp32 products: level 0)",
    )
    p.add_argument(
        "--group-size",
        type=int,
        help="input features per quantisation scale with --quant: 16 | 32 (default) | 64 | 128 "
        "| 256; must divide the model's hidden, attention and MLP widths",
    )
    p.add_argument(
        "--attention",
        default="auto",
        help="auto (default: structkv for fp32 when a C++ compiler is present, else contrib) | "
        "structkv (StructKV's CPU kernel, an ONNX Runtime custom op built on first use) | "
        "structkv-bf16 (the same, products in bf16: 2x faster on CPUs with AVX512-BF16) | "
        "contrib (ONNX Runtime's GroupQueryAttention; CPU and CUDA) | onnx (standard opset-23 "
        "Attention, for other runtimes) | explicit (MatMul/Softmax: what TensorRT builds in any "
        "dtype, masks included; the default with --target tensorrt)",
    )
    p.add_argument(
        "--target",
        default="onnxruntime",
        choices=TARGETS,
        help="onnxruntime (default) | tensorrt (compact / kv_select as StructKVCompact plugin "
        "nodes for TensorRT's ONNX parser, attention explicit; ONNX Runtime still runs it with "
        "the plugin's reference op)",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    """``structkv-export --model M --out DIR [--pivot auto|N] [--lambda X] [--dtype ...]``."""
    p = build_parser()
    try:
        args = p.parse_args(argv)  # a bad --pivot is a StructKVError from its type function
        settings = ExportSettings(
            method=get_method("structkv", **method_knobs(args)),
            dtype=args.dtype,
            attention=args.attention,
            target=args.target,
            profile=Path(args.profile) if args.profile else None,
            quant=QuantSpec.parse(args.quant, args.group_size, args.quant_compute),
        )
        if args.jobs is not None and args.jobs < 1:
            raise StructKVError(f"--jobs must be 1 or more, got {args.jobs}")
        export_engine(args.model, Path(args.out), settings, force=args.force, jobs=args.jobs)
    except StructKVError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

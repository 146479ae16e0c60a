"""Run an exported engine: two-phase prefill (pre_pivot -> compact -> post_pivot -> kv_select),
then batched decoding on the paged KV cache with ``decode.onnx``.

Backends: ``onnxruntime`` (CPUExecutionProvider here; CUDA / TensorRT execution providers when
onnxruntime-gpu offers them) and ``torch``, which runs the same stage modules eagerly on the
Hugging Face model: the oracle the parity tests compare ONNX Runtime with.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from structkv.errors import StructKVError
from structkv.export.manifest import read_manifest
from structkv.runtime.kv_cache import DEFAULT_BLOCK_SIZE, PagedKVCache

BACKENDS = ("onnxruntime", "torch")
GRAPHS = ("pre_pivot", "compact", "post_pivot", "kv_select", "decode")
_NP_DTYPES = {"fp32": np.float32, "fp16": np.float16}


class OrtStages:
    """One ONNX Runtime session per graph; ``run(name, **inputs)`` returns numpy outputs."""

    def __init__(
        self, directory: Path, threads: int | None = None, attention: str = "contrib"
    ) -> None:
        import onnxruntime as ort

        available = ort.get_available_providers()
        providers = [
            p for p in ("TensorrtExecutionProvider", "CUDAExecutionProvider") if p in available
        ] + ["CPUExecutionProvider"]
        self.providers = providers
        self.sessions = {
            name: ort.InferenceSession(
                str(directory / f"{name}.onnx"),
                self._options(name, threads, attention),
                providers=providers,
            )
            for name in GRAPHS
        }

    @staticmethod
    def _options(name: str, threads: int | None, attention: str):
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # ONNX Runtime sizes its pool from the machine's cores; a process pinned to fewer CPUs
        # (taskset, container cpusets) would oversubscribe them. Use the CPUs we may run on.
        opts.intra_op_num_threads = threads or len(os.sched_getaffinity(0))
        if attention == "structkv" and name in ("pre_pivot", "post_pivot"):
            from structkv.runtime import ort_ops

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

        from structkv.export import graphs
        from structkv.export.exporter import DTYPES
        from structkv.models import load

        self.torch = torch
        model = load(manifest["model_id"]).model.to(DTYPES[manifest["dtype"]]).eval()
        m = manifest["method"]
        self.modules = {
            "pre_pivot": graphs.PrePivot(model, m["pivot"], m["window"], m["lambda"]),
            "compact": graphs.Compact(m["r_struct"], m["window"], m["pooling"], m["pool_mode"]),
            "post_pivot": graphs.PostPivot(model, m["pivot"], m["window"]),
            "kv_select": graphs.KVSelect(m["r_kv"], m["window"], m["pooling"], m["pool_mode"]),
            "decode": graphs.DecodeStep(model),
        }
        self.providers = ["torch"]

    def run(self, name: str, **inputs) -> list[np.ndarray]:
        torch = self.torch
        with torch.inference_mode():
            args = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in inputs.items()}
            out = self.modules[name](**args)
        # numpy has no bfloat16; fp32/fp16 stages hand over their own dtype, as ONNX Runtime does
        return [o.float().numpy() if o.dtype == torch.bfloat16 else o.numpy() for o in out]


@dataclass
class PrefillOutput:
    logits: np.ndarray  # [V] at the last prompt token
    keys: np.ndarray  # [L, G, K, D] kept per layer and KV head
    values: np.ndarray
    positions: np.ndarray  # [L, G, K]
    stats: dict = field(default_factory=dict)


@dataclass
class _Running:
    tokens: list[int]
    next_position: int
    max_new_tokens: int
    done: bool = False


class Engine:
    """An engine directory loaded for inference; see :meth:`load`."""

    def __init__(self, directory: Path, manifest: dict, stages, tokenizer, cache) -> None:
        self.directory, self.manifest, self.stages = directory, manifest, stages
        self.tokenizer, self.cache = tokenizer, cache
        self._running: dict[int, _Running] = {}
        self._next_id = 0

    @classmethod
    def load(
        cls,
        directory: str | Path,
        backend: str = "onnxruntime",
        kv_cache_mb: float = 512,
        block_size: int = DEFAULT_BLOCK_SIZE,
        verify: bool = True,
        threads: int | None = None,
    ) -> Engine:
        """Verify the manifest (format version, every file's sha256) and open the graphs."""
        directory = Path(directory)
        if backend not in BACKENDS:
            raise StructKVError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
        manifest = read_manifest(directory, verify=verify)
        if manifest["dtype"] not in _NP_DTYPES:
            raise StructKVError(
                f"{directory} is a {manifest['dtype']} engine; this runtime keeps its paged KV "
                "cache in numpy, which has no bfloat16: re-export with --dtype fp32 or fp16"
            )
        stages = (
            OrtStages(directory, threads, manifest.get("attention", "onnx"))
            if backend == "onnxruntime"
            else TorchStages(manifest)
        )
        tokenizer = None
        if manifest.get("tokenizer"):
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(directory / "tokenizer")
        cfg = manifest["config"]
        head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
        cache = PagedKVCache.from_megabytes(
            kv_cache_mb,
            cfg["num_hidden_layers"],
            cfg["num_key_value_heads"],
            head_dim,
            block_size,
            _NP_DTYPES[manifest["dtype"]],
        )
        return cls(directory, manifest, stages, tokenizer, cache)

    # -- prefill -----------------------------------------------------------------------------
    def check_prompt(self, n: int, max_new_tokens: int) -> None:
        window = self.manifest["method"]["window"]
        limit = self.manifest.get("max_prompt_tokens")
        if n < window + 2:
            raise StructKVError(
                f"prompt of {n} tokens is too short for the observation window ({window}): the "
                f"engine needs at least {window + 2} tokens; use a longer prompt"
            )
        if limit is not None and n + max_new_tokens > limit:
            raise StructKVError(
                f"prompt of {n} tokens plus {max_new_tokens} new tokens exceeds the engine's "
                f"maximum of {limit}; shorten the prompt or lower --max-new-tokens"
            )

    def prefill(self, input_ids) -> PrefillOutput:
        """Compressed prefill of one prompt (``[N]`` token ids); nothing enters the cache yet."""
        ids = np.asarray(input_ids, dtype=np.int64)
        n = int(ids.shape[0])
        run = self.stages.run
        timings = {}
        t = time.perf_counter()
        hidden, keys_a, values_a, sal_a, centrality, metrics = run("pre_pivot", input_ids=ids[None])
        t = _tick(timings, "pre_pivot", t)
        hidden_c, positions_c = run("compact", hidden=hidden, centrality=centrality)
        t = _tick(timings, "compact", t)
        keys_b, values_b, sal_b, logits = run("post_pivot", hidden=hidden_c, positions=positions_c)
        t = _tick(timings, "post_pivot", t)
        dummy = np.zeros(n, dtype=np.int64)  # its length carries N into the budget
        ka, va, pa = run(
            "kv_select",
            keys=keys_a,
            values=values_a,
            saliency=sal_a,
            positions=np.arange(n, dtype=np.int64),
            prompt_len=dummy,
        )
        kb, vb, pb = run(
            "kv_select",
            keys=keys_b,
            values=values_b,
            saliency=sal_b,
            positions=positions_c,
            prompt_len=dummy,
        )
        _tick(timings, "kv_select", t)
        pivot = self.manifest["method"]["pivot"]
        num_layers = pivot + 1 + keys_b.shape[0]
        m = self.manifest["method"]
        kv_tokens = [int(ka.shape[2])] * (pivot + 1) + [int(kb.shape[2])] * keys_b.shape[0]
        per_token = 2 * ka.shape[1] * ka.shape[3] * ka.itemsize  # K and V, all heads of a layer
        stats = {
            "method": m["name"],
            "backend": self.stages.providers[0],
            "prompt_tokens": n,
            "num_layers": num_layers,
            "pivot_layer": pivot,
            "pivot_rule": m["pivot_source"],
            "lam": m["lambda"],
            "kv_bytes": per_token * sum(kv_tokens),
            "kv_bytes_full": per_token * num_layers * n,
            "propagated_tokens": int(positions_c.shape[0]),
            "kv_tokens_per_layer": [int(ka.shape[2])] * (pivot + 1)
            + [int(kb.shape[2])] * keys_b.shape[0],
            "compute_fraction": ((pivot + 1) * n + keys_b.shape[0] * positions_c.shape[0])
            / (num_layers * n),
            "entropy": metrics[:, 0].tolist(),
            "sparsity": metrics[:, 1].tolist(),
            "variance": metrics[:, 2].tolist(),
            "timings": timings,
            "prefill_s": sum(timings.values()),
        }
        return PrefillOutput(
            logits[0],
            np.concatenate([ka, kb]),
            np.concatenate([va, vb]),
            np.concatenate([pa, pb]),
            stats,
        )

    # -- requests and batched decoding ---------------------------------------------------------
    def add_request(self, input_ids, max_new_tokens: int) -> tuple[int, PrefillOutput]:
        """Prefill, admit into the paged cache (refused with a clear error if it cannot fit) and
        take the first token greedily. Returns the request id and the prefill output."""
        if max_new_tokens < 1:
            raise StructKVError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        n = len(input_ids)
        self.check_prompt(n, max_new_tokens)
        out = self.prefill(input_ids)
        seq = self._next_id
        self.cache.admit(seq, out.keys.shape[2], reserve=max_new_tokens - 1)
        self._next_id += 1
        self.cache.write(seq, out.keys, out.values, out.positions)
        self._running[seq] = _Running([int(out.logits.argmax())], n, max_new_tokens)
        return seq, out

    def step(self, eos_ids: tuple[int, ...] = ()) -> None:
        """One decode step for every unfinished request, as one batch."""
        active = [
            s
            for s, r in self._running.items()
            if not r.done and len(r.tokens) < r.max_new_tokens and r.tokens[-1] not in eos_ids
        ]
        for s, r in self._running.items():
            if s not in active:
                r.done = True
        if not active:
            return
        tables, lengths = self.cache.batch_tables(active)
        positions = np.asarray([self._running[s].next_position for s in active], dtype=np.int64)
        tokens = np.asarray([self._running[s].tokens[-1] for s in active], dtype=np.int64)
        logits, new_k, new_v = self.stages.run(
            "decode",
            input_ids=tokens,
            positions=positions,
            block_tables=tables,
            context_lens=lengths,
            k_pool=self.cache.keys,
            v_pool=self.cache.values,
            pos_pool=self.cache.positions,
        )
        for i, s in enumerate(active):
            r = self._running[s]
            self.cache.append(s, new_k[:, i], new_v[:, i], r.next_position)
            r.next_position += 1
            r.tokens.append(int(logits[i].argmax()))

    def finish(self, seq: int) -> list[int]:
        """Release a request's blocks (finished or cancelled) and return its tokens."""
        r = self._running.pop(seq, None)
        if r is None:
            raise StructKVError(f"request {seq} is not running")
        self.cache.release(seq)
        return r.tokens

    def generate_batch(
        self, prompts: list, max_new_tokens: int = 32, eos_ids: tuple[int, ...] = ()
    ) -> list[list[int]]:
        """Greedy generation for several prompts at once (decode batched across them)."""
        seqs = []
        try:
            for ids in prompts:
                seqs.append(self.add_request(ids, max_new_tokens)[0])
            while any(not self._running[s].done for s in seqs):
                self.step(eos_ids)
            return [self._running[s].tokens for s in seqs]
        finally:
            for s in seqs:
                if s in self._running:
                    self.finish(s)

    def generate(self, input_ids, max_new_tokens: int = 32) -> tuple[list[int], dict]:
        """Greedy generation of one prompt; stats as ``structkv generate --json`` reports them."""
        eos = self.eos_ids()
        seq, out = self.add_request(input_ids, max_new_tokens)
        start = time.perf_counter()
        try:
            while not self._running[seq].done:
                self.step(eos)
            decode_s = time.perf_counter() - start
        finally:
            tokens = self.finish(seq)
        stats = dict(out.stats)
        steps = max(0, len(tokens) - 1)
        stats["decode_tokens_per_s"] = steps / decode_s if decode_s > 0 else 0.0
        stats["new_tokens"] = len(tokens)
        return tokens, stats

    def eos_ids(self) -> tuple[int, ...]:
        ids = set()
        for value in (
            self.manifest["config"].get("eos_token_id"),
            getattr(self.tokenizer, "eos_token_id", None),
        ):
            if isinstance(value, int):
                ids.add(value)
            elif isinstance(value, list):
                ids.update(value)
        return tuple(sorted(ids))


def _tick(timings: dict, key: str, start: float) -> float:
    now = time.perf_counter()
    timings[key] = timings.get(key, 0.0) + now - start
    return now

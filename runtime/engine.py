"""Run an exported engine: two-phase prefill (pre_pivot -> compact -> post_pivot -> kv_select;
a two-stage engine cuts once more: post_pivot -> refine -> post_refine), then decoding on the
paged KV cache with ``decode.onnx``.

:class:`Engine` loads an engine directory and offers primitives that hold no request state:
:meth:`Engine.prefill` (one prompt, nothing enters the cache), :meth:`Engine.admit` (a prefilled
prompt into the paged cache), :meth:`Engine.decode` (one step for any set of admitted sequences)
and :meth:`Engine.release`. Who runs which request when is the caller's business:
:class:`structkv.runtime.batch.Batch` for a fixed set of prompts, a scheduler for a server.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from structkv.errors import StructKVError
from structkv.generate import eos_ids_of
from structkv.manifest import method_from_manifest, read_manifest
from structkv.prefill import PrefillStats
from structkv.runtime.kv_cache import DEFAULT_BLOCK_SIZE, PagedKVCache
from structkv.runtime.stages import BACKENDS, OrtStages, TorchStages, TrtStages
from structkv.selection import min_engine_tokens

_NP_DTYPES = {"fp32": np.float32, "fp16": np.float16}
#: The paged-cache sequence an uncompressed prefill borrows (callers number theirs with ints).
_SCRATCH = "uncompressed-prefill"


@dataclass
class PrefillOutput:
    logits: np.ndarray  # [V] at the last prompt token
    keys: np.ndarray  # [L, G, K, D] kept per layer and KV head
    values: np.ndarray
    positions: np.ndarray  # [L, G, K]
    stats: dict = field(default_factory=dict)


class Engine:
    """An engine directory loaded for inference; see :meth:`load`."""

    def __init__(self, directory: Path, manifest: dict, stages, tokenizer, cache) -> None:
        self.directory, self.manifest, self.stages = directory, manifest, stages
        self.tokenizer, self.cache = tokenizer, cache
        self.method = method_from_manifest(manifest)  # the same config type as the torch path

    @classmethod
    def load(
        cls,
        directory: str | Path,
        backend: str = "onnxruntime",
        kv_cache_mb: float = 512,
        block_size: int = DEFAULT_BLOCK_SIZE,
        verify: bool = True,
        threads: int | None = None,
        providers: list | None = None,
        kv_device: str | None = "auto",
    ) -> Engine:
        """Verify the manifest (format version, every file's sha256) and open the graphs.

        ``providers``: ONNX Runtime execution providers, as ``InferenceSession`` takes them
        (names or ``(name, options)``); by default the fastest the installed build offers. A
        server pins them (one GPU per Triton instance, or CPU only).

        ``kv_device``: where the paged KV pool lives. ``None``: host numpy (what ONNX Runtime's
        CPU provider reads in place); ``"cuda:N"`` (or ``"cpu"``, the same code on the host):
        allocated once on that device, decode bound to it with IOBinding, so a step moves
        O(batch) bytes; ``"auto"``: the GPU when the session runs on CUDA / TensorRT."""
        directory = Path(directory)
        if backend not in BACKENDS:
            raise StructKVError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
        manifest = read_manifest(directory, verify=verify)
        if manifest["dtype"] not in _NP_DTYPES:
            raise StructKVError(
                f"{directory} is a {manifest['dtype']} engine, which this runtime does not run: "
                "ONNX Runtime's CPU provider has no bf16 kernel for MatMul, Gemm, Add, Mul, "
                "RMSNormalization or attention (docs/BENCHMARKS.md) and its Python API returns "
                "no bf16 arrays; re-export with --dtype fp32 (on CPU add --quant int8 for "
                "smaller, faster weights) or --dtype fp16"
            )
        cfg = manifest["config"]
        head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
        if backend == "onnxruntime":
            attention = manifest.get("attention", "onnx")
            stages = OrtStages(directory, threads, attention, providers, tuple(manifest["graphs"]))
        elif backend == "tensorrt":
            stages = None  # built below, once the pool's size is known
        else:
            stages = TorchStages(manifest)
        kv_device = _kv_device(kv_device, backend, stages)
        cache = PagedKVCache.from_megabytes(
            kv_cache_mb,
            cfg["num_hidden_layers"],
            cfg["num_key_value_heads"],
            head_dim,
            block_size,
            _NP_DTYPES[manifest["dtype"]],
            device=kv_device,
        )
        if backend == "tensorrt":
            stages = TrtStages(directory, manifest, cache.num_blocks, block_size)
        tokenizer = None
        if manifest.get("tokenizer"):
            from transformers import AutoTokenizer

            try:
                tokenizer = AutoTokenizer.from_pretrained(directory / "tokenizer")
            except (OSError, ValueError) as e:
                raise StructKVError(
                    f"{directory / 'tokenizer'} cannot be loaded ({str(e)[:200]}); re-export "
                    "the engine"
                ) from None
            if len(tokenizer) > cfg["vocab_size"]:
                raise StructKVError(
                    f"the engine's tokenizer has {len(tokenizer)} tokens; the model's embedding "
                    f"has {cfg['vocab_size']}: the tokenizer is from another model (ids past "
                    "the embedding would fail inside the graphs); re-export the engine"
                )
        return cls(directory, manifest, stages, tokenizer, cache)

    # -- prefill -----------------------------------------------------------------------------
    def check_prompt(self, n: int, max_new_tokens: int) -> None:
        limit = self.manifest.get("max_prompt_tokens")
        if n < 1:
            raise StructKVError("the prompt is empty; send at least one token")
        if limit is not None and n + max_new_tokens > limit:
            raise StructKVError(
                f"prompt of {n} tokens plus {max_new_tokens} new tokens exceeds the engine's "
                f"maximum of {limit}; shorten the prompt or lower --max-new-tokens"
            )

    def compresses(self, n: int) -> bool:
        """Whether an ``n``-token prompt takes the compressed prefill. A prompt shorter than
        the observation window plus one chunk has nothing to select from (the prefill graphs
        are traced for at least that many tokens), so it is prefilled uncompressed instead."""
        return n >= min_engine_tokens(self.method.window, self.method.chunk)

    def prefill(self, input_ids) -> PrefillOutput:
        """Compressed prefill of one prompt (``[N]`` token ids); nothing enters the cache yet."""
        ids = np.asarray(input_ids, dtype=np.int64)
        n = int(ids.shape[0])
        if not self.compresses(n):
            return self._prefill_uncompressed(ids)
        run, timings = self.stages.run, {}
        t = time.perf_counter()
        hidden, keys_a, values_a, sal_a, centrality, metrics = run("pre_pivot", input_ids=ids[None])
        t = _tick(timings, "pre_pivot", t)
        hidden_c, positions_c = run("compact", hidden=hidden, centrality=centrality)
        t = _tick(timings, "compact", t)
        dummy = np.zeros(n, dtype=np.int64)  # its length carries N into the budgets
        # (keys, values, saliency, positions) of each run of layers: full length, after the
        # pivot and, in a two-stage engine, after the refine layer
        runs = [(keys_a, values_a, sal_a, np.arange(n, dtype=np.int64))]
        if "refine" in self.stages.names:
            keys_b, values_b, sal_b, hidden_m, centrality_m = run(
                "post_pivot", hidden=hidden_c, positions=positions_c, centrality=centrality
            )
            t = _tick(timings, "post_pivot", t)
            hidden_r, positions_r = hidden_m, positions_c
            if self.compresses(int(positions_c.shape[0])):  # else one token besides the window,
                # which the refinement keeps too (the graph is traced for >= window + 2 tokens)
                hidden_r, positions_r = run("refine", hidden=hidden_m, positions=positions_c,
                                            centrality=centrality_m, prompt_len=dummy)  # fmt: skip
            t = _tick(timings, "refine", t)
            keys_r, values_r, sal_r, logits = run("post_refine", hidden=hidden_r,
                                                  positions=positions_r)  # fmt: skip
            t = _tick(timings, "post_refine", t)
            runs += [(keys_b, values_b, sal_b, positions_c), (keys_r, values_r, sal_r, positions_r)]
        else:
            keys_b, values_b, sal_b, logits = run(
                "post_pivot", hidden=hidden_c, positions=positions_c
            )
            t = _tick(timings, "post_pivot", t)
            runs.append((keys_b, values_b, sal_b, positions_c))
        kept = [
            run("kv_select", keys=k, values=v, saliency=s, positions=p, prompt_len=dummy)
            for k, v, s, p in runs
        ]
        _tick(timings, "kv_select", t)
        stats = self._stats(n, metrics, [r[3].shape[0] for r in runs], kept, timings)
        return PrefillOutput(
            logits[0],
            np.concatenate([k[0] for k in kept]),
            np.concatenate([k[1] for k in kept]),
            np.concatenate([k[2] for k in kept]),
            stats,
        )

    def _prefill_uncompressed(self, ids: np.ndarray) -> PrefillOutput:
        """A short prompt, whole: fed token by token through the decode graph into a scratch
        sequence of the paged pool, whose K/V are then read back. Why decode: every engine
        has it, on every backend, for any length from one token, and its attention over the
        pool is exactly full attention; a prompt under window + chunk tokens costs at most
        that many decode steps. The scratch blocks are freed before the caller admits."""
        n, start = int(ids.shape[0]), time.perf_counter()
        self.cache.admit(_SCRATCH, 0, reserve=n)  # CacheFull (nothing allocated) if no room
        try:
            for position, token in enumerate(ids.tolist()):
                logits = self.decode([_SCRATCH], [token], [position])
            keys, values, positions = self.cache.gather(_SCRATCH)
        finally:
            self.cache.release(_SCRATCH)
        num_layers = int(keys.shape[0])
        stats = PrefillStats(
            self.method.name,
            n,
            num_layers,
            pivot_rule="none: uncompressed, the prompt is shorter than window + chunk",
            propagated_tokens=n,
            prefill_s=time.perf_counter() - start,
            timings={"decode": time.perf_counter() - start},
        )
        per_token = 2 * keys.shape[1] * keys.shape[3] * keys.itemsize
        out = stats.complete([n] * num_layers, num_layers * n, per_token).to_json()
        out["backend"] = self.stages.providers[0]
        out["compressed"] = False
        return PrefillOutput(np.asarray(logits[0]), keys, values, positions, out)

    def _stats(self, n: int, metrics, tokens: list[int], kept: list, timings: dict) -> dict:
        """The same :class:`~structkv.prefill.PrefillStats` the torch path reports. ``tokens``:
        the tokens each run of layers saw (N, the propagated ones, the refined ones); ``kept``:
        each run's kv_select outputs."""
        layers = [int(k[0].shape[0]) for k in kept]
        pivot = self.method.pivot
        stats = PrefillStats(
            self.method.name,
            n,
            sum(layers),
            pivot_layer=pivot,
            pivot_rule="fixed",
            lam=self.method.lam,
            propagated_tokens=int(tokens[1]),
            prefill_s=sum(timings.values()),
            timings=timings,
            entropy=metrics[:, 0].tolist(),
            sparsity=metrics[:, 1].tolist(),
            variance=metrics[:, 2].tolist(),
        )
        if len(tokens) > 2:
            stats.refine_layer, stats.refined_tokens = self.method.refine_layer, int(tokens[2])
        kv_tokens = [int(k[0].shape[2]) for k in kept for _ in range(k[0].shape[0])]
        tokens_run = sum(int(t) * count for t, count in zip(tokens, layers))
        ka = kept[0][0]
        per_token = 2 * ka.shape[1] * ka.shape[3] * ka.itemsize  # K and V, all heads of a layer
        out = stats.complete(kv_tokens, tokens_run, per_token).to_json()
        out["backend"] = self.stages.providers[0]
        out["pivot_source"] = self.manifest.get("pivot_source")
        out["compressed"] = True
        return out

    # -- the paged cache and decoding ----------------------------------------------------------
    def admit(self, seq: int, out: PrefillOutput, reserve: int) -> None:
        """Put a prefilled prompt into the paged cache as sequence ``seq``, with room for
        ``reserve`` decoded tokens (refused with the numbers if the pool cannot hold it)."""
        self.cache.admit(seq, out.keys.shape[2], reserve=reserve)
        self.cache.write(seq, out.keys, out.values, out.positions)

    def decode(self, seqs: list[int], tokens: list[int], positions: list[int]) -> np.ndarray:
        """One decode step for admitted sequences ``seqs`` (one batch): each takes its token
        at its position; the new K/V go into the cache. Returns logits ``[len(seqs), V]``."""
        tables, lengths = self.cache.batch_tables(seqs)
        if self.cache.device is not None:
            return self._decode_resident(seqs, tokens, positions, tables, lengths)
        logits, new_k, new_v = self.stages.run(
            "decode",
            input_ids=np.asarray(tokens, dtype=np.int64),
            positions=np.asarray(positions, dtype=np.int64),
            block_tables=tables,
            context_lens=lengths,
            k_pool=self.cache.keys,
            v_pool=self.cache.values,
            pos_pool=self.cache.positions,
        )
        self.cache.append_batch(seqs, new_k, new_v, positions)
        return logits

    def _decode_resident(self, seqs, tokens, positions, tables, lengths) -> np.ndarray:
        """Decode on a device-resident pool: the pool is bound in place, the new K/V are
        written to device buffers and scattered into the pool there; only token ids,
        positions, block tables, lengths (up) and logits (down) cross, O(batch) bytes."""
        import torch

        from structkv.runtime.stages import run_bound

        cache = self.cache
        layers, _, heads, _, head_dim = cache.keys.shape
        vocab = self.manifest["config"]["vocab_size"]
        out = {
            "logits": torch.empty((len(seqs), vocab), dtype=cache.keys.dtype, device=cache.device),
            "new_keys": torch.empty((layers, len(seqs), heads, head_dim), dtype=cache.keys.dtype,
                                    device=cache.device),
        }  # fmt: skip
        out["new_values"] = torch.empty_like(out["new_keys"])
        host = {
            "input_ids": np.asarray(tokens, dtype=np.int64),
            "positions": np.asarray(positions, dtype=np.int64),
            "block_tables": tables,
            "context_lens": lengths,
        }
        pool = {"k_pool": cache.keys, "v_pool": cache.values, "pos_pool": cache.positions}
        run_bound(self.stages.sessions["decode"], cache.device, cache.transfers, host, pool, out)
        cache.append_batch(seqs, out["new_keys"], out["new_values"], positions)
        return cache.transfers.download(out["logits"])

    def release(self, seq: int) -> None:
        """Free a sequence's blocks (finished or cancelled)."""
        self.cache.release(seq)

    def eos_ids(self) -> tuple[int, ...]:
        return eos_ids_of(self.manifest["config"], None, self.tokenizer)

    # -- conveniences over runtime.batch -----------------------------------------------------
    def generate_batch(
        self, prompts: list, max_new_tokens: int = 32, eos_ids: tuple[int, ...] = ()
    ) -> list[list[int]]:
        """Greedy generation for several prompts at once (decode batched across them)."""
        from structkv.runtime.batch import Batch

        return Batch(self).generate(prompts, max_new_tokens, eos_ids)

    def generate(self, input_ids, max_new_tokens: int = 32) -> tuple[list[int], dict]:
        """Greedy generation of one prompt; stats as ``structkv generate --json`` reports them."""
        from structkv.runtime.batch import Batch

        return Batch(self).generate_one(input_ids, max_new_tokens, self.eos_ids())


def _kv_device(kv_device: str | None, backend: str, stages) -> str | None:
    """Resolve ``Engine.load``'s ``kv_device``: "auto" is the GPU of a CUDA / TensorRT
    session, else the host pool; an explicit device needs ONNX Runtime (IOBinding)."""
    if kv_device == "auto":
        if backend != "onnxruntime":
            return None
        options = stages.sessions["decode"].get_provider_options()
        for name in ("CUDAExecutionProvider", "TensorrtExecutionProvider"):
            if name in options:  # the GPU the session was pinned to
                return f"cuda:{options[name].get('device_id', 0)}"
        return None
    if kv_device is not None and backend != "onnxruntime":
        raise StructKVError(
            f"a device-resident KV pool (kv_device={kv_device!r}) is bound with ONNX Runtime's "
            f"IOBinding; the {backend} backend keeps its own, pass kv_device=None"
        )
    return kv_device


def _tick(timings: dict, key: str, start: float) -> float:
    now = time.perf_counter()
    timings[key] = timings.get(key, 0.0) + now - start
    return now

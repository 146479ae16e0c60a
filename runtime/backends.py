"""What the scheduler drives: one model behind five calls, for both ways of serving it.

:class:`EngineBackend` is an exported engine (ONNX Runtime; prefill graphs, then batched decode
on the paged KV pool). :class:`TorchBackend` is the torch reference (a loaded model and any
registered method with its knobs), so the embedded model can be served without exporting; each
request keeps its own compressed cache and decode steps run one request after another.

Both account KV memory in blocks of the same size, so the scheduler admits by the same rule:
a request is admitted when the blocks of its *compressed* prompt plus its token budget are free.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from structkv.errors import StructKVError
from structkv.runtime.kv_cache import DEFAULT_BLOCK_SIZE


@dataclass
class Prefilled:
    logits: np.ndarray  # [V] float32, at the last prompt token
    stats: dict  # PrefillStats.to_json() (+ backend facts)


class EngineBackend:
    """An :class:`~structkv.runtime.engine.Engine`; its paged cache is the KV pool."""

    def __init__(self, engine, name: str) -> None:
        self.engine, self.name = engine, name
        self.tokenizer = engine.tokenizer
        self.block_size = engine.cache.block_size
        self.num_blocks = engine.cache.num_blocks
        self.eos_ids = engine.eos_ids()
        self.max_context = engine.manifest.get("max_prompt_tokens")

    def check_prompt(self, n: int, max_tokens: int) -> None:
        self.engine.check_prompt(n, max_tokens)

    def kv_tokens(self, n: int) -> int:
        """Tokens each layer keeps of an ``n``-token prompt (the engine's kv_select count)."""
        from structkv.selection import budget, selected_count

        m = self.engine.method
        if not self.engine.compresses(n):  # a short prompt is kept whole
            return n
        return selected_count(n, budget(m.r_kv, n), m.window, m.chunk)

    def prefill(self, seq: int, ids: list[int], max_tokens: int) -> Prefilled:
        out = self.engine.prefill(ids)
        self.engine.admit(seq, out, reserve=max_tokens - 1)
        return Prefilled(np.asarray(out.logits, dtype=np.float32), dict(out.stats))

    def decode(self, seqs: list[int], tokens: list[int], positions: list[int]) -> np.ndarray:
        return np.asarray(self.engine.decode(seqs, tokens, positions), dtype=np.float32)

    def release(self, seq: int) -> None:
        if seq in self.engine.cache.sequences():
            self.engine.release(seq)

    def blocks_used(self) -> int:
        return self.engine.cache.blocks_used


class TorchBackend:
    """A torch model and a resolved method; KV memory is a block budget of ``kv_cache_mb``
    (fp32 K and V of every layer and KV head), the same unit as the engine's paged pool."""

    def __init__(self, lm, method, kv_cache_mb: float, block_size: int = DEFAULT_BLOCK_SIZE):
        from structkv.generate import eos_token_ids

        self.lm, self.method, self.name = lm, method, lm.model_id
        self.tokenizer = lm.tokenizer
        self.block_size = block_size
        cfg = lm.model.config
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        per_block = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * head_dim * 4 * block_size
        self.num_blocks = int(kv_cache_mb * 2**20 // per_block)
        if self.num_blocks < 1:
            raise StructKVError(f"--kv-cache-mb {kv_cache_mb} holds no KV block; raise it")
        self.eos_ids = eos_token_ids(lm)
        self.max_context = getattr(cfg, "max_position_embeddings", None)
        self._caches: dict[int, object] = {}
        self._blocks: dict[int, int] = {}

    def method_for(self, n: int):
        """The configured method, or full context for a prompt no longer than its observation
        window (nothing to select from): as the engine does, a short chat is answered whole
        rather than refused; the reply's ``structkv.method`` says which ran."""
        from structkv.methods import Full

        return self.method if n > self.method.window else Full()

    def check_prompt(self, n: int, max_tokens: int) -> None:
        from structkv.generate import check_context

        self.method_for(n).validate(n)
        check_context(self.lm.model, n, max_tokens)

    def kv_tokens(self, n: int) -> int:
        """An upper bound of the tokens any layer keeps (methods without a budget keep all)."""
        layers = self.lm.model.config.num_hidden_layers
        method = self.method_for(n)
        budgets = [method.kv_budget(layer, layers, n) for layer in range(layers)]
        if any(b is None for b in budgets):
            return n
        return min(n, max(budgets) + method.window)

    def prefill(self, seq: int, ids: list[int], max_tokens: int) -> Prefilled:
        import torch

        from structkv.generate import model_device

        input_ids = torch.tensor(ids, dtype=torch.long, device=model_device(self.lm.model))
        method = self.method_for(len(ids))
        result = method.prefill(self.lm.model, input_ids, extra_capacity=max_tokens)
        self._caches[seq] = result.cache
        kept = max(result.cache.tokens_per_layer())
        self._blocks[seq] = math.ceil((kept + max_tokens) / self.block_size)
        logits = result.logits.float().cpu().numpy()
        stats = {**result.stats.to_json(), "backend": "torch", "compressed": method.name != "full"}
        return Prefilled(logits, stats)

    def decode(self, seqs: list[int], tokens: list[int], positions: list[int]) -> np.ndarray:
        from structkv.generate import decode_step

        rows = [decode_step(self.lm.model, self._caches[s], t) for s, t in zip(seqs, tokens)]
        return np.stack([r.float().cpu().numpy() for r in rows])

    def release(self, seq: int) -> None:
        self._caches.pop(seq, None)
        self._blocks.pop(seq, None)

    def blocks_used(self) -> int:
        return sum(self._blocks.values())

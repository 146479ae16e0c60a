"""Request bookkeeping over an :class:`~structkv.runtime.engine.Engine`: a fixed set of prompts,
prefilled one by one, then decoded together one batched step at a time (greedy).

It only uses the engine's public primitives (prefill, admit, decode, release), as a server's
scheduler does; the engine holds no per-request state of its own.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from structkv.errors import StructKVError


@dataclass
class _Running:
    tokens: list[int]
    next_position: int
    max_new_tokens: int
    done: bool = False


class Batch:
    """Sequences admitted into one engine's paged cache and decoded together."""

    def __init__(self, engine) -> None:
        self.engine = engine
        self.running: dict[int, _Running] = {}
        self._next_id = 0

    def add(self, input_ids, max_new_tokens: int):
        """Prefill, admit into the paged cache (refused with a clear error if it cannot fit) and
        take the first token greedily. Returns the sequence id and the prefill output."""
        if max_new_tokens < 1:
            raise StructKVError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        n = len(input_ids)
        self.engine.check_prompt(n, max_new_tokens)
        out = self.engine.prefill(input_ids)
        seq = self._next_id
        self.engine.admit(seq, out, reserve=max_new_tokens - 1)
        self._next_id += 1
        self.running[seq] = _Running([int(out.logits.argmax())], n, max_new_tokens)
        return seq, out

    def step(self, eos_ids: tuple[int, ...] = ()) -> None:
        """One decode step for every unfinished sequence, as one batch."""
        active = []
        for seq, r in self.running.items():
            if r.done or len(r.tokens) >= r.max_new_tokens or r.tokens[-1] in eos_ids:
                r.done = True
            else:
                active.append(seq)
        if not active:
            return
        runs = [self.running[s] for s in active]
        logits = self.engine.decode(
            active, [r.tokens[-1] for r in runs], [r.next_position for r in runs]
        )
        for i, r in enumerate(runs):
            r.next_position += 1
            r.tokens.append(int(logits[i].argmax()))

    def finish(self, seq: int) -> list[int]:
        """Release a sequence's blocks (finished or cancelled) and return its tokens."""
        r = self.running.pop(seq, None)
        if r is None:
            raise StructKVError(f"request {seq} is not running")
        self.engine.release(seq)
        return r.tokens

    def generate(self, prompts: list, max_new_tokens: int, eos_ids=()) -> list[list[int]]:
        seqs = []
        try:
            for ids in prompts:
                seqs.append(self.add(ids, max_new_tokens)[0])
            while any(not self.running[s].done for s in seqs):
                self.step(eos_ids)
            return [self.running[s].tokens for s in seqs]
        finally:
            for s in seqs:
                if s in self.running:
                    self.finish(s)

    def generate_one(self, input_ids, max_new_tokens: int, eos_ids=()) -> tuple[list[int], dict]:
        seq, out = self.add(input_ids, max_new_tokens)
        start = time.perf_counter()
        try:
            while not self.running[seq].done:
                self.step(eos_ids)
            decode_s = time.perf_counter() - start
        finally:
            tokens = self.finish(seq)
        stats = dict(out.stats)
        steps = max(0, len(tokens) - 1)
        stats["decode_tokens_per_s"] = steps / decode_s if decode_s > 0 else 0.0
        stats["new_tokens"] = len(tokens)
        return tokens, stats

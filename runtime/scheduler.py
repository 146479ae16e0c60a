"""Continuous batching over one backend: requests arrive at any time, stream tokens, may cancel.

One loop in one thread owns the model: cancel what was cancelled, admit and prefill at most ONE
waiting request, then run one decode step for every running request, and repeat. So a long
prefill stalls the running streams for one prefill at most, and a new request waits for one
decode step at most before its prefill starts.

Admission is by KV blocks: a request is admitted when its *compressed* prompt plus its token
budget fits in the blocks not yet promised to running requests (StructKV keeps ~R_KV·N + w
tokens per layer instead of N, so the same pool admits several times more requests). Running
requests hold their whole promise, so they never run out of blocks mid-stream: no preemption,
no deadlock. A request larger than the whole pool is refused when it is submitted, with the
numbers. Requests are admitted in arrival order (a large request is not starved by small ones).

Per request: max_tokens, temperature, top_p, seed, stop strings and the model's EOS. Greedy
decoding gives exactly the single-request tokens: batched decode computes each row alone.
Events go to the request's ``emit`` callback from the loop thread (the HTTP layer hands them to
its event loop).
"""

from __future__ import annotations

import itertools
import math
import threading
import time
from collections import deque
from dataclasses import dataclass, field

import numpy as np

from structkv.errors import StructKVError


@dataclass
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()

    def check(self) -> None:
        """Every bad value gets one message naming the parameter and the valid range."""
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise StructKVError(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        if not (isinstance(self.temperature, (int, float)) and 0 <= self.temperature <= 2):
            raise StructKVError(f"temperature must be in [0, 2], got {self.temperature!r}")
        if not (isinstance(self.top_p, (int, float)) and 0 < self.top_p <= 1):
            raise StructKVError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if self.seed is not None and not isinstance(self.seed, int):
            raise StructKVError(f"seed must be an integer, got {self.seed!r}")
        if len(self.stop) > 4 or not all(isinstance(s, str) and s for s in self.stop):
            raise StructKVError("stop must be up to 4 non-empty strings")


@dataclass
class Event:
    """``kind`` "token" (``text`` is the new text, possibly empty while a multi-byte character
    or a possible stop string is incomplete), "done" (``finish_reason``, ``usage``, ``stats``)
    or "error" (``message``; the request is over)."""

    kind: str
    text: str = ""
    token: int | None = None
    finish_reason: str | None = None
    usage: dict | None = None
    stats: dict | None = None
    message: str | None = None
    tokens: list[int] | None = None  # "done": every token generated


class IncrementalText:
    """Detokenise a growing token list into text deltas: nothing is emitted while the text ends
    in an incomplete UTF-8 sequence (U+FFFD) or in a prefix of a stop string; a stop string
    ends the text before it."""

    def __init__(self, tokenizer, stop: tuple[str, ...] = ()) -> None:
        self.tokenizer, self.stop = tokenizer, stop
        self.tokens: list[int] = []
        self.emitted = ""
        self.stopped = False

    def add(self, token: int) -> str:
        self.tokens.append(token)
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        hits = [text.find(s) for s in self.stop if s in text]
        if hits:
            self.stopped = True
            text = text[: min(hits)]
        elif text.endswith("\ufffd"):
            return ""
        else:
            text = text[: len(text) - self._held(text)]
        if not text.startswith(self.emitted):  # a tokenizer that rewrites earlier text
            return ""
        delta, self.emitted = text[len(self.emitted) :], text
        return delta

    def _held(self, text: str) -> int:
        """Characters at the end of ``text`` that could begin a stop string."""
        held = 0
        for s in self.stop:
            for k in range(min(len(s) - 1, len(text)), held, -1):
                if text.endswith(s[:k]):
                    held = k
                    break
        return held

    def flush(self) -> str:
        """At the end (not stopped by a stop string): the held-back characters."""
        if self.stopped:
            return ""
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        if not text.startswith(self.emitted):
            return ""
        delta, self.emitted = text[len(self.emitted) :], text
        return delta


@dataclass
class Request:
    id: int
    prompt_ids: list[int]
    params: SamplingParams
    emit: object  # Callable[[Event], None]
    arrival: float = field(default_factory=time.perf_counter)
    blocks: int = 0  # promised KV blocks (compressed prompt + max_tokens)
    tokens: list[int] = field(default_factory=list)
    position: int = 0
    text: IncrementalText | None = None
    generator: object = None
    stats: dict | None = None
    last_token_at: float = 0.0
    cancelled: bool = False


class Scheduler:
    """The loop; :meth:`submit` and :meth:`cancel` may be called from any thread.

    ``observer`` (the front end's metrics) is called from the loop thread:
    ``prefilled(request, seconds)``, ``inter_token(seconds)``, ``decoded(batch_size)`` and
    ``finished(reason)``."""

    def __init__(self, backend, observer=None) -> None:
        self.backend, self.observer = backend, observer
        self.waiting: deque[Request] = deque()
        self.running: dict[int, Request] = {}
        self.promised = 0  # blocks promised to running requests
        self._ids = itertools.count()
        self._lock = threading.Condition()
        self._cancel: set[int] = set()
        self._stop = False
        self._thread: threading.Thread | None = None

    # -- called from any thread ----------------------------------------------------------------
    def submit(self, prompt_ids: list[int], params: SamplingParams, emit) -> int:
        """Queue a request; refused at once (StructKVError) when it can never run."""
        params.check()
        n = len(prompt_ids)
        if n == 0:
            raise StructKVError("the prompt is empty")
        self.backend.check_prompt(n, params.max_tokens)
        blocks = self._blocks_for(n, params.max_tokens)
        if blocks > self.backend.num_blocks:
            raise StructKVError(
                f"this request needs {blocks} KV blocks ({self.backend.kv_tokens(n)} kept prompt "
                f"tokens + {params.max_tokens} new, {self.backend.block_size} per block) but the "
                f"whole pool has {self.backend.num_blocks}; lower max_tokens or the prompt, or "
                "start the server with a larger --kv-cache-mb"
            )

        def safe_emit(event: Event) -> None:  # a gone consumer must not kill the loop
            try:
                emit(event)
            except Exception:
                pass

        with self._lock:
            if self._stop:
                raise StructKVError("the server is shutting down")
            request = Request(next(self._ids), list(prompt_ids), params, safe_emit, blocks=blocks)
            self.waiting.append(request)
            self._lock.notify()
        return request.id

    def cancel(self, request_id: int) -> None:
        """Stop a request wherever it is; its blocks are released within one loop step."""
        with self._lock:
            self._cancel.add(request_id)
            self._lock.notify()

    def start(self) -> Scheduler:
        self._thread = threading.Thread(target=self._loop, name="structkv-scheduler", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 30.0) -> None:
        """Cancel everything still queued or running (each gets a final event), then end."""
        with self._lock:
            self._stop = True
            self._lock.notify()
        if self._thread is not None:
            self._thread.join(timeout)

    def counts(self) -> dict:
        return {
            "running": len(self.running),
            "waiting": len(self.waiting),
            "blocks_used": self.backend.blocks_used(),
            "blocks_promised": self.promised,
            "blocks_total": self.backend.num_blocks,
        }

    # -- the loop (one thread) ------------------------------------------------------------------
    def _blocks_for(self, n: int, max_tokens: int) -> int:
        return math.ceil((self.backend.kv_tokens(n) + max_tokens) / self.backend.block_size)

    def _loop(self) -> None:
        while True:
            with self._lock:
                while not (self._stop or self._cancel or self.running or self._admissible()):
                    self._lock.wait(0.5)
                stopping = self._stop
                cancelled, self._cancel = self._cancel, set()
                admit = self.waiting.popleft() if not stopping and self._admissible() else None
                if admit is not None:
                    self.promised += admit.blocks
            if stopping:
                self._drain()
                return
            for request_id in cancelled:
                self._cancel_one(request_id)
            if admit is not None and admit.id in cancelled:  # cancelled as it was admitted
                self.promised -= admit.blocks
                self._finish(admit, "abort")
            elif admit is not None:
                self._prefill(admit)
            if self.running:
                self._decode_step()

    def _admissible(self) -> bool:
        head = self.waiting[0] if self.waiting else None
        if head is None:
            return False
        if head.id in self._cancel:
            return True  # let the loop drop it
        return head.blocks <= self.backend.num_blocks - self.promised

    def _finish(self, request: Request, reason: str) -> None:
        if request.id in self.running:
            del self.running[request.id]
            self.backend.release(request.id)
            self.promised -= request.blocks
        if self.observer is not None:
            self.observer.finished(reason)
        tail = request.text.flush() if request.text is not None and reason != "abort" else ""
        if tail:
            request.emit(Event("token", text=tail))
        completion = len(request.tokens)
        usage = {
            "prompt_tokens": len(request.prompt_ids),
            "completion_tokens": completion,
            "total_tokens": len(request.prompt_ids) + completion,
        }
        request.emit(
            Event(
                "done",
                finish_reason=reason,
                usage=usage,
                stats=request.stats,
                tokens=list(request.tokens),
            )
        )

    def _cancel_one(self, request_id: int) -> None:
        if request_id in self.running:
            self._finish(self.running[request_id], "abort")
            return
        with self._lock:
            queued = next((r for r in self.waiting if r.id == request_id), None)
            if queued is not None:
                self.waiting.remove(queued)
        if queued is not None:
            self._finish(queued, "abort")

    def _drain(self) -> None:
        for request in list(self.running.values()):
            self._finish(request, "abort")
        with self._lock:
            queued, self.waiting = list(self.waiting), deque()
        for request in queued:
            self._finish(request, "abort")

    def _prefill(self, request: Request) -> None:
        try:
            out = self.backend.prefill(request.id, request.prompt_ids, request.params.max_tokens)
        except Exception as e:  # the request fails, the server does not
            self.promised -= request.blocks
            self.backend.release(request.id)
            request.emit(Event("error", message=f"{type(e).__name__}: {e}"))
            return
        self.running[request.id] = request
        request.stats = out.stats
        request.text = IncrementalText(self.backend.tokenizer, request.params.stop)
        request.position = len(request.prompt_ids)
        if request.params.temperature > 0:
            import torch

            seed = request.params.seed
            request.generator = torch.Generator().manual_seed(
                seed if seed is not None else int.from_bytes(np.random.bytes(4), "little")
            )
        if self.observer is not None:
            self.observer.prefilled(request, time.perf_counter() - request.arrival)
        self._take(request, out.logits)

    def _decode_step(self) -> None:
        batch = list(self.running.values())
        try:
            logits = self.backend.decode(
                [r.id for r in batch], [r.tokens[-1] for r in batch], [r.position for r in batch]
            )
        except Exception as e:  # fail these requests, release their blocks, keep serving
            for request in batch:
                del self.running[request.id]
                self.backend.release(request.id)
                self.promised -= request.blocks
                request.emit(Event("error", message=f"{type(e).__name__}: {e}"))
            return
        if self.observer is not None:
            self.observer.decoded(len(batch))
        for request, row in zip(batch, logits):
            request.position += 1
            self._take(request, row)

    def _take(self, request: Request, logits: np.ndarray) -> None:
        """Sample the next token, stream its text, and finish the request when it is done."""
        token = self._sample(request, logits)
        request.tokens.append(token)
        now = time.perf_counter()
        if self.observer is not None and len(request.tokens) > 1:
            self.observer.inter_token(now - request.last_token_at)
        request.last_token_at = now
        delta = request.text.add(token)
        if delta:
            request.emit(Event("token", text=delta, token=token))
        if request.text.stopped or token in self.backend.eos_ids:
            self._finish(request, "stop")
        elif len(request.tokens) >= request.params.max_tokens:
            self._finish(request, "length")

    @staticmethod
    def _sample(request: Request, logits: np.ndarray) -> int:
        if request.params.temperature <= 0:
            return int(np.argmax(logits))
        import torch

        from structkv.generate import sample

        p = request.params
        return sample(torch.from_numpy(logits), p.temperature, p.top_p, request.generator)

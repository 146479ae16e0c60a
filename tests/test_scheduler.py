"""The serving scheduler without HTTP: continuous batching on a tiny engine and on the torch
reference, admission by KV blocks, refusal, cancellation, stop strings, incremental UTF-8."""

from __future__ import annotations

import threading

import pytest
import torch
from conftest import ByteTokenizer, exported_engine

from structkv.errors import StructKVError
from structkv.generate import generate_ids
from structkv.methods import StructKV
from structkv.models import LoadedModel, tiny_model
from structkv.runtime.backends import EngineBackend, TorchBackend
from structkv.runtime.batch import Batch
from structkv.runtime.engine import Engine
from structkv.runtime.scheduler import IncrementalText, SamplingParams, Scheduler


class Collector:
    """Events per request; ``wait`` blocks until every submitted request is done."""

    def __init__(self) -> None:
        self.events: dict[int, list] = {}
        self.cond = threading.Condition()

    def emitter(self, key: int):
        def emit(event) -> None:
            with self.cond:
                self.events.setdefault(key, []).append(event)
                self.cond.notify_all()

        return emit

    def done(self, key: int):
        return next((e for e in self.events.get(key, []) if e.kind in ("done", "error")), None)

    def wait(self, keys, timeout: float = 120.0) -> None:
        with self.cond:
            assert self.cond.wait_for(lambda: all(self.done(k) for k in keys), timeout)

    def text(self, key: int) -> str:
        return "".join(e.text for e in self.events[key] if e.kind == "token")


def _prompt(n: int, seed: int) -> list[int]:
    return torch.randint(32, 127, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    engine = Engine.load(
        exported_engine("tiny-llama", "contrib", tmp_path_factory), kv_cache_mb=0.25
    )
    engine.tokenizer = ByteTokenizer()  # tiny models have no tokenizer: bytes stand in
    return engine


def test_concurrent_greedy_equals_single_requests_and_admission_queues(engine):
    """Eight requests at once into a pool that holds only some of them: the later ones wait
    for blocks, every output equals the same prompt decoded alone (`structkv run`'s path),
    and the pool is empty afterwards."""
    backend = EngineBackend(engine, "tiny")
    prompts = [_prompt(40 + 30 * i, seed=i) for i in range(8)]
    expected = [Batch(engine).generate_one(p, 12)[0] for p in prompts]
    scheduler = Scheduler(backend)
    need = [scheduler._blocks_for(len(p), 12) for p in prompts]
    assert sum(need) > backend.num_blocks  # they cannot all run at once
    sink = Collector()
    waited = []
    ids = [scheduler.submit(p, SamplingParams(max_tokens=12), sink.emitter(i))
           for i, p in enumerate(prompts)]  # fmt: skip
    waited.append(len(scheduler.waiting))
    scheduler.start()
    sink.wait(range(8))
    scheduler.stop()
    assert waited[0] == 8 and len(set(ids)) == 8
    for i, tokens in enumerate(expected):
        done = sink.done(i)
        assert done.kind == "done" and done.finish_reason == "length"
        assert done.tokens == tokens, i
        assert sink.text(i) == bytes(tokens).decode("utf-8", errors="ignore")
        assert done.usage == {"prompt_tokens": len(prompts[i]), "completion_tokens": 12,
                              "total_tokens": len(prompts[i]) + 12}  # fmt: skip
    assert engine.cache.blocks_used == 0 and scheduler.promised == 0


def test_a_request_larger_than_the_pool_is_refused_with_the_numbers(engine):
    scheduler = Scheduler(EngineBackend(engine, "tiny"))
    total = engine.cache.num_blocks
    with pytest.raises(StructKVError, match=rf"needs \d+ KV blocks .* whole pool has {total}"):
        scheduler.submit(_prompt(60, 1), SamplingParams(max_tokens=16 * total), lambda e: None)
    with pytest.raises(StructKVError, match="max_tokens must be an integer >= 1"):
        scheduler.submit(_prompt(60, 1), SamplingParams(max_tokens=0), lambda e: None)
    with pytest.raises(StructKVError, match="the prompt is empty"):
        scheduler.submit([], SamplingParams(max_tokens=4), lambda e: None)
    assert engine.cache.blocks_used == 0 and scheduler.promised == 0


def test_a_prompt_under_the_window_is_served_whole(engine):
    """A 5-token prompt is shorter than window + chunk: the scheduler serves it uncompressed
    (test_export checks that path against the full model) and frees its blocks."""
    prompt = _prompt(5, 1)
    expected = Batch(engine).generate_one(prompt, 4)[0]
    scheduler = Scheduler(EngineBackend(engine, "tiny")).start()
    sink = Collector()
    scheduler.submit(prompt, SamplingParams(max_tokens=4), sink.emitter(0))
    sink.wait([0])
    scheduler.stop()
    done = sink.done(0)
    assert done.kind == "done" and done.tokens == expected and len(expected) == 4
    assert engine.cache.blocks_used == 0 and scheduler.promised == 0


def test_cancel_while_queued_and_while_decoding_releases_blocks(engine):
    scheduler = Scheduler(EngineBackend(engine, "tiny"))
    sink = Collector()
    running = scheduler.submit(_prompt(120, 2), SamplingParams(max_tokens=100), sink.emitter(0))
    queued = scheduler.submit(_prompt(90, 3), SamplingParams(max_tokens=8), sink.emitter(1))
    scheduler.cancel(queued)  # before the loop ever saw it
    scheduler.start()
    with sink.cond:  # let the long one stream a few tokens, then cancel it mid-decode
        sink.cond.wait_for(lambda: len(sink.events.get(0, [])) >= 3, 60)
    scheduler.cancel(running)
    sink.wait([0, 1])
    scheduler.stop()
    assert sink.done(1).finish_reason == "abort" and sink.done(1).tokens == []
    first = sink.done(0)
    assert first.finish_reason == "abort" and 3 <= len(first.tokens) < 100
    assert engine.cache.blocks_used == 0 and scheduler.promised == 0


def test_stop_strings_end_the_text_before_them(engine):
    """A stop string taken from the greedy output itself: the streamed text stops right before
    it (never streaming part of it), finish_reason "stop"."""
    prompt = _prompt(80, 4)
    full = bytes(Batch(engine).generate_one(prompt, 20)[0]).decode("utf-8", errors="ignore")
    # the first 2-character piece that begins at or after character 2 and not earlier
    cut = next(i for i in range(2, len(full) - 1) if full.index(full[i : i + 2]) == i)
    stop = full[cut : cut + 2]
    scheduler = Scheduler(EngineBackend(engine, "tiny")).start()
    sink = Collector()
    scheduler.submit(prompt, SamplingParams(max_tokens=20, stop=(stop,)), sink.emitter(0))
    sink.wait([0])
    scheduler.stop()
    assert sink.done(0).finish_reason == "stop"
    assert sink.text(0) == full[:cut]


class _ReplacingTokenizer:
    """Byte-level tokens decoded with U+FFFD for incomplete UTF-8, as HF byte-BPE does."""

    def decode(self, ids, skip_special_tokens=True):
        return bytes(ids).decode("utf-8", errors="replace")


def test_incremental_text_never_splits_a_character_or_a_stop_string():
    text = IncrementalText(_ReplacingTokenizer(), stop=("END",))
    deltas = [text.add(b) for b in "héllo → wörld EN".encode()]
    assert "".join(deltas) == "héllo → wörld "  # "EN" held back: it may begin "END"
    assert all("\ufffd" not in d for d in deltas)
    assert text.add(ord("D")) == "" and text.stopped
    plain = IncrementalText(_ReplacingTokenizer(), stop=("END",))
    assert "".join(plain.add(b) for b in b"x EN") + plain.flush() == "x EN"


def test_torch_backend_serves_the_reference_method():
    """--model serving: the torch path's greedy tokens equal generate_ids of the same method,
    and seeded sampling is reproducible."""
    tiny = tiny_model("tiny-llama", num_layers=6, seed=1)
    lm = LoadedModel(tiny.model, ByteTokenizer(), tiny.model_id)
    method = StructKV(pivot=2, lam=0.5)
    backend = TorchBackend(lm, method, kv_cache_mb=4)
    prompts = [_prompt(n, seed=n) for n in (60, 150, 100)]
    expected = [generate_ids(lm.model, torch.tensor(p), method, 10).tokens for p in prompts]
    scheduler = Scheduler(backend).start()
    sink = Collector()
    for i, p in enumerate(prompts):
        scheduler.submit(p, SamplingParams(max_tokens=10), sink.emitter(i))
    sampled = SamplingParams(max_tokens=10, temperature=0.8, top_p=0.9, seed=7)
    scheduler.submit(prompts[0], sampled, sink.emitter(10))
    scheduler.submit(prompts[0], sampled, sink.emitter(11))
    sink.wait([0, 1, 2, 10, 11])
    scheduler.stop()
    assert [sink.done(i).tokens for i in range(3)] == expected
    assert sink.done(10).tokens == sink.done(11).tokens != expected[0]
    assert backend.blocks_used() == 0

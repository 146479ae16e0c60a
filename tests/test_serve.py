"""`structkv serve` live: the real server in a subprocess on a free 127.0.0.1 port, spoken to
with the official `openai` client and with plain HTTP; a bounded load test; SIGTERM.

Every greedy output is compared with the same prompt run alone through the same engine in this
process (`structkv run`'s path: Batch.generate_one), so batching must not change results.
"""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest
from serving import NAME, Server

from structkv.generate import encode_prompt
from structkv.prompts.needle import make_needle_prompt
from structkv.runtime.batch import Batch
from structkv.runtime.engine import Engine

pytestmark = pytest.mark.real_model


@pytest.fixture(scope="module")
def engine(smollm2_serving_engine):
    return Engine.load(smollm2_serving_engine, kv_cache_mb=64)


@pytest.fixture(scope="module")
def server(smollm2_serving_engine):
    server = Server(smollm2_serving_engine)
    yield server
    assert server.stop() == 0, "".join(server.log)


def _chat_prompt(tokenizer, length: int, seed: int) -> str:
    return make_needle_prompt(tokenizer, length, 0.5, seed=seed, haystack="noise").prompt


def _alone(engine, ids, max_tokens: int) -> str:
    tokens, _ = Batch(engine).generate_one(list(ids), max_tokens, engine.eos_ids())
    return engine.tokenizer.decode(tokens, skip_special_tokens=True)


def test_openai_client_chat_and_completions(server, engine):
    from openai import OpenAI

    client = OpenAI(base_url=server.url + "/v1", api_key="unused")
    assert [m.id for m in client.models.list().data] == [NAME]
    prompt = _chat_prompt(engine.tokenizer, 1024, seed=11)
    ids = encode_prompt(engine.tokenizer, prompt, chat=True).tolist()
    expected = _alone(engine, ids, 24)
    messages = [{"role": "user", "content": prompt}]
    chat = client.chat.completions.create(model=NAME, messages=messages, max_tokens=24,
                                          temperature=0)  # fmt: skip
    assert chat.choices[0].message.content == expected
    assert chat.usage.prompt_tokens == len(ids) and 1 <= chat.usage.completion_tokens <= 24
    extra = chat.model_extra["structkv"]
    m = engine.method  # the engine bakes in the shipped profile's pivot and budgets
    assert extra["pivot_layer"] == m.pivot
    assert extra["kv_bytes"] <= extra["kv_bytes_full"] * (m.r_kv + 0.05)
    stream = client.chat.completions.create(
        model=NAME, messages=messages, max_tokens=24, temperature=0, stream=True,
        stream_options={"include_usage": True},
    )  # fmt: skip
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == expected and chunks[-1].usage.completion_tokens == chat.usage.completion_tokens
    completion_prompt = "Write one sentence about the sea.\n" + prompt
    cids = engine.tokenizer(completion_prompt, add_special_tokens=True)["input_ids"]
    plain = client.completions.create(model=NAME, prompt=completion_prompt, max_tokens=12,
                                      temperature=0)  # fmt: skip
    assert plain.choices[0].text == _alone(engine, cids, 12)
    streamed = client.completions.create(model=NAME, prompt=completion_prompt, max_tokens=12,
                                         temperature=0, stream=True)  # fmt: skip
    assert "".join(c.choices[0].text for c in streamed) == plain.choices[0].text


def test_a_prompt_under_the_window_is_answered_whole(server, engine, smollm2):
    """A prompt shorter than the engine's window + 2 tokens has nothing to compress: the server
    answers it (not a 400) with full-context attention, the same greedy text as the torch
    model with no compression, and says so (`compressed: false`, compute fraction 1)."""
    from structkv.generate import generate_text
    from structkv.methods import Full

    prompt = "The capital of France is"
    assert not engine.compresses(len(engine.tokenizer(prompt)["input_ids"]))
    code, reply = server.post("/v1/completions", {"model": NAME, "prompt": prompt,
                                                  "max_tokens": 8, "temperature": 0})  # fmt: skip
    assert code == 200, reply
    assert (
        reply["choices"][0]["text"] == generate_text(smollm2, prompt, Full(), max_new_tokens=8).text
    )
    assert reply["structkv"]["compressed"] is False
    assert reply["structkv"]["compute_fraction"] == 1.0
    assert json.loads(server.get("/health"))["status"] == "ok"


def test_torch_backend_serves_the_embedded_model_without_an_engine(smollm2):
    """`structkv serve --model smollm2-135m --method snapkv --r-kv 0.2`: the reference method
    behind the same server; greedy text equals `structkv generate`'s for the same request."""
    from structkv.generate import generate_text
    from structkv.methods import get_method

    server = Server(
        None,
        kv_cache_mb=64,
        source=["--model", "smollm2-135m", "--method", "snapkv", "--r-kv", "0.2"],
    )
    try:
        prompt = _chat_prompt(smollm2.tokenizer, 512, seed=5)
        code, reply = server.post(
            "/v1/chat/completions",
            {
                "model": NAME,
                "messages": [{"role": "user", "content": prompt}],
                "max_tokens": 8,
                "temperature": 0,
            },
        )
        assert code == 200, reply
        expected = generate_text(
            smollm2, prompt, get_method("snapkv", r_kv=0.2), chat=True, max_new_tokens=8
        ).text
        assert reply["choices"][0]["message"]["content"] == expected
        assert reply["structkv"]["method"] == "snapkv" and reply["structkv"]["backend"] == "torch"
        code, reply = server.post(  # under SnapKV's window of 8: answered whole, not refused
            "/v1/completions",
            {"model": NAME, "prompt": "The capital of France is", "max_tokens": 4},
        )
        assert code == 200 and reply["structkv"]["method"] == "full", reply
        assert reply["structkv"]["compressed"] is False
    finally:
        assert server.stop() == 0, "".join(server.log)


def test_bad_requests_get_openai_errors_and_the_server_keeps_serving(server):
    long_prompt = "hello " * 9000
    cases = [
        ("/v1/completions", b"{not json", 400, "not valid JSON"),
        ("/v1/completions", {"model": "gpt-4", "prompt": "hi there " * 4}, 404, "does not exist"),
        ("/v1/completions", {"model": NAME, "prompt": "hi " * 20, "max_tokens": 0}, 400,
         "max_tokens must be"),
        ("/v1/completions", {"model": NAME, "prompt": long_prompt}, 400, "exceeds the engine"),
        ("/v1/completions", {"model": NAME, "prompt": "hi " * 20, "n": 2}, 400, "n=2"),
        ("/v1/chat/completions", {"model": NAME, "messages": "hi"}, 400, "messages must be"),
        ("/v1/chat/completions", {"model": NAME, "messages": [{"role": "user", "content": "x"}],
                                  "temperature": 7}, 400, "temperature must be in"),
    ]  # fmt: skip
    for path, body, status, message in cases:
        code, reply = server.post(path, body, raw=isinstance(body, bytes))
        assert code == status, (body, reply)
        assert (
            reply["error"]["type"] == "invalid_request_error"
            and message in reply["error"]["message"]
        ), reply
    code, reply = server.post("/v1/nowhere", {})
    assert code == 404 and "error" in reply
    code, reply = server.post("/v1/completions", {"model": NAME, "prompt": "hi " * 20,
                                                  "max_tokens": 3, "temperature": 0})  # fmt: skip
    assert code == 200 and reply["usage"]["completion_tokens"] == 3
    assert json.loads(server.get("/health"))["status"] == "ok"


def _stream_chat(url: str, prompt: str, cancel: bool) -> tuple[int, str, str | None]:
    """(status, streamed text, finish reason); ``cancel`` closes the connection after the first
    content chunk (the server must cancel the request and free its blocks)."""
    import http.client

    body = json.dumps({"model": NAME, "messages": [{"role": "user", "content": prompt}],
                       "max_tokens": 4, "temperature": 0, "stream": True})  # fmt: skip
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=300)
    conn.request("POST", "/v1/chat/completions", body, {"content-type": "application/json"})
    response = conn.getresponse()
    text, finish = "", None
    if response.status != 200:
        return response.status, response.read().decode(), None
    for raw in response:
        line = raw.decode().strip()
        if not line.startswith("data: ") or line == "data: [DONE]":
            continue
        chunk = json.loads(line[6:])
        choice = chunk["choices"][0] if chunk.get("choices") else {}
        text += choice.get("delta", {}).get("content") or ""
        finish = choice.get("finish_reason") or finish
        if cancel and text:
            conn.close()  # the client goes away mid-stream
            return response.status, text, "cancelled"
    conn.close()
    return response.status, text, finish


def test_load_32_streams_with_a_quarter_cancelled(server, engine):
    """32 concurrent streaming chat requests of 1K-4K prompt tokens, every fourth one dropped by
    its client after its first token: no 5xx, every other output equals its single-request
    output, and the KV pool is empty afterwards (nothing leaked)."""
    # 8 distinct prompts of 1K-4K tokens, each sent 4 times (one of the 4 cancelled): 32 streams,
    # and the single-request reference is computed once per distinct prompt.
    distinct = [1024, 1024, 1024, 1024, 1024, 1024, 2048, 4096]
    lengths = [distinct[i % 8] for i in range(32)]
    prompts = [_chat_prompt(engine.tokenizer, n, seed=100 + i % 8) for i, n in enumerate(lengths)]
    cancel = [i // 8 == 3 for i in range(32)]
    reference: dict[int, str] = {}
    start = time.perf_counter()
    with ThreadPoolExecutor(32) as pool:
        results = list(pool.map(lambda a: _stream_chat(server.url, *a), zip(prompts, cancel)))
    elapsed = time.perf_counter() - start
    assert all(status < 500 for status, _, _ in results), results
    assert all(status == 200 for status, _, _ in results), results
    for i, (_, text, finish) in enumerate(results):
        if cancel[i]:
            assert finish == "cancelled"
            continue
        if i % 8 not in reference:
            ids = encode_prompt(engine.tokenizer, prompts[i], chat=True).tolist()
            reference[i % 8] = _alone(engine, ids, 4)
        assert text == reference[i % 8], (i, lengths[i])
        assert finish in ("stop", "length")
    deadline = time.time() + 30
    while server.gauge("structkv_kv_blocks_used") != 0 and time.time() < deadline:
        time.sleep(0.2)
    assert server.gauge("structkv_kv_blocks_used") == 0
    assert server.gauge("structkv_requests_running") == 0
    assert server.gauge("structkv_requests_waiting") == 0
    assert 'structkv_requests_finished_total{reason="abort"}' in server.get("/metrics")
    print(f"load: 32 streams in {elapsed:.1f} s")


def test_sigterm_ends_streams_and_exits_cleanly(server, engine):
    """(Last in this module: it stops the module's server.) SIGTERM with a long stream in
    flight: the stream ends (finish_reason abort, [DONE]) and the process exits 0."""
    prompt = _chat_prompt(engine.tokenizer, 1024, seed=7)
    outcome = {}

    def client() -> None:
        body = json.dumps(
            {
                "model": NAME,
                "messages": [{"role": "user", "content": prompt}],
                "max_tokens": 400,
                "temperature": 0,
                "stream": True,
            }
        ).encode()
        req = urllib.request.Request(server.url + "/v1/chat/completions", body,
                                     {"content-type": "application/json"})  # fmt: skip
        with urllib.request.urlopen(req, timeout=120) as r:
            outcome["lines"] = [line.decode().strip() for line in r if line.strip()]

    thread = threading.Thread(target=client)
    thread.start()
    assert server.sigterm_when_running(1) == 0, "".join(server.log)
    thread.join(30)
    lines = outcome["lines"]
    assert lines[-1] == "data: [DONE]"
    assert json.loads(lines[-2][6:])["choices"][0]["finish_reason"] == "abort"

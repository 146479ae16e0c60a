"""Reliability, `structkv serve`: the real server (subprocess, 127.0.0.1) with a small KV pool
(22 blocks of 16 tokens) tried with: the pool exhausted by concurrent requests, a request
larger than the pool, clients that disconnect at every stage of a request, malformed /
oversized / deeply nested bodies, property-based bodies (hypothesis), 1 000 rapid bad requests
followed by a good one, and SIGTERM with requests in flight. Every answer is a JSON error or a
success — never a 5xx for bad input, never a hang — and the pool is empty afterwards."""

from __future__ import annotations

import json
import socket
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from reliability import case
from serving import NAME, Server


def floats(**kw):
    """Hypothesis floats without subnormals: a library loaded into the test process may switch
    on flush-to-zero (the kernel library did, until test_ort_ops caught it), and hypothesis
    refuses to draw subnormals then; they are not what these tests are about."""
    return st.floats(allow_subnormal=False, **kw)


pytestmark = pytest.mark.real_model
CLS = "Server"
POOL_MB = 16  # 22 blocks: two compressed 1K prompts fit, a third waits


@pytest.fixture(scope="module")
def server(smollm2_serving_engine):
    server = Server(smollm2_serving_engine, kv_cache_mb=POOL_MB)
    yield server
    server.stop()


def _prompt(words: int, seed: int = 0) -> str:
    return " ".join(f"item{(i * 7919 + seed) % 997}" for i in range(words))


def _healthy(server) -> None:
    """The server answers, and (once cancellations settle) holds no request and no block."""
    deadline = time.time() + 30
    while time.time() < deadline:
        if (server.gauge("structkv_kv_blocks_used") == 0
                and server.gauge("structkv_requests_running") == 0
                and server.gauge("structkv_requests_waiting") == 0):  # fmt: skip
            break
        time.sleep(0.2)
    assert server.gauge("structkv_kv_blocks_used") == 0, "KV blocks leaked"
    assert "Traceback" not in "".join(server.log), "".join(server.log)[-2000:]
    assert server.gauge("structkv_requests_running") == 0, "a request is still running"
    code, reply = server.post("/v1/completions", {"model": NAME, "prompt": _prompt(30),
                                                  "max_tokens": 2, "temperature": 0})  # fmt: skip
    assert code == 200 and reply["usage"]["completion_tokens"] >= 1, reply


def _completion(server, words: int, max_tokens: int, seed: int = 0):
    body = {"model": NAME, "prompt": _prompt(words, seed), "max_tokens": max_tokens,
            "temperature": 0}  # fmt: skip
    return server.post("/v1/completions", body)


def test_an_exhausted_pool_queues_requests_and_a_too_large_one_is_refused(server):
    with case(CLS, "KV pool exhausted: 6 concurrent requests on a 2-request pool"):
        with ThreadPoolExecutor(6) as pool:
            results = list(pool.map(lambda i: _completion(server, 700, 8, seed=i), range(6)))
        assert [code for code, _ in results] == [200] * 6, results
        _healthy(server)
    with case(CLS, "a request larger than the whole pool"):
        code, reply = _completion(server, 1700, 400)  # ~6.6K tokens: 70 blocks > 22
        assert code == 400, reply
        message = reply["error"]["message"]
        assert "KV blocks" in message and "the whole pool has 22" in message, message
        assert "--kv-cache-mb" in message, message
        _healthy(server)


def _aborts(server) -> float:
    for line in server.get("/metrics").splitlines():
        if line.startswith('structkv_requests_finished_total{reason="abort"}'):
            return float(line.split()[-1])
    return 0.0


def _raw(server, payload: bytes, read: bool = False, delay: float = 0.0) -> bytes:
    """Send ``payload`` on a fresh connection, optionally wait / read a little, then hang up."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        if payload:
            sock.sendall(payload)
        time.sleep(delay)
        return sock.recv(256) if read else b""


def _request(body: dict, path: str = "/v1/completions") -> bytes:
    data = json.dumps(body).encode()
    head = (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(data)}\r\n\r\n")  # fmt: skip
    return head.encode() + data


def test_clients_that_disconnect_at_every_stage(server):
    # ~1.2K prompt tokens, 128 kept + 200 new: 21 of the pool's 22 blocks (admitted, long enough)
    long = {"model": NAME, "prompt": _prompt(300), "max_tokens": 200, "temperature": 0}
    stages = [
        ("connects and hangs up", b"", 0.0),
        ("half a request line", b"POST /v1/comp", 0.1),
        ("headers, no body", _request(long)[: _request(long).index(b"\r\n\r\n") + 4], 0.1),
        ("half the body", _request(long)[:-40], 0.1),
        ("whole request, gone during prefill", _request(long), 0.3),
        ("whole request, gone during decode", _request(long), 1.5),
        ("streaming request, gone before the first chunk", _request({**long, "stream": True}),
         0.2),
        ("streaming request, gone after the first chunk",
         _request({**long, "stream": True}), 0.2, True),
        ("chat stream, gone after its first chunk", _request({"model": NAME, "max_tokens": 200,
         "stream": True, "messages": [{"role": "user", "content": _prompt(300)}]},
         "/v1/chat/completions"), 0.2, True),
    ]  # fmt: skip
    for label, payload, delay, *read in stages:
        with case(CLS, f"client disconnect: {label}"):
            admitted = payload.endswith(b"}")  # a whole request: it must end as an abort
            before = _aborts(server)
            _raw(server, payload, read=bool(read), delay=delay)  # read: its first chunk
            _healthy(server)
            if admitted:
                assert _aborts(server) == before + 1, f"{label}: the request was not cancelled"


BAD_BODIES = [
    ("not JSON", b"{not json", 400, "not valid JSON"),
    ("empty body", b"", 400, "not valid JSON"),
    ("invalid UTF-8", b'{"prompt": "\xff\xfe"}', 400, "not valid JSON"),
    ("a JSON array", b"[1, 2, 3]", 400, "must be a JSON object"),
    ("JSON null", b"null", 400, "must be a JSON object"),
    ("a JSON string", b'"hello"', 400, "must be a JSON object"),
    ("nested 100 000 deep", b"[" * 100_000 + b"]" * 100_000, 400, ""),
    ("prompt of the wrong type", b'{"prompt": 42}', 400, "prompt"),
    ("max_tokens a string", b'{"prompt": "hi there", "max_tokens": "ten"}', 400, "max_tokens"),
    ("max_tokens huge", b'{"prompt": "hi there", "max_tokens": 1e300}', 400, "max_tokens"),
    ("temperature NaN", b'{"prompt": "hi there", "temperature": NaN}', 400, "temperature"),
    ("stop of the wrong type", b'{"prompt": "hi there", "stop": 5, "max_tokens": 2}', 400,
     "stop"),
    ("messages with a bad role", b'{"messages": [{"role": "robot", "content": "x"}]}', 400,
     "role"),
]  # fmt: skip


@pytest.mark.parametrize("label,body,status,message", BAD_BODIES, ids=[b[0] for b in BAD_BODIES])
def test_malformed_bodies_get_a_json_4xx(server, label, body, status, message):
    path = "/v1/chat/completions" if b"messages" in body else "/v1/completions"
    with case(CLS, f"body: {label}"):
        code, reply = server.post(path, body, raw=True)
        assert code == status, (code, reply)
        assert reply["error"]["type"] == "invalid_request_error"
        assert message in reply["error"]["message"], reply


def test_oversized_bodies_are_refused_before_they_are_read(server):
    import http.client

    with case(CLS, "body declared as 20 MB: 413 before it is read"):
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
        conn.putrequest("POST", "/v1/completions")
        conn.putheader("content-type", "application/json")
        conn.putheader("content-length", str(20 * 2**20))
        conn.endheaders()
        conn.send(b'{"prompt": "' + b"a" * 1000)  # the rest never comes
        response = conn.getresponse()
        assert response.status == 413, response.status
        assert "limit" in json.loads(response.read())["error"]["message"]
        conn.close()
    with case(CLS, "body of 16 MiB + 1 byte, chunked (no declared length): 413"):
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
        chunks = [b"a" * 2**20 for _ in range(16)] + [b"a"]
        conn.request("POST", "/v1/completions", body=iter(chunks), encode_chunked=True,
                     headers={"content-type": "application/json"})  # fmt: skip
        response = conn.getresponse()
        assert response.status == 413, response.status
        assert "limit" in json.loads(response.read())["error"]["message"]
        conn.close()
    _healthy(server)


VALUES = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**70), 2**70), floats(allow_nan=True),
    st.text(max_size=20), st.lists(st.integers(-5, 70000), max_size=5),
    st.dictionaries(st.text(max_size=5), st.integers(), max_size=2),
)  # fmt: skip
KEYS = ["prompt", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p",
        "stop", "stream", "seed", "n", "model", "stream_options", "logprobs"]  # fmt: skip


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(body=st.dictionaries(st.sampled_from(KEYS), VALUES, max_size=6),
       chat=st.booleans())  # fmt: skip
def test_property_any_body_gets_a_json_answer_never_a_5xx(server, body, chat):
    """Random bodies over the API's own keys (wrong types, NaN, huge numbers, lists, nested
    objects): a 200 or a JSON 4xx, never a 5xx or a dropped connection. Generation is bounded
    (max_tokens at most 4 when valid) so the property runs in seconds."""
    if isinstance(body.get("max_tokens"), int) and 0 < body["max_tokens"]:
        body["max_tokens"] = min(body["max_tokens"], 4)
    body.pop("max_completion_tokens", None) if body.get("max_tokens") else None
    body.setdefault("max_tokens", 2)
    path = "/v1/chat/completions" if chat else "/v1/completions"
    with case(CLS, f"property body ({'chat' if chat else 'completion'})"):
        code, reply = server.post(path, body)
        assert code == 200 or 400 <= code < 500, (code, body, reply)
        if code != 200:
            assert reply["error"]["type"] == "invalid_request_error", reply


def test_1000_rapid_bad_requests_then_a_good_one(server):
    import http.client

    with case(CLS, "1 000 rapid bad requests, then a good one"):
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
        statuses = set()
        start = time.perf_counter()
        for i in range(1000):
            body = b"{oops" if i % 2 else json.dumps({"model": NAME, "prompt": 5}).encode()
            conn.request("POST", "/v1/completions", body, {"content-type": "application/json"})
            response = conn.getresponse()
            response.read()
            statuses.add(response.status)
        conn.close()
        assert statuses == {400}, statuses
        assert time.perf_counter() - start < 300
        _healthy(server)


def test_sigterm_with_requests_in_flight(smollm2_serving_engine):
    """A server of its own: a streaming and a non-streaming request in flight when SIGTERM
    arrives; the stream ends with finish_reason abort and [DONE], the non-streaming one gets a
    JSON answer (abort) or its full answer, and the process exits 0."""
    own = Server(smollm2_serving_engine, kv_cache_mb=POOL_MB)
    outcome: dict = {}

    def stream() -> None:
        # two requests of ~800 prompt tokens, 88 kept + 80 new: 11 blocks each, both admitted
        body = json.dumps({"model": NAME, "prompt": _prompt(200), "max_tokens": 80,
                           "stream": True, "temperature": 0}).encode()  # fmt: skip
        req = urllib.request.Request(own.url + "/v1/completions", body,
                                     {"content-type": "application/json"})  # fmt: skip
        with urllib.request.urlopen(req, timeout=120) as r:
            outcome["stream"] = [x.decode().strip() for x in r if x.strip()]

    def plain() -> None:
        outcome["plain"] = own.post("/v1/completions", {"model": NAME, "prompt": _prompt(200, 3),
                                                        "max_tokens": 80})  # fmt: skip

    threads = [threading.Thread(target=stream), threading.Thread(target=plain)]
    with case(CLS, "SIGTERM with a stream and a plain request in flight"):
        for t in threads:
            t.start()
        assert own.sigterm_when_running(2) == 0, "".join(own.log)
        for t in threads:
            t.join(30)
        lines = outcome["stream"]
        assert lines[-1] == "data: [DONE]", lines[-3:]
        assert json.loads(lines[-2][6:])["choices"][0]["finish_reason"] == "abort"
        code, reply = outcome["plain"]
        assert code in (200, 503), (code, reply)
        assert "Traceback" not in "".join(own.log)

"""``structkv deploy triton``: the repository it writes, and that repository served by a real
tritonserver (2.51, bundled in nvidia-pytriton, CPU) on 127.0.0.1, talked to over HTTP
(``generate`` / ``generate_stream``) and gRPC (``tritonclient``, decoupled streaming).

The server runs in the Triton environment (``.venv-triton``, built by ``make test`` with
``scripts/make_peer_env.py --extra tritonserver``; numpy < 2 there) through
``scripts/triton_server.sh``; the tests and their references run here.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from structkv.cli import main as cli
from structkv.errors import StructKVError
from structkv.prompts.needle import make_needle_prompt
from structkv.runtime.batch import Batch
from structkv.runtime.engine import Engine
from structkv.runtime.triton_deploy import INPUTS, OUTPUTS, write_repository
from structkv.runtime.triton_model import parse_inputs

ROOT = Path(__file__).resolve().parents[1]
TRITON_ENV = Path(os.environ.get("STRUCTKV_TRITON_ENV", ROOT / ".venv-triton"))
MODEL = "structkv"


# -- the repository --------------------------------------------------------------------------
def test_config_declares_a_decoupled_python_model_with_the_io_table(smollm2_engine, tmp_path):
    repo = write_repository(smollm2_engine, tmp_path / "repo", instances=2, kv_cache_mb=64)
    config = (repo / MODEL / "config.pbtxt").read_text()
    assert 'backend: "python"' in config
    assert "decoupled: true" in config
    assert "count: 2" in config and "kind: KIND_CPU" in config
    for spec in INPUTS + OUTPUTS:
        assert f'name: "{spec.name}"' in config
    assert config.count("optional: true") == sum(s.optional for s in INPUTS)
    assert f'string_value: "{Path(smollm2_engine).resolve()}"' in config  # referenced
    assert "structkv.runtime.triton_model" in (repo / MODEL / "1" / "model.py").read_text()
    assert "tritonserver --model-repository" in (repo / "README.md").read_text()


def test_copy_makes_the_repository_self_contained(smollm2_engine, tmp_path):
    repo = write_repository(smollm2_engine, tmp_path / "repo", copy=True, device="cuda")
    config = (repo / MODEL / "config.pbtxt").read_text()
    assert 'string_value: "1/engine"' in config and "kind: KIND_GPU" in config
    Engine.load(repo / MODEL / "1" / "engine", kv_cache_mb=8)  # whole, hashes verified


def _tampered(engine: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "tampered"
    shutil.copytree(engine, copy)
    weights = next(p for p in copy.iterdir() if p.suffix in (".bin", ".data", ".onnx"))
    with open(weights, "r+b") as f:
        f.seek(100)
        byte = f.read(1)
        f.seek(100)
        f.write(bytes([byte[0] ^ 0xFF]))
    return copy


@pytest.mark.parametrize(
    "case",
    ["missing", "tampered", "no_tokenizer", "not_empty", "bad_name", "inside_engine", "instances"],
)
def test_refusals_exit_2_with_one_clear_line(
    case, smollm2_engine, tmp_path, tmp_path_factory, capsys
):
    from conftest import exported_engine

    engine, out, extra = Path(smollm2_engine), tmp_path / "repo", []
    expect = {
        "missing": "does not exist",
        "tampered": "does not match its sha256",
        "no_tokenizer": "has no tokenizer",
        "not_empty": "pass --force",
        "bad_name": "invalid model name",
        "inside_engine": "holds the engine",
        "instances": "--instances must be in 1..64",
    }[case]
    if case == "missing":
        engine = tmp_path / "nowhere"
    elif case == "tampered":
        engine = _tampered(engine, tmp_path)
    elif case == "no_tokenizer":  # the tiny test engines carry no tokenizer
        engine = exported_engine("tiny-llama", "contrib", tmp_path_factory)
    elif case == "not_empty":
        out.mkdir()
        (out / "keep.txt").write_text("mine")
    elif case == "bad_name":
        extra = ["--name", "../evil"]
    elif case == "inside_engine":
        out = engine
    elif case == "instances":
        extra = ["--instances", "0"]
    argv = ["deploy", "triton", "--engine", str(engine), "--out", str(out), *extra]
    assert cli(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and expect in err[0], err
    if case == "not_empty":
        assert [p.name for p in out.iterdir()] == ["keep.txt"]  # untouched
    if case != "inside_engine":
        assert not (out.exists() and (out / MODEL).exists())
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".repo.")]  # no temp left


def test_force_replaces_the_old_repository_whole(smollm2_engine, tmp_path):
    out = tmp_path / "repo"
    write_repository(smollm2_engine, out, name="first")
    (out / "stale.txt").write_text("old")
    with pytest.raises(StructKVError, match="--force"):
        write_repository(smollm2_engine, out, name="second")
    write_repository(smollm2_engine, out, name="second", force=True)
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "second"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".repo.")]


# -- request parsing (what the model does before the scheduler) ------------------------------
def _tensors(**values) -> dict:
    out = {}
    for name, value in values.items():
        if isinstance(value, (str, bytes)):
            value = [value.encode() if isinstance(value, str) else value]
        dtype = np.object_ if isinstance(value, list) and isinstance(value[0], bytes) else None
        out[name] = np.array(value if isinstance(value, list) else [value], dtype=dtype)
    return out


def test_parse_inputs_defaults_and_values():
    p = parse_inputs(_tensors(text_input="Hello there"))
    assert (p.prompt, p.params.max_tokens, p.params.temperature, p.stream) == (
        "Hello there", 16, 0.0, False
    )  # fmt: skip
    p = parse_inputs(
        _tensors(
            text_input="x y",
            max_tokens=np.int32(5),
            temperature=np.float32(0.5),
            top_p=np.float32(0.9),
            seed=np.int64(3),
            stop=[b"\n", b"END"],
            stream=True,
            exclude_input_in_output=True,
        )
    )
    assert p.params.max_tokens == 5 and p.params.seed == 3 and p.params.stop == ("\n", "END")
    assert p.stream and p.exclude_input and abs(p.params.top_p - 0.9) < 1e-6


@pytest.mark.parametrize(
    "values, message",
    [
        ({}, "text_input is required"),
        ({"text_input": "  "}, "text_input is empty"),
        ({"text_input": b"\xff\xfe"}, "not valid UTF-8"),
        ({"text_input": "hi", "max_tokens": np.int32(0)}, "max_tokens must be"),
        ({"text_input": "hi", "temperature": np.float32(5)}, "temperature must be"),
        ({"text_input": "hi", "top_p": np.float32(0)}, "top_p must be"),
        ({"text_input": "hi", "stop": [b"a", b"b", b"c", b"d", b"e"]}, "stop must be"),
        ({"text_input": "hi", "max_tokens": np.array([1, 2], np.int32)}, "exactly one value"),
    ],
)
def test_parse_inputs_refuses_bad_values(values, message):
    with pytest.raises(StructKVError, match=message):
        parse_inputs(_tensors(**values))


def test_final_outputs_are_numbers_for_a_prompt_kept_whole():
    """An uncompressed prefill reports no pivot (``None``); a tensor cannot hold None (the
    response would fail to build and the client wait forever), so every output is a number
    of its declared type."""
    from structkv.runtime.scheduler import Event
    from structkv.runtime.triton_model import _OUT_DTYPES, OUTPUTS, final_outputs

    stats = {"pivot_layer": None, "propagated_tokens": 5, "compute_fraction": 1.0}
    out = final_outputs(Event("done", finish_reason="length", stats=stats), "x")
    assert out["pivot_layer"] == -1 and out["propagated_tokens"] == 5
    for spec in OUTPUTS:
        np.array([out[spec.name]], dtype=_OUT_DTYPES[spec.dtype])  # what _response builds


# -- a live tritonserver ------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _triton_env_reason() -> str | None:
    python = TRITON_ENV / "bin" / "python"
    if not python.is_file():
        return (
            f"no Triton environment at {TRITON_ENV}: build it with `python "
            "scripts/make_peer_env.py .venv-triton --extra tritonserver` (make test does)"
        )
    probe = subprocess.run([str(python), "-c", "import pytriton"], capture_output=True)
    if probe.returncode != 0:
        return f"nvidia-pytriton does not import in {TRITON_ENV}: {probe.stderr.decode()[-300:]}"
    return None


class Triton:
    """scripts/triton_server.sh in its own process group (so the test can see it is all gone)."""

    def __init__(self, repo: Path) -> None:
        self.http, self.grpc, self.metrics = _free_port(), _free_port(), _free_port()
        self.url = f"http://127.0.0.1:{self.http}"
        cmd = [str(ROOT / "scripts" / "triton_server.sh"), str(repo),
               str(self.http), str(self.grpc), str(self.metrics)]  # fmt: skip
        env = {**os.environ, "STRUCTKV_TRITON_ENV": str(TRITON_ENV)}
        self.log_path = repo.parent / "triton.log"
        self.log = open(self.log_path, "w")  # closed in stop()
        self.proc = subprocess.Popen(
            cmd, stdout=self.log, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
        deadline = time.time() + 180
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"tritonserver exited:\n{self.log_text()}")
            if self.status("/v2/health/ready") == 200:
                return
            time.sleep(0.5)
        self.stop()
        raise AssertionError(f"tritonserver not ready in 180 s:\n{self.log_text()}")

    def log_text(self) -> str:
        self.log.flush()
        return self.log_path.read_text()[-5000:]

    def status(self, path: str) -> int:
        try:
            with urllib.request.urlopen(self.url + path, timeout=5) as r:
                return r.status
        except (urllib.error.URLError, ConnectionError, OSError):
            return 0

    def post(self, path: str, body: dict) -> tuple[int, bytes]:
        req = urllib.request.Request(
            self.url + path, json.dumps(body).encode(), {"content-type": "application/json"}
        )
        try:
            with urllib.request.urlopen(req, timeout=120) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()

    def metric(self, name: str, **labels) -> float:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics}/metrics", timeout=10) as r:
            text = r.read().decode()
        total = 0.0
        for line in text.splitlines():
            if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
                total += float(line.rsplit(" ", 1)[1])
        return total

    def stop(self) -> tuple[int | None, float]:
        start = time.time()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            code = None
        self.log.close()
        return code, time.time() - start


def _group_alive(pgid: int) -> list[str]:
    """Processes still in the server's process group (the Python stubs are its children)."""
    alive = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            stat = (proc / "stat").read_text()
            fields = stat[stat.rindex(")") + 2 :].split()
            if int(fields[2]) == pgid and fields[0] != "Z":
                alive.append((proc / "cmdline").read_text().replace("\0", " "))
        except (OSError, ValueError):
            continue
    return alive


@pytest.fixture(scope="module")
def engine(smollm2_engine):
    return Engine.load(smollm2_engine, kv_cache_mb=64)


@pytest.fixture(scope="module")
def triton(smollm2_engine, tmp_path_factory):
    reason = _triton_env_reason()
    if reason:
        pytest.skip(reason)
    repo = write_repository(
        smollm2_engine, tmp_path_factory.mktemp("triton") / "repo", kv_cache_mb=128, copy=True
    )
    server = Triton(repo)
    yield server
    if server.proc.poll() is None:
        server.stop()


def _prompt(engine, seed: int, length: int = 320) -> str:
    """A needle question in the chat template, as text: Triton LLM clients send the templated
    prompt in text_input (an instruct model answers it instead of ending at once)."""
    question = make_needle_prompt(engine.tokenizer, length, 0.5, seed=seed, haystack="noise")
    messages = [{"role": "user", "content": question.prompt}]
    return engine.tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=False
    )


def _alone(engine, prompt: str, max_tokens: int) -> str:
    """The reference: the engine generating the prompt alone, in this process."""
    ids = engine.tokenizer(prompt, add_special_tokens=True)["input_ids"]
    tokens, _ = Batch(engine).generate_one(ids, max_tokens, engine.eos_ids())
    return engine.tokenizer.decode(tokens, skip_special_tokens=True)


pytestmark = pytest.mark.real_model


def test_generate_matches_structkv_run(triton, smollm2_engine, engine, capsys):
    prompt = _prompt(engine, seed=1)
    assert cli(["run", "--engine", str(smollm2_engine), "--prompt", prompt,
                "--max-new-tokens", "12", "--json"]) == 0  # fmt: skip
    expected = json.loads(capsys.readouterr().out)["text"]
    status, body = triton.post(
        f"/v2/models/{MODEL}/generate", {"text_input": prompt, "max_tokens": 12}
    )
    assert status == 200, body
    out = json.loads(body)
    assert out["text_output"] == prompt + expected  # exclude_input_in_output defaults to false
    assert out["finish_reason"] in ("length", "stop")
    assert out["prompt_tokens"] == len(engine.tokenizer(prompt)["input_ids"])
    assert 0 < out["propagated_tokens"] < out["prompt_tokens"]
    assert 0 < out["kv_bytes"] < out["kv_bytes_full"] and 0 < out["compute_fraction"] < 1
    status, body = triton.post(
        f"/v2/models/{MODEL}/generate",
        {"text_input": prompt, "max_tokens": 12, "exclude_input_in_output": True},
    )
    assert json.loads(body)["text_output"] == expected


def test_generate_stream_tokens_concatenate_to_the_same_text(triton, engine):
    prompt = _prompt(engine, seed=2)
    expected = _alone(engine, prompt, 10)
    status, body = triton.post(
        f"/v2/models/{MODEL}/generate_stream",
        {"text_input": prompt, "max_tokens": 10, "stream": True},
    )
    assert status == 200
    events = [
        json.loads(line[6:]) for line in body.decode().splitlines() if line.startswith("data: ")
    ]
    assert all("error" not in e for e in events), events
    *tokens, final = events
    assert len(tokens) >= 2 and all(set(e) >= {"text_output"} for e in tokens), events
    assert "".join(e["text_output"] for e in tokens) == expected
    assert final["text_output"] == "" and final["completion_tokens"] == 10
    assert final["finish_reason"] == "length"


def test_grpc_8_streams_two_cancelled_midway(triton, engine):
    """8 decoupled gRPC streams at once (requests arriving together share decode steps); two
    are cancelled after their second token. The other six match the engine alone, the two
    cancelled ones end as "abort" (so their KV blocks were released early), and the server
    stays healthy with every block free."""
    import tritonclient.grpc as grpcclient

    prompts = [_prompt(engine, seed=10 + i % 3) for i in range(8)]
    expected = {s: _alone(engine, prompts[s], 12) for s in range(3)}
    cancel = {2, 5}
    aborted_before = triton.metric("structkv_requests_finished", reason="abort")
    steps_before = triton.metric("structkv_decode_steps")
    rows_before = triton.metric("structkv_decode_rows")
    results: dict[int, dict] = {}

    def one(i: int) -> None:
        client = grpcclient.InferenceServerClient(f"127.0.0.1:{triton.grpc}")
        got = {"text": [], "errors": [], "final": None, "count": 0}
        done, second = threading.Event(), threading.Event()

        def callback(result, error) -> None:
            if error is not None:
                got["errors"].append(str(error))
                done.set()
                return
            got["count"] += 1
            got["text"].append(result.as_numpy("text_output")[0].decode())
            if got["count"] >= 2:
                second.set()
            if result.get_response().parameters["triton_final_response"].bool_param:
                got["final"] = result.as_numpy("finish_reason")[0].decode()
                done.set()

        inputs = []
        for name, value, dtype in (
            ("text_input", np.array([prompts[i].encode()], dtype=np.object_), "BYTES"),
            ("max_tokens", np.array([300 if i in cancel else 12], dtype=np.int32), "INT32"),
            ("stream", np.array([True]), "BOOL"),
        ):
            tensor = grpcclient.InferInput(name, list(value.shape), dtype)
            tensor.set_data_from_numpy(value)
            inputs.append(tensor)
        client.start_stream(callback=callback)
        client.async_stream_infer(MODEL, inputs, request_id=str(i),
                                  enable_empty_final_response=True)  # fmt: skip
        if i in cancel:
            assert second.wait(120), got
            client.stop_stream(cancel_requests=True)
        else:
            assert done.wait(120), got
            client.stop_stream()
        client.close()
        results[i] = got

    threads = [threading.Thread(target=one, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(180)
    assert sorted(results) == list(range(8))
    for i, got in results.items():
        if i in cancel:  # the client's own stream reports its cancellation, nothing else
            assert all("CANCELLED" in e for e in got["errors"]), (i, got["errors"])
        else:
            assert not got["errors"], (i, got["errors"])
            assert got["final"] in ("length", "stop")
            assert "".join(got["text"]) == expected[i % 3], i
    deadline = time.time() + 30
    while time.time() < deadline and (
        triton.metric("structkv_requests_finished", reason="abort") < aborted_before + 2
        or triton.metric("structkv_kv_blocks_used") > 0
    ):
        time.sleep(0.2)
    assert triton.metric("structkv_requests_finished", reason="abort") == aborted_before + 2
    assert triton.metric("structkv_kv_blocks_used") == 0
    steps = triton.metric("structkv_decode_steps") - steps_before
    rows = triton.metric("structkv_decode_rows") - rows_before
    assert rows > 1.5 * steps, (rows, steps)  # streams shared decode steps (8 alone: equal)
    assert triton.metric("structkv_requests_running") == 0
    assert triton.status("/v2/health/ready") == 200


def test_bad_requests_get_error_responses_and_the_server_keeps_serving(triton, engine):
    for body, message in (
        ({"max_tokens": 4}, "text_input"),
        ({"text_input": _prompt(engine, 3), "max_tokens": 0}, "max_tokens must be"),
        ({"text_input": _prompt(engine, 3), "temperature": 9.0}, "temperature must be"),
    ):
        status, raw = triton.post(f"/v2/models/{MODEL}/generate", body)
        assert status >= 400 and message in json.loads(raw)["error"], (body, raw)
    assert triton.status("/v2/health/ready") == 200
    hi = engine.tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hi!"}], add_generation_prompt=True, tokenize=False
    )  # fewer tokens than the engine's window + chunk: prefilled whole
    assert not engine.compresses(len(engine.tokenizer(hi)["input_ids"]))
    for text in (_prompt(engine, 4), hi):
        status, raw = triton.post(
            f"/v2/models/{MODEL}/generate", {"text_input": text, "max_tokens": 3}
        )
        assert status == 200 and json.loads(raw)["completion_tokens"] == 3, raw


def test_shutdown_within_10_s_and_no_orphans(triton):
    """(Last: stops the module's server.) SIGTERM: tritonserver unloads the model (the
    scheduler ends whatever is in flight) and exits; nothing of its process group survives."""
    pgid = triton.proc.pid
    assert _group_alive(pgid), "the server's processes should be visible before the stop"
    code, seconds = triton.stop()
    assert code == 0, triton.log_path.read_text()[-3000:]
    assert seconds < 10
    time.sleep(0.5)
    assert _group_alive(pgid) == []

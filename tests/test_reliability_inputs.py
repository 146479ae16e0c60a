"""Reliability, inputs: every numeric knob of the command line and the Python API at and beyond
its bounds (NaN, inf, negative, huge, wrong type), property-based with hypothesis; empty /
whitespace / non-UTF-8 / binary prompts; unknown names; contradictory knobs. Each must be one
clear error naming the problem, exit 2, no traceback — refused before any model is loaded."""

from __future__ import annotations

import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from reliability import assert_one_error, case, run_cli

from structkv.cli import main
from structkv.errors import StructKVError
from structkv.export.exporter import main as export_main
from structkv.methods import get_method


def floats(**kw):
    """Hypothesis floats without subnormals: a library loaded into the test process may switch
    on flush-to-zero (the kernel library did, until test_ort_ops caught it), and hypothesis
    refuses to draw subnormals then; they are not what these tests are about."""
    return st.floats(allow_subnormal=False, **kw)


SETTINGS = settings(max_examples=20, deadline=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture])  # fmt: skip
GEN = ["generate", "--prompt", "a prompt longer than the observation window of eight tokens"]


def _text(x: float) -> str:
    return repr(x) if math.isfinite(x) else str(x)


def _ratio_bad() -> st.SearchStrategy[str]:
    """Not in (0, 1]: NaN, infinities, zero, negatives, > 1, huge; and non-numbers."""
    numbers = st.one_of(
        st.just(math.nan), st.just(math.inf), st.just(-math.inf), st.just(0.0),
        floats(max_value=-1e-12, allow_nan=False), floats(min_value=1.0000001,
                                                                allow_nan=False),
    )  # fmt: skip
    return st.one_of(numbers.map(_text), st.sampled_from(["abc", "", "0.5.1", "1/2", "--"]))


def _unit_bad() -> st.SearchStrategy[str]:
    """Not in [0, 1] (λ, top-p's upper side)."""
    numbers = st.one_of(
        st.just(math.nan), st.just(math.inf), st.just(-math.inf),
        floats(max_value=-1e-12, allow_nan=False), floats(min_value=1.0000001,
                                                                allow_nan=False),
    )  # fmt: skip
    return st.one_of(numbers.map(_text), st.sampled_from(["abc", "", "x1"]))


def _int_bad(minimum: int) -> st.SearchStrategy[str]:
    """Below ``minimum``, fractional, or not a number."""
    return st.one_of(
        st.integers(max_value=minimum - 1).map(str),
        floats(allow_nan=True, allow_infinity=True).filter(lambda x: x != int(x) if
                                                              math.isfinite(x) else True)
        .map(_text),
        st.sampled_from(["abc", "", "1e3", "0x10", "½"]),
    )  # fmt: skip


#: (class, argv prefix, flag, strategy of bad values, what the error line must name)
KNOB_CASES = [
    ("generate", GEN, "--r-struct", _ratio_bad(), "r-struct"),
    ("generate", GEN, "--r-kv", _ratio_bad(), "r-kv"),
    ("generate", GEN, "--lambda", _unit_bad(), "lambda"),
    ("generate", GEN, "--window", _int_bad(1), "window"),
    ("generate", GEN, "--chunk", _int_bad(0), "chunk"),
    ("generate", GEN, "--max-new-tokens", _int_bad(1), "max-new-tokens"),
    ("generate", GEN, "--temperature", st.one_of(
        floats(max_value=-1e-12, allow_nan=False).map(_text),
        st.sampled_from(["nan", "inf", "-inf", "hot"])), "temperature"),
    ("generate", GEN, "--top-p", _ratio_bad(), "top-p"),
    ("serve", ["serve", "--engine", "/nonexistent-engine"], "--port", _int_bad(1), "port"),
    # an engine that does not exist: a bad value let through would fail there, never serve
    ("serve", ["serve", "--engine", "/nonexistent-engine"], "--kv-cache-mb", st.one_of(
        floats(max_value=0, allow_nan=False).map(_text),
        st.sampled_from(["nan", "inf", "-inf", "lots", ""])), "kv-cache-mb"),
    ("export", ["--model", "tiny-llama", "--out", "/proc/structkv-e"], "--jobs", _int_bad(1),
     "jobs"),
    ("calibrate", ["calibrate"], "--compute-cap", _ratio_bad(), "compute-cap"),
    ("eval", ["eval", "ruler", "--out", "/proc/structkv-r"], "--samples", _int_bad(1),
     "samples"),
]  # fmt: skip


@pytest.mark.parametrize(
    "cls,prefix,flag,values,needle", KNOB_CASES, ids=[f"{c[0]} {c[2]}" for c in KNOB_CASES]
)
def test_every_knob_beyond_its_bounds_is_one_error(cls, prefix, flag, values, needle):
    entry = export_main if cls == "export" else main

    @SETTINGS
    @given(value=values)
    def check(value: str) -> None:
        with case(f"CLI knobs ({cls})", f"{flag} {value!r}"):
            rc, _, err = run_cli(entry, [*prefix, flag, value])
            line = assert_one_error(rc, err)
            assert needle in line.replace("_", "-"), f"{needle!r} not named in {line!r}"

    check()


PROMPTS = [
    ("empty", b"", "empty prompt"),
    ("whitespace", b" \n\t  \r\n", "empty prompt"),
    ("non-UTF-8 (Latin-1)", "café crème".encode("latin-1"), "not UTF-8"),
    ("binary (PNG header)", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", "not UTF-8"),
    ("a directory", None, "is a directory"),
    ("missing", "missing", "does not exist"),
]


@pytest.mark.parametrize("label,content,message", PROMPTS, ids=[p[0] for p in PROMPTS])
def test_bad_prompt_files_are_one_error(label, content, message, tmp_path):
    with case("CLI prompts", f"--prompt-file {label}"):
        if content is None:
            path = tmp_path
        elif content == "missing":
            path = tmp_path / "nope.txt"
        else:
            path = tmp_path / "p.txt"
            path.write_bytes(content)
        rc, _, err = run_cli(main, ["generate", "--prompt-file", str(path)])
        assert_one_error(rc, err, message)


NAMES = [
    (["generate", "--prompt", "hi", "--method", "snapkvv"], "unknown method 'snapkvv'"),
    (["generate", "--prompt", "hi", "--model", "gpt-5"], "unknown model"),
    (["generate", "--prompt", "hi", "--pool-mode", "median"], "pool_mode must be one of"),
    (["generate", "--prompt", "hi", "--device", "tpu"], "unknown --device 'tpu'"),
    (["generate", "--prompt", "hi", "--dtype", "fp8"], "unsupported --dtype 'fp8'"),
    (["generate", "--prompt", "hi", "--pivot", "middle"], "argument --pivot: must be auto, online"),
    ([*GEN, "--method", "fastkv", "--tsp-layer", "29"], "tsp_layer must be a layer in [0, 28]"),
    ([*GEN, "--method", "gemfilter", "--filter-layer", "-1"],
     "filter_layer must be a layer in [0, 29]"),
    ([*GEN, "--method", "gemfilter", "--filter-score", "first"], "unknown filter_score 'first'"),
    ([*GEN, "--method", "snapkv", "--tsp-layer", "3"], "method snapkv has no parameter tsp_layer"),
    (["eval", "ruler", "--tasks", "niah_single_9", "--out", "/proc/structkv-x"],
     "unknown task"),
    (["eval", "ruler", "--methods", "ful", "--out", "/proc/structkv-x"], "unknown method"),
    (["bench", "prefill", "--methods", "full,fastkv2"], "unknown method 'fastkv2'"),
    (["nonsense-command"], "invalid choice"),
]  # fmt: skip


@pytest.mark.parametrize("argv,message", NAMES, ids=[" ".join(a[-2:]) for a, _ in NAMES])
def test_unknown_names_are_one_error(argv, message):
    with case("CLI names", " ".join(argv[-2:])):
        rc, _, err = run_cli(main, argv)
        assert_one_error(rc, err, message)


CONTRADICTIONS = [
    (["--r-struct", "0.2", "--r-kv", "0.5"], "must not exceed --r-struct"),
    (["--pivot", "31"], "--pivot must be in [0, "),
    (["--pivot", "-1"], "pivot must be auto, online or a layer index"),
    (["--quant", "int4", "--target", "tensorrt"], "TensorRT's ONNX parser"),
    (["--attention", "structkv", "--dtype", "fp16"], "fp32 CPU kernel"),
    (["--group-size", "64"], "--group-size needs --quant"),
]


@pytest.mark.parametrize("extra,message", CONTRADICTIONS, ids=[" ".join(e) for e, _ in
                                                               CONTRADICTIONS])  # fmt: skip
def test_contradictory_export_knobs_are_one_error_and_leave_nothing(extra, message, tmp_path):
    with case("CLI contradictions (export)", " ".join(extra)):
        out = tmp_path / "engine"
        rc, _, err = run_cli(export_main, ["--model", "tiny-llama", "--out", str(out), *extra])
        assert_one_error(rc, err, message)
        assert list(tmp_path.iterdir()) == [], "export left files behind"


@SETTINGS
@given(
    name=st.sampled_from(["structkv", "snapkv", "fastkv", "gemfilter", "pyramidkv"]),
    knob=st.sampled_from(["r_kv", "window", "pooling"]),
    value=st.one_of(st.just(math.nan), st.just(math.inf), floats(max_value=0),
                    st.integers(max_value=0), st.text(max_size=3), st.none().map(lambda _: [1])),
)  # fmt: skip
def test_python_api_refuses_bad_knobs_with_structkv_error(name, knob, value):
    """`get_method(name, **knobs)` — what a library user calls — raises StructKVError (never
    TypeError / ValueError from deep inside) for a bad value of any knob it has."""
    with case("Python API knobs", f"get_method({name!r}, {knob}={value!r})"):
        try:
            get_method(name, **{knob: value})
        except StructKVError:
            return
        raise AssertionError(f"{name}: {knob}={value!r} accepted")


def test_prompts_at_the_limit_and_one_over(tmp_path_factory):
    """Exactly the engine's limit (prompt + new tokens = max_position_embeddings) runs; one
    token more is one clear error; so are the shortest prompt the window allows and one less.
    The torch path (`generate_ids`) holds the same limit."""
    import numpy as np
    import torch
    from conftest import exported_engine

    from structkv.generate import generate_ids
    from structkv.methods import StructKV
    from structkv.models import tiny_model
    from structkv.runtime.engine import Engine

    engine = Engine.load(exported_engine("tiny-llama", "contrib", tmp_path_factory))
    limit, window = engine.manifest["max_prompt_tokens"], engine.method.window
    ids = np.random.default_rng(0).integers(0, 256, limit)
    with case("CLI prompts", f"engine: prompt + new tokens = the limit ({limit})"):
        tokens, _ = engine.generate(ids[: limit - 2], 2)
        assert len(tokens) == 2
    with case("CLI prompts", "engine: one token over the limit"):
        with pytest.raises(StructKVError, match=f"exceeds the engine's maximum of {limit}"):
            engine.generate(ids[: limit - 1], 2)
    with case("CLI prompts", f"engine: the shortest prompt the window allows ({window + 2})"):
        assert len(engine.generate(ids[: window + 2], 2)[0]) == 2
    with case("CLI prompts", "engine: one token under it (prefilled whole)"):
        tokens, stats = engine.generate(ids[: window + 1], 2)
        assert len(tokens) == 2 and not stats["compressed"]
    with case("CLI prompts", "engine: one token"):
        assert len(engine.generate(ids[:1], 2)[0]) == 2
    model = tiny_model("tiny-llama").model
    top = model.config.max_position_embeddings
    big = torch.randint(0, 256, (top,), generator=torch.Generator().manual_seed(0))
    with case("CLI prompts", f"torch path: prompt + new tokens = the context ({top})"):
        assert len(generate_ids(model, big[: top - 2], StructKV(pivot=2), 2).tokens) == 2
    with case("CLI prompts", "torch path: one token over the context"):
        with pytest.raises(StructKVError, match=f"exceeds the model's context of {top}"):
            generate_ids(model, big[: top - 1], StructKV(pivot=2), 2)

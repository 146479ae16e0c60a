"""CLI contract: bad input -> one `error:` line and exit 2; --json prints one object."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest

from structkv.cli import main
from structkv.models import tiny_model

BAD_INPUTS = [
    (["generate", "--prompt", "hi", "--method", "nope"], "unknown method 'nope'"),
    (["generate", "--prompt", "hi", "--r-kv", "1.5"], "r_kv must be in (0, 1]"),
    (["generate", "--prompt", "hi", "--r-struct", "0"], "r_struct must be in (0, 1]"),
    (["generate", "--prompt", "hi", "--r-kv", "-0.1"], "r_kv must be in (0, 1]"),
    (["generate", "--prompt", "hi", "--method", "snapkv", "--r-struct", "0.2"], "no parameter"),
    (["generate", "--prompt", ""], "empty prompt"),
    (["serve", "--engine", "e", "--r-kv", "0.3"], "method is fixed at export"),
    (["serve", "--port", "0"], "--port must be in 1..65535"),
    (["serve", "--model", "nope-model"], "unknown model 'nope-model'"),
    (["generate", "--prompt", "   "], "empty prompt"),
    (["generate", "--prompt-file", "/nonexistent/p.txt"], "does not exist"),
    (["generate", "--prompt", "hi", "--model", "/nonexistent"], "unknown model"),
    (["generate", "--prompt", "hi", "--model", "llama-3.1-8b"], "not in the local Hugging Face"),
    (["generate", "--prompt", "hi", "--pivot", "middle"], "--pivot"),
    (["generate", "--prompt", "hi", "--window", "0"], "window must be a positive integer"),
    (["generate"], "required"),
    (["bench", "prefill", "--lengths", "1k"], "comma-separated integers"),
    (["eval", "niah", "--task", "vt", "--out", "x"], "--task must be a needle task"),
    (["eval", "survival", "--task", "cwe", "--out", "x"], "--task must be a needle task"),
    (["calibrate", "--target-fidelity", "1.5"], "--target-fidelity must be in (0, 1]"),
    (["calibrate", "--target-fidelity", "nan"], "--target-fidelity must be in (0, 1]"),
    (["calibrate", "--compute-cap", "0"], "--compute-cap must be in (0, 1]"),
    (["calibrate", "--r-kvs", "0.2"], "--r-kvs limits the budget search: give --target-fidelity"),
    (["calibrate", "--refine"], "--refine searches the budgets: give --target-fidelity"),
    (["calibrate", "--windows", "32"], "--windows limits the budget search: give --target"),
    (["calibrate", "--chunks", "16,a", "--target-fidelity", "0.9"], "--chunks must be comma-sep"),
    (["calibrate", "--poolings", "8", "--target-fidelity", "0.9"], "pooling must be an odd"),
    (["calibrate", "--r-kvs", "2", "--target-fidelity", "0.9"], "--r-kvs must list fractions"),
    (["calibrate", "--prompts", "0"], "argument --prompts: expected an integer >= 1"),
    (["generate", "--prompt", "hi", "--kv-evidence", "-1"], "kv_evidence must be"),
    (["generate", "--prompt", "hi", "--method", "snapkv", "--kv-evidence", "1"], "no parameter"),
    (["eval", "frontier", "--r-kv", "0.2", "--out", "x"], "--r-kvs"),
    (["eval", "frontier", "--r-structs", "0.2,x", "--out", "x"], "comma-separated fractions"),
    (["eval", "frontier", "--tasks", "nope", "--out", "x"], "unknown task"),
    (["generate", "--prompt", "hi", "--dtype", "int8"], "unsupported --dtype 'int8'"),
    (["bench", "prefill", "--dtype", "fp64"], "unsupported --dtype 'fp64'"),
    (["eval", "ruler", "--dtype", "half", "--out", "x"], "unsupported --dtype 'half'"),
    (["serve", "--dtype", "float"], "unsupported --dtype 'float'"),
    (["serve", "--engine", "e", "--dtype", "bf16"], "an engine's dtype is fixed at export"),
]


@pytest.mark.parametrize("argv,message", BAD_INPUTS)
def test_bad_input_is_one_error_line_and_exit_2(argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))  # no cached hub weights
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err


def test_a_prompt_file_that_is_not_utf8_is_one_error(tmp_path, capsys):
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("caf\xe9 au lait".encode("latin-1"))
    assert main(["generate", "--prompt-file", str(bad)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is not UTF-8 text (byte 3" in err[0] and "iconv" in err[0]
    assert main(["generate", "--prompt-file", str(tmp_path)]) == 2  # a directory
    assert "is a directory; pass a text file" in capsys.readouterr().err


def test_unsupported_architecture(tmp_path, capsys):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    assert main(["generate", "--prompt", "hi", "--model", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "unsupported architecture 'gpt2'; supported: llama, qwen2, mistral" in err


def test_console_script_exits_2_without_traceback():
    proc = subprocess.run(
        [sys.executable, "-m", "structkv.cli", "generate", "--prompt", "x", "--r-kv", "2"],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and proc.stderr.startswith("error: r_kv")


@pytest.mark.real_model
def test_window_and_context_errors_on_real_model(capsys, tmp_path):
    assert main(["generate", "--prompt", "hello", "--window", "64"]) == 2
    assert "must be smaller than the prompt" in capsys.readouterr().err
    long = tmp_path / "long.txt"
    long.write_text("1 " * 9000)  # every digit is its own token: > 8192-token context
    assert main(["generate", "--prompt-file", str(long)]) == 2
    assert "exceeds the model's context of 8192" in capsys.readouterr().err


@pytest.mark.real_model
def test_generate_json_on_a_2k_needle_prompt(tmp_path, smollm2):
    from structkv.prompts.needle import make_needle_prompt

    needle = make_needle_prompt(smollm2.tokenizer, 2048, 0.5, seed=3)
    prompt = tmp_path / "p.txt"
    prompt.write_text(needle.prompt)
    cmd = [sys.executable, "-m", "structkv.cli", "generate", "--model", "smollm2-135m"]
    cmd += ["--method", "structkv", "--chat", "--json", "--prompt-file", str(prompt)]
    cmd += ["--max-new-tokens", "24"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ})
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)  # stdout is exactly one JSON object
    stats = out["stats"]
    for key in ("pivot_layer", "prompt_tokens", "propagated_tokens", "kv_tokens_per_layer",
                "prefill_s", "decode_tokens_per_s", "kv_bytes", "kv_bytes_full"):  # fmt: skip
        assert key in stats
    n = stats["prompt_tokens"]
    assert 2000 <= n <= 2200
    # `structkv` = the shipped profile's budgets (the paper's where it has none)
    from structkv.generate import as_method

    m = as_method("structkv", "smollm2-135m")
    assert out["method"] == m.to_dict()  # what was used, profile defaults filled in
    if m.chunk <= 1:
        assert stats["kv_tokens_per_layer"] == [math.ceil(m.r_kv * n) + m.window] * 30
        assert stats["propagated_tokens"] == math.ceil(m.r_struct * n) + m.window
    else:  # whole chunks: at most one chunk (plus the remainder) beyond the token budget
        bound = math.ceil(m.r_kv * n) + m.window + 2 * m.chunk
        assert all(k <= bound for k in stats["kv_tokens_per_layer"])
    # 30 layers x 3 KV heads x 64 dims x K and V x fp32
    assert stats["kv_bytes_full"] == 30 * 3 * 64 * 2 * 4 * n
    assert isinstance(out["text"], str) and out["text"]


def _bare_options(parser, path: str) -> list[str]:
    import argparse

    bare = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                bare += _bare_options(sub, f"{path} {name}")
        elif action.option_strings and action.dest != "help" and not action.help:
            bare.append(f"{path} {action.option_strings[0]}")
    return bare


def test_every_cli_option_has_a_help_string():
    from structkv.cli import build_parser
    from structkv.export.exporter import build_parser as export_parser

    bare = _bare_options(build_parser(), "structkv") + _bare_options(
        export_parser(), "structkv-export"
    )
    assert not bare, f"options without help: {bare}"


def test_generate_in_bf16_follows_transformers_bf16_logits(smollm2, capsys):
    """`--dtype bf16`: the torch path runs the model in bfloat16 (AMX / AVX-512 bf16 on CPU).
    With the full method every greedy token it emits is the top choice of transformers' own
    forward pass of a bf16 copy of the model (the independent reference), teacher-forced on
    the same tokens, up to two bf16 steps (ulps) at that logit's size; and the tokens are not
    all the fp32 ones on a prompt where fp32 and bf16 part ways (else the flag might be
    ignored). Why not token-for-token equality with transformers' generate(): its incremental
    decode rounds differently from one forward pass, and bf16 logits tie within one ulp often
    enough that either flips a token (on an AMX CPU, at token 14 of this prompt)."""
    import copy
    import math

    import torch

    from structkv.generate import encode_prompt

    text = "List the first ten prime numbers, then explain why 1 is not prime."
    argv = ["generate", "--method", "full", "--chat", "--json", "--max-new-tokens", "40",
            "--prompt", text]  # fmt: skip
    assert main([*argv, "--dtype", "bf16"]) == 0
    out = json.loads(capsys.readouterr().out)
    got = out["tokens"]
    assert out["dtype"] == "bf16" and len(got) >= 10
    model = copy.deepcopy(smollm2.model).to(torch.bfloat16)
    ids = encode_prompt(smollm2.tokenizer, text, chat=True)
    forced = torch.cat([ids, torch.tensor(got, dtype=ids.dtype)])[None]
    with torch.no_grad():
        logits = model(forced).logits[0, len(ids) - 1 : -1].float()
    for step, token in enumerate(got):
        best = float(logits[step].max())
        ulp = 2.0 ** (math.floor(math.log2(abs(best))) - 7)  # bf16: 8 significant bits
        assert best - float(logits[step, token]) <= 2 * ulp, (step, token, best)
    assert main([*argv, "--dtype", "fp32"]) == 0
    assert json.loads(capsys.readouterr().out)["tokens"][:10] != got[:10]  # here they part


def test_calibrate_r_kvs_limits_the_budget_search(monkeypatch, capsys):
    """`--r-kvs 0.2` reaches the budget search as its only R_KV (a fixed KV memory budget);
    without it the search keeps its default grid. `--refine` reaches it as refine=True."""
    import structkv.calibration as calibration
    from structkv.errors import StructKVError

    seen = []

    def fake(lm, **kwargs):
        seen.append(
            (kwargs["budget_grid"], kwargs["prompt_set"], kwargs["length"], kwargs["refine"])
        )
        raise StructKVError("stop here")

    monkeypatch.setattr(calibration, "calibrate", fake)
    base = ["calibrate", "--model", "tiny-llama", "--target-fidelity", "0.9"]
    assert main([*base, "--r-kvs", "0.2"]) == 2
    assert main(base) == 2
    assert main([*base, "--probes", "copy", "--length", "300"]) == 2
    assert main([*base, "--refine"]) == 2
    assert main([*base, "--windows", "32", "--poolings", "31", "--chunks", "16,0"]) == 2
    # the defaults are the shipped profile's recipe: fact probes at 4096 tokens, or the model's
    # whole context when it is shorter
    context = min(4096, tiny_model("tiny-llama").model.config.max_position_embeddings)
    assert seen == [
        ({"r_kvs": (0.2,)}, "fact", context, False),
        (None, "fact", context, False),
        (None, "copy", 300, False),
        (None, "fact", context, True),  # two-stage schedules searched too
        ({"windows": (32,), "poolings": (31,), "chunks": (16, 0)}, "fact", context, False),
    ]
    assert "stop here" in capsys.readouterr().err


def test_calibration_length_is_4096_or_the_models_context():
    from types import SimpleNamespace

    from structkv.calibration import calibration_length

    assert calibration_length(SimpleNamespace(max_position_embeddings=32768)) == 4096
    assert calibration_length(SimpleNamespace(max_position_embeddings=2048)) == 2048
    assert calibration_length(SimpleNamespace()) == 4096

"""Which calibration objective tracks needle retrieval? (docs/RESULTS.md, "Probe v3", "Probe v4").

Scores StructKV settings whose 2K needle results are known, on calibration prompts (never the
evaluation's), with each objective asked for: teacher-forced top-1 agreement on the
question-form recall probes of v2 (``probes``), and the free-running answer agreement on the copy
probes of v3 (``copy``), the cued copy probes of v4 (``cued``), the question probes of v5
(``question``) and the fact probes (``fact``), keeping only probes the full model continues.
An objective that tracks retrieval ranks the settings as the needles do.

    python scripts/probe_objectives.py [--prompts 8] [--steps 12] [--sets probes,copy,cued]
        [--match "v5"]    e.g. --sets copy,fact --match cheap
"""

from __future__ import annotations

import argparse

import torch

from structkv.calibration import (
    DRAWS,
    _fidelity,
    _record,
    calibration_prompts,
    echo_length,
    keep_prompts,
)
from structkv.methods import StructKV
from structkv.models import load

#: name: (pivot, λ, window, chunk, R_struct, R_KV[, pooling]), with the needle evidence in
#: docs/RESULTS.md
SETTINGS = {
    "v2 choice (needles 0/10, 0/10)": (6, 0.1, 64, 0, 0.5, 0.2),
    "shipped default (0/10 prose, 5/10 noise)": (14, 0.1, 8, 0, 0.2, 0.1),
    "chunk 16 window 64 (7/10 prose)": (14, 0.1, 64, 16, 0.2, 0.1),
    "chunk 8 (1/10 prose, 9/10 noise)": (14, 0.1, 8, 8, 0.2, 0.1),
    "0.5 / 0.5 (frontier 89 %)": (14, 0.1, 8, 0, 0.5, 0.5),
    "pivot 22, R_KV 0.5 (held-out 9/10)": (22, 0.1, 8, 0, 0.2, 0.5),
    "chunk 16 window 64, 0.5 / 0.5 (9/10, 9/10)": (14, 0.1, 64, 16, 0.5, 0.5),
    # the shipped profile (pivot 15, λ 0.3, chunk 16) and its KV 0.2 variants: RULER full
    # profile needle average, % of full (docs/RESULTS.md, "The calibrated default on RULER")
    "v5 default, KV 0.5 (RULER 90.5 %)": (15, 0.3, 8, 16, 0.5, 0.5),
    "v5 default at KV 0.2 (RULER 47 %)": (15, 0.3, 8, 16, 0.5, 0.2),
    "v5 at KV 0.2, window 32 (mk1 4/10)": (15, 0.3, 32, 16, 0.5, 0.2),
    "v5 at KV 0.2, window 64 (mk1 5/10)": (15, 0.3, 64, 16, 0.5, 0.2),
    # a 7th number is the pooling kernel (default 7): a wide kernel keeps a value's last digits
    "v5 at KV 0.2, pooling 31 (mk1 1/10, s1 10/10)": (15, 0.3, 8, 16, 0.5, 0.2, 31),
    "v5 at KV 0.2, window 64, pooling 31 (mk1 7/10, s1 10/10)": (15, 0.3, 64, 16, 0.5, 0.2, 31),
    # the cheap end at 2K, KV 0.1: 4 needle tasks x 40 samples, average of full's 47.7
    # (docs/RESULTS.md, "The capped calibration's own budgets", "Fact probes")
    "cheap: pivot 7 / 0.3, chunk 8 (2.5)": (7, 0.1, 8, 8, 0.3, 0.1),
    "cheap: pivot 10 / 0.2, chunk 8 (5.8)": (10, 0.1, 8, 8, 0.2, 0.1),
    "cheap: pivot 12 / 0.2, chunk 16 (8.3)": (12, 0.3, 8, 16, 0.2, 0.1),
    "cheap: pivot 14 / 0.1, chunk 16 (10.2)": (14, 0.3, 8, 16, 0.1, 0.1),
}


def score(lm, prompts, steps: int, settings: dict) -> dict[str, tuple[float, float]]:
    """(teacher-forced top-1, free-running answer agreement) per setting."""
    out: dict[str, list] = {k: [] for k in settings}
    full = {k: (*v, 7)[:7] for k, v in settings.items()}  # pooling 7 unless given
    for window, pooling in sorted({(v[2], v[6]) for v in full.values()}):
        here = {k: v for k, v in full.items() if (v[2], v[6]) == (window, pooling)}
        variants = sorted({(v[3], v[5]) for v in here.values()})
        for prompt in prompts:
            ids = prompt.encode(lm.tokenizer, chat=True)
            run = _record(lm.model, ids, 0.1, window, pooling, steps, variants)
            run.skip = echo_length(lm.tokenizer, prompt, run.full_tokens)
            for name, (pivot, lam, w, chunk, rs, rk, pool) in here.items():
                method = StructKV(
                    r_struct=rs, r_kv=rk, window=w, chunk=chunk, pooling=pool, pivot=0
                )
                _, top1, _, answer = _fidelity(lm.model, run, method, pivot, lam, steps)
                out[name].append((top1, answer))
    return {k: tuple(sum(x[i] for x in v) / len(v) for i in range(2)) for k, v in out.items()}


def probe_set(lm, name: str, n: int, steps: int) -> list:
    """``n`` prompts of set ``name``; for copy and cued probes, those the full model continues
    first (``DRAWS`` times as many drawn), as calibration keeps them."""
    if name == "probes":
        return calibration_prompts(lm.tokenizer, n, 2048, prompt_set=name)
    drawn = calibration_prompts(lm.tokenizer, DRAWS[name] * n, 2048, prompt_set=name)
    recorded = []
    for i, prompt in enumerate(drawn):
        run = _record(lm.model, prompt.encode(lm.tokenizer, True), 0.1, 8, 7, steps)
        answer = lm.tokenizer.decode(run.full_tokens, skip_special_tokens=True)
        recorded.append((i, run, prompt.copied(answer)))
    kept = keep_prompts(recorded, n, prefer_copied=True)
    print(f"{name}: {sum(c for *_, c in kept)} of {n} kept probes continued by the full model")
    for i, run, _ in kept:
        skip = echo_length(lm.tokenizer, drawn[i], run.full_tokens)
        said = lm.tokenizer.decode(run.full_tokens, skip_special_tokens=True)
        print(f"  probe {i}: {skip} echo tokens; full model: {said!r}")
    return [drawn[i] for i, _, _ in kept]


#: the column each prompt set is scored by: index 0 teacher-forced top-1, 1 free-running answer
COLUMNS = {
    "probes": ("v2: top-1", 0),
    "copy": ("v3: answer", 1),
    "cued": ("v4: answer", 1),
    "question": ("v5: answer", 1),
    "fact": ("fact: answer", 1),
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--sets", default="probes,copy,cued", help="prompt sets, comma-separated")
    p.add_argument("--match", default="", help="only the settings whose name contains this")
    args = p.parse_args()
    sets = args.sets.split(",")
    if any(s not in COLUMNS for s in sets):
        p.error(f"--sets: choose among {','.join(COLUMNS)}")
    settings = {k: v for k, v in SETTINGS.items() if args.match in k}
    if not settings:
        p.error(f"--match {args.match!r}: no setting name contains it")
    torch.set_grad_enabled(False)
    lm = load("smollm2-135m")
    scores = {
        s: score(lm, probe_set(lm, s, args.prompts, args.steps), args.steps, settings) for s in sets
    }
    print(f"{'setting':<44}" + "".join(f" {COLUMNS[s][0]:>11}" for s in sets))
    for name in settings:
        cells = "".join(f" {scores[s][name][COLUMNS[s][1]]:>11.3f}" for s in sets)
        print(f"{name:<44}{cells}")


if __name__ == "__main__":
    main()

"""Which calibration objective tracks needle retrieval? (docs/RESULTS.md, "Probe v3").

Scores six StructKV settings whose 2K needle results are known, on calibration prompts (never
the evaluation's), with both objectives: teacher-forced top-1 agreement on the question-form
recall probes of v2 (``prompt_set="probes"``), and the free-running answer agreement on the copy
probes of v3 (``prompt_set="copy"``, keeping only probes the full model continues). An objective
that tracks retrieval ranks the settings as the needles do.

    python scripts/probe_objectives.py [--prompts 8] [--steps 12]
"""

from __future__ import annotations

import argparse

import torch

from structkv.calibration import _fidelity, _record, calibration_prompts, keep_prompts
from structkv.methods import StructKV
from structkv.models import load

#: name: (pivot, λ, window, chunk, R_struct, R_KV), with the needle evidence in docs/RESULTS.md
SETTINGS = {
    "v2 choice (needles 0/10, 0/10)": (6, 0.1, 64, 0, 0.5, 0.2),
    "shipped default (0/10 prose, 5/10 noise)": (14, 0.1, 8, 0, 0.2, 0.1),
    "chunk 16 window 64 (7/10 prose)": (14, 0.1, 64, 16, 0.2, 0.1),
    "chunk 8 (1/10 prose, 9/10 noise)": (14, 0.1, 8, 8, 0.2, 0.1),
    "0.5 / 0.5 (frontier 89 %)": (14, 0.1, 8, 0, 0.5, 0.5),
    "pivot 22, R_KV 0.5 (held-out 9/10)": (22, 0.1, 8, 0, 0.2, 0.5),
}


def score(lm, prompts, steps: int) -> dict[str, tuple[float, float]]:
    """(teacher-forced top-1, free-running answer agreement) per setting."""
    out: dict[str, list] = {k: [] for k in SETTINGS}
    for window in sorted({v[2] for v in SETTINGS.values()}):
        here = {k: v for k, v in SETTINGS.items() if v[2] == window}
        variants = sorted({(v[3], v[5]) for v in here.values()})
        for prompt in prompts:
            ids = prompt.encode(lm.tokenizer, chat=True)
            run = _record(lm.model, ids, 0.1, window, 7, steps, variants)
            for name, (pivot, lam, w, chunk, rs, rk) in here.items():
                method = StructKV(r_struct=rs, r_kv=rk, window=w, chunk=chunk, pivot=0)
                _, top1, _, answer = _fidelity(lm.model, run, method, pivot, lam, steps)
                out[name].append((top1, answer))
    return {k: tuple(sum(x[i] for x in v) / len(v) for i in range(2)) for k, v in out.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--steps", type=int, default=12)
    args = p.parse_args()
    torch.set_grad_enabled(False)
    lm = load("smollm2-135m")
    v2 = calibration_prompts(lm.tokenizer, args.prompts, 2048, prompt_set="probes")
    drawn = calibration_prompts(lm.tokenizer, 2 * args.prompts, 2048, prompt_set="copy")
    recorded = []
    for i, prompt in enumerate(drawn):
        run = _record(lm.model, prompt.encode(lm.tokenizer, True), 0.1, 8, 7, args.steps)
        answer = lm.tokenizer.decode(run.full_tokens, skip_special_tokens=True)
        recorded.append((i, run, prompt.copied(answer)))
    v3 = [drawn[i] for i, _, _ in keep_prompts(recorded, args.prompts, prefer_copied=True)]
    old, new = score(lm, v2, args.steps), score(lm, v3, args.steps)
    print(f"{'setting':<44} {'v2: top-1':>10} {'v3: answer':>11}")
    for name in SETTINGS:
        print(f"{name:<44} {old[name][0]:>10.3f} {new[name][1]:>11.3f}")


if __name__ == "__main__":
    main()

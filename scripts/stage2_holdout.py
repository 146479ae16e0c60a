"""Does the budget search's stage 2 choose well? Check its ranking on held-out calibration probes.

Stage 2 of ``structkv calibrate --target-fidelity`` ranks window x pooling x chunk at fixed
budgets. A ranking is only worth something if it carries over to probes it did not see. This
script takes a calibration profile, draws a *held-out* set of the same calibration probes
(same prompt set, another seed: other calibration documents — never the evaluation's
haystacks, needles or wording), keeps them exactly as calibration does (probes the full model
continues first), scores the same window x pooling x chunk grid at the profile's stage-2
budgets, and compares rankings:

- for each ranking rule (``answer``: answer agreement alone; ``answer-kl``: answer agreement
  minus the first answer token's KL, the rule of the profiles up to 2026-12-01), the setting
  it picks on the profile's own table and that setting's held-out answer agreement;
- the Spearman rank correlation of each rule's scores on the profile's table with the held-out
  answer agreement (the quantity the target fidelity is stated in), and of KL with held-out KL
  (does a setting's KL carry over at all?).

    python scripts/stage2_holdout.py --profile docs/results/calibration/mixed-kv02/\
smollm2-135m-profile.json --prompts 16 --seed 4321 --out docs/results/calibration/stage2-holdout
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

from structkv.calibration import draw_probes, search_budgets
from structkv.models import load

RULES = {"answer": lambda r: r["answer"], "answer-kl": lambda r: r["answer"] - r["kl"]}


def ranks(values: list[float]) -> list[float]:
    """Ranks 1..n, ties sharing their mean rank (as Spearman's rho needs)."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    out = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            out[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return out


def spearman(a: list[float], b: list[float]) -> float:
    """Pearson correlation of the ranks."""
    ra, rb = ranks(a), ranks(b)
    n = len(a)
    ma, mb = sum(ra) / n, sum(rb) / n
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb))
    va = sum((x - ma) ** 2 for x in ra) ** 0.5
    vb = sum((y - mb) ** 2 for y in rb) ** 0.5
    return cov / (va * vb) if va and vb else float("nan")


def compare(seen: list[dict], held: list[dict]) -> dict:
    """Each rule's pick on ``seen`` and its held-out answer; rank correlations."""
    key = lambda r: (r["window"], r["pooling"], r["chunk"])  # noqa: E731
    by_key = {key(r): r for r in held}
    pairs = [(r, by_key[key(r)]) for r in seen]
    out: dict = {"rules": {}}
    for name, rule in RULES.items():
        pick = max(seen, key=rule)
        out["rules"][name] = {
            "pick": dict(zip(("window", "pooling", "chunk"), key(pick))),
            "seen_answer": pick["answer"],
            "seen_kl": pick["kl"],
            "held_out_answer": by_key[key(pick)]["answer"],
            "held_out_kl": by_key[key(pick)]["kl"],
            "spearman_with_held_out_answer": round(
                spearman([rule(a) for a, _ in pairs], [b["answer"] for _, b in pairs]), 4
            ),
        }
    best = max(held, key=lambda r: r["answer"])
    out["held_out_best"] = {**dict(zip(("window", "pooling", "chunk"), key(best))),
                            "answer": best["answer"]}  # fmt: skip
    out["spearman_kl_seen_vs_held_out"] = round(
        spearman([a["kl"] for a, _ in pairs], [b["kl"] for _, b in pairs]), 4
    )
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--profile", required=True, help="a profile with a budget search")
    ap.add_argument("--prompts", type=int, default=16, help="held-out probes kept (default 16)")
    ap.add_argument("--seed", type=int, default=4321, help="held-out seed (calibration: 1234)")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    profile = json.loads(Path(args.profile).read_text())
    search = profile.get("budget_search")
    if not search or "window_table" not in search:
        print(f"error: {args.profile} has no budget search; calibrate with --target-fidelity",
              file=sys.stderr)  # fmt: skip
        return 2
    if args.seed in (1234, 1235):
        print("error: --seed 1234/1235 draw the calibration set itself; choose another seed",
              file=sys.stderr)  # fmt: skip
        return 2
    s, at = profile["settings"], search["window_budget"]
    lam = profile["lambda"]
    seen = search["window_table"]
    windows = sorted({r["window"] for r in seen})
    poolings = sorted({r.get("pooling", 7) for r in seen})
    chunks = sorted({r["chunk"] for r in seen})
    lm = load(args.model)
    start = time.perf_counter()

    def progress(msg: str) -> None:
        print(f"{time.strftime('%H:%M:%S')} {msg}", file=sys.stderr, flush=True)

    draw = draw_probes(lm, args.prompts, s["length"], s["prompt_set"], s["r_kv"], s["window"],
                       s.get("pooling", 7), s["steps"], seed=args.seed,
                       progress=progress)  # fmt: skip
    texts, copied, drawn = draw.texts, draw.copied, draw.drawn
    del draw
    held = search_budgets(
        lm, texts, at["pivot"], lam, profile["num_layers"], s["steps"],
        search["target_fidelity"], s["compute_cap"], windows=windows, poolings=poolings,
        chunks=chunks, r_structs=(at["r_struct"],), r_kvs=(at["r_kv"],), pivots=[at["pivot"]],
        progress=progress, objective=search.get("objective", "answer"),
    )  # fmt: skip
    result = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": f"{platform.processor() or platform.machine()}, {platform.platform()}",
        "command": "python " + " ".join(sys.argv),
        "profile": args.profile,
        "budgets": {**at, "lambda": lam},
        "held_out": {"seed": args.seed, "prompts": args.prompts, "drawn": drawn, "copied": copied},
        "comparison": compare(seen, held["window_table"]),
        "seen_table": seen,
        "held_out_table": held["window_table"],
        "seconds": round(time.perf_counter() - start, 1),
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"stage2-holdout-seed{args.seed}.json"
    path.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result["comparison"], indent=1))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python
"""Print a calibration profile's search table as Markdown: KL and top-1 per pivot x λ.

Example: python scripts/profile_table.py structkv/profiles/smollm2-135m.json
"""

import json
import sys


def main(path: str) -> int:
    profile = json.load(open(path))
    lambdas = sorted({r["lambda"] for r in profile["table"]})
    rows = {}
    for r in profile["table"]:
        layer = r["layer"] if isinstance(r["layer"], int) else ",".join(map(str, r["layer"]))
        label = f"{r['rule']} {layer}" if r["rule"] != "fixed" else f"layer {layer}"
        rows.setdefault((label, r["compute_fraction"]), {})[r["lambda"]] = r
    print("| pivot | compute | " + " | ".join(f"λ {lam}: KL / top-1" for lam in lambdas) + " |")
    print("|---|---|" + "---|" * len(lambdas))
    best = profile["best"]
    for (label, frac), by_lam in rows.items():
        cells = []
        for lam in lambdas:
            r = by_lam[lam]
            cell = f"{r['kl']:.4f} / {r['top1']:.3f}"
            cells.append(f"**{cell}**" if r == best else cell)
        print(f"| {label} | {frac:.3f} | " + " | ".join(cells) + " |")
    print(
        f"\nChosen: pivot {profile['pivot']} (rule {profile['rule'] or 'fixed'}), "
        f"λ {profile['lambda']}; metric scales {[round(s, 4) for s in profile['metric_scales']]}; "
        f"search range [{profile['l_min']}, {profile['l_max']}]; {profile['seconds']} s."
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))

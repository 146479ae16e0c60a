"""Export a checkpoint larger than the export's memory limit, and check the engine (issue 16).

1. Write a synthetic checkpoint: an alias's published config at full width with few layers
   (default Qwen2.5-7B, 3 layers: 3.6 GB in bf16), random weights, sharded like the hub's
   (``model-0000x-of-0000y.safetensors`` + index), written shard by shard.
2. ``structkv-export`` it under a hard address-space limit below the checkpoint's size
   (``prlimit --as``; every process of the export, the tracing worker included, is held to
   it), timed by ``/usr/bin/time -v`` (peak RSS, wall time).
3. The engine (ONNX Runtime) and the torch reference loading the same directory generate
   greedily from one prompt; the tokens must be equal. Both run outside the limit, one after
   the other (the fp32 engine is twice the bf16 checkpoint).

    python scripts/export_big.py --out docs/results/export-big/qwen2.5-7b-L3.json

Writes the JSON (sizes, limit, peak RSS, times, tokens) and exits 1 if a check fails.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROMPT_TOKENS, NEW_TOKENS, PIVOT, LAM = 96, 8, 1, 0.5


def write_checkpoint(directory: Path, alias: str, layers: int, shard_bytes: int) -> dict:
    """Random bf16 weights for ``alias`` at full width with ``layers`` layers, one shard in
    memory at a time. Returns sizes."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModelForCausalLM

    from structkv.configs import scaled

    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(scaled(alias, layers), indent=1))
    config = AutoConfig.from_pretrained(directory)
    with torch.device("meta"):
        meta = AutoModelForCausalLM.from_config(config)
    params = list(meta.named_parameters())  # tied duplicates are listed once
    groups, group, size = [], [], 0
    for name, p in params:
        nbytes = p.numel() * 2
        if group and size + nbytes > shard_bytes:
            groups.append(group)
            group, size = [], 0
        group.append((name, tuple(p.shape)))
        size += nbytes
    groups.append(group)
    gen = torch.Generator().manual_seed(0)
    weight_map, total, largest = {}, 0, 0
    for i, group in enumerate(groups):
        file = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        tensors = {}
        for name, shape in group:
            if len(shape) == 1:
                t = 1.0 + 0.05 * torch.randn(shape, generator=gen)
            else:
                t = torch.randn(shape, generator=gen) * (1.0 / shape[-1] ** 0.5)
            tensors[name] = t.to(torch.bfloat16)
            weight_map[name] = file
            total += tensors[name].numel() * 2
            largest = max(largest, tensors[name].numel() * 2)
        save_file(tensors, str(directory / file), metadata={"format": "pt"})
        del tensors
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))
    return {"bytes": total, "largest_tensor_bytes": largest, "shards": len(groups)}


def _time_v(stderr: str) -> dict:
    def field(label):
        m = re.search(rf"{re.escape(label)}: (.+)", stderr)
        return m.group(1).strip() if m else None

    wall = field("Elapsed (wall clock) time (h:mm:ss or m:ss)")
    seconds = None
    if wall:
        parts = [float(x) for x in wall.split(":")]
        seconds = sum(v * 60**i for i, v in enumerate(reversed(parts)))
    rss = field("Maximum resident set size (kbytes)")
    return {"wall_s": seconds, "max_rss_mb": int(rss) / 1024 if rss else None}


def _tokens(code: str) -> list[int]:
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"reference run failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--alias", default="qwen2.5-7b")
    p.add_argument("--layers", type=int, default=3)
    p.add_argument("--limit-gb", type=float, default=3.0, help="address-space limit (GiB)")
    p.add_argument("--shard-gb", type=float, default=1.0)
    p.add_argument("--work", help="working directory (default: a temporary one, removed)")
    p.add_argument("--out", help="write the JSON result here")
    args = p.parse_args(argv)

    work = Path(args.work or tempfile.mkdtemp(prefix="structkv-big-"))
    ckpt, engine = work / "checkpoint", work / "engine"
    result: dict = {"alias": args.alias, "layers": args.layers, "date": time.strftime(
        "%Y-%m-%d %H:%M UTC", time.gmtime()), "cpus": len(os.sched_getaffinity(0))}  # fmt: skip
    try:
        t = time.perf_counter()
        if not (ckpt / "model.safetensors.index.json").is_file():
            shutil.rmtree(ckpt, ignore_errors=True)
            result["checkpoint"] = write_checkpoint(
                ckpt, args.alias, args.layers, int(args.shard_gb * 2**30)
            )
        else:
            index = json.loads((ckpt / "model.safetensors.index.json").read_text())
            result["checkpoint"] = {"bytes": index["metadata"]["total_size"], "reused": True,
                                    "shards": len(set(index["weight_map"].values()))}  # fmt: skip
        result["checkpoint"]["write_s"] = round(time.perf_counter() - t, 1)
        limit = int(args.limit_gb * 2**30)
        result["limit_bytes"] = limit
        command = ["prlimit", f"--as={limit}", "/usr/bin/time", "-v", sys.executable, "-m",
                   "structkv.export.exporter", "--model", str(ckpt), "--out", str(engine),
                   "--force", "--pivot", str(PIVOT), "--lambda", str(LAM),
                   "--attention", "contrib"]  # fmt: skip
        result["command"] = " ".join(command[4:])
        run = subprocess.run(command, capture_output=True, text=True)
        result["export"] = {"returncode": run.returncode, **_time_v(run.stderr)}
        result["export"]["log"] = [
            line.strip()
            for line in run.stderr.replace("\r", "\n").splitlines()
            if line.startswith("[structkv-export]")
        ]
        if run.returncode != 0:
            result["export"]["stderr_tail"] = run.stderr[-4000:]
            raise SystemExit(f"export failed under the limit:\n{run.stderr[-4000:]}")
        manifest = json.loads((engine / "manifest.json").read_text())
        result["export"]["manifest_stats"] = manifest["export"]
        result["engine_bytes"] = sum(f.stat().st_size for f in engine.rglob("*") if f.is_file())
        prompt = f"torch.randint(0, 1000, ({PROMPT_TOKENS},), generator=torch.Generator().manual_seed(1))"  # noqa: E501
        engine_tokens = _tokens(
            "import json, numpy as np, torch\nfrom structkv.runtime.engine import Engine\n"
            f"ids = {prompt}\nengine = Engine.load({str(engine)!r})\n"
            f"np.save({str(work / 'engine-logits.npy')!r}, engine.prefill(ids.numpy()).logits)\n"
            f"print(json.dumps(engine.generate(ids.numpy(), {NEW_TOKENS})[0]))"
        )
        torch_tokens = _tokens(
            "import json, numpy as np, torch\nfrom structkv.models import load\n"
            "from structkv.methods import StructKV\nfrom structkv.generate import generate_ids\n"
            f"ids = {prompt}\nmodel = load({str(ckpt)!r}).model\n"
            f"method = StructKV(pivot={PIVOT}, lam={LAM})\n"
            f"np.save({str(work / 'torch-logits.npy')!r}, method.prefill(model, ids).logits)\n"
            f"out = generate_ids(model, ids, method, {NEW_TOKENS})\n"
            "print(json.dumps(out.tokens))"
        )
        import numpy as np

        got, want = np.load(work / "engine-logits.npy"), np.load(work / "torch-logits.npy")
        top = 10
        result["first_step_logits"] = {
            "max_abs_diff": float(np.abs(got - want).max()),
            "scale (max |logit|)": float(np.abs(want).max()),
            f"top{top}_engine": np.argsort(-got)[:top].tolist(),
            f"top{top}_torch": np.argsort(-want)[:top].tolist(),
        }
        result["tokens"] = {"engine": engine_tokens, "torch": torch_tokens}
        result["tokens_equal"] = engine_tokens == torch_tokens
        rss = result["export"]["max_rss_mb"] * 2**20
        result["checks"] = {
            "export under a limit below the checkpoint size": limit < result["checkpoint"]["bytes"],
            "peak RSS below the checkpoint size": rss < result["checkpoint"]["bytes"],
            "greedy tokens equal (engine vs torch)": result["tokens_equal"],
            "first-step top-10 equal": result["first_step_logits"]["top10_engine"]
            == result["first_step_logits"]["top10_torch"],
            "first-step logits within 1e-3 of torch": result["first_step_logits"]["max_abs_diff"]
            < 1e-3,
        }
    finally:
        if args.out:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(result, indent=1))
    return 0 if all(result["checks"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())

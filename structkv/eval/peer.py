"""Peer cross-check against kvpress (NVIDIA's KV-compression library) on the same prompts.

Two questions, answered on RULER-style prompts with the question inside the compressed context
(so kvpress is query-aware like our methods):

1. Is our ``snapkv`` SnapKV? With kvpress's settings (average pooling, kernel 5, same window,
   same number of kept tokens per head) both must keep the same token set per layer and KV head.
   We record the exact-match rate and the mean overlap of the kept sets.
2. How do kvpress's presses (SnapKV, StreamingLLM, Knorm) score beside ours at the same budget?

kvpress 0.5.5 works with transformers < 5.3 only (with 5.24 every press fails with
``KeyError: 'past_key_values'``), so this runs in its own environment:
``pip install 'structkv[peer]'`` pins both. Nothing here is imported by the rest of the package.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import json
import statistics
from dataclasses import dataclass
from pathlib import Path

import torch

from structkv.errors import StructKVError
from structkv.eval.ruler import make_sample, score
from structkv.generate import encode_prompt, eos_token_ids, generate_many
from structkv.methods import get_method
from structkv.profile import resolve_method
from structkv.selection import budget

#: kvpress press -> our generation whose kept sets must equal its own (None: no counterpart).
#: Our SnapKV is compared in kvpress's settings (average pooling, kernel 5): "snapkv-avg5".
PRESSES = {"snapkv": "snapkv-avg5", "streamingllm": "streamingllm", "knorm": None}
#: Our methods scored beside them, at their defaults (R_KV 0.1, R_struct 0.2).
OURS = ("full", "snapkv", "streamingllm", "structkv")


def import_kvpress():
    """kvpress, or a clear error saying how to get a working one."""
    try:
        return importlib.import_module("kvpress")
    except Exception as e:  # ImportError, or kvpress failing against this transformers
        raise StructKVError(
            f"kvpress is not usable here ({type(e).__name__}: {e}); run the peer check in its own "
            "environment: python -m venv peer && peer/bin/pip install 'structkv[peer]' "
            "(kvpress 0.5.5 needs transformers < 5.3)"
        ) from None


def keep_count(n_prompt: int, r_kv: float, window: int) -> int:
    """Tokens our SaliencyKV methods keep per layer and head: the budget plus the window."""
    return budget(r_kv, n_prompt) + window


def make_press(kvpress, name: str, n_prompt: int, keep: int, window: int, kernel: int):
    """A kvpress press that keeps exactly ``keep`` of ``n_prompt`` tokens per head.

    kvpress keeps ``int(N * (1 - ratio))`` tokens; the +0.5 makes that ``keep`` exactly."""
    ratio = 1.0 - (keep + 0.5) / n_prompt
    if name == "snapkv":
        return kvpress.SnapKVPress(compression_ratio=ratio, window_size=window, kernel_size=kernel)
    if name == "streamingllm":
        return kvpress.StreamingLLMPress(compression_ratio=ratio)
    if name == "knorm":
        return kvpress.KnormPress(compression_ratio=ratio)
    raise StructKVError(f"unknown press {name!r}; choose one of {', '.join(PRESSES)}")


def record_kept(press, kvpress) -> dict[int, torch.Tensor]:
    """Make ``press`` record, per layer, the sorted token indices it keeps ``[G, keep]``.

    ScorerPress.compress keeps ``scores.topk(n_kept)``; we take the same top-k of the same
    scores, so the record is what the cache really holds."""
    kept: dict[int, torch.Tensor] = {}
    score_fn = press.score

    def scoring(module, hidden_states, keys, values, attentions, kwargs):
        scores = score_fn(module, hidden_states, keys, values, attentions, kwargs)
        n_kept = kvpress.utils.compute_n_kept(keys.shape[2], press.compression_ratio)
        kept[module.layer_idx] = scores[0].topk(n_kept, dim=-1).indices.sort(-1).values
        return scores

    press.score = scoring
    return kept


@torch.inference_mode()
def kvpress_generate(model, ids: torch.Tensor, press, max_new_tokens: int, eos: tuple[int, ...]):
    """Greedy decoding as kvpress's pipeline does it: compressed prefill of the whole prompt
    (question included), then new tokens at positions N, N+1, ... on the compressed cache."""
    from transformers import DynamicCache

    cache = DynamicCache()
    n = int(ids.shape[0])
    with press(model):
        out = model(input_ids=ids[None], past_key_values=cache, logits_to_keep=1)
    tokens = [int(out.logits[0, -1].argmax())]
    while len(tokens) < max_new_tokens and tokens[-1] not in eos:
        pos = torch.tensor([[n + len(tokens) - 1]])
        out = model(input_ids=torch.tensor([[tokens[-1]]]), past_key_values=cache, position_ids=pos)
        tokens.append(int(out.logits[0, -1].argmax()))
    return tokens


def set_agreement(ours: torch.Tensor, theirs: torch.Tensor) -> tuple[float, float]:
    """(fraction of heads with identical sets, mean overlap |ours ∩ theirs| / |theirs|)."""
    exact, overlap = [], []
    for a, b in zip(ours.tolist(), theirs.tolist(), strict=True):
        exact.append(float(set(a) == set(b)))
        overlap.append(len(set(a) & set(b)) / len(b))
    return statistics.mean(exact), statistics.mean(overlap)


@dataclass
class PeerConfig:
    tasks: list[str]
    lengths: list[int]
    samples: int
    seed: int = 0
    r_kv: float = 0.1
    window: int = 8
    kernel: int = 5
    max_new_tokens: int = 32


def _peer_row(lm, kvpress, cfg: PeerConfig, methods: dict, task, length, seed, eos) -> dict:
    """One prompt: every method's and press's score, and the kept-set agreement per press."""
    chat = bool(getattr(lm.tokenizer, "chat_template", None))
    sample = make_sample(task, lm.tokenizer, length, seed)
    ids = encode_prompt(lm.tokenizer, sample.prompt, chat)
    n = int(ids.shape[0])
    keep = keep_count(n, cfg.r_kv, cfg.window)
    row = {"task": task, "length": length, "seed": seed, "tokens": n}
    runs = generate_many(lm.model, ids, list(methods.values()), cfg.max_new_tokens, eos)
    gens = dict(zip(methods, runs, strict=True))
    for m, gen in gens.items():
        row[m] = score(sample, lm.tokenizer.decode(gen.tokens, skip_special_tokens=True))
    for name, counterpart in PRESSES.items():
        press = make_press(kvpress, name, n, keep, cfg.window, cfg.kernel)
        kept = record_kept(press, kvpress)
        tokens = kvpress_generate(lm.model, ids, press, cfg.max_new_tokens, eos)
        text = lm.tokenizer.decode(tokens, skip_special_tokens=True)
        row[f"kvpress-{name}"] = score(sample, text)
        if counterpart is None:
            continue
        # The cache holds the kept prompt tokens first, then the decoded ones.
        layers = gens[counterpart].cache.layers
        agreement = [
            set_agreement(lc.kept_positions()[:, :keep], kept[l]) for l, lc in enumerate(layers)
        ]
        row[f"sets_{name}"] = {
            "exact": statistics.mean(a for a, _ in agreement),
            "overlap": statistics.mean(b for _, b in agreement),
            "kept": [int(kept[0].shape[1]), keep],
        }
    return row


def run_peer(lm, cfg: PeerConfig, out_dir: Path, progress=None) -> dict:
    """Kept-set agreement (snapkv) and accuracy side by side; writes peer.json and peer.md."""
    kvpress = import_kvpress()
    eos = eos_token_ids(lm)
    ours = {m: resolve_method(get_method(m), lm.model_id) for m in OURS}
    matched = get_method(
        "snapkv", r_kv=cfg.r_kv, window=cfg.window, pooling=cfg.kernel, pool_mode="avg"
    )
    methods = {**ours, "snapkv-avg5": matched}
    rows: list[dict] = []
    total = len(cfg.tasks) * len(cfg.lengths) * cfg.samples
    bar = progress(total=total) if progress else None
    for length in cfg.lengths:
        for task in cfg.tasks:
            for i in range(cfg.samples):
                rows.append(_peer_row(lm, kvpress, cfg, methods, task, length, cfg.seed + i, eos))
                if bar:
                    bar.update(1)
    if bar:
        bar.close()
    result = {
        "settings": {
            "r_kv": cfg.r_kv,
            "window": cfg.window,
            "kernel": cfg.kernel,
            "kvpress": importlib.metadata.version("kvpress"),
            "transformers": importlib.import_module("transformers").__version__,
        },
        "rows": rows,
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "peer.json").write_text(json.dumps(result, indent=1))
    (out_dir / "peer.md").write_text(peer_table(result))
    return result


def peer_table(result: dict) -> str:
    """Markdown: accuracy (%) per method and length, and the kept-set agreement of SnapKV."""
    rows = result["rows"]
    methods = [*OURS, "snapkv-avg5", *(f"kvpress-{p}" for p in PRESSES)]
    lengths = sorted({r["length"] for r in rows})
    lines = [
        "| method | " + " | ".join(str(n) for n in lengths) + " |",
        "|---|" + "---|" * len(lengths),
    ]
    for m in methods:
        cells = []
        for n in lengths:
            scores = [r[m] for r in rows if r["length"] == n and m in r]
            cells.append(f"{100 * statistics.mean(scores):.1f}" if scores else "–")
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    lines.append("")
    for name, ours in PRESSES.items():
        if ours is None:
            continue
        exact = statistics.mean(r[f"sets_{name}"]["exact"] for r in rows)
        overlap = statistics.mean(r[f"sets_{name}"]["overlap"] for r in rows)
        lines.append(
            f"- kept sets, our `{ours}` vs kvpress `{name}`, {len(rows)} prompts x every layer "
            f"and KV head: identical {100 * exact:.2f} %, mean overlap {100 * overlap:.3f} %."
        )
    return "\n".join(lines) + "\n"

"""The generation loop: prefill with a method, then decode on the compressed cache.

Kept apart from the cache (:mod:`structkv.cache`) and from the methods: decoding is identical for
every method, it only sees whatever K/V each layer kept. New tokens take the positions after the
prompt's original positions and are appended to every layer unchanged (§5).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch

from structkv.cache import CompressedKVCache
from structkv.errors import StructKVError
from structkv.layers import (
    decode_layer,
    decode_mask,
    decoder_layers,
    final_logits,
    rope,
    sliding_window,
)
from structkv.methods import Method, get_method, prefill_shared
from structkv.prefill import PrefillResult, PrefillStats


def _new_tokens(model, pos: int, tokens: list[int]):
    """Embeddings ``[1, n, E]``, RoPE tables and positions ``[n]`` of tokens appended at
    ``pos``… (what decode and teacher-forced scoring both start from)."""
    positions = torch.arange(pos, pos + len(tokens), device=model_device(model))
    h = model.model.embed_tokens(torch.tensor([tokens], device=positions.device))
    cos, sin = rope(model, positions, h.dtype)
    return h, cos, sin, positions


def _appending(lc, pos: int):
    """The ``with_new_token`` callback of :func:`structkv.layers.decode_layer` for the torch
    cache: write the new K/V in place at ``pos``… and attend over everything kept."""

    def with_new_tokens(k, v):
        lc.append(k, v, pos)
        return lc.keys(), lc.values()

    return with_new_tokens


@torch.inference_mode()
def decode_step(model, cache: CompressedKVCache, token: int) -> torch.Tensor:
    """Append ``token`` at the next position to every layer and return next-token logits ``[V]``.

    The layer step is :func:`structkv.layers.decode_layer`, as in the exported decode graph; the
    new token's K/V are written in place into the cache's preallocated buffers."""
    pos = cache.next_position
    h, cos, sin, position = _new_tokens(model, pos, [token])
    n_rep = model.config.num_attention_heads // model.config.num_key_value_heads
    for layer, lc in zip(decoder_layers(model), cache.layers):
        mask = None
        window = sliding_window(layer)
        # Only a sliding-window layer whose kept tokens reach back past its window needs a mask
        # (the new token's own slot is written before attention reads it: pos - pos = 0).
        if window is not None and pos - int(lc.kept_positions().min()) >= window:
            key_pos = torch.cat([lc.kept_positions(), position.expand(lc.k.shape[1], 1)], 1)
            mask = decode_mask(position, key_pos[None], window, n_rep)
        h, _, _ = decode_layer(layer, h, cos, sin, _appending(lc, pos), mask)
    cache.next_position = pos + 1
    return final_logits(model, h[:, -1])[0]


@torch.inference_mode()
def forced_logits(model, cache: CompressedKVCache, tokens: list[int]) -> torch.Tensor:
    """Append known ``tokens`` at the next positions to every layer in one pass and return the
    next-token logits after each ``[n, V]``: what :func:`decode_step` would return, token by
    token, when fed them.

    Why: scoring an answer that is already known (calibration's teacher-forced agreement with
    the full model's answer) needs no sequential loop, and on a CPU a decode step's cost is
    the per-layer overhead, not the token count — one pass scores the whole answer for about
    the price of one step. The new tokens see every cached token (all precede them) and each
    other causally; a sliding-window layer masks what lies past its window."""
    n, pos = len(tokens), cache.next_position
    h, cos, sin, positions = _new_tokens(model, pos, tokens)
    n_rep = model.config.num_attention_heads // model.config.num_key_value_heads
    for layer, lc in zip(decoder_layers(model), cache.layers):
        key_pos = torch.cat([lc.kept_positions(), positions.expand(lc.k.shape[1], n)], 1)
        diff = positions[None, :, None] - key_pos[:, None, :]  # [G, n, keys]
        visible = diff >= 0
        window = sliding_window(layer)
        if window is not None:
            visible &= diff < window
        mask = visible.repeat_interleave(n_rep, dim=0)[None]
        h, _, _ = decode_layer(layer, h, cos, sin, _appending(lc, pos), mask)
    cache.next_position = pos + n
    return final_logits(model, h[0])


def model_device(model) -> torch.device:
    """Where the model's weights live; every tensor the torch path makes goes there too."""
    return model.model.embed_tokens.weight.device


def sample(logits: torch.Tensor, temperature: float, top_p: float, generator) -> int:
    """Greedy when ``temperature`` <= 0, else nucleus sampling from softmax(logits / T)."""
    if temperature <= 0:
        return int(logits.argmax())
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(descending=True)
        keep = sorted_p.cumsum(0) - sorted_p < top_p  # always keeps the most likely token
        probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_p[keep])
    return int(torch.multinomial((probs / probs.sum()).cpu(), 1, generator=generator))


@dataclass
class Generation:
    tokens: list[int]
    stats: PrefillStats
    decode_s: float
    cache: CompressedKVCache | None = None  # to continue decoding, or inspect what was kept
    text: str = ""
    method: dict | None = None  # the resolved configuration (profile defaults filled in)

    @property
    def decode_tokens_per_s(self) -> float:
        steps = max(0, len(self.tokens) - 1)  # the first token comes from the prefill logits
        return steps / self.decode_s if self.decode_s > 0 else 0.0

    def stats_json(self) -> dict:
        out = self.stats.to_json()
        out["decode_tokens_per_s"] = self.decode_tokens_per_s
        out["new_tokens"] = len(self.tokens)
        return out


def as_method(method: str | Method, model_id: str, **knobs) -> Method:
    """A method instance with model-dependent defaults (calibration profile) filled in."""
    from structkv.profile import resolve_method

    if isinstance(method, str):
        method = get_method(method, **knobs)
    return resolve_method(method, model_id)


def check_context(model, n_prompt: int, max_new_tokens: int) -> None:
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit is not None and n_prompt + max_new_tokens > limit:
        raise StructKVError(
            f"prompt of {n_prompt} tokens plus {max_new_tokens} new tokens exceeds the model's "
            f"context of {limit}; shorten the prompt or lower --max-new-tokens"
        )


def check_sampling(max_new_tokens, temperature: float = 0.0, top_p: float = 1.0) -> None:
    """Generation settings, refused before any model work: ``max_new_tokens`` >= 1,
    ``temperature`` a finite number >= 0 (0 = greedy), ``top_p`` in (0, 1]."""
    if (
        isinstance(max_new_tokens, bool)
        or not isinstance(max_new_tokens, int)
        or (max_new_tokens < 1)
    ):
        raise StructKVError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
    if not isinstance(temperature, (int, float)) or not 0 <= temperature < math.inf:
        raise StructKVError(
            f"temperature must be a finite number >= 0 (0 = greedy), got {temperature!r}"
        )
    if not isinstance(top_p, (int, float)) or not 0 < top_p <= 1:
        raise StructKVError(f"top_p must be in (0, 1], got {top_p!r}")


@torch.inference_mode()
def generate_ids(
    model,
    input_ids: torch.Tensor,
    method: Method,
    max_new_tokens: int = 32,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
    eos_ids: tuple[int, ...] = (),
) -> Generation:
    """Prefill ``input_ids`` (``[N]``) with ``method`` and decode up to ``max_new_tokens``."""
    check_sampling(max_new_tokens, temperature, top_p)
    check_context(model, int(input_ids.shape[0]), max_new_tokens)
    input_ids = input_ids.to(model_device(model))
    result = method.prefill(model, input_ids, extra_capacity=max_new_tokens)
    return decode(model, result, max_new_tokens, temperature, top_p, seed, eos_ids)


@torch.inference_mode()
def generate_many(
    model,
    input_ids: torch.Tensor,
    methods: list[Method],
    max_new_tokens: int = 32,
    eos_ids: tuple[int, ...] = (),
) -> list[Generation]:
    """Greedy generation of the same prompt with several methods, sharing their full-length
    prefill layers (:func:`structkv.methods.prefill_shared`); equals one ``generate_ids`` each."""
    if max_new_tokens < 1:
        raise StructKVError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    check_context(model, int(input_ids.shape[0]), max_new_tokens)
    input_ids = input_ids.to(model_device(model))
    results = prefill_shared(model, input_ids, methods, extra_capacity=max_new_tokens)
    return [decode(model, r, max_new_tokens, eos_ids=eos_ids) for r in results]


@torch.inference_mode()
def decode(
    model,
    result: PrefillResult,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
    eos_ids: tuple[int, ...] = (),
) -> Generation:
    """Sample the first token from the prefill logits, then decode on the prefill's cache."""
    generator = torch.Generator().manual_seed(seed)
    tokens = [sample(result.logits, temperature, top_p, generator)]
    start = time.perf_counter()
    while len(tokens) < max_new_tokens and tokens[-1] not in eos_ids:
        logits = decode_step(model, result.cache, tokens[-1])
        tokens.append(sample(logits, temperature, top_p, generator))
    return Generation(tokens, result.stats, time.perf_counter() - start, result.cache)


def encode_prompt(tokenizer, prompt: str, chat: bool) -> torch.Tensor:
    if not prompt:
        raise StructKVError("empty prompt; pass a non-empty --prompt or --prompt-file")
    if chat:
        if not getattr(tokenizer, "chat_template", None):
            raise StructKVError("this tokenizer has no chat template; drop --chat")
        ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}],
            add_generation_prompt=True,
            tokenize=True,
            return_dict=False,
        )
    else:
        ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
    if not ids:
        raise StructKVError("the prompt encodes to zero tokens; pass a non-empty prompt")
    return torch.tensor(ids, dtype=torch.long)


def eos_ids_of(config, generation_config, tokenizer) -> tuple[int, ...]:
    """Every end-of-sequence id a model declares (config, generation config, tokenizer; each
    may hold one id or a list). ``config`` may be a dict (an engine manifest's)."""
    ids = set()
    for source in (config, generation_config, tokenizer):
        if isinstance(source, dict):
            value = source.get("eos_token_id")
        else:
            value = getattr(source, "eos_token_id", None)
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(value)
    return tuple(sorted(ids))


def eos_token_ids(lm) -> tuple[int, ...]:
    return eos_ids_of(lm.model.config, getattr(lm.model, "generation_config", None), lm.tokenizer)


def generate_text(
    lm,
    prompt: str,
    method: str | Method = "structkv",
    chat: bool = False,
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
    **knobs,
) -> Generation:
    """Tokenise (optionally with the chat template), generate, detokenise."""
    if lm.tokenizer is None:
        raise StructKVError(
            f"model {lm.model_id} has no tokenizer; use generate_ids with token ids"
        )
    ids = encode_prompt(lm.tokenizer, prompt, chat)
    resolved = as_method(method, lm.model_id, **knobs)
    out = generate_ids(
        lm.model, ids, resolved, max_new_tokens, temperature, top_p, seed, eos_token_ids(lm)
    )
    out.text = lm.tokenizer.decode(out.tokens, skip_special_tokens=True)
    out.method = resolved.to_dict()
    return out

"""§6 Calibration: choose the pivot (rule or layer) and λ per model by label-free fidelity.

Why: the paper's λ 0.9 and argmax pivot fail on shallow-salience models such as SmolLM2
(method.md §2–3). We pick, on prose prompts that are not from any evaluation task, the (pivot,
λ) whose compressed model stays closest to full context: the agreement of its free-running
greedy answer with the full model's own answer (the matched prefix), KL of the next-token
distribution at the last prompt position, and teacher-forced top-1 agreement over the next
``steps`` tokens. Only pivots under the compute cap are searched.

Why fact probes at 4096 tokens (prompt set "fact", the default since 2026-12-02): an invented
record with a 5–8 digit code is inserted in the prose and asked for by its name — a short key
and a multi-token value, as retrieval has. They are the only probes whose ranking carried over
to the needles at the cheap end (docs/RESULTS.md "Calibrated at 4K, the fact probes choose
depth"); at 2048 tokens they saturate (every shallow setting 1.000) and the search falls back to
the cheapest row, so the default length is 4096 (capped at the model's context).

Why copy probes and free-running agreement (prompt set "copy", the default until 2026-12-02):
the earlier objectives (generic tasks, then question-form recall probes, scored by
teacher-forced top-1) chose settings that fail needle retrieval — the 135M model does not answer
a question-form recall probe from the document, so its "reference" answer was a summary any
compressed model reproduces, and teacher forcing hides the one wrong retrieval step among easy
copied ones. A copy probe pre-fills the answer with the opening words of a sentence from early
in the document; the full model continues it from the document (induction), which only works if
compression kept that sentence. Probes the full model does not continue are set aside.

Question probes (prompt set "question"): a copy probe's last tokens are the quote itself, so
the observation window that scores the document is the query exactly, and a wider window only
dilutes it — whereas a chat question sits before the template's closing tokens, which a window
of 8 sees instead of the question. A question probe quotes the sentence's opening in the user
turn, pre-fills only its first words, and scores the answer after the answer's echo of the
quote (any setting that keeps the question reproduces the echo), so it rewards a window that
reaches the question (docs/RESULTS.md, "Probe v5").

Cost: one full prefill per prompt, recorded layer by layer; each candidate then re-runs only
the layers after its pivot on the compacted tokens (:func:`structkv.prefill.continue_prefill`),
since the KV selection of the layers before the pivot does not depend on the candidate, and
scores the full model's answer teacher-forced in one pass (:func:`structkv.generate.forced_logits`):
its free-running answer equals its teacher-forced predictions up to their first difference from
the full model's, which is all the matched prefix counts (half the time of decoding both).
"""

from __future__ import annotations

import random
import re
import sys
import time
from dataclasses import dataclass, field, replace

import torch

from structkv.cache import LayerCache
from structkv.centrality import accumulate
from structkv.errors import StructKVError
from structkv.generate import decode_step, encode_prompt, forced_logits
from structkv.methods import Full, SnapKV, StructKV
from structkv.pivot import OnlinePivot, metric_scales, search_range
from structkv.prefill import Compacted, LayerView, compact, continue_prefill, run_prefill_shared
from structkv.profile import FORMAT_VERSION
from structkv.prompts.haystack import calibration_paragraphs, paragraphs
from structkv.prompts.needle import build_context
from structkv.selection import budget

#: Generic endings: a question or continuation about the prose itself (no needle, no lookup).
TASKS = (
    "Summarize the text above in two sentences.",
    "What is the main topic of the text above? Explain briefly.",
    "Continue the text above with one more paragraph in the same style.",
    "List the three most important ideas in the text above.",
)
#: Copy probe (prompt set "copy"): the user turn asks for a sentence of the document, and the
#: answer is pre-filled with the first :data:`QUOTE_WORDS` words of one from its first 60 %.
COPY_REQUEST = "Quote one sentence of the text above word for word."
QUOTE_WORDS = 8
#: A copy probe counts as answered by the full model when its answer starts with this many
#: words of the sentence's true continuation.
COPIED_WORDS = 3
#: Question-form recall probe (prompt set "probes", the profiles of 2026-11-29): quote five
#: consecutive words from early in the document and ask for the words that follow them there.
#: Label-free: the reference is the full-context model's own answer. Its wording, the prose pool
#: (calibration_paragraphs) and the question differ from every evaluation template, as the copy
#: probe's do.
PROBE = (
    'In the text above, the words "{quote}" are followed by more words. '
    "Write the ten words that come right after them in the text."
)
LAMBDAS = (0.1, 0.3, 0.5, 0.7, 0.9)
#: The paper's operating point: prefill computation reduced by 40% (compute fraction 0.6).
DEFAULT_COMPUTE_CAP = 0.6


def _probe(context: list[str], rng: random.Random) -> str | None:
    """A recall question on five words inside a sentence of >= 16 words from the first 60 %
    of ``context`` (at least ten words follow them in that sentence)."""
    early = context[: max(1, int(0.6 * len(context)))]
    sentences = [
        sent
        for para in early
        for sent in re.split(r"(?<=[.!?])\s+", para)
        if len(sent.split()) >= 16
    ]
    if not sentences:
        return None
    words = rng.choice(sentences).split()
    start = rng.randrange(0, len(words) - 15)
    return PROBE.format(quote=" ".join(words[start : start + 5]))


@dataclass(frozen=True)
class CalibrationPrompt:
    """A calibration prompt: the user's text, the answer's pre-filled start (copy probes) and
    the document's own continuation of it (what a copying full model says; only used to set
    aside probes the full model does not continue — never as a reference)."""

    text: str
    prefill: str = ""
    continuation: str = ""
    #: question probes: the cue's words the answer repeats after its pre-filled start, before
    #: it retrieves anything (answer agreement is scored after them: any setting that keeps
    #: the question repeats them)
    echo: str = ""
    #: fact probes: the continuation is the inserted code, which the answer must open with
    fact: bool = False

    def encode(self, tokenizer, chat: bool) -> torch.Tensor:
        """The prompt's ids: the chat template's user turn, then the pre-filled answer."""
        if not self.prefill:
            return encode_prompt(tokenizer, self.text, chat)
        if not chat:
            return encode_prompt(tokenizer, self.text + "\n" + self.prefill, chat)
        head = encode_prompt(tokenizer, self.text, chat)
        tail = tokenizer(self.prefill, add_special_tokens=False)["input_ids"]
        return torch.cat([head, torch.tensor(tail, dtype=head.dtype)])

    def copied(self, answer: str) -> bool:
        """Whether ``answer`` (the full model's) continues the quote as the document does: right
        away for a copy probe; for a cued probe, anywhere after its echo of the cue (a run of
        :data:`COPIED_WORDS` words from the sentence's next :data:`CUE_SPAN`); for a fact
        probe, when its first word is the inserted code."""
        after, got = self.continuation.split(), answer.split()
        if self.fact:
            return bool(got) and re.sub(r"\W", "", got[0]) == self.continuation
        if len(self.prefill.split()) >= QUOTE_WORDS:
            return bool(after) and got[:COPIED_WORDS] == after[:COPIED_WORDS]
        runs = {tuple(after[i : i + COPIED_WORDS]) for i in range(CUE_SPAN - COPIED_WORDS + 1)}
        return any(
            tuple(got[i : i + COPIED_WORDS]) in runs for i in range(len(got) - COPIED_WORDS + 1)
        )


def _copy_probe(context: list[str], rng: random.Random) -> CalibrationPrompt | None:
    early = context[: max(1, int(0.6 * len(context)))]
    sentences = [
        sent
        for para in early
        for sent in re.split(r"(?<=[.!?])\s+", para)
        if len(sent.split()) >= QUOTE_WORDS + 8
    ]
    if not sentences:
        return None
    words = rng.choice(sentences).split()
    return CalibrationPrompt(
        "\n".join(context) + "\n\n" + COPY_REQUEST,
        " ".join(words[:QUOTE_WORDS]),
        " ".join(words[QUOTE_WORDS:]),
    )


#: Cued copy probe (prompt set "cued", v4): the user turn quotes the first :data:`QUOTE_WORDS`
#: words of a sentence from early in the document and asks for that sentence; the answer is
#: pre-filled with only its first :data:`CUE_PREFILL` words. As in a chat question about a
#: document, the cue then sits before the chat template's closing tokens, out of reach of a
#: window of 8 — which a copy probe, whose last tokens are the quote, cannot show. Without any
#: pre-filled words the 135M model does not answer it (it describes the text instead). The
#: wording shares nothing with the evaluation's needle questions.
CUE_REQUEST = 'Repeat the sentence of the text above that opens with "{quote}".'
CUE_PREFILL = 3
#: A cued probe counts as answered by the full model when its answer shares a run of
#: :data:`COPIED_WORDS` words with the first :data:`CUE_SPAN` words that follow the cue.
CUE_SPAN = 12


def _cued_probe(context: list[str], rng: random.Random) -> CalibrationPrompt | None:
    probe = _copy_probe(context, rng)
    if probe is None:
        return None
    words = probe.prefill.split()
    request = CUE_REQUEST.format(quote=probe.prefill)
    return CalibrationPrompt(
        probe.text.removesuffix(COPY_REQUEST) + request,
        " ".join(words[:CUE_PREFILL]),
        probe.continuation,
    )


#: Question probe (prompt set "question", v5): the cued probe, scored only after the answer's
#: echo of the cue (:func:`echo_length`), and drawn four times over because the 135M model
#: continues about half of them. v4's answers were half echo, which any setting that keeps the
#: question reproduces, so the score rewarded keeping the question rather than the sentence.
def _question_probe(context: list[str], rng: random.Random) -> CalibrationPrompt | None:
    probe = _copy_probe(context, rng)
    if probe is None:
        return None
    words = probe.prefill.split()
    return CalibrationPrompt(
        probe.text.removesuffix(COPY_REQUEST) + CUE_REQUEST.format(quote=probe.prefill),
        " ".join(words[:CUE_PREFILL]),
        probe.continuation,
        " ".join(words[CUE_PREFILL:]),
    )


#: Fact probe (prompt set "fact", 2026-12-02): one invented fact inserted at a random paragraph
#: boundary of the calibration prose — an invented name's record sealed with an invented code of
#: 5–8 digits — and a question about it, the answer pre-filled with the fact's own words up to
#: the code (a pre-fill that left out "in the catalogue" was continued by the full model only 7
#: times in 16; this one 16 in 16). What it adds to the
#: copy probes: the query is a short key (the name), not an 8-word quote, and the answer is an
#: unpredictable multi-token span, as in a retrieval workload; copy probes are solved by
#: induction on the quote at shallow pivots that such retrieval punishes (docs/RESULTS.md, "Fact
#: probes"). Label-free like the others: the reference is the full model's own answer, and the
#: inserted code only sets aside probes the full model does not answer. Wording, names, codes
#: and prose share nothing with the evaluation's needle templates or haystacks (tested).
FACT = "Record {name} in the catalogue was sealed with the code {code}."
FACT_QUESTION = "Which code sealed record {name} in the text above?"
FACT_PREFILL = "Record {name} in the catalogue was sealed with the code"
#: syllables of the invented record names (three per name, capitalised)
SYLLABLES = ("ka", "lo", "mer", "ti", "van", "su", "dor", "pel", "ri", "zan", "bel", "nu", "ras",
             "fi", "gon", "tal")  # fmt: skip


def _fact_probe(context: list[str], rng: random.Random) -> CalibrationPrompt:
    name = "".join(rng.choice(SYLLABLES) for _ in range(3)).capitalize()
    digits = rng.randint(5, 8)
    code = str(rng.randrange(10 ** (digits - 1), 10**digits))
    at = rng.randrange(1, len(context)) if len(context) > 1 else 1
    paras = [*context[:at], FACT.format(name=name, code=code), *context[at:]]
    return CalibrationPrompt(
        "\n".join(paras) + "\n\n" + FACT_QUESTION.format(name=name),
        FACT_PREFILL.format(name=name),
        code,
        fact=True,
    )


def echo_length(tokenizer, prompt: CalibrationPrompt, tokens: list[int]) -> int:
    """How many leading tokens of an answer repeat ``prompt.echo``: the fewest whose text starts
    with the echo's words; 0 when the answer never does (then nothing is skipped)."""
    words = prompt.echo.split()
    for k in range(1, len(tokens) + 1) if words else ():
        if tokenizer.decode(tokens[:k], skip_special_tokens=True).split()[: len(words)] == words:
            return k
    return 0


#: the prompt sets whose prompts pre-fill an answer the full model must continue (scored by
#: the free-running answer; calibration sets aside the probes the full model does not continue)
PROBE_SETS = {
    "copy": _copy_probe,
    "question": _question_probe,
    "cued": _cued_probe,
    "fact": _fact_probe,
}
#: how many prompts calibration draws per prompt it keeps
DRAWS = {"copy": 2, "question": 4, "cued": 2, "fact": 2}
#: prompt set "mixed": half copy probes (they see what keeps a value's span: pooling, chunks),
#: half question probes (they see the window a chat question needs), each drawn and kept as
#: its own set; the question half from another seed, so that it quotes other documents
MIXED = (("copy", 0), ("question", 1))
PROMPT_SETS = ("copy", "question", "mixed", "cued", "fact", "probes", "generic")
DEFAULT_PROMPT_SET = "fact"
#: calibration prompt length: fact probes saturate at 2048 tokens on SmolLM2 (module docstring)
DEFAULT_LENGTH = 4096


def calibration_prompts(
    tokenizer, n: int, length: int, seed: int = 1234, prompt_set: str = "copy"
) -> list[CalibrationPrompt]:
    """``n`` prompts of about ``length`` tokens of calibration prose (never the evaluation's
    haystack). "copy": copy probes (calibration draws twice the prompts it needs and keeps
    those the full model continues). "probes" (profiles of 2026-11-29): three in four end with
    a question-form recall probe, every fourth with a generic task. "generic" (older profiles:
    the evaluation's prose pool, generic tasks only). The older sets stay so that the profiles
    made with them stay reproducible."""
    if prompt_set not in PROMPT_SETS:
        raise StructKVError(f"unknown prompt set {prompt_set!r}; choose one of {PROMPT_SETS}")
    if prompt_set == "mixed":
        raise StructKVError('"mixed" is drawn by parts: use drawn_prompts()')
    if prompt_set == "generic":
        rng = random.Random(seed)
        contexts = [build_context(tokenizer, length - 24, rng, paragraphs()) for _ in range(n)]
        return [
            CalibrationPrompt("\n".join(c) + "\n\n" + TASKS[i % len(TASKS)])
            for i, c in enumerate(contexts)
        ]
    source = calibration_paragraphs()
    rng = random.Random(seed)
    out = []
    while len(out) < n:
        context = build_context(tokenizer, length - 48, rng, source)
        if prompt_set in PROBE_SETS:
            probe = PROBE_SETS[prompt_set](context, rng)
            if probe is not None:
                out.append(probe)
            continue
        i = len(out)
        ending = _probe(context, rng) if i % 4 != 3 else None
        text = "\n".join(context) + "\n\n" + (ending or TASKS[(i // 4) % len(TASKS)])
        out.append(CalibrationPrompt(text))
    return out


def drawn_prompts(
    tokenizer, n: int, length: int, prompt_set: str, seed: int = 1234
) -> list[tuple[str, list[CalibrationPrompt], int]]:
    """What calibration draws to keep ``n`` prompts: per part of the set, (its prompt set, the
    prompts drawn, how many of them are kept) — ``DRAWS`` times as many as kept for the probe
    sets; for "mixed", ``n // 2`` copy probes and the rest question probes, each part drawn
    from its own seed. A profile's ``settings.selected`` indexes the parts' prompts in order.
    Another ``seed`` draws other documents: a held-out set of calibration probes."""
    if prompt_set != "mixed":
        count = DRAWS.get(prompt_set, 1) * n
        return [(prompt_set, calibration_prompts(tokenizer, count, length, seed, prompt_set), n)]
    out = []
    for (part, offset), kept in zip(MIXED, (n // 2, n - n // 2)):
        drawn = calibration_prompts(tokenizer, DRAWS[part] * kept, length, seed + offset, part)
        out.append((part, drawn, kept))
    return out


def keep_prompts(recorded: list[tuple], n: int, prefer_copied: bool) -> list[tuple]:
    """The ``n`` prompts calibration scores, from ``(index, run, copied)`` in drawing order:
    the probes the full model continues first (a probe it does not continue measures nothing
    about retrieval), the others only to fill up; kept in drawing order."""
    ranked = sorted(recorded, key=lambda r: (prefer_copied and not r[2], r[0]))
    return sorted(ranked[:n], key=lambda r: r[0])


def compute_fraction(
    pivot: int,
    num_layers: int,
    r_struct: float,
    refine_layer: int | None = None,
    r_refine: float | None = None,
) -> float:
    """§4: (L*+1 + (L-L*-1)·R_struct) / L of the full model's linear work; with a refinement
    after layer R (StructKV's ``refine_layer``), the layers past R run on ``r_refine`` · N."""
    if refine_layer is None:
        return (pivot + 1 + (num_layers - pivot - 1) * r_struct) / num_layers
    after = num_layers - refine_layer - 1
    return (pivot + 1 + (refine_layer - pivot) * r_struct + after * r_refine) / num_layers


def max_pivot_under_cap(num_layers: int, r_struct: float, cap: float) -> int:
    fits = [
        p for p in range(num_layers - 1) if compute_fraction(p, num_layers, r_struct) <= cap + 1e-9
    ]
    if not fits:
        raise StructKVError(f"no pivot fits compute cap {cap}; raise --compute-cap")
    return max(fits)


@dataclass
class _Recording:
    """Every layer's hidden state, saliency and pivot statistics of one full-length prefill,
    collected by the prefill's observer hook."""

    hidden: list[torch.Tensor] = field(default_factory=list)
    saliency: list[torch.Tensor] = field(default_factory=list)
    metrics: list[tuple[float, float, float]] = field(default_factory=list)

    def __call__(self, view: LayerView) -> None:
        self.hidden.append(view.hidden)
        self.saliency.append(view.saliency)
        self.metrics.append(view.metrics)


@dataclass
class _PromptRun:
    ids: torch.Tensor
    record: _Recording
    #: pre-pivot KV selections of SnapKV riders, by (chunk, r_kv): the layers before a pivot
    #: select their cache the same way whatever the candidate pivot and λ
    caches: dict[tuple[int, float], list[LayerCache]]
    full_logprobs: torch.Tensor
    full_tokens: list[int]
    #: the full model's next-token log-probabilities at each teacher-forced answer step
    full_step_logprobs: list[torch.Tensor] = field(default_factory=list)
    #: leading answer tokens not scored (a question probe's echo of its cue)
    skip: int = 0


def _fresh(cache: LayerCache, extra: int) -> LayerCache:
    return LayerCache.from_kept(cache.keys(), cache.values(), cache.kept_positions(), extra)


@torch.inference_mode()
def _record(model, ids, r_kv, window, pooling, steps, variants=None) -> _PromptRun:
    # One pass over the layers serves all: the full model's cache and logits (the reference),
    # and SnapKV's per-layer KV selection for each (chunk, r_kv) variant, with every layer's
    # state recorded by the observer.
    record = _Recording()
    variants = list(dict.fromkeys(variants or [(0, r_kv)]))
    snaps = [SnapKV(r_kv=rk, window=window, pooling=pooling, chunk=c) for c, rk in variants]
    full, *snapped = run_prefill_shared(
        model, ids, [Full(), *snaps], extra_capacity=steps, observer=record
    )
    tokens, step_logprobs = [int(full.logits.argmax())], []
    for _ in range(steps - 1):
        logits = decode_step(model, full.cache, tokens[-1])
        step_logprobs.append(torch.log_softmax(logits, -1))
        tokens.append(int(logits.argmax()))
    caches = {v: out.cache.layers for v, out in zip(variants, snapped)}
    logprobs = torch.log_softmax(full.logits, -1)
    return _PromptRun(ids, record, caches, logprobs, tokens, step_logprobs)


def matched_prefix(tokens: list[int], reference: list[int], skip: int = 0) -> float:
    """The share of ``reference`` that ``tokens`` reproduce before their first difference,
    counting only the tokens after the first ``skip`` (which must match too)."""
    same = 0
    for a, b in zip(tokens, reference):
        if a != b:
            break
        same += 1
    return max(0, same - skip) / max(1, len(reference) - skip)


def _scores(model, run: _PromptRun, out, steps: int) -> tuple[float, float, float, float]:
    """(KL(full || candidate) at the last prompt position, teacher-forced top-1 agreement,
    mean KL over the teacher-forced answer steps: what the decode reads from the caches, and
    the free-running answer's agreement: :func:`matched_prefix` of its own greedy tokens) of a
    candidate's prefill result ``out`` (its cache is decoded into)."""
    logprobs = torch.log_softmax(out.logits, -1)
    kl = float((run.full_logprobs.exp() * (run.full_logprobs - logprobs)).sum())
    # the candidate's prediction at each answer step, fed the full model's answer; until its
    # first difference from that answer, these *are* its free-running greedy tokens, so the
    # matched prefix needs no second, free-running decode
    predicted = [int(out.logits.argmax())]
    answer_kl = []
    if steps > 1:
        forced = forced_logits(model, out.cache, run.full_tokens[: steps - 1])
        predicted += forced.argmax(-1).tolist()
        for p, logits in zip(run.full_step_logprobs, forced):
            answer_kl.append(float((p.exp() * (p - torch.log_softmax(logits, -1))).sum()))
    agree = [a == b for a, b in zip(predicted, run.full_tokens)]
    answer = matched_prefix(predicted, run.full_tokens, run.skip)
    return kl, sum(agree) / len(agree), sum(answer_kl) / max(1, len(answer_kl)), answer


@torch.inference_mode()
def _fidelity(model, run: _PromptRun, method: StructKV, pivot: int, lam: float, steps: int,
              refines=()) -> dict:  # fmt: skip
    """:func:`_scores` of StructKV with ``method``'s budgets, pivot and λ on one recorded
    prompt, keyed None; and of each two-stage schedule ``(refine_layer, r_refine)`` in
    ``refines`` (a second cut after that layer, by the centrality that keeps accumulating over
    the propagated tokens), keyed by that pair.

    Why one run serves all: until the refinement every schedule with this pivot and R_struct
    runs the same layers on the same tokens, so the single-stage run's layers are tapped
    (hidden state, positions, centrality, caches) and each schedule branches off at its layer,
    paying only for the layers after it (tests/test_calibration.py compares with direct runs)."""
    n = int(run.ids.shape[0])
    num_layers = len(run.record.hidden)
    c = None
    for saliency in run.record.saliency[: pivot + 1]:
        c = accumulate(c, saliency, lam)
    keep = method.select(c, budget(method.r_struct, n))
    hidden, positions = compact(run.record.hidden[pivot], torch.arange(n, device=keep.device), keep)
    caches = [_fresh(c_, steps) for c_ in run.caches[(method.chunk, method.r_kv)][: pivot + 1]]
    base = replace(method, lam=lam, refine_layer=None, r_refine=None)
    at = {layer for layer, _ in refines}
    # the refinement's centrality, folded as StructKV's own observe_compacted does it
    folding = replace(base, refine_layer=max(at, default=num_layers), r_refine=0.0)
    tracked = folding.begin(num_layers, n)
    tracked.centrality.value = c
    taps = {}

    def tap(view: LayerView) -> None:
        if at and view.layer > pivot:
            folding.observe_compacted(view, tracked)
            if view.layer in at:
                taps[view.layer] = (view, tracked.centrality.value.clone())

    out = continue_prefill(
        model, n, base, Compacted(pivot, hidden, positions, caches), steps, observer=tap
    )
    branches = {layer: [_fresh(c_, steps) for c_ in out.cache.layers[: layer + 1]] for layer in at}
    scores = {None: _scores(model, run, out, steps)}
    del out
    for layer, r_refine in refines:
        view, value = taps[layer]
        schedule = replace(base, refine_layer=layer, r_refine=r_refine)
        state = schedule.begin(num_layers, n)
        state.centrality.value = value
        cut = schedule.refine(view, state)  # marks the state refined: no second cut
        compacted = Compacted(
            layer,
            view.hidden[:, cut],
            view.positions[cut],
            [_fresh(c_, steps) for c_ in branches[layer]],
            state,
        )
        branch = continue_prefill(model, n, schedule, compacted, steps)
        scores[(layer, r_refine)] = _scores(model, run, branch, steps)
    return scores


@dataclass
class ProbeDraw:
    """The prompts calibration scores, their recorded full runs, and what was drawn for them."""

    runs: list[_PromptRun]
    texts: list[CalibrationPrompt]
    selected: list[int]
    copied: int
    drawn: int


def draw_probes(lm, n: int, length: int, prompt_set: str, r_kv: float, window: int,
                pooling: int, steps: int, seed: int = 1234,
                progress=None) -> ProbeDraw:  # fmt: skip
    """Draw ``prompt_set``'s prompts from ``seed``, record each one's full run (with a SnapKV
    rider at ``r_kv``/``window``/``pooling``), and keep ``n`` (:func:`keep_prompts`: probes the
    full model continues first). Shared by :func:`calibrate` and the held-out checks, so that a
    held-out set is drawn and kept exactly as the calibration set is."""
    chat = bool(getattr(lm.tokenizer, "chat_template", None))
    probes = prompt_set in PROBE_SETS or prompt_set == "mixed"
    out = ProbeDraw([], [], [], 0, 0)
    for part, prompts, kept in drawn_prompts(lm.tokenizer, n, length, prompt_set, seed):
        recorded = []
        for i, prompt in enumerate(prompts):
            ids = prompt.encode(lm.tokenizer, chat)
            run = _record(lm.model, ids, r_kv, window, pooling, steps)
            run.skip = echo_length(lm.tokenizer, prompt, run.full_tokens)
            said = lm.tokenizer.decode(run.full_tokens, skip_special_tokens=True)
            recorded.append((i, run, prompt.copied(said)))
            if progress:
                progress(
                    f"recorded {part} prompt {i + 1}/{len(prompts)}"
                    + (", copied" if recorded[-1][2] else "")
                )
        chosen = keep_prompts(recorded, kept, prefer_copied=probes)
        out.selected += [out.drawn + i for i, _, _ in chosen]
        out.runs += [run for _, run, _ in chosen]
        out.texts += [prompts[i] for i, _, _ in chosen]
        out.copied += sum(c for *_, c in chosen)
        out.drawn += len(prompts)
        del recorded, chosen
    return out


def deepest_pivots(num_layers: int, r_structs, cap: float, l_min: int, l_max: int) -> list[int]:
    """Per R_struct, the deepest pivot in [l_min, l_max] whose compute fraction fits ``cap``.

    Why the budget search adds them to its every-third-layer grid: at a tight cap the best
    use of the compute may be a deep pivot with few propagated tokens (pivot 14 / R_struct 0.1
    at cap 0.55 on SmolLM2), and the grid alone reaches only the pivots that fit at stage 1's
    R_struct (docs/RESULTS.md, "Fact probes")."""
    out = []
    for rs in r_structs:
        fits = [p for p in range(l_min, l_max + 1)
                if compute_fraction(p, num_layers, rs) <= cap + 1e-9]  # fmt: skip
        if fits:
            out.append(max(fits))
    return sorted(set(out))


def refine_grid(l_min: int, l_max: int) -> list[int]:
    """The layers after which the budget search tries a second cut: every second layer from
    ``l_min + 2`` to ``l_max``, the range where a single pivot is searched too. Why this dense:
    a schedule's branch re-runs only the layers after its refinement, on few tokens, so each
    layer costs little, and the layer where a needle becomes salient differs by model (about
    14 of 30 on SmolLM2, docs/RESULTS.md)."""
    return list(range(l_min + 2, l_max + 1, 2))


def _rule_pivot(metrics, l_min, l_max, rule, scales) -> int:
    online = OnlinePivot(l_min, l_max, rule=rule, scales=scales)
    for m in metrics:
        decided = online.observe(m)
        if decided is not None:
            return decided
    return l_max


def _search(model, runs, candidates, method, lambdas, steps, num_layers, progress,
            objective="answer") -> list[dict]:  # fmt: skip
    """One table row per (candidate pivot choice, λ): mean KL, top-1 agreement, free-running
    answer agreement, compute; ``score`` is the ``objective`` agreement minus KL."""
    cache: dict[tuple[int, int, float], tuple[float, ...]] = {}
    table = []
    for label, pivots in candidates:
        for lam in lambdas:
            scores = []
            for i, (run, pivot) in enumerate(zip(runs, pivots)):
                key = (i, pivot, lam)
                if key not in cache:
                    cache[key] = _fidelity(model, run, method, pivot, lam, steps)[None]
                scores.append(cache[key])
            kl = sum(s[0] for s in scores) / len(scores)
            agree = sum(s[1] for s in scores) / len(scores)
            answer = sum(s[3] for s in scores) / len(scores)
            frac = sum(compute_fraction(p, num_layers, method.r_struct) for p in pivots)
            row = {
                "rule": label if label in ("argmax", "stabilised") else "fixed",
                "layer": pivots[0] if label.startswith("layer") else pivots,
                "lambda": lam,
                "kl": round(kl, 5),
                "top1": round(agree, 4),
                "answer": round(answer, 4),
                "compute_fraction": round(frac / len(pivots), 4),
            }
            row["score"] = round(row[objective] - kl, 5)
            table.append(row)
        if progress:
            progress(f"searched {label}")
    return table


def calibration_length(config) -> int:
    """The default prompt length for a model: :data:`DEFAULT_LENGTH`, or its context window when
    that is shorter (a prompt past it would measure position extrapolation, not compression)."""
    context = getattr(config, "max_position_embeddings", None) or DEFAULT_LENGTH
    return min(DEFAULT_LENGTH, int(context))


def calibrate(
    lm,
    n_prompts: int = 8,
    length: int = DEFAULT_LENGTH,
    r_struct: float = 0.2,
    r_kv: float = 0.1,
    window: int = 8,
    pooling: int = 7,
    compute_cap: float = DEFAULT_COMPUTE_CAP,
    lambdas: tuple[float, ...] = LAMBDAS,
    steps: int = 16,
    progress=None,
    target_fidelity: float | None = None,
    budget_grid: dict | None = None,
    prompt_set: str = DEFAULT_PROMPT_SET,
    refine: bool = False,
) -> dict:
    """Search (pivot rule or layer) x λ under the compute cap; with ``target_fidelity``, then
    window x chunk and R_struct x R_KV (:func:`search_budgets`). Returns the profile dict.
    ``refine``: the budget search also tries two-stage schedules, refining after every second
    layer from ``l_min + 2`` to ``l_max`` (:func:`refine_grid`).
    The objective is the free-running answer agreement for the probe sets (fact, copy, question,
    mixed, cued), teacher-forced top-1 for the older ones. ``length`` defaults to 4096 because
    fact probes saturate at 2048 (module docstring)."""
    if lm.tokenizer is None:
        raise StructKVError("calibration needs a model with a tokenizer")
    if refine and target_fidelity is None:
        raise StructKVError("--refine searches the budgets: give --target-fidelity too")
    model = lm.model
    num_layers = len(model.model.layers)
    l_min, l_max = search_range(num_layers)
    cap_layer = min(l_max, max_pivot_under_cap(num_layers, r_struct, compute_cap))
    if cap_layer <= l_min:
        raise StructKVError(f"compute cap {compute_cap} leaves no pivot above layer {l_min}")
    method = StructKV(r_struct=r_struct, r_kv=r_kv, window=window, pooling=pooling, pivot=0)
    start = time.perf_counter()
    probes = prompt_set in PROBE_SETS or prompt_set == "mixed"
    objective = "answer" if probes else "top1"
    draw = draw_probes(lm, n_prompts, length, prompt_set, r_kv, window, pooling, steps,
                       progress=progress)  # fmt: skip
    runs, texts, selected = draw.runs, draw.texts, draw.selected
    copied, drawn = draw.copied, draw.drawn
    del draw
    if probes and progress:
        progress(f"{copied} of the {n_prompts} probes used are continued by the full model")
    per_prompt_scales = [metric_scales(r.record.metrics) for r in runs]
    scales = tuple(sorted(s[i] for s in per_prompt_scales)[len(runs) // 2] for i in range(3))
    candidates: list[tuple[str, list[int]]] = [
        (f"layer {p}", [p] * len(runs)) for p in range(l_min, cap_layer + 1)
    ]
    for rule in ("argmax", "stabilised"):
        pivots = [_rule_pivot(r.record.metrics, l_min, cap_layer, rule, scales) for r in runs]
        candidates.append((rule, pivots))
    table = _search(
        model, runs, candidates, method, lambdas, steps, num_layers, progress, objective
    )
    settings = dict(
        prompts=n_prompts, length=length, r_struct=r_struct, r_kv=r_kv, window=window,
        pooling=pooling, compute_cap=compute_cap, steps=steps, prompt_set=prompt_set,
        drawn=drawn, selected=selected, copied=copied, objective=objective,
        echo_tokens=[run.skip for run in runs],
    )  # fmt: skip
    refine_layers = refine_grid(l_min, l_max) if refine else []
    if refine:
        settings["refine_layers"] = refine_layers
    if target_fidelity is not None:
        # the budget search (and every engine) needs one fixed pivot layer: choose among those
        table = [r for r in table if r["rule"] == "fixed"] + [
            dict(r, candidate=False) for r in table if r["rule"] != "fixed"
        ]
    profile = _profile(lm.model_id, num_layers, table, l_min, cap_layer, scales, settings)
    if target_fidelity is not None:
        best = profile["best"]
        grid_r_structs = (budget_grid or {}).get("r_structs", R_STRUCTS)
        # the budget search records its own, per observation window and chunk
        del runs
        search = search_budgets(
            lm,
            texts,
            best["layer"],
            best["lambda"],
            num_layers,
            steps,
            target_fidelity,
            compute_cap,
            pivots=[
                best["layer"],
                *range(l_min, cap_layer + 1, 3),
                *deepest_pivots(num_layers, grid_r_structs, compute_cap, l_min, l_max),
            ],
            progress=progress,
            objective=objective,
            refine_layers=refine_layers,
            **(budget_grid or {}),
        )
        profile["budgets"] = search.pop("chosen")
        profile["budget_search"] = search
        # the pivot trades compute with R_struct: the budget search's choice is the profile's
        profile["pivot"] = search["chosen_row"]["pivot"]
    profile["seconds"] = round(time.perf_counter() - start, 1)
    return profile


#: The budget search's grids (stage 2: window x pooling x chunk; stage 3: R_struct x R_KV).
#: Pooling 31 because at R_KV 0.2 the needle values were cut at chunk edges and a 31-token max
#: pooling keeps the value's next chunk (docs/RESULTS.md, "Where R_KV 0.2 loses the needles").
WINDOWS = (8, 32, 64)
POOLINGS = (7, 31)
CHUNKS = (0, 8, 16)
R_STRUCTS = (0.1, 0.2, 0.3, 0.5, 0.7)
R_KVS = (0.05, 0.1, 0.2, 0.5)


def _score_setting(model, runs, method, pivot, lam, steps, refines=()) -> dict:
    """Means over the prompts of :func:`_fidelity`'s four numbers, per schedule (None: the
    single-stage one; ``(refine_layer, r_refine)``: each two-stage one)."""
    scores = [_fidelity(model, run, method, pivot, lam, steps, refines) for run in runs]
    return {
        key: tuple(sum(s[key][i] for s in scores) / len(scores) for i in range(4))
        for key in scores[0]
    }


def choose_budget(rows: list[dict], target: float, objective: str = "answer") -> tuple[dict, bool]:
    """The cheapest row (least compute, then least KV, then single-stage) whose ``objective``
    agreement reaches ``target``; when none does, the most faithful row (ties: less compute).
    And whether the target was met."""
    meets = [r for r in rows if r[objective] >= target]
    if meets:
        # at equal cost, one compaction: fewer graphs and the simpler engine
        return min(
            meets,
            key=lambda r: (r["compute_fraction"], r["r_kv"], r.get("refine_layer") is not None),
        ), True
    return max(rows, key=lambda r: (r[objective], -r["compute_fraction"])), False


def choose_window(rows: list[dict], objective: str = "answer") -> dict:
    """Stage 2's choice among window x pooling x chunk rows: the most faithful by the
    ``objective`` agreement alone, ties to less KL (then the first searched). Why not agreement
    minus KL (stage 1's score, and stage 2's until 2026-12-01): the target fidelity that stage 3
    then meets is stated in agreement alone, and the KL is the first answer token's, whose mean
    one probe can move by more than the agreement differences between the best rows (0.005 ->
    0.09 on 8 probes; docs/RESULTS.md, "Stage 2 on held-out probes"). On a held-out probe set
    both rules' picks did about as well (0.618 vs 0.609), so the rule follows the target, not
    that margin."""
    return max(rows, key=lambda r: (r[objective], -r["kl"]))


def _schedule(row: dict) -> list[tuple[int, float]]:
    """A row's refinement as :func:`_fidelity`'s ``refines`` (empty: single-stage)."""
    return [] if row.get("refine_layer") is None else [(row["refine_layer"], row["r_refine"])]


def _key(row: dict):
    return None if row.get("refine_layer") is None else (row["refine_layer"], row["r_refine"])


SCHEDULE_KEYS = ("pivot", "r_struct", "r_kv", "refine_layer", "r_refine")


def search_budgets(lm, texts, pivot, lam, num_layers, steps, target, compute_cap,
                   windows=WINDOWS, poolings=POOLINGS, chunks=CHUNKS, r_structs=R_STRUCTS,
                   r_kvs=R_KVS, pivots=None, progress=None, objective="answer",
                   refine_layers=(), r_refines=None) -> dict:  # fmt: skip
    """Stages 2 and 3 of the calibration, at the chosen λ, by coordinate descent.

    Stage 3 searches pivot x R_struct x R_KV (``pivots``: default the stage-1 pivot alone;
    R_KV <= R_struct, as engines need; compute fraction under the cap) and chooses the cheapest
    (compute, then KV) setting whose ``objective`` agreement with full context reaches
    ``target``, else the most faithful one (``met`` False). It runs first at the first window,
    pooling and chunk of the grids (the paper's window 8 and pooling 7, token-level selection).
    Stage 2 then searches window x pooling x chunk *at that choice's budgets* and keeps the
    best (:func:`choose_window`), and stage 3 runs again there when it differs. Why this order:
    at the base budgets (R_struct 0.2 / R_KV 0.1) every window and chunk loses the probes alike,
    so a window chosen there is noise; at the budgets the target needs, they differ
    (docs/RESULTS.md, "The calibrated default"). Every row is returned.

    ``refine_layers``: stage 3 also searches two-stage schedules (budgets that shrink with
    depth): a first cut at a pivot to R_struct, a second after a refine layer R (> pivot) to
    ``r_refine`` (< R_struct, >= R_KV; default grid: ``r_structs``), whose compute fraction
    fits the cap even where the first cut alone would not. Why: at a tight cap a shallow pivot
    with a loose R_struct and a deep, tight refinement kept 90 % of full context's needles
    where every single-cut setting of the same cost kept about half (docs/RESULTS.md, "Budgets
    that shrink with depth"). structkv-export builds such a schedule as a two-stage engine."""
    model = lm.model
    chat = bool(getattr(lm.tokenizer, "chat_template", None))
    ids = [t.encode(lm.tokenizer, chat) for t in texts]
    cap = compute_cap + 1e-9
    r_refines = r_structs if r_refines is None else r_refines
    # (pivot, R_struct, R_KV) -> (is the single cut a candidate, its two-stage schedules)
    stage3: dict[tuple[int, float, float], tuple[bool, list[tuple[int, float]]]] = {}
    for p in sorted(set(pivots or [pivot])):
        for rs in r_structs:
            for rk in r_kvs:
                if rk > rs:
                    continue
                refines = [
                    (layer, rr)
                    for layer in sorted(set(refine_layers))
                    if p < layer < num_layers - 1
                    for rr in r_refines
                    if rk <= rr < rs and compute_fraction(p, num_layers, rs, layer, rr) <= cap
                ]
                single = compute_fraction(p, num_layers, rs) <= cap
                if single or refines:
                    stage3[(p, rs, rk)] = (single, refines)
    if not stage3:
        raise StructKVError(
            f"no R_struct of {list(r_structs)} fits compute cap {compute_cap} at the pivots "
            "searched; raise --compute-cap"
        )
    kvs = sorted({rk for *_, rk in stage3})

    def record(window: int, pooling: int, variants: list[tuple[int, float]]) -> list[_PromptRun]:
        # one recorded full prefill per prompt, with SnapKV riders for exactly these variants
        runs = [_record(model, x, variants[0][1], window, pooling, steps, variants) for x in ids]
        for run, text in zip(runs, texts):
            run.skip = echo_length(lm.tokenizer, text, run.full_tokens)
        return runs

    def rows_for(runs, p, rs, rk, w, pl, c, refines) -> dict:
        method = StructKV(r_struct=rs, r_kv=rk, window=w, pooling=pl, chunk=c, pivot=0)
        scores = _score_setting(model, runs, method, p, lam, steps, refines)
        return {key: {"kl": round(kl, 5), "top1": round(top1, 4),
                      "answer_kl": round(answer_kl, 5), "answer": round(answer, 4)}
                for key, (kl, top1, answer_kl, answer) in scores.items()}  # fmt: skip

    def budget_pass(w: int, pl: int, c: int) -> list[dict]:
        runs = record(w, pl, [(c, rk) for rk in kvs])
        rows = []
        for (p, rs, rk), (single, refines) in stage3.items():
            scored = rows_for(runs, p, rs, rk, w, pl, c, refines)
            for key, scores in scored.items():
                if key is None and not single:
                    continue  # the shared first cut of schedules; alone it exceeds the cap
                row = {"pivot": p, "r_struct": rs, "r_kv": rk}
                if key is not None:
                    row.update(refine_layer=key[0], r_refine=key[1])
                frac = compute_fraction(p, num_layers, rs, *(key or ()))
                rows.append({**row, **scores, "compute_fraction": round(frac, 4)})
            if progress:
                best = max(v["answer"] for v in scored.values())
                progress(
                    f"budgets (window {w}, pooling {pl}, chunk {c}): pivot {p}, R_struct {rs}, "
                    f"R_KV {rk}: answer {scored.get(None, {}).get('answer', float('nan')):.3f}"
                    + (f", best of {len(refines)} refinements {best:.3f}" if refines else "")
                )
        return rows

    w0, pl0, c0 = windows[0], poolings[0], chunks[0]
    first = budget_pass(w0, pl0, c0)
    at, _ = choose_budget(first, target, objective)
    window_rows = []
    for w in windows:
        for pl in poolings:
            runs = record(w, pl, [(c, at["r_kv"]) for c in chunks])
            for c in chunks:
                scored = rows_for(
                    runs, at["pivot"], at["r_struct"], at["r_kv"], w, pl, c, _schedule(at)
                )
                window_rows.append({"window": w, "pooling": pl, "chunk": c, **scored[_key(at)]})
            del runs
        if progress:
            progress(f"budgets: window {w} searched")
    best = choose_window(window_rows, objective)
    w, pl, c = best["window"], best["pooling"], best["chunk"]
    budget_rows = first if (w, pl, c) == (w0, pl0, c0) else budget_pass(w, pl, c)
    chosen, met = choose_budget(budget_rows, target, objective)
    picked = {"r_struct": chosen["r_struct"], "r_kv": chosen["r_kv"], "window": w,
              "pooling": pl, "chunk": c}  # fmt: skip
    if chosen.get("refine_layer") is not None:
        picked.update(refine_layer=chosen["refine_layer"], r_refine=chosen["r_refine"])
    return {
        "target_fidelity": target,
        "objective": objective,
        "met": met,
        "chosen": picked,
        "chosen_row": chosen,
        "window_budget": {k: at[k] for k in SCHEDULE_KEYS if k in at},
        "window_rule": f"{objective}, ties: less KL",
        "window_table": window_rows,
        "first_budget_table": {"window": w0, "pooling": pl0, "chunk": c0, "rows": first},
        "budget_table": budget_rows,
    }


def _profile(model_id, num_layers, table, l_min, cap_layer, scales, settings) -> dict:
    """The profile file's contents: the table's best row (ties: less compute) and the table."""
    best = max(
        (r for r in table if r.get("candidate", True)),
        key=lambda r: (r["score"], -r["compute_fraction"]),
    )
    fixed = best["rule"] == "fixed"
    return {
        "format": FORMAT_VERSION,
        "model_id": model_id,
        "num_layers": num_layers,
        "lambda": best["lambda"],
        "pivot": best["layer"] if fixed else "online",
        "rule": None if fixed else best["rule"],
        "l_min": l_min,
        "l_max": cap_layer,
        "metric_scales": list(scales),
        # name the probe set: a profile read later must say which probes chose it
        "objective": (
            "maximise answer - KL (free-running answer agreement with full context's own "
            f"answer to {settings.get('prompt_set', 'copy')} probes); ties: less compute"
            if settings.get("objective") == "answer"
            else "maximise top1 - KL (teacher-forced, vs full context); ties: less compute"
        ),
        "settings": settings,
        "best": best,
        "paper_preset": next(
            (r for r in table if r["rule"] == "argmax" and r["lambda"] == 0.9), None
        ),
        "table": table,
    }


def format_table(profile: dict) -> str:
    rows = ["rule        layer(s)            lambda  KL        top1    answer  compute"]
    for r in profile["table"]:
        layer = r["layer"] if isinstance(r["layer"], int) else ",".join(map(str, r["layer"]))
        mark = "  <- stage 1" if r == profile["best"] and "budgets" in profile else ""
        mark = mark or ("  <- chosen" if r == profile["best"] else "")
        rows.append(
            f"{r['rule']:<11} {layer:<19} {r['lambda']:<7} {r['kl']:<9.4f} "
            f"{r['top1']:<7.3f} {r.get('answer', float('nan')):<7.3f} "
            f"{r['compute_fraction']:.3f}{mark}"
        )
    return "\n".join(rows)


def format_budgets(profile: dict) -> str:
    """The budget search's tables (window x pooling x chunk, then R_struct x R_KV) and its
    choice. Profiles from before pooling was searched show the pooling they ran at (7)."""
    search, chosen = profile["budget_search"], profile["budgets"]
    nan = float("nan")
    at = search.get("window_budget")
    rows = (
        []
        if at is None
        else [
            f"window x pooling x chunk at pivot {at['pivot']}, R_struct {at['r_struct']}, R_KV "
            f"{at['r_kv']}{_refined(at)} (stage 3's choice at the first window, pooling and chunk)"
        ]
    )
    picked = (chosen["window"], chosen.get("pooling", 7), chosen["chunk"])
    rows += ["window  pooling  chunk  KL        top1    answer", *(
        f"{r['window']:<7} {r.get('pooling', 7):<8} {r['chunk']:<6} {r['kl']:<9.4f} "
        f"{r['top1']:<7.3f} {r.get('answer', nan):.3f}"
        + ("  <- chosen" if (r["window"], r.get("pooling", 7), r["chunk"]) == picked else "")
        for r in search["window_table"]
    )]  # fmt: skip
    rows.append("pivot  R_struct  R_KV   refine    KL        top1    answer  compute")
    for r in search["budget_table"]:
        mark = "  <- chosen" if r == search["chosen_row"] else ""
        refine = "-" if r.get("refine_layer") is None else f"{r['refine_layer']}:{r['r_refine']}"
        rows.append(
            f"{r['pivot']:<6} {r['r_struct']:<9} {r['r_kv']:<6} {refine:<9} {r['kl']:<9.4f} "
            f"{r['top1']:<7.3f} {r.get('answer', nan):<7.3f} {r['compute_fraction']:.3f}{mark}"
        )
    objective = search.get("objective", "top1")
    met = "met" if search["met"] else "NOT met (the most faithful setting is chosen)"
    rows.append(
        f"budgets: pivot {profile['pivot']}, window {chosen['window']}, pooling "
        f"{chosen.get('pooling', 7)}, chunk {chosen['chunk']}, R_struct {chosen['r_struct']}, "
        f"R_KV {chosen['r_kv']}{_refined(chosen)}; target {objective} "
        f"{search['target_fidelity']} {met}"
    )
    if chosen.get("refine_layer") is not None:
        rows.append(
            "note: a two-stage schedule: structkv-export builds it with two more graphs "
            "(refine, post_refine); pass --pivot and --r-struct for a single cut instead"
        )
    if not search["met"]:
        # Why say more than "not met": below its target the probes' ranking of the settings is
        # not to be trusted on retrieval (on SmolLM2 at cap 0.55 the chosen row kept 5 % of full
        # context's needle score where a row it rated near zero kept 12 %; docs/RESULTS.md, "The
        # capped calibration's own budgets"), so the user must hear it and how to act on it.
        cap = profile.get("settings", {}).get("compute_cap")
        under = f"under compute cap {cap}" if cap is not None else "searched"
        rows.append(
            f"warning: no setting {under} reaches {objective} {search['target_fidelity']} (best "
            f"{search['chosen_row'].get(objective, nan):.3f}); below its target the search's "
            "ranking is a weak guide to retrieval — raise --compute-cap, give a larger KV "
            "budget (--r-kvs), or lower --target-fidelity"
        )
    return "\n".join(rows)


def _refined(row: dict) -> str:
    """``row``'s refinement as text ("" when single-stage)."""
    if row.get("refine_layer") is None:
        return ""
    return f", refine after layer {row['refine_layer']} to {row['r_refine']}"


def log(msg: str) -> None:
    print(f"[structkv calibrate] {msg}", file=sys.stderr, flush=True)

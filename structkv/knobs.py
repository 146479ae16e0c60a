"""The method knobs on the command line: one table of flags for every command that takes them.

``structkv generate``, ``structkv eval ruler``, ``structkv bench`` and ``structkv-export`` all
call :func:`add_method_args` and :func:`method_knobs`. Every flag defaults to None so that the
method's own dataclass default applies (defaults live in the method classes, validation in
their ``check_knobs``); this module only spells the flags and their help once.
"""

from __future__ import annotations

import argparse

from structkv.errors import StructKVError


class Parser(argparse.ArgumentParser):
    """argparse prints usage plus an error; every StructKV command prints one `error:` line and
    exits 2 instead (its ``main`` turns the StructKVError into that line)."""

    def error(self, message: str):
        raise StructKVError(f"{message} (see `{self.prog} --help`)")


def count(minimum: int = 1):
    """An argparse type: an integer >= ``minimum`` (samples, repeats, steps, prompts...), so
    ``--samples 0`` is an error instead of silently the default."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < minimum:  # argparse names the flag in its message
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {text!r}")
        return value

    parse.__name__ = f"integer >= {minimum}"
    return parse


def lambdas(text: str) -> tuple[float, ...]:
    """A comma-separated list of λ values, each in [0, 1] (what ``calibrate --lambdas`` takes)."""
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        values = ()
    if not values or not all(0.0 <= v <= 1.0 for v in values):
        raise argparse.ArgumentTypeError(f"expected values in [0, 1] like 0.1,0.3, got {text!r}")
    return values


def parse_pivot(text: str) -> int | str:
    """``auto`` | ``online`` | a layer index (what ``--pivot`` accepts)."""
    if text in ("auto", "online"):
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"must be auto, online or a layer index, got {text!r}"
        ) from None


#: (flag, dest, type, help). Help states the default of the methods that have the knob.
KNOBS: tuple[tuple[str, str, object, str], ...] = (
    ("--r-struct", "r_struct", float,
     "compute budget: fraction of the prompt propagated after the pivot (default 0.2; structkv: "
     "the calibration profile's where it has one)"),
    ("--r-kv", "r_kv", float,
     "memory budget: fraction of the prompt kept per layer and KV head (default 0.1; structkv: "
     "the calibration profile's where it has one)"),
    ("--window", "window", int,
     "observation window w, last prompt tokens always kept (default 8; structkv: the profile's)"),
    ("--pooling", "pooling", int, "odd pooling kernel over token scores, 1 = off (default 7)"),
    ("--pool-mode", "pool_mode", str, "pooling mode: max (SnapKV) | avg (kvpress) (default max)"),
    ("--chunk", "chunk", int,
     "keep whole spans of this many tokens instead of single tokens, 0 = token level (default 0; "
     "structkv: the profile's)"),
    ("--lambda", "lam", float, "centrality decay λ in [0, 1] (default: calibration profile)"),
    ("--kv-evidence", "kv_evidence", float,
     "structkv: weight of deeper evidence (centrality at the pivot, attention after it) in the "
     "caches of the layers before the pivot; 0 = each layer's own (default 0; torch only)"),
    ("--refine-layer", "refine_layer", int,
     "structkv: after this layer (past the pivot) cut the propagated tokens once more, to "
     "--r-refine of the prompt, by the centrality (default: none)"),
    ("--r-refine", "r_refine", float,
     "structkv: fraction of the prompt kept from --refine-layer on (< --r-struct)"),
    ("--pivot", "pivot", parse_pivot,
     "auto (calibration profile) | online (detect per prompt) | a layer index (default auto)"),
    # the baselines' own pivots, so that a comparison can put every method at the same compute
    ("--tsp-layer", "tsp_layer", int,
     "fastkv: the last full-length layer (default floor(L/2))"),
    ("--filter-layer", "filter_layer", int,
     "gemfilter: the layer whose attention selects the tokens to re-run (default floor(0.4 L))"),
    ("--filter-score", "filter_score", str,
     "gemfilter: how that layer scores tokens: last (GemFilter's: the last query's attention) | "
     "window (the pooled window saliency FastKV selects by; only the re-run differs) "
     "(default last)"),
)  # fmt: skip


def add_method_args(parser: argparse.ArgumentParser) -> None:
    for flag, dest, kind, text in KNOBS:
        parser.add_argument(flag, dest=dest, type=kind, default=None, help=text)


def method_knobs(args: argparse.Namespace) -> dict:
    """The knobs given on the command line (unset ones left out: the method's default holds)."""
    return {dest: getattr(args, dest) for _, dest, _, _ in KNOBS if getattr(args, dest) is not None}

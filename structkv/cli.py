"""``structkv`` command line: generate, run, calibrate, eval, bench, serve, deploy, methods.

Results go to stdout (``--json``: exactly one JSON object); progress and timing go to stderr.
Bad input exits 2 with one ``error:`` line and no traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from structkv.errors import StructKVError
from structkv.knobs import Parser, add_method_args, count, lambdas, method_knobs

_Parser = Parser


def megabytes(text: str) -> float:
    """``--kv-cache-mb``: a finite number of MiB > 0 (argparse type; refused before loading)."""
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0 < value < float("inf"):
        raise StructKVError(f"--kv-cache-mb must be a finite number of MiB > 0, got {text!r}")
    return value


def _out_dir(path: str) -> Path:
    """An evaluation's --out, created here: an uncreatable one is one error, not a traceback."""
    out = Path(path)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise StructKVError(
            f"cannot create --out {out} ({e.strerror}); choose a writable directory"
        ) from None
    return out


def _read_prompt(args) -> str:
    if args.prompt_file is not None:
        path = Path(args.prompt_file)
        if path.is_dir():
            raise StructKVError(f"prompt file {path} is a directory; pass a text file")
        if not path.is_file():
            raise StructKVError(f"prompt file {path} does not exist; check the path")
        try:
            return path.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise StructKVError(
                f"prompt file {path} is not UTF-8 text (byte {e.start}: {e.reason}); convert it, "
                "e.g. `iconv -f latin1 -t utf-8`"
            ) from None
        except OSError as e:
            raise StructKVError(f"cannot read prompt file {path}: {e.strerror or e}") from None
    return args.prompt


def cmd_generate(args) -> int:
    from structkv.generate import check_sampling, generate_text
    from structkv.methods import get_method
    from structkv.models import load, torch_dtype

    prompt = _read_prompt(args)
    if not prompt or not prompt.strip():
        raise StructKVError("empty prompt; pass a non-empty --prompt or --prompt-file")
    method = get_method(args.method, **method_knobs(args))  # validate names before loading
    check_sampling(args.max_new_tokens, args.temperature, args.top_p)
    lm = load(args.model, dtype=torch_dtype(args.dtype), device=args.device)
    out = generate_text(
        lm,
        prompt,
        method,
        chat=args.chat,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        seed=args.seed,
    )
    stats = out.stats_json()
    if args.json:
        doc = {"text": out.text, "tokens": out.tokens, "dtype": args.dtype, "stats": stats}
        print(json.dumps({**doc, "method": out.method}))
    else:
        print(out.text)
        print(
            f"[structkv] {args.method}: {stats['prompt_tokens']} prompt tokens, pivot "
            f"{stats['pivot_layer']}, {stats['propagated_tokens']} propagated, prefill "
            f"{stats['prefill_s']:.2f}s, decode {stats['decode_tokens_per_s']:.1f} tok/s, KV "
            f"{stats['kv_bytes'] / 2**20:.1f}/{stats['kv_bytes_full'] / 2**20:.1f} MiB",
            file=sys.stderr,
        )
    return 0


def cmd_run(args) -> int:
    from structkv.generate import encode_prompt
    from structkv.runtime.engine import Engine

    prompt = _read_prompt(args)
    if not prompt or not prompt.strip():
        raise StructKVError("empty prompt; pass a non-empty --prompt or --prompt-file")
    engine = Engine.load(args.engine, backend=args.backend, kv_cache_mb=args.kv_cache_mb)
    if engine.tokenizer is None:
        raise StructKVError(f"engine {args.engine} has no tokenizer; run it from Python with ids")
    ids = encode_prompt(engine.tokenizer, prompt, args.chat).numpy()
    tokens, stats = engine.generate(ids, args.max_new_tokens)
    text = engine.tokenizer.decode(tokens, skip_special_tokens=True)
    if args.json:
        print(json.dumps({"text": text, "stats": stats}))
    else:
        print(text)
        print(
            f"[structkv run] {stats['backend']}: {stats['prompt_tokens']} prompt tokens, pivot "
            f"{stats['pivot_layer']}, {stats['propagated_tokens']} propagated, prefill "
            f"{stats['prefill_s']:.2f}s, decode {stats['decode_tokens_per_s']:.1f} tok/s",
            file=sys.stderr,
        )
    return 0


def cmd_calibrate(args) -> int:
    from structkv.calibration import (
        calibrate,
        calibration_length,
        format_budgets,
        format_table,
        log,
    )
    from structkv.models import load, torch_dtype
    from structkv.profile import save_profile, user_profile_path

    target = args.target_fidelity
    if target is not None and not 0.0 < target <= 1.0:
        raise StructKVError(f"--target-fidelity must be in (0, 1], got {target}; e.g. 0.9")
    if not 0.0 < args.compute_cap <= 1.0:
        raise StructKVError(f"--compute-cap must be in (0, 1], got {args.compute_cap}")
    if args.prompts < 1 or args.steps < 1 or (args.length is not None and args.length < 128):
        raise StructKVError("--prompts and --steps must be >= 1 and --length >= 128")
    grid: dict[str, tuple] = {}
    if args.r_kvs is not None:
        grid["r_kvs"] = tuple(_ratios(args.r_kvs, "--r-kvs"))
    for key in ("windows", "poolings", "chunks"):
        if getattr(args, key) is not None:
            grid[key] = tuple(_ints(getattr(args, key), f"--{key}"))
    if grid and target is None:
        flag = "--" + next(iter(grid)).replace("_", "-")
        raise StructKVError(f"{flag} limits the budget search: give --target-fidelity too")
    from structkv.methods import StructKV

    for w in grid.get("windows", (8,)):  # one clear error before the model loads
        for pl in grid.get("poolings", (7,)):
            for c in grid.get("chunks", (0,)):
                StructKV(window=w, pooling=pl, chunk=c).check_knobs()
    grid = grid or None
    if args.refine and target is None:
        raise StructKVError("--refine searches the budgets: give --target-fidelity too")
    lm = load(args.model, dtype=torch_dtype(args.dtype), device=args.device)
    length = args.length or calibration_length(lm.model.config)
    profile = calibrate(
        lm,
        n_prompts=args.prompts,
        length=length,
        compute_cap=args.compute_cap,
        steps=args.steps,
        progress=log,
        target_fidelity=target,
        prompt_set=args.probes,
        lambdas=args.lambdas,
        budget_grid=grid,
        refine=args.refine,
    )
    out = Path(args.out) if args.out else user_profile_path(lm.model_id)
    save_profile(profile, out)
    print(format_table(profile))
    best = profile["best"]
    layer = best["layer"] if best["rule"] == "fixed" else profile["pivot"]
    print(
        f"chosen: pivot {layer} (rule {profile['rule'] or 'fixed'}), lambda "
        f"{profile['lambda']}, KL {best['kl']:.4f}, top-1 {best['top1']:.3f}, answer "
        f"{best.get('answer', float('nan')):.3f}, compute "
        f"{best['compute_fraction']:.3f} (at R_struct 0.2 / R_KV 0.1); saved to {out}"
    )
    if target is not None:
        print(format_budgets(profile))
    return 0


def cmd_bench(args) -> int:
    from structkv import bench

    return bench.main_from_args(args)


def _suite_names(args, preset: dict) -> tuple[list[str], list[str]]:
    """--methods / --tasks (or the profile's), every name checked before a model is loaded."""
    from structkv.eval.ruler import TASKS
    from structkv.methods import METHODS

    methods = (args.methods or preset["methods"]).split(",")
    tasks = (args.tasks or preset["tasks"]).split(",")
    for name in methods:
        if name not in METHODS:
            raise StructKVError(f"unknown method {name!r}; choose from {', '.join(METHODS)}")
    for task in tasks:
        if task not in TASKS:
            raise StructKVError(f"unknown task {task!r}; choose from {', '.join(TASKS)}")
    return methods, tasks


def cmd_eval_ruler(args) -> int:
    from tqdm import tqdm

    from structkv.bench import parse_ints
    from structkv.eval.runner import PROFILES, RunConfig, run_ruler
    from structkv.models import load, torch_dtype

    preset = PROFILES[args.profile]
    methods, tasks = _suite_names(args, preset)
    cfg = RunConfig(
        methods=methods,
        tasks=tasks,
        lengths=parse_ints(args.lengths or preset["lengths"]),
        samples=args.samples or preset["samples"],
        seed=args.seed,
        knobs=method_knobs(args),
        haystack_file=args.haystack_file,
    )
    if args.haystack_file and not Path(args.haystack_file).is_file():
        raise StructKVError(f"haystack file {args.haystack_file} does not exist")
    out = _out_dir(args.out)
    if args.report_only:  # rewrite results.md from what is scored, generate nothing
        from structkv.eval.runner import load_results, results_table

        (out / "results.md").write_text(results_table(load_results(out), cfg))
    else:
        lm = load(args.model, dtype=torch_dtype(args.dtype), device=args.device)
        run_ruler(lm, cfg, out, progress=lambda total: tqdm(total=total, file=sys.stderr))
    print((out / "results.md").read_text(), end="")
    return 0


def _ratios(text: str, flag: str) -> list[float]:
    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise StructKVError(f"{flag} must be comma-separated fractions, got {text!r}") from None
    if not values or not all(0.0 < v <= 1.0 for v in values):
        raise StructKVError(f"{flag} must list fractions in (0, 1], got {text!r}")
    return values


def _ints(text: str, flag: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise StructKVError(f"{flag} must be comma-separated integers, got {text!r}") from None
    if not values:
        raise StructKVError(f"{flag} must list at least one integer, got {text!r}")
    return values


def cmd_eval_compare(args) -> int:
    from structkv.eval.compare import compare, format_report, load

    tasks = [t for t in (args.tasks or "").split(",") if t.strip()] or None
    b_results = load(Path(args.b_out)) if args.b_out else None
    report = compare(load(Path(args.out)), args.a, args.b, tasks, b_results)
    if args.b_out:
        report["b"] += f" (from {args.b_out})"
    if args.json:
        print(json.dumps(report))
    else:
        print(format_report(report), end="")
    return 0


def cmd_eval_frontier(args) -> int:
    from tqdm import tqdm

    from structkv.bench import bench_prefill, parse_ints
    from structkv.eval.frontier import PROFILES, run_frontier, settings
    from structkv.eval.runner import RunConfig
    from structkv.models import load, torch_dtype

    preset = PROFILES[args.profile]
    knobs = method_knobs(args)
    for fixed in ("r_struct", "r_kv"):
        if fixed in knobs:
            flag = "--" + fixed.replace("_", "-")
            raise StructKVError(f"{flag} is what the frontier varies; list values with {flag}s")
    methods, tasks = _suite_names(args, preset)
    if "full" not in methods:
        methods = ["full", *methods]  # the reference every percentage is of
    specs = settings(
        methods,
        _ratios(args.r_structs or preset["r_structs"], "--r-structs"),
        _ratios(args.r_kvs or preset["r_kvs"], "--r-kvs"),
        knobs,
    )
    cfg = RunConfig(
        methods=list(specs),
        tasks=tasks,
        lengths=parse_ints(args.lengths or preset["lengths"]),
        samples=args.samples or preset["samples"],
        seed=args.seed,
        specs=specs,
    )
    if cfg.samples < 1 or not cfg.lengths or min(cfg.lengths) < 64:
        raise StructKVError("--samples must be >= 1 and --lengths token counts >= 64")
    if args.speed_repeats and args.speed_repeats < 3:
        raise StructKVError("--speed-repeats must be 0 (no timing) or >= 3 (medians)")
    out = _out_dir(args.out)
    out.mkdir(parents=True, exist_ok=True)
    dtype = torch_dtype(args.dtype)
    lm = None if args.report_only else load(args.model, dtype=dtype, device=args.device)
    run_frontier(
        lm,
        cfg,
        specs,
        out,
        progress=lambda total: tqdm(total=total, file=sys.stderr),
        speed_repeats=args.speed_repeats,
        timer=lambda lm, methods, n, repeats: bench_prefill(
            lm, [n], list(methods), repeats=repeats, instances=methods
        ),
    )
    print((out / "frontier.md").read_text(), end="")
    return 0


def cmd_eval_peer(args) -> int:
    from tqdm import tqdm

    from structkv.bench import parse_ints
    from structkv.eval.peer import PeerConfig, import_kvpress, run_peer
    from structkv.eval.ruler import TASKS
    from structkv.models import load, torch_dtype

    tasks = args.tasks.split(",")
    for task in tasks:
        if task not in TASKS:
            raise StructKVError(f"unknown task {task!r}; choose from {', '.join(TASKS)}")
    import_kvpress()  # fail before loading the model
    cfg = PeerConfig(tasks, parse_ints(args.lengths), args.samples, args.seed)
    out = _out_dir(args.out)
    lm = load(args.model, dtype=torch_dtype(args.dtype), device=args.device)
    run_peer(lm, cfg, out, progress=lambda total: tqdm(total=total, file=sys.stderr))
    print((out / "peer.md").read_text(), end="")
    return 0


def cmd_eval_report(args) -> int:
    from structkv.bench import parse_ints
    from structkv.eval import reports
    from structkv.methods import METHODS
    from structkv.models import load, torch_dtype

    methods = args.methods.split(",")
    for name in methods:
        if name not in METHODS:
            raise StructKVError(f"unknown method {name!r}; choose from {', '.join(METHODS)}")
    task = getattr(args, "task", None)
    if task is not None and not task.startswith("niah_"):
        raise StructKVError(f"--task must be a needle task (niah_single_1, ...), got {task!r}")
    lengths = parse_ints(args.lengths)
    if not lengths or min(lengths) < 64:
        raise StructKVError("--lengths must list token counts >= 64, e.g. 1024,2048")
    out = _out_dir(args.out)
    lm = load(args.model, dtype=torch_dtype(args.dtype), device=args.device)
    if args.kind == "pivot":
        data = reports.pivot_report(lm, out, lengths[0], args.samples, args.seed)
        summary = {k: data[k] for k in ("profile_pivot", "profile_lambda", "search_range")}
    elif args.kind == "fidelity":
        summary = reports.fidelity_report(lm, methods, out, lengths[0], args.samples, args.seed)
        summary = {k: {"kl": v["kl"], "top1": v["top1_agreement"]} for k, v in summary.items()}
    elif args.kind == "decoupling":
        data = reports.decoupling_report(
            lm, out, lengths[0], args.samples, args.seed, methods=methods
        )
        summary = {k: data[k] for k in ("budgets", "lambda_pivot")}
        summary["survival"] = {k: v["propagated"] for k, v in data["survival"].items()}
    elif args.kind == "survival":
        data = reports.survival_report(
            lm, methods, out, lengths, args.samples, args.seed, task=args.task,
            knobs=method_knobs(args),
        )  # fmt: skip
        summary = {
            n: {k: {"accuracy": v["accuracy"], "propagated": v["propagated"]} for k, v in d.items()}
            for n, d in data.items()
        }
    elif args.kind == "latency":
        summary = reports.latency_report(lm, methods, out, lengths[0], args.repeats, args.seed)
    else:
        depths = [float(d) for d in args.depths.split(",")]
        summary = reports.niah_report(
            lm, methods, out, lengths, depths, args.samples, args.seed, task=args.task
        )
    print(json.dumps(summary, indent=1))
    return 0


def cmd_serve(args) -> int:
    from structkv.models import DEFAULT_MODEL
    from structkv.runtime.server import serve

    if args.engine is not None and (method_knobs(args) or args.method != "structkv"):
        given = ", ".join(["--method"] * (args.method != "structkv") + list(method_knobs(args)))
        raise StructKVError(
            f"an engine's method is fixed at export ({given} given); drop them, or serve "
            "--model NAME with the method and knobs you want"
        )
    if args.engine is not None and args.dtype != "fp32":
        raise StructKVError(
            f"an engine's dtype is fixed at export (--dtype {args.dtype} given); drop it, or "
            f"export with structkv-export --dtype {args.dtype}"
        )
    if args.engine is None and args.model is None:
        args.model = DEFAULT_MODEL
    if not 0 < args.port < 65536:
        raise StructKVError(f"--port must be in 1..65535, got {args.port}")
    return serve(args)


def cmd_deploy_triton(args) -> int:
    from structkv.runtime.triton_deploy import write_repository

    out = write_repository(
        args.engine,
        args.out,
        name=args.name,
        instances=args.instances,
        kv_cache_mb=args.kv_cache_mb,
        device=args.device,
        threads=args.threads,
        copy=args.copy,
        force=args.force,
        backend=args.backend,
    )
    print(f"Triton model repository {args.name!r} written to {out}; start the server with:")
    print(f"  tritonserver --model-repository {out}   (see {out / 'README.md'})")
    return 0


def cmd_methods(args) -> int:
    from dataclasses import fields

    from structkv.methods import METHODS
    from structkv.methods.structkv import PAPER_BUDGETS

    def shown(f) -> str:  # structkv's unset budgets come from the profile
        if f.default is None and f.name in PAPER_BUDGETS:
            return f"{f.name}=profile|{PAPER_BUDGETS[f.name]}"
        return f"{f.name}={f.default!r}"

    for name, cls in METHODS.items():
        knobs = ", ".join(shown(f) for f in fields(cls))
        print(f"{name:<15} {knobs}")
    return 0


MODEL_HELP = "smollm2-135m (embedded, default), an alias, an HF directory, a .gguf or tiny-*"
BACKEND_HELP = (
    "onnxruntime (default), torch (the stage modules eagerly: the parity oracle) or tensorrt "
    "(a --target tensorrt engine built into TensorRT engines on a GPU)"
)
SEED_HELP = "seed of the generated prompts (default 0)"
DEVICE_HELP = "torch device for the model: cpu (default), cuda, cuda:N"


def _suite_args(p: argparse.ArgumentParser, profile_help: str) -> None:
    """The flags every resumable evaluation suite (ruler, frontier) takes."""
    _model_args(p)
    p.add_argument("--profile", choices=("quick", "full"), default="quick", help=profile_help)
    p.add_argument("--methods", help="comma-separated (default: the profile's)")
    p.add_argument("--tasks", help="comma-separated (default: the profile's)")
    p.add_argument("--lengths", help="comma-separated token lengths (default: the profile's)")
    p.add_argument("--samples", type=count(1), help="samples per task and length")
    p.add_argument("--seed", type=int, default=0, help=SEED_HELP)
    p.add_argument("--out", required=True, help="results directory (re-runs resume here)")
    p.add_argument(
        "--report-only",
        action="store_true",
        help="rewrite the report from results.json without generating anything",
    )


def _model_args(p: argparse.ArgumentParser) -> None:
    from structkv.models import DEFAULT_MODEL, DTYPE_HELP

    p.add_argument("--model", default=DEFAULT_MODEL, help=MODEL_HELP)
    p.add_argument("--device", default="cpu", help=DEVICE_HELP)
    p.add_argument("--dtype", default="fp32", help=DTYPE_HELP)


def _prompt_args(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="the prompt text")
    src.add_argument("--prompt-file", help="a UTF-8 text file holding the prompt")


def build_parser() -> argparse.ArgumentParser:
    from structkv.calibration import (
        CHUNKS,
        DEFAULT_COMPUTE_CAP,
        DEFAULT_LENGTH,
        DEFAULT_PROMPT_SET,
        LAMBDAS,
        POOLINGS,
        PROMPT_SETS,
        WINDOWS,
    )
    from structkv.models import DTYPE_HELP

    parser = _Parser(prog="structkv", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    g = sub.add_parser("generate", help="generate with a compression method")
    _model_args(g)
    g.add_argument(
        "--method", default="structkv", help="compression method (see `structkv methods`)"
    )
    add_method_args(g)
    _prompt_args(g)
    g.add_argument(
        "--max-new-tokens", type=count(1), default=64, help="tokens to generate (default 64)"
    )
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default 1.0)")
    g.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    g.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template")
    g.add_argument("--json", action="store_true", help="print one JSON object")
    g.set_defaults(func=cmd_generate)

    rn = sub.add_parser("run", help="generate with an exported engine (structkv-export)")
    rn.add_argument("--engine", required=True, help="engine directory")
    _prompt_args(rn)
    rn.add_argument(
        "--max-new-tokens", type=count(1), default=64, help="tokens to generate (default 64)"
    )
    rn.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template")
    rn.add_argument(
        "--backend",
        choices=("onnxruntime", "torch", "tensorrt"),
        default="onnxruntime",
        help=BACKEND_HELP,
    )
    rn.add_argument("--kv-cache-mb", type=megabytes, default=512, help="paged KV pool size")
    rn.add_argument("--json", action="store_true", help="print one JSON object")
    rn.set_defaults(func=cmd_run)

    c = sub.add_parser("calibrate", help="choose pivot and λ per model (method.md §6)")
    _model_args(c)
    c.add_argument("--out", help="profile path (default: the user cache, used automatically)")
    c.add_argument("--prompts", type=count(1), default=8, help="calibration prompts (default 8)")
    c.add_argument(
        "--length",
        type=count(1),
        help=f"tokens per prompt; calibrate at the length you serve (default {DEFAULT_LENGTH}, "
        "or the model's context if shorter)",
    )
    c.add_argument(
        "--steps",
        type=count(1),
        default=16,
        help="teacher-forced tokens scored per prompt (default 16)",
    )
    c.add_argument(
        "--compute-cap",
        type=float,
        default=DEFAULT_COMPUTE_CAP,
        help=f"largest prefill compute fraction searched (default {DEFAULT_COMPUTE_CAP})",
    )
    c.add_argument(
        "--r-kvs",
        help="the R_KV values the budget search may choose (default 0.05,0.1,0.2,0.5); one "
        "value, e.g. 0.2, calibrates every other knob for that KV memory budget",
    )
    c.add_argument(
        "--target-fidelity",
        type=float,
        help="also choose window, chunk, R_struct and R_KV: the cheapest setting whose "
        "agreement with full context's own answers reaches this (e.g. 0.9)",
    )
    for flag, what, grid in (("--windows", "observation windows", WINDOWS),
                             ("--poolings", "pooling kernels", POOLINGS),
                             ("--chunks", "chunk sizes (0: single tokens)", CHUNKS)):  # fmt: skip
        c.add_argument(
            flag,
            help=f"the {what} stage 2 may choose (default {','.join(map(str, grid))}); one "
            "value fixes it, e.g. to keep a profile's window while a cheaper schedule is searched",
        )
    c.add_argument(
        "--refine",
        action="store_true",
        help="the budget search also tries two-stage schedules (a shallow cut, then a deeper, "
        "tighter one: --refine-layer/--r-refine), which structkv-export builds as two more graphs",
    )
    c.add_argument(
        "--lambdas",
        type=lambdas,
        default=LAMBDAS,
        help="λ values searched, comma-separated, each in [0, 1] (default "
        f"{','.join(map(str, LAMBDAS))})",
    )
    c.add_argument(
        "--probes",
        choices=PROMPT_SETS,
        default=DEFAULT_PROMPT_SET,
        help="calibration prompts: fact (an invented record's code inserted in the prose and "
        "asked for: a short key and a multi-token value, as retrieval needs; the shipped "
        "SmolLM2 profile's), copy (v3: the answer pre-filled with a sentence's opening from the "
        "document), question (v5: that opening quoted in the question, the answer scored after "
        "repeating it), mixed (half copy, half question), cued (v4), probes/generic (older "
        f"profiles) (default {DEFAULT_PROMPT_SET})",
    )
    c.set_defaults(func=cmd_calibrate)

    e = sub.add_parser("eval", help="accuracy evaluations (resumable; results.json/.md)")
    kinds = e.add_subparsers(dest="kind", required=True, parser_class=_Parser)
    r = kinds.add_parser("ruler", help="RULER-style tasks: needles, vt, cwe, fwe")
    _suite_args(r, "quick (CI-sized) or full (the report) task/length/sample set")
    r.add_argument("--haystack-file", help="your own prose for the haystack (default: docstrings)")
    add_method_args(r)
    r.set_defaults(func=cmd_eval_ruler)

    fr = kinds.add_parser(
        "frontier", help="accuracy vs prefill compute and KV fraction, every method (resumable)"
    )
    _suite_args(fr, "quick (CI-sized) or full (2K/4K, all task families, 20 samples, the grid)")
    fr.add_argument("--r-structs", help="R_struct values, e.g. 0.1,0.2,0.3,0.5,0.7")
    fr.add_argument("--r-kvs", help="R_KV values, e.g. 0.05,0.1,0.2,0.5")
    fr.add_argument(
        "--speed-repeats",
        type=int,
        default=0,
        help="time the cheapest settings' prefill vs full at the longest length (0: skip)",
    )
    add_method_args(fr)
    fr.set_defaults(func=cmd_eval_frontier)

    cp = kinds.add_parser(
        "compare", help="paired comparison of two methods' answers, same prompts (no generation)"
    )
    cp.add_argument("out", help="an eval --out directory (or its results.json)")
    cp.add_argument("a", help="a label as results.md writes it, or a method naming one label")
    cp.add_argument("b", help="the label (or method) to compare with")
    cp.add_argument("--tasks", help="only these tasks, comma-separated (default: all in common)")
    cp.add_argument(
        "--b-out",
        help="take B's answers from this other eval --out directory (same tasks, lengths and "
        "seeds; e.g. one label run twice with other knobs)",
    )
    cp.add_argument("--json", action="store_true", help="print one JSON object")
    cp.set_defaults(func=cmd_eval_compare)

    pe = kinds.add_parser("peer", help="kvpress cross-check: kept sets and accuracy side by side")
    pe.add_argument("--peer", choices=("kvpress",), default="kvpress", help="the peer library")
    _model_args(pe)
    pe.add_argument(
        "--tasks",
        default="niah_single_1,niah_single_2,niah_multikey_1",
        help="comma-separated RULER tasks",
    )
    pe.add_argument("--lengths", default="2048,4096", help="comma-separated token lengths")
    pe.add_argument(
        "--samples", type=count(1), default=5, help="samples per task and length (default 5)"
    )
    pe.add_argument("--seed", type=int, default=0, help=SEED_HELP)
    pe.add_argument("--out", required=True, help="results directory")
    pe.set_defaults(func=cmd_eval_peer)

    for kind, text in (
        ("niah", "needle grid over lengths x depths, heatmap per method (Figure 6)"),
        ("fidelity", "per-layer hidden-state cosine, KL, top-1 vs full (Figure 3)"),
        ("pivot", "per-layer entropy / sparsity / variance / T_l and pivots (Figure 5)"),
        ("latency", "prefill time per stage and method, stacked bars (Figure 8)"),
        ("decoupling", "R_struct x R_KV and λ x pivot grids, needle survival (Figure 7)"),
        ("survival", "needle survival per stage (propagated set, KV per layer) per length"),
    ):
        k = kinds.add_parser(kind, help=text)
        _model_args(k)
        k.add_argument(
            "--methods",
            default="full,snapkv,fastkv,structkv-paper,structkv",
            help="comma-separated methods",
        )
        k.add_argument("--lengths", default="2048", help="comma-separated token lengths")
        k.add_argument("--samples", type=count(1), default=4, help="prompts per cell (default 4)")
        k.add_argument("--seed", type=int, default=0, help=SEED_HELP)
        k.add_argument("--out", required=True, help="results directory (JSON + PNG)")
        if kind == "niah":
            k.add_argument(
                "--depths",
                default="0.1,0.3,0.5,0.7,0.9",
                help="needle depths as fractions of the context",
            )
        if kind == "latency":
            k.add_argument(
                "--repeats", type=count(1), default=3, help="timed runs per method (median)"
            )
        if kind in ("survival", "niah"):
            default = "niah_single_1" if kind == "survival" else "niah_single_2"
            k.add_argument("--task", default=default, help=f"a needle task (default {default})")
        if kind == "survival":
            add_method_args(k)  # --r-kv, --window, ...: to every method that has the knob
        k.set_defaults(func=cmd_eval_report)

    from structkv.bench import add_bench_parser

    add_bench_parser(sub)

    sv = sub.add_parser("serve", help="OpenAI-compatible HTTP server (continuous batching)")
    src = sv.add_mutually_exclusive_group()
    src.add_argument("--engine", help="serve an exported engine directory (ONNX Runtime)")
    src.add_argument("--model", default=None, help=MODEL_HELP + " (torch; default smollm2-135m)")
    sv.add_argument("--method", default="structkv", help="method with --model (default structkv)")
    add_method_args(sv)
    sv.add_argument("--device", default="cpu", help=DEVICE_HELP)
    sv.add_argument("--dtype", default="fp32", help=DTYPE_HELP + " (with --model)")
    sv.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    sv.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    sv.add_argument("--kv-cache-mb", type=megabytes, default=512, help="KV pool size (default 512)")
    sv.add_argument("--served-model-name", help="model id clients send (default: engine or model)")
    sv.set_defaults(func=cmd_serve)

    dp = sub.add_parser("deploy", help="write a deployment for an exported engine")
    targets = dp.add_subparsers(dest="target", required=True, parser_class=_Parser)
    tr = targets.add_parser(
        "triton", help="a Triton Inference Server model repository (decoupled Python backend)"
    )
    tr.add_argument("--engine", required=True, help="engine directory (structkv-export --out)")
    tr.add_argument("--out", required=True, help="model repository directory to write")
    tr.add_argument("--name", default="structkv", help="Triton model name (default structkv)")
    tr.add_argument("--instances", type=int, default=1, help="model instances (default 1)")
    tr.add_argument(
        "--kv-cache-mb", type=megabytes, default=512, help="KV pool per instance (default 512)"
    )
    tr.add_argument(
        "--backend", default="onnxruntime", choices=("onnxruntime",),
        help="the engine's runtime inside Triton's Python backend (default onnxruntime)",
    )  # fmt: skip
    tr.add_argument(
        "--device", default="cpu", choices=("cpu", "cuda"),
        help="cpu: KIND_CPU instances; cuda: KIND_GPU with ONNX Runtime's CUDA provider",
    )  # fmt: skip
    tr.add_argument(
        "--threads", type=int, default=0, help="ONNX Runtime threads per instance (0: cores/N)"
    )
    tr.add_argument("--copy", action="store_true", help="copy the engine into the repository")
    tr.add_argument("--force", action="store_true", help="replace a non-empty --out")
    tr.set_defaults(func=cmd_deploy_triton)

    m = sub.add_parser("methods", help="list methods and their default parameters")
    m.set_defaults(func=cmd_methods)
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        return args.func(args)
    except StructKVError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

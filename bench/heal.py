"""Healing from different starts: validation KL and wiki/c4 perplexity against steps (and tokens seen).

Answers FermiGrad's open question, "does the FermiGrad initialization reduce the amount of data or training steps
required for the subsequent healing phase compared to uniform compression?", with measurements: every start
(uniform, fermigrad, lems, ...) is compressed to the same parameter count, then healed with the same settings;
the closing note gives the steps each start needs to reach a given perplexity, and the perplexity at equal steps.

    python bench/heal.py                                                   # svd-llm+uniform @0.8, factors (CPU)
    python bench/heal.py --starts uniform,fermigrad,lems --ratios 0.8,0.6 --factorize svd-llm,kfac \\
        --modes factors,lora --heal steps=1000 --heal batch_size=16 --ppl-every 100 --device auto    # GPU
    python bench/heal.py --device cpu --heal steps=45 --heal calib=wiki,c4 --heal samples=192 --heal val_samples=16 \\
        --heal eval_every=15 --heal time_limit=420 --ppl-every 15 \\
        --tasks piqa,hellaswag,winogrande,arc_easy,arc_challenge,boolq,openbookqa --task-limit 200   # CPU target

Protocol: compression as in the other benches (32×512 calibration tokens of wiki's first half, seed 0; the
statistics, and the teacher's top-k log-probs, are cached in --work so every start shares them). Healing trains on the calibration halves only
(`--heal calib=...`, default wiki,c4); perplexity is measured on 8192 tokens of each text's held-out second half
in 1024-token windows, at step 0 and every --ppl-every steps (the time it takes is not counted as healing time),
and the final figures are those of the best checkpoint (lowest validation KL), which is what `svdpress heal` saves.
Writes a table, bench/results/heal.json (rewritten after every run) and heal.png (the curves). Resumable: a rerun
with the same settings keeps the runs the file holds and does only the missing ones.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path
from typing import Any, Optional

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

import svdpress  # noqa: E402
from svdpress.allocate import ALLOCATORS  # noqa: E402
from svdpress.cli import (bench_main, csv, names_in, parse_method_opts, parse_opts, positive_int,  # noqa: E402
                          positive_number, ratio_list, results_file)
from svdpress.config import CompressConfig, EvalConfig, HealConfig, resolve_device  # noqa: E402
from svdpress.errors import SvdpressError  # noqa: E402
from svdpress.evaluate.perplexity import text_perplexity  # noqa: E402
from svdpress.evaluate.zeroshot import average_acc  # noqa: E402
from svdpress.export import read_json, read_manifest, write_json  # noqa: E402
from svdpress.factorize import FACTORIZERS  # noqa: E402
from svdpress.table import table  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="default")
    p.add_argument("--factorize", type=names_in(FACTORIZERS, "factorizer"), default="svd-llm",
                   help="comma list (svd-llm, kfac, ...)")
    p.add_argument("--starts", type=names_in(ALLOCATORS, "allocator"), default="uniform",
                   help="allocations to start from, comma list")
    p.add_argument("--ratios", type=ratio_list, default="0.8")
    p.add_argument("--modes", default="factors", help="factors, lora (comma list)")
    p.add_argument("--heal", action="append", default=[], metavar="KEY=VALUE", help="heal setting, for every run")
    p.add_argument("--opt", action="append", default=[], metavar="METHOD.KEY=VALUE",
                   help="an allocation method's option, e.g. fermigrad.steps=300")
    p.add_argument("--ppl", default="wiki,c4", help="texts whose held-out half is scored")
    p.add_argument("--ppl-every", type=positive_int, default=50,
                   help="perplexity every N steps (a multiple of eval_every)")
    p.add_argument("--limit", type=positive_int, default=8192, help="perplexity tokens per text")
    p.add_argument("--seqlen", type=positive_int, default=1024, help="perplexity window")
    p.add_argument("--tasks", default="", help="zero-shot tasks scored before and after healing (comma list)")
    p.add_argument("--task-limit", type=positive_int, default=200)
    p.add_argument("--target-ppl", type=positive_number, default=None,
                   help="wiki perplexity for 'steps to reach' (default: the worst final one among the starts)")
    p.add_argument("--calib-samples", type=positive_int, default=32)
    p.add_argument("--calib-seqlen", type=positive_int, default=512)
    p.add_argument("--device", default="auto")
    p.add_argument("--work", default="/tmp/svdpress-heal-bench", help="compressed starts and statistics cache")
    p.add_argument("--no-dense", action="store_true", help="skip the dense model's perplexity")
    p.add_argument("--out", type=results_file, default=str(ROOT / "bench" / "results" / "heal.json"))
    p.add_argument("--fresh", action="store_true", help="start over: replace --out's runs (made under other settings)")
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def compressed(a, factorize: str, start: str, ratio: float, options: dict, device: str, progress: bool) -> str:
    """The start's directory in --work, compressed once (later runs reuse it)."""
    d = Path(a.work) / f"{factorize}+{start}@{ratio}"
    if not (d / "svdpress.json").is_file():
        cfg = CompressConfig(model=a.model, factorize=factorize, allocate=start, ratio=ratio,
                             calib_samples=a.calib_samples, calib_seqlen=a.calib_seqlen, options=options,
                             device=device, stats_cache=str(Path(a.work) / "stats"), out=str(d), overwrite=True,
                             progress=progress)
        svdpress.compress(None, cfg)
    return str(d)


def run_one(a, path: str, mode: str, heal_opts: dict, texts: list[str], device: str, progress: bool) -> dict:
    """Heal one start in one mode; the perplexity curve comes from the monitor, the final figures from the best
    checkpoint."""
    cfg = HealConfig.from_options({**heal_opts, "mode": mode}, progress=progress,
                                  eval=EvalConfig(ppl=tuple(texts), seqlen=a.seqlen, limit=a.limit,
                                                  tasks=tuple(csv(a.tasks)), task_limit=a.task_limit))
    cfg.device = device
    if cfg.teacher_cache is None:  # every run of one sweep distils the same teacher on the same windows
        cfg.teacher_cache = str(Path(a.work) / "teacher")
    every = max(cfg.eval_every, a.ppl_every // cfg.eval_every * cfg.eval_every)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)

    def monitor(step: int, runner) -> dict:
        if step % every and step != cfg.steps:
            return {}
        return {"ppl": {t: text_perplexity(runner, tok, t, a.seqlen, a.limit, progress=False)["ppl"] for t in texts}}

    t = time.perf_counter()
    _, report = svdpress.heal(path, cfg, monitor=monitor)
    h = report["heal"]
    ev = report["eval"]
    start = next(p for p in h["val_curve"] if "ppl" in p)
    best = next((p for p in h["val_curve"] if p["step"] == h["best_step"]), None)
    if best is not None and "ppl" not in best:  # e.g. a time limit ended the run between perplexity points:
        best["ppl"] = {k: v["ppl"] for k, v in ev["ppl"].items()}  # the evaluated model is that checkpoint
    return {"mode": mode, "settings": h["settings"], "params": h["params"], "linear_ratio":
            report["params"]["linear_ratio"], "trainable_params": h["trainable_params"],
            "ppl_before": start["ppl"], "ppl_after": {k: v["ppl"] for k, v in ev["ppl"].items()},
            "tasks_after": ev.get("tasks"), "avg_acc_after": average_acc(ev["tasks"]) if ev.get("tasks") else None,
            "val_kl_before": h["initial_val_kl"], "val_kl_after": h["best_val_kl"], "best_step": h["best_step"],
            "steps_run": h["steps_run"], "tokens_seen": h["tokens_seen"], "stopped": h["stopped"],
            "time_s": h["time_s"], "val_curve": h["val_curve"],
            "loss_curve": [{k: c[k] for k in ("step", "tokens", "loss", "kl")} for c in h["curve"]],
            "data": h["data"], "wall_s": round(time.perf_counter() - t, 1)}


def steps_to_reach(curve: list[dict], target: float, text: str = "wiki") -> Optional[float]:
    """First step at which the perplexity reaches `target`, interpolated (in log ppl) between checkpoints."""
    pts = [(p["step"], p["ppl"][text]) for p in curve if "ppl" in p and text in p["ppl"]]
    for (s0, p0), (s1, p1) in zip(pts, pts[1:]):
        if p0 <= target:
            return float(s0)
        if p1 <= target:
            f = (math.log(p0) - math.log(target)) / max(math.log(p0) - math.log(p1), 1e-12)
            return s0 + f * (s1 - s0)
    return float(pts[0][0]) if pts and pts[0][1] <= target else None


def ppl_at(curve: list[dict], step: int, text: str = "wiki") -> Optional[float]:
    """Perplexity at the last checkpoint at or before `step`."""
    pts = [p["ppl"][text] for p in curve if "ppl" in p and text in p["ppl"] and p["step"] <= step]
    return pts[-1] if pts else None


def answer(results: list[dict], target: Optional[float], text: str = "wiki") -> list[str]:
    """The closing note: per (factorization, ratio, mode), steps to reach a perplexity on `text` and the perplexity
    at equal steps."""
    lines = []
    groups: dict[tuple, list[dict]] = {}
    for r in results:
        groups.setdefault((r["factorize"], r["ratio"], r["mode"]), []).append(r)
    for (fac, ratio, mode), rs in groups.items():
        # the worst final figure read off the curves themselves (a LoRA run's ppl_after is measured after merging,
        # which differs from its curve by rounding, so a run would never reach its own figure)
        goal = target or max(ppl_at(r["val_curve"], r["best_step"], text) for r in rs)
        common = min(r["steps_run"] for r in rs)
        parts = []
        for r in rs:
            s = steps_to_reach(r["val_curve"], goal, text)
            at = ppl_at(r["val_curve"], common, text)
            tok_per_step = r["tokens_seen"] / max(r["steps_run"], 1)
            reach = "never" if s is None else f"{s:.0f} steps ({s * tok_per_step:,.0f} tokens)"
            parts.append(f"{r['start']}: start {r['ppl_before'][text]:.1f}, reaches {goal:.1f} in {reach}, "
                         f"{at:.1f} at step {common}" if at is not None else f"{r['start']}: no checkpoint")
        lines.append(f"{fac} @{ratio}, {mode} ({text} perplexity): " + "; ".join(parts))
    return lines


def plot(results: list[dict], dense: Optional[dict], path: Path, text: str = "wiki") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = list(dict.fromkeys((r["factorize"], r["ratio"]) for r in results))
    fig, axes = plt.subplots(2, len(groups), figsize=(5.5 * len(groups), 7), squeeze=False)
    for j, (fac, ratio) in enumerate(groups):
        ax_p, ax_k = axes[0][j], axes[1][j]
        for r in (r for r in results if (r["factorize"], r["ratio"]) == (fac, ratio)):
            label = f"{r['start']} ({r['mode']})"
            pts = [(p["step"], p["ppl"][text]) for p in r["val_curve"] if "ppl" in p and text in p["ppl"]]
            ax_p.plot([s for s, _ in pts], [v for _, v in pts], marker="o", label=label)
            ks = [(p["step"], p["val_kl"]) for p in r["val_curve"] if p["val_kl"] is not None]
            ax_k.plot([s for s, _ in ks], [v for _, v in ks], marker=".", label=label)
        if dense and text in dense:
            ax_p.axhline(dense[text], color="k", ls="--", lw=1, label="dense")
        ax_p.set(title=f"{fac} @{ratio}", xlabel="step", ylabel=f"{Path(text).name} perplexity (held-out half)",
                 yscale="log")
        ax_k.set(xlabel="step", ylabel="validation KL (calibration half)", yscale="log")
        for ax in (ax_p, ax_k):
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def print_table(doc: dict) -> None:
    rows = []
    for r in doc["results"]:
        pb, pa = r["ppl_before"], r["ppl_after"]
        rows.append([r["factorize"], r["ratio"], r["start"], r["mode"], f"{r['linear_ratio']:.4f}",
                     " / ".join(f"{pb[t]:.1f}→{pa[t]:.1f}" for t in pa),
                     f"{r['val_kl_before']:.3f}→{r['val_kl_after']:.3f}",
                     "" if r.get("avg_acc_after") is None else
                     f"{r.get('avg_acc_before', float('nan')):.4f}→{r['avg_acc_after']:.4f}",
                     f"{r['best_step']}/{r['steps_run']}", f"{r['tokens_seen']:,}", r["time_s"]["total"]])
    print(table(rows, ["factorize", "ratio", "start", "mode", "linear ratio", f"ppl {'/'.join(doc['ppl_texts'])}",
                       "val KL", "avg acc", "best/steps", "tokens", "heal s"]))
    if doc.get("dense_ppl"):
        print("dense: " + ", ".join(f"{t} {v:.2f}" for t, v in doc["dense_ppl"].items()))
    for line in doc.get("answer", []):
        print(line)


def tasks_before(a, path: str, device: str) -> dict:
    """Zero-shot results of the start before healing, computed once per start, task list and limit (kept next to
    the start in --work: a start is compressed once, so its figures do not change)."""
    spec = {"tasks": list(csv(a.tasks)), "task_limit": a.task_limit}
    f = Path(path) / "bench_tasks_before.json"
    if f.is_file():
        try:
            got = read_json(f, "a cache of zero-shot results")
        except SvdpressError as e:  # a cache: a damaged one is measured again, not fatal
            print(f"note: {e}; measuring again", file=sys.stderr)
            got = {}
        if isinstance(got, dict) and got.get("spec") == spec and "tasks" in got:
            return got["tasks"]
    ev = svdpress.evaluate(path, EvalConfig(ppl=(), tasks=tuple(spec["tasks"]), task_limit=a.task_limit),
                           device=device)
    write_json(f, {"spec": spec, "tasks": ev["tasks"]})
    return ev["tasks"]


def run_key(r: dict) -> tuple:
    return (r["factorize"], r["ratio"], r["start"], r["mode"])


RESUME_KEYS = ("model", "device", "ppl_texts", "heal_options", "allocation_options", "eval", "tasks", "task_limit")


def resume(out: Path, fresh: dict) -> dict:
    """The stored document when it was made under the same settings (its runs are kept and skipped), else `fresh`:
    a sweep of many heal runs can be stopped and continued. A file of other settings is refused, never replaced:
    hours of healing runs are not overwritten by a rerun with one flag changed."""
    if out.is_file():
        old = read_json(out, "this bench's JSON (pass another --out or --fresh)")
        if not isinstance(old, dict) or not isinstance(old.get("results"), list):
            raise SvdpressError(f"{out} is not this bench's JSON (no results); pass another --out or --fresh")
        diff = {k: (old.get(k), fresh[k]) for k in RESUME_KEYS if old.get(k) != fresh[k]}
        if diff:
            raise SvdpressError(f"{out} holds runs of other settings (stored, this run: {diff}); pass another "
                                "--out, run with its settings to resume it, or --fresh to start over")
        print(f"{out}: resuming, {len(old['results'])} run(s) kept")
        return old
    return fresh


def main(argv=None) -> int:
    a = parse_args(argv)
    progress = not a.no_progress
    device = resolve_device(a.device)
    texts = list(csv(a.ppl))
    try:  # bad settings fail before anything is compressed
        heal_opts = parse_opts(a.heal)
        for mode in csv(a.modes) or ["(none given)"]:
            HealConfig.from_options({**heal_opts, "mode": mode}).validate()
        alloc_opts = parse_method_opts(a.opt)
        EvalConfig(ppl=tuple(texts), seqlen=a.seqlen, limit=a.limit, tasks=tuple(csv(a.tasks)),
                   task_limit=a.task_limit).validate()
    except SvdpressError as e:
        raise SystemExit(str(e)) from None
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    Path(a.work).mkdir(parents=True, exist_ok=True)
    fresh: dict[str, Any] = {"model": a.model, "device": device, "ppl_texts": texts, "heal_options": heal_opts,
                             "allocation_options": alloc_opts, "protocol": __doc__.split("Protocol: ")[1].strip(),
                             "eval": f"{', '.join(texts)} second halves, {a.limit} tokens, seqlen {a.seqlen}",
                             "tasks": list(csv(a.tasks)), "task_limit": a.task_limit, "results": []}
    try:
        doc = resume(out, fresh) if not a.fresh else fresh
    except SvdpressError as e:
        raise SystemExit(str(e)) from None
    if not a.no_dense and "dense_ppl" not in doc:
        dense = svdpress.evaluate(a.model, EvalConfig(ppl=tuple(texts), seqlen=a.seqlen, limit=a.limit), device=device)
        doc["dense_ppl"] = {t: v["ppl"] for t, v in dense["ppl"].items()}
    done = {run_key(r) for r in doc["results"]}

    def save() -> None:  # after every run, and once at the end (a resumed sweep with nothing to run)
        doc["answer"] = answer(doc["results"], a.target_ppl, texts[0])
        write_json(out, doc)

    for fac in a.factorize:
        for ratio in a.ratios:
            for start in a.starts:
                modes = [m for m in csv(a.modes) if (fac, ratio, start, m) not in done]
                if not modes:
                    continue
                path = compressed(a, fac, start, ratio, alloc_opts.get(start, {}), device, progress)
                before_tasks = tasks_before(a, path, device) if a.tasks else None
                for mode in modes:
                    r = run_one(a, path, mode, heal_opts, texts, device, progress)
                    r.update(factorize=fac, ratio=ratio, start=start,
                             allocation=read_manifest(path).get("allocate"))
                    if before_tasks is not None:
                        r["tasks_before"] = before_tasks
                        r["avg_acc_before"] = average_acc(before_tasks)
                    doc["results"].append(r)
                    save()
                    print_table(doc)
    if doc["results"]:
        save()
    plot(doc["results"], doc.get("dense_ppl"), out.with_suffix(".png"), texts[0])
    print(f"\nwrote {out} and {out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    bench_main(main)

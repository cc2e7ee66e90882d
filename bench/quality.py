"""Perplexity vs compression ratio for the factorization methods (uniform ranks), on held-out wiki / c4.

Protocol (COMMON.md): calibration 32×512 tokens of wiki's first half (seed 0); evaluation `--limit` tokens of
each text's second half in `--seqlen` windows. Calibration runs ONCE: the input statistics (X·Xᵀ per block) and,
if any method needs them, the gradient statistics go through the on-disk stats cache (`--stats-cache`), and every
method then reads them from there; each method is factorized once, and every ratio is built from a fresh copy of
the dense model. Prints a table, writes JSON and a PNG plot (perplexity vs ratio, one panel per text).

    python bench/quality.py                                       # the full table (GPU recommended)
    python bench/quality.py --methods svd-llm,kfac --ratios 0.8 --texts wiki --device cpu
"""

from __future__ import annotations

import argparse
import copy
import math
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parent / "src"))

from svdpress.allocate import AllocationProblem, allocate  # noqa: E402
from svdpress.cli import bench_main, names_in, positive_int, ratio_list, results_file, seed  # noqa: E402
from svdpress.config import EvalConfig, resolve_device  # noqa: E402
from svdpress.data import calibration_samples, check_sources  # noqa: E402
from svdpress.errors import SvdpressError  # noqa: E402
from svdpress.factorize import FACTORIZERS  # noqa: E402
from svdpress.model import Placement, Runner  # noqa: E402
from svdpress.models import find_targets, load_model  # noqa: E402
from svdpress.params import count_params, dense_count  # noqa: E402
from svdpress.export import write_json  # noqa: E402
from svdpress.pipeline import Timer, build, evaluate_model, factorize_model  # noqa: E402
from svdpress.stats_cache import StatsCache, block_stats, grad_stats  # noqa: E402
from svdpress.table import table  # noqa: E402

METHODS = "svd,asvd,fwsvd,svd-llm,svd-llm-v2,kfac,gfwsvd"


def names(s: str) -> list[str]:
    return [x.strip() for x in s.split(",") if x.strip()]


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="default")
    p.add_argument("--methods", type=names_in(FACTORIZERS, "factorizer"), default=METHODS)
    p.add_argument("--ratios", type=ratio_list, default="0.9,0.8,0.7,0.6")
    p.add_argument("--texts", type=names, default=["wiki", "c4"])
    p.add_argument("--limit", type=positive_int, default=8192, help="evaluation tokens per text")
    p.add_argument("--seqlen", type=positive_int, default=1024, help="evaluation window")
    p.add_argument("--calib", default="wiki")
    p.add_argument("--calib-samples", type=positive_int, default=32)
    p.add_argument("--calib-seqlen", type=positive_int, default=512)
    p.add_argument("--batch-size", type=positive_int, default=4, help="calibration batch (forward and backward)")
    p.add_argument("--seed", type=seed, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--stats-cache", default=str(ROOT / "results" / "stats-cache"))
    p.add_argument("--json", type=results_file, default=ROOT / "results" / "quality.json")
    p.add_argument("--plot", type=Path, default=None, help="PNG path (default: the JSON path with .png)")
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def calibrate_once(model, samples, cache: StatsCache, a, device, need_grads: bool, seq_grads: bool = False) -> dict:
    """Fill the stats cache (a no-op when it already holds this model's and samples' statistics); timed."""
    out = {}
    t = time.perf_counter()
    runner = Runner(model, Placement(device=device, offload="none"))
    for _ in block_stats(cache, runner, samples, a.batch_size, not a.no_progress):
        pass
    out["inputs_s"] = round(time.perf_counter() - t, 2)
    if need_grads:
        t = time.perf_counter()
        grad_stats(cache, runner, samples, a.batch_size, not a.no_progress, fisher=True)
        if seq_grads:  # gfwsvd's per-sequence G: its own cache entry (another backward pass)
            grad_stats(cache, runner, samples, a.batch_size, not a.no_progress, fisher=False, out_grad="sequence")
        out["gradients_s"] = round(time.perf_counter() - t, 2)
    runner.close()
    return out


def evaluate(model, tok, a, device) -> dict[str, float]:
    cfg = EvalConfig(ppl=tuple(a.texts), seqlen=a.seqlen, limit=a.limit)
    res = evaluate_model(model, tok, cfg, device, not a.no_progress)
    return {t: r["ppl"] for t, r in res["ppl"].items()}


def run_method(method: str, model, tok, samples, shapes, a, device) -> dict:
    timer = Timer()
    with Runner(model, Placement(device=device, offload="none")) as runner:
        spectra = factorize_model(runner, samples, method, timer, a.batch_size, not a.no_progress, a.stats_cache)
    rows = {}
    for ratio in a.ratios:
        alloc = allocate(AllocationProblem(shapes, spectra, ratio, seed=a.seed, progress=False), "uniform")
        compressed = copy.deepcopy(model)  # every ratio from the dense weights
        with Runner(compressed, Placement(device=device, offload="none")) as r:
            build(r, spectra, alloc.ranks, progress=False)
        rows[str(ratio)] = {"achieved": count_params(shapes, alloc.ranks) / dense_count(shapes),
                            "ppl": evaluate(compressed, tok, a, device)}
        del compressed
        print(f"  {method} @ {ratio}: " + ", ".join(f"{t} {v:.4g}" for t, v in rows[str(ratio)]["ppl"].items()),
              flush=True)
    return {"timings_s": {k: round(v, 2) for k, v in timer.seconds.items()}, "ratios": rows}


def report(res: dict, a) -> str:
    head = ["method"] + [f"{t}@{r}" for t in a.texts for r in a.ratios] + ["factorize s", "stats load s"]
    rows = [["dense"] + [res["dense"][t] for t in a.texts for _ in a.ratios] + [None, None]]
    for m, d in res["methods"].items():
        rows.append([m] + [d["ratios"][str(r)]["ppl"][t] for t in a.texts for r in a.ratios]
                    + [d["timings_s"].get("factorize"), d["timings_s"].get("calibrate", 0)
                       + d["timings_s"].get("calibrate_gradients", 0)])
    cal = res["calibration_s"]
    note = (f"calibration (once, shared): inputs {cal['inputs_s']} s"
            + (f", gradients {cal['gradients_s']} s" if "gradients_s" in cal else "")
            + f"; eval {a.limit} tokens/text, seqlen {a.seqlen}; uniform ranks; device {res['device']}")
    return table(rows, head) + "\n" + note


def plot(res: dict, a, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(a.texts), figsize=(5.5 * len(a.texts), 4.2), squeeze=False)
    for ax, t in zip(axes[0], a.texts):
        for m, d in res["methods"].items():
            ys = [d["ratios"][str(r)]["ppl"][t] for r in a.ratios]
            ax.plot(a.ratios, [y if math.isfinite(y) else float("nan") for y in ys], marker="o", label=m)
        ax.axhline(res["dense"][t], color="k", ls="--", lw=1, label="dense")
        ax.set(xlabel="kept ratio (decoder linear params)", ylabel="perplexity", yscale="log", title=f"{t} (held-out)")
        ax.invert_xaxis()
        ax.grid(alpha=0.3, which="both")
    axes[0][0].legend(fontsize=8)
    fig.suptitle(f"{res['model']}: perplexity vs ratio, uniform ranks")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    a = parse(argv)
    try:  # texts and numbers before any work
        EvalConfig(ppl=tuple(a.texts), seqlen=a.seqlen, limit=a.limit).validate()
        check_sources(a.calib)
    except SvdpressError as e:
        raise SystemExit(f"error: {e}") from None
    device = resolve_device(a.device)
    torch.manual_seed(a.seed)
    model, tok, src = load_model(a.model, torch.float32, "cpu")
    shapes = {t.name: t.shape for t in find_targets(model)}
    samples, part = calibration_samples(tok, a.calib, a.calib_samples, a.calib_seqlen, a.seed)
    cache = StatsCache(a.stats_cache, model, samples)
    need_grads = any(FACTORIZERS[m].needs_gradients for m in a.methods)
    seq_grads = any(FACTORIZERS[m].out_grad != "token" for m in a.methods)
    res: dict = {"model": src.spec, "device": device, "calibration": f"{part.describe()}, {a.calib_samples}x"
                 f"{a.calib_seqlen}, seed {a.seed}", "eval": {"texts": a.texts, "limit": a.limit, "seqlen": a.seqlen},
                 "allocation": "uniform"}
    res["calibration_s"] = calibrate_once(model, samples, cache, a, device, need_grads, seq_grads)
    t = time.perf_counter()
    res["dense"] = evaluate(model, tok, a, device)
    print("dense: " + ", ".join(f"{k} {v:.4g}" for k, v in res["dense"].items()), flush=True)
    res["eval_s_dense"] = round(time.perf_counter() - t, 2)
    res["methods"] = {}
    for m in a.methods:
        res["methods"][m] = run_method(m, model, tok, samples, shapes, a, device)
        res["methods"][m]["needs_gradients"] = FACTORIZERS[m].needs_gradients
        a.json.parent.mkdir(parents=True, exist_ok=True)
        write_json(a.json, res, indent=1)  # partial results survive an interruption
    print(report(res, a))
    png = a.plot or a.json.with_suffix(".png")
    plot(res, a, png)
    print(f"\nwrote {a.json} and {png}")
    return 0


if __name__ == "__main__":
    bench_main(main)

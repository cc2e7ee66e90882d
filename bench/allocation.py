"""Rank-search methods compared at equal size: wiki perplexity vs parameter ratio, with each method's search time.

Protocol (COMMON.md): the model's spectra are computed ONCE (svd-llm, 32×512 calibration tokens of wiki's first
half, seed 0); then for each ratio and method: allocate → build from the restored dense weights → perplexity on
8192 tokens of wiki's second half in 1024-token windows. All methods share one measurement cache, so a layer
sensitivity measured for one method is not measured again for another (each method still reports what its
measurements cost: `search_s` includes them, `wall_s` is what this run spent).

    python bench/allocation.py --methods uniform,fermigrad --ratios 0.9,0.8,0.7 --device auto
    python bench/allocation.py --methods uniform,lems --ratios 0.8 --opt lems.gamma=3 --opt lems.probe_samples=8

Writes bench/results/allocation.json (after every run) and allocation.png (ppl vs ratio). The table says, per
ratio, whether every method's achieved parameter count is within ±0.5% of the others (a fair comparison).
`--pivga` allocates under PivGa counting r·(m+n) − r² and builds the models gauge-fixed (`compress --pivga`);
bench/pivga_budget.py compares that with PivGa applied after a classical allocation, at equal size.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

import torch  # noqa: E402

from svdpress.allocate import ALLOCATORS, AllocationProblem, allocate, check_options  # noqa: E402
from svdpress.cli import bench_main, names_in, parse_method_opts, positive_int, ratio_list, results_file  # noqa: E402
from svdpress.config import EvalConfig, resolve_device  # noqa: E402
from svdpress.data import calibration_samples  # noqa: E402
from svdpress.errors import SvdpressError  # noqa: E402
from svdpress.export import write_json  # noqa: E402
from svdpress.lowrank import set_module  # noqa: E402
from svdpress.model import Placement, Runner  # noqa: E402
from svdpress.models import load_model  # noqa: E402
from svdpress.params import count_params, dense_count  # noqa: E402
from svdpress.pipeline import Timer, build, evaluate_model, factorize_model  # noqa: E402
from svdpress.table import table  # noqa: E402

MATCH_TOL = 0.005  # achieved parameter counts compared at equal size, within ±0.5%
ALL = ("uniform", "atp", "asvd-threshold", "mrcs", "asvd-plus", "mrcs-plus", "svd-llm-v2", "lems", "fermigrad")


def protocol_args(p: argparse.ArgumentParser) -> None:
    """The options of the shared protocol (also bench/pivga_budget.py's)."""
    p.add_argument("--model", default="default")
    p.add_argument("--factorize", default="svd-llm")
    p.add_argument("--rank-multiple", type=positive_int, default=1,
                   help="for every method (lems uses 16 when this is 1)")
    p.add_argument("--opt", action="append", default=[], metavar="METHOD.KEY=VALUE", help="a method's option")
    p.add_argument("--calib-samples", type=positive_int, default=32)
    p.add_argument("--calib-seqlen", type=positive_int, default=512)
    p.add_argument("--seqlen", type=positive_int, default=1024, help="perplexity window")
    p.add_argument("--limit", type=positive_int, default=8192, help="evaluation tokens")
    p.add_argument("--device", default="auto")
    p.add_argument("--no-dense", action="store_true", help="skip the dense model's perplexity")
    p.add_argument("--stats-cache", default=None, help="calibration statistics cache directory (stats_cache.py)")
    p.add_argument("--spectra-cache", default=None, help="file to save/load the spectra (skips calibration)")
    p.add_argument("--no-progress", action="store_true")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    protocol_args(p)
    p.add_argument("--methods", type=names_in(ALLOCATORS, "allocator"), default=",".join(ALL), help="comma list")
    p.add_argument("--ratios", type=ratio_list, default="0.9,0.8,0.7,0.6")
    p.add_argument("--pivga", action="store_true", help="budget counted as PivGa stores it; models gauge-fixed")
    p.add_argument("--out", type=results_file, default=str(ROOT / "bench" / "results" / "allocation.json"))
    return p.parse_args(argv)


def spectra_for(a, runner, samples, progress) -> tuple[dict, float]:
    path = Path(a.spectra_cache) if a.spectra_cache else None
    if path and path.is_file():
        return torch.load(path, weights_only=False), 0.0
    t = time.perf_counter()
    spectra = factorize_model(runner, samples, a.factorize, Timer(), progress=progress, stats_cache=a.stats_cache)
    seconds = time.perf_counter() - t
    if path:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(spectra, path)
    return spectra, seconds


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for m in dict.fromkeys(r["method"] for r in results):
        pts = sorted((r["achieved"], r["ppl"]) for r in results if r["method"] == m)
        ax.plot([x for x, _ in pts], [y for _, y in pts], marker="o", label=m)
    ax.set(xlabel="kept parameter ratio (decoder linear layers)", ylabel="wiki perplexity", yscale="log")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    a = parse_args(argv)
    progress = not a.no_progress
    device = resolve_device(a.device)
    methods, ratios = a.methods, a.ratios
    try:
        EvalConfig(ppl=("wiki",), seqlen=a.seqlen, limit=a.limit).validate()
        opts = parse_method_opts(a.opt)
        for m in methods:  # every method's options (and optional packages: optuna) before the model is loaded
            check_options(m, opts.get(m, {}))
    except SvdpressError as e:
        raise SystemExit(str(e)) from None

    model, tok, _ = load_model(a.model)
    runner = Runner(model, Placement(device=device, offload="none"))
    samples, _ = calibration_samples(tok, "wiki", a.calib_samples, a.calib_seqlen, 0)
    shapes = runner.arch.shapes()
    spectra, factor_s = spectra_for(a, runner, samples, progress)
    originals = {name: model.get_submodule(name) for name in shapes}
    ev = EvalConfig(ppl=("wiki",), seqlen=a.seqlen, limit=a.limit)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    doc: dict[str, Any] = {"model": a.model, "factorize": a.factorize, "device": device,
                           "calibration": f"wiki first half, {a.calib_samples}x{a.calib_seqlen}, seed 0",
                           "eval": f"wiki second half, {a.limit} tokens, seqlen {a.seqlen}",
                           "factorize_s": round(factor_s, 1), "rank_multiple": a.rank_multiple, "options": opts,
                           "budget_counting": "pivga" if a.pivga else "classical", "results": []}
    if not a.no_dense:
        doc["dense_ppl"] = evaluate_model(runner, tok, ev, device, progress)["ppl"]["wiki"]["ppl"]
    cache: dict = {}  # sensitivities shared by all methods and ratios
    for ratio in ratios:
        for m in methods:
            problem = AllocationProblem(shapes, spectra, ratio, a.rank_multiple, dict(opts.get(m, {})), runner,
                                        samples, 0, progress, cache, pivga=a.pivga)
            t = time.perf_counter()
            alloc = allocate(problem, m)
            wall = time.perf_counter() - t
            build(runner, spectra, alloc.ranks, pivga=a.pivga, progress=False)
            ppl = evaluate_model(runner, tok, ev, device, progress)["ppl"]["wiki"]["ppl"]
            for name, layer in originals.items():
                set_module(model, name, layer)
            achieved = count_params(shapes, alloc.ranks, a.pivga) / dense_count(shapes)
            row = {"method": m, "ratio": ratio, "achieved": achieved,
                   "ppl": ppl, "search_s": float(alloc.info.get("search_s", wall)), "wall_s": round(wall, 2),
                   "info": alloc.info, "ranks": alloc.ranks}
            doc["results"].append(row)
            write_json(out, doc)
            print(f"{m:>15} @ {ratio}: ppl {ppl:.2f} (achieved {row['achieved']:.4f}, search {row['search_s']:.1f}s)",
                  flush=True)
    rows = []
    for ratio in ratios:
        here = [r for r in doc["results"] if r["ratio"] == ratio]
        lo, hi = min(r["achieved"] for r in here), max(r["achieved"] for r in here)
        matched = (hi - lo) / hi <= MATCH_TOL
        base = next((r["ppl"] for r in here if r["method"] == "uniform"), None)
        rows += [[r["method"], r["ratio"], f"{r['achieved']:.4f}", f"{r['ppl']:.2f}",
                  "-" if base is None else f"{r['ppl'] / base:.3f}", f"{r['search_s']:.1f}", f"{r['wall_s']:.1f}",
                  "yes" if matched else "NO"] for r in here]
    print(table(rows, ["method", "target", "achieved", "wiki ppl", "vs uniform", "search s", "wall s",
                       "params ±0.5%"]))
    if "dense_ppl" in doc:
        print(f"dense ppl {doc['dense_ppl']:.2f}")
    plot(doc["results"], out.with_suffix(".png"))
    print(f"wrote {out} and {out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    bench_main(main)

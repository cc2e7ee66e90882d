"""PivGa-aware budget vs PivGa after allocation, at equal parameter count: wiki perplexity (issue 13).

PivGa stores a rank-r factorization in r·(m+n) − r² parameters, losslessly. Two ways to use that:

* after:  allocate ranks under the classical count r·(m+n) at ratio R, then gauge-fix (`svdpress pivga`): the
          model shrinks by Σ r² to a ratio R' < R, with the SVD model's outputs;
* aware:  allocate under the PivGa count at ratio R' (`compress --pivga`): the same parameters buy higher ranks
          (every rank below min(m, n) is a candidate).

Both are built gauge-fixed (`build(..., pivga=True)`), counted directly from the built modules, and compared at
that equal count (±0.5%). `--build svd` builds the plain LowRankLinear pairs instead (PivGa is lossless, so the
perplexity is the same, without the float64 pivoted QR of every layer) and counts them with `layer_params(...,
pivga=True)`. `--resume` keeps the rows already in --out and runs only the missing ones. Protocol as bench/allocation.py: the spectra are computed once (svd-llm, 32×512 tokens
of wiki's first half, seed 0), perplexity on 8192 tokens of wiki's second half in 1024-token windows.

    python bench/pivga_budget.py --methods uniform,lems --ratios 0.8,0.6 --stats-cache /tmp/stats \\
        --spectra-cache /tmp/spectra.pt --out bench/reference/pivga_budget_cpu.json

Writes the JSON after every row (default bench/results/pivga_budget.json) and prints a table.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from svdpress.allocate import ALLOCATORS, AllocationProblem, allocate  # noqa: E402
from svdpress.cli import bench_main, names_in, parse_method_opts, ratio_list, results_file  # noqa: E402
from svdpress.config import EvalConfig, resolve_device  # noqa: E402
from svdpress.data import calibration_samples  # noqa: E402
from svdpress.errors import SvdpressError  # noqa: E402
from svdpress.export import as_read_back, read_json, write_json  # noqa: E402
from svdpress.lowrank import set_module  # noqa: E402
from svdpress.model import Placement, Runner  # noqa: E402
from svdpress.models import load_model  # noqa: E402
from svdpress.params import CLASSICAL, count_params, dense_count  # noqa: E402
from svdpress.pipeline import build, evaluate_model  # noqa: E402
from svdpress.table import table  # noqa: E402

from allocation import protocol_args, spectra_for  # noqa: E402  (bench/allocation.py: the shared protocol)

MATCH_TOL = 0.005  # the two models' parameter counts agree within ±0.5%


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    protocol_args(p)
    p.add_argument("--methods", type=names_in(ALLOCATORS, "allocator"), default="uniform,lems",
                   help="comma list of allocation methods")
    p.add_argument("--ratios", type=ratio_list, default="0.8,0.6", help="nominal ratios R of the classical allocation")
    p.add_argument("--out", type=results_file, default=str(ROOT / "bench" / "results" / "pivga_budget.json"))
    p.add_argument("--build", choices=("pivga", "svd"), default="pivga",
                   help="build gauge-fixed (and count the modules) or as LowRankLinear (same outputs; counted)")
    p.add_argument("--resume", action="store_true", help="keep the rows already in --out, run the missing ones")
    a = p.parse_args(argv)
    if not all(r < 1 for r in a.ratios):
        p.error("--ratios must lie in (0, 1)")
    try:
        EvalConfig(ppl=("wiki",), seqlen=a.seqlen, limit=a.limit).validate()
    except SvdpressError as e:
        p.error(str(e))
    try:
        a.options = parse_method_opts(a.opt)
    except SvdpressError as e:
        p.error(str(e))
    return a


class Bench:
    """The dense model behind its runner, its spectra and samples; builds and scores one allocation at a time,
    putting the dense layers back after each."""

    def __init__(self, a) -> None:
        self.a, self.progress = a, not a.no_progress
        self.device = resolve_device(a.device)
        model, self.tok, _ = load_model(a.model)
        self.model = model
        self.runner = Runner(model, Placement(device=self.device, offload="none"))
        self.samples, _ = calibration_samples(self.tok, "wiki", a.calib_samples, a.calib_seqlen, 0)
        self.shapes = self.runner.arch.shapes()
        self.dense = dense_count(self.shapes)
        self.spectra, self.factor_s = spectra_for(a, self.runner, self.samples, self.progress)
        self.originals = {name: model.get_submodule(name) for name in self.shapes}
        self.ev = EvalConfig(ppl=("wiki",), seqlen=a.seqlen, limit=a.limit)
        self.cache: dict = {}  # sensitivities shared across ratios (keyed by counting too)

    def ppl(self) -> float:
        return evaluate_model(self.runner, self.tok, self.ev, self.device, self.progress)["ppl"]["wiki"]["ppl"]

    def allocate(self, method: str, ratio: float, pivga: bool):
        p = AllocationProblem(self.shapes, self.spectra, ratio, self.a.rank_multiple,
                              dict(self.a.options.get(method, {})), self.runner, self.samples, 0, self.progress,
                              self.cache, pivga=pivga)
        t = time.perf_counter()
        alloc = allocate(p, method)
        return alloc, time.perf_counter() - t

    def score(self, ranks) -> dict[str, Any]:
        """Build at `ranks` (gauge-fixed, or as LowRankLinear with `--build svd`), count the target layers'
        parameters as PivGa stores them, measure perplexity."""
        gauge = self.a.build == "pivga"
        report = build(self.runner, self.spectra, ranks, pivga=gauge, progress=False)
        expected = count_params(self.shapes, ranks, pivga=True)
        try:
            params = expected
            if gauge:
                params = sum(p.numel() for name in self.shapes for p in self.model.get_submodule(name).parameters())
            ppl = self.ppl()
        finally:
            for name, layer in self.originals.items():
                set_module(self.model, name, layer)
        reduced = report["rank_reduced"] if gauge else {}
        if params != expected and not reduced:
            raise RuntimeError(f"built model has {params} parameters, the PivGa count says {expected}")
        past = sum(r is not None and r >= CLASSICAL.break_even(self.shapes[n]) for n, r in ranks.items())
        mean_rank = sum(r if r is not None else self.shapes[n].full_rank for n, r in ranks.items()) / len(ranks)
        return {"params": params, "achieved": params / self.dense, "ppl": ppl, "past_break_even": past,
                "dense_layers": sum(r is None for r in ranks.values()), "mean_rank": round(mean_rank, 2),
                "rank_reduced": reduced, "ranks": dict(ranks)}


def main(argv=None) -> int:
    a = parse_args(argv)
    out = Path(a.out)
    setup = {"model": a.model, "factorize": a.factorize,
             "calibration": f"wiki first half, {a.calib_samples}x{a.calib_seqlen}, seed 0",
             "eval": f"wiki second half, {a.limit} tokens, seqlen {a.seqlen}",
             "rank_multiple": a.rank_multiple, "options": a.options}
    done: dict[str, Any] = {}
    if a.resume and out.is_file():  # read and checked before the model is loaded: rows of other settings never mix
        try:
            done = read_json(out, "this bench's JSON (pass another --out, or leave out --resume)")
        except SvdpressError as e:
            raise SystemExit(f"error: {e}") from None
        differ = [k for k, v in setup.items() if as_read_back(v) != (done.get(k) if isinstance(done, dict) else None)]
        if differ:
            raise SystemExit(f"error: {out} holds results of other settings ({', '.join(differ)} differ): "
                             "pass another --out, or leave out --resume to start over")
    b = Bench(a)
    out.parent.mkdir(parents=True, exist_ok=True)
    doc: dict[str, Any] = {
        **setup, "device": b.device, "factorize_s": round(b.factor_s, 1),
        "linear_dense": b.dense,
        "build": {"pivga": "gauge-fixed, parameters counted from the built modules",
                  "svd": "LowRankLinear (PivGa is lossless: same outputs), counted by layer_params(..., pivga=True)"},
        "protocol": "after = classical allocation at R, then PivGa (ratio R' < R); aware = PivGa-counted allocation "
                    "at R'; both built gauge-fixed and counted from the built modules",
        "results": [],
    }
    if done:
        doc["results"] = [{"build": "pivga", **r} for r in done["results"]]  # rows say how they were built
        doc.update({k: done[k] for k in ("dense_ppl",) if k in done})
    if not a.no_dense and "dense_ppl" not in doc:
        doc["dense_ppl"] = b.ppl()
    for m in a.methods:  # method-major: a cheap method's rows are written before a measuring one's start
        for ratio in a.ratios:
            if any(r["method"] == m and r["ratio"] == ratio for r in doc["results"]):
                continue
            alloc_c, wall_c = b.allocate(m, ratio, pivga=False)
            after = b.score(alloc_c.ranks)
            alloc_p, wall_p = b.allocate(m, after["achieved"], pivga=True)
            aware = b.score(alloc_p.ranks)
            row = {"method": m, "ratio": ratio, "build": a.build, "after": after, "aware": aware,
                   "ppl_ratio": aware["ppl"] / after["ppl"],
                   "params_diff": (aware["params"] - after["params"]) / after["params"],
                   "search_s": {"after": round(wall_c, 2), "aware": round(wall_p, 2)},
                   "info": {"after": alloc_c.info, "aware": alloc_p.info}}
            row["matched"] = abs(row["params_diff"]) <= MATCH_TOL
            doc["results"].append(row)
            write_json(out, doc)
            print(f"{m:>10} @ {ratio}: after {after['ppl']:.2f} ({after['achieved']:.4f}), aware {aware['ppl']:.2f} "
                  f"({aware['achieved']:.4f}), ratio {row['ppl_ratio']:.3f}", flush=True)
    rows = [[r["method"], r["ratio"], f"{r['after']['achieved']:.4f}", f"{r['aware']['achieved']:.4f}",
             f"{r['after']['ppl']:.2f}", f"{r['aware']['ppl']:.2f}", f"{r['ppl_ratio']:.3f}",
             f"{r['after']['mean_rank']:.0f} → {r['aware']['mean_rank']:.0f}",
             str(r["aware"]["past_break_even"]), "yes" if r["matched"] else "NO"] for r in doc["results"]]
    print(table(rows, ["method", "R", "ratio after", "ratio aware", "ppl after", "ppl aware", "aware/after",
                       "mean rank", "past r_be", "params ±0.5%"]))
    if "dense_ppl" in doc:
        print(f"dense ppl {doc['dense_ppl']:.2f}")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    bench_main(main)

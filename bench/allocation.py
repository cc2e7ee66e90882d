"""Rank allocators compared at equal parameter count: wiki perplexity (held-out half) per method and ratio.

Calibration and spectra are computed ONCE (one factorization for every method and ratio); each run then
allocates, builds the low-rank model from the same spectra, measures perplexity, and puts the original dense
modules back (the very same objects, so every run starts from the identical dense model). Any allocator in
`ALLOCATORS` can be named in --methods; per-method settings go through --opt method.key=value.

    python bench/allocation.py --ratios 0.9,0.8,0.7 --methods uniform,fermigrad --device auto
    python bench/allocation.py --ratios 0.8 --limit 8192 --opt fermigrad.steps=60   # a quick CPU check

Protocol (COMMON.md): calibration 32×512 tokens of wiki's first half (seed 0), perplexity on 8192 tokens of the
second half in 1024-token windows. Prints a table and writes JSON (bench/results/allocation.json by default).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from svdpress.allocate import AllocationProblem, allocate  # noqa: E402
from svdpress.cli import csv, parse_opts  # noqa: E402
from svdpress.config import EvalConfig, resolve_device  # noqa: E402
from svdpress.data import calibration_samples  # noqa: E402
from svdpress.factorize import LayerSpectrum  # noqa: E402
from svdpress.lowrank import set_module  # noqa: E402
from svdpress.models import find_targets, load_model  # noqa: E402
from svdpress.params import count_params, dense_count  # noqa: E402
from svdpress.pipeline import Timer, build, evaluate_model, factorize_model  # noqa: E402
from svdpress.table import table  # noqa: E402

MATCH_TOL = 0.005  # achieved parameter counts of the methods at one ratio must agree within ±0.5%


def args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="default")
    p.add_argument("--factorize", default="svd-llm")
    p.add_argument("--methods", type=csv, default=("uniform", "fermigrad"))
    p.add_argument("--ratios", type=lambda s: tuple(float(x) for x in csv(s)), default=(0.9, 0.8, 0.7))
    p.add_argument("--calib", default="wiki")
    p.add_argument("--calib-samples", type=int, default=32)
    p.add_argument("--calib-seqlen", type=int, default=512)
    p.add_argument("--text", default="wiki", help="perplexity text (its held-out second half)")
    p.add_argument("--limit", type=int, default=8192, help="perplexity tokens")
    p.add_argument("--seqlen", type=int, default=1024, help="perplexity window")
    p.add_argument("--device", default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-dense", action="store_true", help="skip the dense model's perplexity")
    p.add_argument("--opt", action="append", default=[], metavar="METHOD.KEY=VALUE",
                   help="allocator setting, e.g. fermigrad.steps=60 (repeatable)")
    p.add_argument("--spectra-cache", type=Path, default=None,
                   help="file to save/load the spectra (skips calibration when it exists; same model/settings!)")
    p.add_argument("--json", type=Path, default=Path(__file__).parent / "results" / "allocation.json")
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args()


def method_options(pairs: list[str], methods: tuple[str, ...]) -> dict[str, dict[str, Any]]:
    opts: dict[str, dict[str, Any]] = {m: {} for m in methods}
    for key, value in parse_opts(pairs).items():
        method, _, k = key.partition(".")
        if method not in opts or not k:
            raise SystemExit(f"--opt {key}: expected METHOD.KEY with METHOD one of {', '.join(methods)}")
        opts[method][k] = value
    return opts


def spectra_once(a, model, samples, device: str, timer: Timer) -> dict[str, LayerSpectrum]:
    """Calibrate and factorize once; optionally cached on disk (keyed by nothing but the path: the user's job)."""
    if a.spectra_cache and a.spectra_cache.exists():
        raw = torch.load(a.spectra_cache, weights_only=True)
        return {n: LayerSpectrum(U, S, V, note) for n, (U, S, V, note) in raw.items()}
    spectra = factorize_model(model, samples, a.factorize, device, timer, progress=not a.no_progress)
    if a.spectra_cache:
        a.spectra_cache.parent.mkdir(parents=True, exist_ok=True)
        torch.save({n: (s.U, s.S, s.V, s.note) for n, s in spectra.items()}, a.spectra_cache)
    return spectra


def run_one(a, model, tokenizer, shapes, spectra, samples, method: str, ratio: float, opts: dict, device: str,
            ev: EvalConfig) -> dict[str, Any]:
    """Allocate, build, measure, and put the dense modules back."""
    originals = {n: model.get_submodule(n) for n in shapes}
    problem = AllocationProblem(shapes, spectra, ratio, 1, dict(opts), model, samples, device, a.seed,
                                not a.no_progress)
    t = time.perf_counter()
    alloc = allocate(problem, method)
    alloc_s = time.perf_counter() - t
    try:
        build(model, spectra, alloc.ranks)
        ppl = evaluate_model(model, tokenizer, ev, device, not a.no_progress)["ppl"][a.text]["ppl"]
    finally:
        for n, m in originals.items():
            set_module(model, n, m)
    kept = count_params(shapes, alloc.ranks)
    info = {k: v for k, v in alloc.info.items() if k not in ("history", "mu", "config")}
    return {"method": method, "ratio": ratio, "achieved": kept / dense_count(shapes), "kept_params": kept,
            "ppl": ppl, "allocate_s": round(alloc_s, 2), "ranks": alloc.ranks, "info": info,
            "info_full": alloc.info}


def main() -> int:
    a = args()
    device = resolve_device(a.device)
    opts = method_options(a.opt, a.methods)
    timer = Timer()
    model, tokenizer, _ = load_model(a.model)
    shapes = {t.name: t.shape for t in find_targets(model)}
    samples, part = calibration_samples(tokenizer, a.calib, a.calib_samples, a.calib_seqlen, a.seed)
    torch.manual_seed(a.seed)
    with timer("spectra"):
        spectra = spectra_once(a, model, samples, device, timer)
    ev = EvalConfig(ppl=(a.text,), seqlen=a.seqlen, limit=a.limit)
    runs: list[dict[str, Any]] = []
    dense_ppl = None if a.no_dense else evaluate_model(model, tokenizer, ev, device, not a.no_progress)["ppl"][a.text]["ppl"]
    for ratio in a.ratios:
        for method in a.methods:
            r = run_one(a, model, tokenizer, shapes, spectra, samples, method, ratio, opts[method], device, ev)
            runs.append(r)
            print(f"[{method} @ {ratio}] ppl {r['ppl']:.3f}, achieved {r['achieved']:.4f}, "
                  f"allocate {r['allocate_s']:.1f}s", flush=True)
    result = report(a, runs, dense_ppl, timer, device, part.describe())
    a.json.parent.mkdir(parents=True, exist_ok=True)
    a.json.write_text(json.dumps(result, indent=1, default=str) + "\n")
    print(f"\nwrote {a.json}")
    return 0


def report(a, runs: list[dict], dense_ppl, timer: Timer, device: str, calib: str) -> dict[str, Any]:
    rows, matched = [], {}
    for ratio in a.ratios:
        here = [r for r in runs if r["ratio"] == ratio]
        lo, hi = min(r["achieved"] for r in here), max(r["achieved"] for r in here)
        matched[ratio] = (hi - lo) / hi <= MATCH_TOL
        base = next((r["ppl"] for r in here if r["method"] == "uniform"), None)
        for r in here:
            rows.append([f"{ratio:.2f}", r["method"], f"{r['achieved']:.4f}", f"{r['ppl']:.2f}",
                         "" if base is None else f"{r['ppl'] / base:.3f}", f"{r['allocate_s']:.1f}",
                         "yes" if matched[ratio] else "NO"])
    print(f"\n{a.model} / {a.factorize}; calibration {calib} {a.calib_samples}x{a.calib_seqlen}; "
          f"ppl {a.text} held-out, {a.limit} tokens, seqlen {a.seqlen}; device {device}")
    if dense_ppl is not None:
        print(f"dense ppl {dense_ppl:.3f}")
    print(table(rows, ["ratio", "method", "achieved", "ppl", "vs uniform", "alloc s", "params ±0.5%"]))
    return {"model": a.model, "factorize": a.factorize, "device": device, "calibration": calib,
            "eval": {"text": a.text, "tokens": a.limit, "seqlen": a.seqlen}, "dense_ppl": dense_ppl,
            "spectra_s": round(timer.seconds.get("spectra", 0.0), 1), "matched_params": matched,
            "runs": [{k: v for k, v in r.items() if k != "info_full"} for r in runs],
            "allocation_info": [r["info_full"] for r in runs]}


if __name__ == "__main__":
    sys.exit(main())

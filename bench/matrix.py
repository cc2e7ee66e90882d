"""The method matrix: every factorizer × every allocator × ratio, wiki and c4 perplexity, on one calibration.

Protocol (COMMON.md, as bench/allocation.py): calibration 32×512 tokens of wiki's first half (seed 0), gathered
ONCE through the on-disk stats cache (input statistics, and the gradient statistics kfac / fwsvd / gfwsvd
need), so every factorizer reads the same statistics; each factorizer's spectra are computed once and every
(allocator, ratio) cell is built from them on the restored dense layers; perplexity on `--limit` tokens of each
text's second half in `--seqlen` windows. Allocators that measure the model share one sensitivity cache per
factorizer (a layer's sensitivity is measured once per spectra, whatever the method or ratio).

    python bench/matrix.py                                             # every cell (hours on 2 CPU cores)
    python bench/matrix.py --factorizers svd-llm,kfac --allocators uniform,lems --ratios 0.8
    python bench/matrix.py --opt fermigrad.steps=100 --out o.json      # a method's option: another protocol

Shards run side by side (one process per factorizer, or per machine) write their own --out and are merged:

    python bench/matrix.py --factorizers kfac --out a.json &  python bench/matrix.py --factorizers svd --out b.json
    python bench/matrix.py --merge a.json b.json                       # into bench/results/matrix.json

Resumable: bench/results/matrix.json is rewritten after every cell, and a rerun with the same protocol skips
the cells it already holds (a cell that failed is recorded with its error and retried); a file of another
protocol (model, calibration, evaluation, rank multiple, method options) is refused, never replaced. The
sensitivity measurements of each factorizer's spectra (the costly part of lems, asvd-threshold, mrcs and the +
variants: 6–79 min a factorizer on 2 cores) are kept as JSON in --probes (bench/results/matrix-probes/), written
as each kept fraction is measured (an interrupted probe keeps the fractions it finished), and
those committed in bench/reference/matrix-probes/ are read too, so a later run, or a fresh clone, reuses them;
each file names its protocol and a checksum of the spectra it was measured on (`spectra_id`), and one that
does not match is ignored and measured again. Prints the table laid out like the seed's tables (per ratio: one row per factorizer +
allocator, wiki / c4), a pivot of wiki perplexity per ratio (factorizer × allocator), the cells that answer issue
#16's checks, and writes a heat-map PNG.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import math
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

import torch  # noqa: E402

from svdpress.allocate import ALLOCATORS, AllocationProblem, allocate, check_options  # noqa: E402
from svdpress.allocate.sensitivity import export_measurements, import_measurements  # noqa: E402
from svdpress.cli import bench_main, names_in, parse_method_opts, positive_int, ratio_list, results_file  # noqa: E402
from svdpress.config import EvalConfig, resolve_device  # noqa: E402
from svdpress.data import calibration_samples  # noqa: E402
from svdpress.errors import SvdpressError  # noqa: E402
from svdpress.export import as_read_back, read_json, write_json  # noqa: E402
from svdpress.factorize import FACTORIZERS  # noqa: E402
from svdpress.lowrank import set_module  # noqa: E402
from svdpress.model import Placement, Runner  # noqa: E402
from svdpress.models import load_model  # noqa: E402
from svdpress.params import count_params, dense_count  # noqa: E402
from svdpress.pipeline import Timer, build, evaluate_model, factorize_model  # noqa: E402
from svdpress.table import table  # noqa: E402

FACTORIZERS_ALL = ("svd", "asvd", "fwsvd", "svd-llm", "svd-llm-v2", "kfac", "gfwsvd", "dobi-svd")
# every registered allocator but `load` (ranks read from a file): svd-llm-v2's loss-based split needs no forwards
REFERENCE_PROBES = ROOT / "bench" / "reference" / "matrix-probes"  # committed: read, never written
ALLOCATORS_ALL = ("uniform", "svd-llm-v2", "atp", "mrcs", "asvd-threshold", "lems", "fermigrad", "asvd-plus",
                  "mrcs-plus", "dobi")
TEXTS = ("wiki", "c4")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="default")
    p.add_argument("--factorizers", type=names_in(FACTORIZERS, "factorizer"), default=",".join(FACTORIZERS_ALL),
                   help="comma list")
    p.add_argument("--allocators", type=names_in(ALLOCATORS, "allocator"), default=",".join(ALLOCATORS_ALL),
                   help="comma list")
    p.add_argument("--ratios", type=ratio_list, default="0.9,0.8,0.7,0.6")
    p.add_argument("--opt", action="append", default=[], metavar="METHOD.KEY=VALUE", help="a method's option")
    p.add_argument("--rank-multiple", type=positive_int, default=1)
    p.add_argument("--calib-samples", type=positive_int, default=32)
    p.add_argument("--calib-seqlen", type=positive_int, default=512)
    p.add_argument("--batch-size", type=positive_int, default=4)
    p.add_argument("--seqlen", type=positive_int, default=1024, help="perplexity window")
    p.add_argument("--limit", type=positive_int, default=8192, help="evaluation tokens per text")
    p.add_argument("--device", default="auto")
    p.add_argument("--stats-cache", default=str(ROOT / "bench" / "results" / "stats-cache"))
    p.add_argument("--out", type=results_file, default=str(ROOT / "bench" / "results" / "matrix.json"))
    p.add_argument("--probes", default="", help="where sensitivity measurements are kept (default: --out's "
                   "directory/matrix-probes); bench/reference/matrix-probes is read too")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--markdown", action="store_true", help="only print the stored cells as the README's tables")
    p.add_argument("--merge", nargs="+", default=[], metavar="JSON",
                   help="only add the cells of these matrices (shards run side by side) to --out")
    return p.parse_args(argv)


def protocol(a, opts: dict) -> dict:
    """What a stored cell must share with this run to be reused or merged. Method options (--opt) are part of it
    when given: a cell made with fermigrad.steps=100 is not a cell of the default fermigrad (absent when none
    are given, so matrices stored before options joined the protocol keep theirs)."""
    proto = {"model": a.model, "calibration": f"wiki first half, {a.calib_samples}x{a.calib_seqlen}, seed 0",
             "eval": f"second half of {', '.join(TEXTS)}: {a.limit} tokens each, seqlen {a.seqlen}",
             "rank_multiple": a.rank_multiple}
    if opts:
        proto["options"] = as_read_back(opts)  # as it reads back from the JSON
    return proto


def read_matrix(path: Path) -> dict:
    """A matrix JSON (protocol and cells), or one clear error."""
    doc = read_json(path, "a matrix JSON")
    if not isinstance(doc, dict) or not isinstance(doc.get("protocol"), dict) or not isinstance(doc.get("cells"), dict):
        raise SvdpressError(f"{path} is not a matrix JSON (no protocol and cells)")
    return doc


def load_doc(path: Path, proto: dict) -> dict:
    """The matrix stored at path, or a new one. A file holding another protocol's matrix is refused, never
    overwritten: its cells may be hours of measurements."""
    if not path.is_file():
        return {"protocol": proto, "cells": {}, "factorize_s": {}}
    doc = read_matrix(path)
    if doc["protocol"] != proto:
        theirs = doc["protocol"]
        diff = {k: (theirs.get(k), proto.get(k)) for k in sorted(set(proto) | set(theirs))
                if theirs.get(k) != proto.get(k)}
        raise SvdpressError(f"{path} holds a matrix of another protocol (stored, this run: {diff}); "
                            "pass another --out, or run with its settings to resume it")
    return doc


def save_doc(path: Path, doc: dict) -> None:
    write_json(path, doc, indent=1)  # atomic: an interrupted run never leaves a half-written file


def spectra_id(spectra: dict) -> str:
    """A checksum of the spectra that probes were measured on: each layer's singular values relative to its
    largest, to 6 decimals. A change in the factorizer's code or in the statistics changes it (stored probes are
    then measured again, never applied to other spectra); a BLAS's last-bit rounding does not."""
    h = hashlib.sha256()
    for name in sorted(spectra):
        S = spectra[name].S.double()
        h.update(name.encode())
        h.update(torch.round(S / S[0].clamp_min(1e-300) * 1e6).to(torch.int64).numpy().tobytes())
    return h.hexdigest()[:16]


def load_probes(path: Path, proto: dict, spectra: str) -> dict:
    """The sensitivity measurements made on these spectra (`spectra_id`) under this protocol by an earlier run
    (lems, asvd-threshold, mrcs and the + variants read them through the problem cache), so a rerun for other
    ratios does not probe again; {} when the file is absent or was made for other spectra or another protocol."""
    if not path.is_file():
        return {}
    doc = read_json(path, "a matrix probe file")
    if not isinstance(doc, dict) or doc.get("protocol") != proto or doc.get("spectra") != spectra:
        return {}
    return import_measurements(doc.get("entries", []))


def save_probes(path: Path, proto: dict, spectra: str, cache: dict) -> None:
    entries = export_measurements(cache)
    if entries:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json(path, {"protocol": proto, "spectra": spectra, "entries": entries})


def merge(doc: dict, paths: list[Path]) -> list[str]:
    """Add the cells of other matrices of the same protocol to doc: a measured cell is kept over an error, and a
    cell measured in two shards must agree (the same protocol and seed give the same cell; a disagreement means
    the shards did not run the same code, and is refused). Returns one line per file."""
    said = []
    for path in paths:
        try:
            other = read_matrix(path)
        except SvdpressError as e:
            raise SvdpressError(f"--merge: {e}") from None
        if other["protocol"] != doc["protocol"]:
            raise SvdpressError(f"--merge: {path} has another protocol: {other.get('protocol')}")
        added = 0
        for k, c in other.get("cells", {}).items():
            mine = doc["cells"].get(k)
            if mine is not None and "ppl" in mine and "ppl" in c:
                if any(abs(mine["ppl"][t] / c["ppl"][t] - 1) > 1e-4 for t in TEXTS):
                    raise SvdpressError(f"--merge: cell {k} differs: {mine['ppl']} here, {c['ppl']} in {path}")
                continue
            if mine is None or ("error" in mine and "ppl" in c):
                doc["cells"][k] = c
                added += 1
        doc["factorize_s"].update(other.get("factorize_s", {}))
        if "dense" in other:
            doc.setdefault("dense", other["dense"])
        said.append(f"{path}: {added} cells added")
    return said


def key(f: str, m: str, ratio: float) -> str:
    return f"{f}|{m}|{ratio}"


def fmt(x: Any) -> str:
    if not isinstance(x, (int, float)) or not math.isfinite(x):
        return "-"
    return f"{x:.1f}" if x < 1000 else f"{x:.3g}"


def report(doc: dict, facs: list[str], allocs: list[str], ratios: list[float]) -> str:
    cells = doc["cells"]
    rows = []
    for ratio in ratios:
        for f in facs:
            for m in allocs:
                c = cells.get(key(f, m, ratio))
                if c is None:
                    continue
                if "error" in c:
                    rows.append([ratio, f, m, "error", "", "", c["error"][:60]])
                    continue
                rows.append([ratio, f, m, fmt(c["ppl"]["wiki"]), fmt(c["ppl"]["c4"]), f"{c['achieved']:.4f}",
                             f"{c['search_s']:.0f}"])
    out = [table(rows, ["ratio", "factorize", "allocate", "wiki ppl", "c4 ppl", "achieved", "search s"])]
    if "dense" in doc:
        out.append(f"dense: wiki {fmt(doc['dense']['wiki'])}, c4 {fmt(doc['dense']['c4'])}")
    for ratio in ratios:  # pivot: wiki ppl, factorizer × allocator
        grid = [[f] + [fmt(cells.get(key(f, m, ratio), {}).get("ppl", {}).get("wiki")) for m in allocs] for f in facs]
        out.append(f"\nwiki perplexity at ratio {ratio} (rows: factorize, columns: allocate)\n"
                   + table(grid, ["factorize"] + allocs))
    # the checks read every stored cell (a run of a few cells is still judged against all the others)
    every_ratio = sorted(set(ratios) | _ratios(doc), reverse=True)
    out.append(checks(doc, list(FACTORIZERS_ALL), list(ALLOCATORS_ALL), every_ratio))
    return "\n".join(out)


def markdown(doc: dict, facs: list[str], allocs: list[str], ratios: list[float]) -> str:
    """The README's tables: per ratio, factorizer rows × allocator columns with a measured cell, "wiki / c4"."""
    out = []
    for ratio in ratios:
        grid = []
        cols = [m for m in allocs if any("ppl" in doc["cells"].get(key(f, m, ratio), {}) for f in facs)]
        for f in facs:
            cs = [doc["cells"].get(key(f, m, ratio), {}).get("ppl") for m in cols]
            if any(cs):
                grid.append([f] + [f"{fmt(c['wiki'])} / {fmt(c['c4'])}" if c else "-" for c in cs])
        if grid:
            out.append(f"ratio {ratio}, wiki / c4 perplexity:\n\n" + table(grid, ["factorize"] + cols, markdown=True))
    return "\n\n".join(out)


def _ratios(doc: dict) -> set[float]:
    return {float(k.rsplit("|", 1)[1]) for k in doc["cells"]}


def _wiki(doc: dict, f: str, m: str, ratio: float) -> float:
    return doc["cells"].get(key(f, m, ratio), {}).get("ppl", {}).get("wiki", math.nan)


def _place(v: float, svd_llm: float, kfac: float) -> str:
    """Where a dobi-svd cell lies against svd-llm and kfac. With uniform ranks dobi-svd's cut is svd-llm's:
    W_r = Q_r Q_rᵀ W, Q the eigenvectors of W·X·Xᵀ·Wᵀ, equals U_r U_rᵀ W, U the left singular vectors of W·S with
    S·Sᵀ = X·Xᵀ. The two agree to rounding, so a relative gap below 1e-3 is reported as that equality."""
    lo, hi = min(svd_llm, kfac), max(svd_llm, kfac)
    if abs(v / svd_llm - 1) < 1e-3:
        return "= svd-llm"
    return "between" if lo <= v <= hi else "better than both" if v < lo else "worse than both"


def checks(doc: dict, facs: list[str], allocs: list[str], ratios: list[float]) -> str:
    """Issue #16's checks, computed from the cells present (a check whose cells are missing says so)."""
    lines = ["\nchecks (wiki perplexity):"]
    if 0.8 in ratios:
        done = [(_wiki(doc, f, m, 0.8), f, m) for f in facs for m in allocs if math.isfinite(_wiki(doc, f, m, 0.8))]
        kl = _wiki(doc, "kfac", "lems", 0.8)
        if done and math.isfinite(kl):
            best = min(done)
            met = kl <= 1.05 * best[0]
            whole = len(done) == len(facs) * len(allocs)
            lines.append(f"- kfac+lems at 0.8: {kl:.2f}; best of the {len(done)} cells measured at 0.8 (of "
                         f"{len(facs) * len(allocs)}): {best[1]}+{best[2]} {best[0]:.2f} ({kl / best[0] - 1:+.1%}; "
                         f"target: within 5%) -> {('MET' if whole else 'met so far') if met else 'MISSED'}")
        else:
            lines.append("- kfac+lems at 0.8: not measured")
    for other, relation in (("gfwsvd", "worse than kfac"),):
        pairs = [(r, m, _wiki(doc, other, m, r), _wiki(doc, "kfac", m, r)) for r in ratios for m in allocs]
        pairs = [p for p in pairs if math.isfinite(p[2]) and math.isfinite(p[3])]
        if pairs:
            bad = [p for p in pairs if p[2] <= p[3]]
            lines.append(f"- {other} {relation} in {len(pairs) - len(bad)}/{len(pairs)} shared cells"
                         + (f"; not where: {', '.join(f'{m}@{r}' for r, m, _, _ in bad)}" if bad else ""))
    for r in ratios:
        d, s, k = (_wiki(doc, f, "uniform", r) for f in ("dobi-svd", "svd-llm", "kfac"))
        dd = _wiki(doc, "dobi-svd", "dobi", r)
        if math.isfinite(s) and math.isfinite(k) and (math.isfinite(d) or math.isfinite(dd)):
            parts = [f"{name} {v:.2f} ({_place(v, s, k)})"
                     for name, v in (("dobi-svd+uniform", d), ("dobi-svd+dobi", dd)) if math.isfinite(v)]
            lines.append(f"- ratio {r}: {', '.join(parts)}; svd-llm {s:.2f}, kfac {k:.2f} (uniform)")
    return "\n".join(lines)


def plot(doc: dict, facs: list[str], allocs: list[str], ratios: list[float], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.colors
    import matplotlib.pyplot as plt
    import numpy as np

    def short(v: float) -> str:  # fits a cell: 37.0, 902, 4e7
        if v < 1000:
            return f"{v:.1f}" if v < 100 else f"{v:.0f}"
        m, e = f"{v:.0e}".split("e")
        return f"{m}e{int(e)}"

    cols = min(2, len(ratios))
    rows = math.ceil(len(ratios) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(cols * (0.62 * len(allocs) + 1.6) + 1.2,
                                                  rows * (0.42 * len(facs) + 1.6)), squeeze=False)
    grids = {r: np.array([[_wiki(doc, f, m, r) for m in allocs] for f in facs]) for r in ratios}
    seen = np.log10(np.concatenate([g[np.isfinite(g)] for g in grids.values()]))
    lo = float(seen.min()) if seen.size else 0.0  # one colour scale for every ratio: best cell to worst
    norm = matplotlib.colors.Normalize(lo, max(float(seen.max()) if seen.size else lo, lo + 1))
    for k, ax in enumerate(axes.flat):
        if k >= len(ratios):
            ax.axis("off")
            continue
        r, grid = ratios[k], grids[ratios[k]]
        im = ax.imshow(np.log10(grid), cmap="viridis_r", aspect="auto", norm=norm)
        for i in range(len(facs)):
            for j in range(len(allocs)):
                if math.isfinite(grid[i, j]):
                    ax.text(j, i, short(grid[i, j]), ha="center", va="center", fontsize=6.5,
                            color="w" if norm(math.log10(grid[i, j])) > 0.45 else "k")
        ax.set_xticks(range(len(allocs)), allocs, rotation=45, ha="right", fontsize=7)
        ax.set_yticks(range(len(facs)), facs, fontsize=7)
        ax.set_title(f"wiki ppl, kept {r}", fontsize=9)
    fig.subplots_adjust(hspace=0.55, wspace=0.25)
    fig.colorbar(im, ax=axes.ravel().tolist(), label="log10 wiki ppl", shrink=0.6)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def main(argv=None) -> int:
    a = parse_args(argv)
    progress = not a.no_progress
    device = resolve_device(a.device)
    facs, allocs, ratios = a.factorizers, a.allocators, a.ratios
    ev = EvalConfig(ppl=TEXTS, seqlen=a.seqlen, limit=a.limit)
    try:
        ev.validate()
        opts = parse_method_opts(a.opt)
        for m in allocs:  # every method's options (and optional packages: optuna) before the model is loaded
            check_options(m, opts.get(m, {}))
    except SvdpressError as e:
        raise SystemExit(str(e)) from None
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    probes = Path(a.probes) if a.probes else out.parent / "matrix-probes"
    proto = protocol(a, opts)
    try:
        doc = load_doc(out, proto)
    except SvdpressError as e:
        raise SystemExit(str(e)) from None
    if a.markdown:
        print(markdown(doc, facs, allocs, ratios))
        return 0
    if a.merge:
        try:
            print("\n".join(merge(doc, [Path(m) for m in a.merge])))
        except SvdpressError as e:
            raise SystemExit(str(e)) from None
        save_doc(out, doc)
        print(f"wrote {out}: {sum('ppl' in c for c in doc['cells'].values())} cells measured")
        return 0
    todo = {f: [(m, r) for m in allocs for r in ratios
                if key(f, m, r) not in doc["cells"] or "error" in doc["cells"][key(f, m, r)]] for f in facs}
    if not any(todo.values()) and "dense" in doc:
        print(report(doc, facs, allocs, ratios))
        plot(doc, facs, allocs, ratios, out.with_suffix(".png"))
        return 0

    model, tok, _ = load_model(a.model)
    runner = Runner(model, Placement(device=device, offload="none"))
    samples, _ = calibration_samples(tok, "wiki", a.calib_samples, a.calib_seqlen, 0)
    shapes = runner.arch.shapes()
    originals = {name: model.get_submodule(name) for name in shapes}

    def ppl() -> dict[str, float]:
        res = evaluate_model(runner, tok, ev, device, progress)["ppl"]
        return {t: res[t]["ppl"] for t in TEXTS}

    if "dense" not in doc:
        doc["dense"] = ppl()
        save_doc(out, doc)
    for f in facs:
        if not todo[f]:
            continue
        t = time.perf_counter()
        spectra = factorize_model(runner, samples, f, Timer(), a.batch_size, progress, a.stats_cache)
        doc["factorize_s"][f] = round(time.perf_counter() - t, 1)
        # sensitivities measured on these spectra, shared by every allocator and ratio (and kept on disk)
        sid, mine = spectra_id(spectra), probes / f"{f}.json"
        cache: dict = {**load_probes(REFERENCE_PROBES / f"{f}.json", proto, sid), **load_probes(mine, proto, sid)}
        for m, ratio in sorted(todo[f], key=lambda mr: (allocs.index(mr[0]), -mr[1])):
            problem = AllocationProblem(shapes, spectra, ratio, a.rank_multiple, dict(opts.get(m, {})), runner,
                                        samples, 0, progress, cache,
                                        on_measured=functools.partial(save_probes, mine, proto, sid, cache))
            t = time.perf_counter()
            try:
                alloc = allocate(problem, m)
                wall = time.perf_counter() - t
                build(runner, spectra, alloc.ranks, progress=False)
                cell = {"ppl": ppl(), "achieved": count_params(shapes, alloc.ranks) / dense_count(shapes),
                        "search_s": float(alloc.info.get("search_s", wall)), "wall_s": round(wall, 1),
                        "ranks": dict(alloc.ranks)}
            except SvdpressError as e:  # a combination a method refuses is recorded, not fatal
                cell = {"error": str(e)}
            finally:
                for name, layer in originals.items():
                    set_module(model, name, layer)
            doc["cells"][key(f, m, ratio)] = cell
            save_doc(out, doc)
            save_probes(mine, proto, sid, cache)
            print(f"{f}+{m} @ {ratio}: " + (f"wiki {cell['ppl']['wiki']:.2f}, c4 {cell['ppl']['c4']:.2f}"
                                            if "ppl" in cell else f"error: {cell['error']}"), flush=True)
        del spectra, cache
    print(report(doc, facs, allocs, ratios))
    plot(doc, facs, allocs, ratios, out.with_suffix(".png"))
    print(f"wrote {out} and {out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    bench_main(main)

"""Does LEMS's error surrogate track the measured loss? Its prediction against the probe, per factorizer.

LEMS (src/svdpress/allocate/lems.py) predicts the loss of truncating layer l alone to rank r as

    e_l(r) = G_l · T_l(r) / T_l(r_p),    T_l(r) = Σ_{j≥r} S_j² / Σ_j S_j²  (the whitened spectrum's tail)

with G_l the KL measured at the probe rank r_p (kept fraction 0.1). This bench measures the same KL at the kept
fractions the ILP actually chooses between (0.4 … 0.9, asvd-threshold's probe points) and prints, per layer kind,
the median of predicted / measured and the rank correlation across layers (what the ILP needs: which layers are
cheap to cut), and the share of each spectrum's energy in its first 32 directions (32 calibration sequences).
It was written for the matrix's outlier: LEMS on gfwsvd spectra gives wiki 77.4 at 0.8, worse than atp (66.3) on
the same spectra, where on every other whitened factorizer LEMS is the best allocator.

    python bench/lems_surrogate.py --factorizers gfwsvd,kfac
    python bench/lems_surrogate.py --probes bench/results/matrix-probes   # reuse the matrix's measurements
    python bench/lems_surrogate.py --factorizers kfac,svd-llm --energy-only    # only the spectra's head energy

Protocol: the matrix's (bench/matrix.py): 32×512 calibration tokens of wiki's first half, seed 0, through the
stats cache; the probe of LEMS and asvd-threshold (4 sequences × 256 tokens, τ = 0.6). Sensitivities the matrix
already measured on the same spectra are read from its probe files (--probes, and the committed
bench/reference/matrix-probes/), never written back; the ones
measured here are kept in --out's directory (lems_surrogate-probes/). Writes bench/results/lems_surrogate.json.
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "bench"))

import numpy as np  # noqa: E402
from scipy.stats import spearmanr  # noqa: E402

import matrix as mx  # noqa: E402  (the matrix's protocol and probe files)
from svdpress.allocate import AllocationProblem  # noqa: E402
from svdpress.allocate.common import rank_at  # noqa: E402
from svdpress.allocate.lems import LemsConfig, tail_fraction  # noqa: E402
from svdpress.allocate.sensitivity import layer_sensitivity, probe_config  # noqa: E402
from svdpress.config import resolve_device  # noqa: E402
from svdpress.cli import bench_main, names_in, results_file  # noqa: E402
from svdpress.data import calibration_samples  # noqa: E402
from svdpress.export import read_json, write_json  # noqa: E402
from svdpress.factorize import FACTORIZERS  # noqa: E402
from svdpress.model import Placement, Runner  # noqa: E402
from svdpress.models import load_model  # noqa: E402
from svdpress.pipeline import Timer, factorize_model  # noqa: E402
from svdpress.table import table  # noqa: E402

FRACTIONS = (0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


def compare(shapes, spectra, kl: dict[str, dict[float, float]], probe_fraction: float, counting) -> dict:
    """Per layer kind and kept fraction (a string key, as in the JSON): median predicted/measured KL, and Spearman's ρ
    across the layers."""
    out: dict = defaultdict(dict)
    kinds = [name.split(".")[-1] for name in shapes]
    S2 = {name: np.cumsum(spectra[name].S.double().numpy() ** 2) for name in shapes}  # once, for every fraction
    for f in FRACTIONS:
        pred = np.array([kl[name][probe_fraction] * tail_fraction(S2[name], rank_at(shape, f, 1, counting))
                         / max(tail_fraction(S2[name], rank_at(shape, probe_fraction, 1, counting)), 1e-12)
                         for name, shape in shapes.items()])
        meas = np.maximum(np.array([kl[name][f] for name in shapes]), 1e-12)
        for kind in dict.fromkeys(kinds):
            i = [j for j, k in enumerate(kinds) if k == kind]
            out[kind][str(f)] = float(np.median(pred[i] / meas[i]))
        out["all layers"][str(f)] = float(np.median(pred / meas))
        out["spearman"][str(f)] = float(spearmanr(pred, meas).statistic)
    return dict(out)


def head_energy(shapes, spectra, k: int) -> dict[str, float]:
    """Per layer kind, the median share of the spectrum's energy in its first k directions: with k the number
    of calibration sequences it shows gfwsvd's rank collapse (rank G_seq ≤ k) in the spectra LEMS reads."""
    share = defaultdict(list)
    for name in shapes:
        S2 = spectra[name].S.double().numpy() ** 2
        share[name.split(".")[-1]].append(float(S2[:k].sum() / max(S2.sum(), 1e-300)))
    return {kind: float(np.median(v)) for kind, v in share.items()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--factorizers", type=names_in(FACTORIZERS, "factorizer"), default="gfwsvd,kfac")
    p.add_argument("--probes", default=str(ROOT / "bench" / "results" / "matrix-probes"),
                   help="the matrix's probe files to read (not written)")
    p.add_argument("--device", default="auto")
    p.add_argument("--stats-cache", default=str(ROOT / "bench" / "results" / "stats-cache"))
    p.add_argument("--out", type=results_file, default=str(ROOT / "bench" / "results" / "lems_surrogate.json"))
    p.add_argument("--energy-only", action="store_true",
                   help="only the spectra's head energy (no probes: a minute per factorizer)")
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    ma = mx.parse_args([])  # the matrix's default protocol: its probe files are reusable only under it
    proto = mx.protocol(ma, {})
    cfg = LemsConfig()
    device = resolve_device(a.device)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    model, tok, _ = load_model(ma.model)
    runner = Runner(model, Placement(device=device, offload="none"))
    samples, _ = calibration_samples(tok, "wiki", ma.calib_samples, ma.calib_seqlen, 0)
    shapes = runner.arch.shapes()
    doc = {"protocol": proto, "probe_fraction": cfg.probe_fraction, "fractions": list(FRACTIONS), "results": {},
           "head_energy": {}}
    if out.is_file():  # add to an earlier run of the same protocol (one factorizer at a time)
        old = read_json(out, "this bench's JSON")
        if isinstance(old, dict) and old.get("protocol") == proto:
            doc = {**doc, **old}
    for f in a.factorizers:
        spectra = factorize_model(runner, samples, f, Timer(), ma.batch_size, not a.no_progress, a.stats_cache)
        doc["head_energy"][f] = head_energy(shapes, spectra, ma.calib_samples)
        if a.energy_only:
            write_json(out, doc)
            continue
        sid, mine = mx.spectra_id(spectra), out.parent / "lems_surrogate-probes" / f"{f}.json"
        cache = {**mx.load_probes(mx.REFERENCE_PROBES / f"{f}.json", proto, sid),
                 **mx.load_probes(Path(a.probes) / f"{f}.json", proto, sid), **mx.load_probes(mine, proto, sid)}
        problem = AllocationProblem(shapes, spectra, 0.8, 1, {}, runner, samples, 0, not a.no_progress, cache)
        sens = layer_sensitivity(problem, (cfg.probe_fraction, *FRACTIONS), probe_config(cfg))
        mx.save_probes(mine, proto, sid, cache)
        kl = {name: {fr: v["kl"] for fr, v in sens.loss[name].items()} for name in shapes}
        doc["results"][f] = compare(shapes, spectra, kl, cfg.probe_fraction, problem.counting)
        write_json(out, doc)
    rows = [[f, kind] + [v[str(fr)] for fr in FRACTIONS] for f, res in doc["results"].items() for kind, v in res.items()]
    print("LEMS surrogate / measured KL (median over layers; 'spearman': rank correlation across all layers), by kept"
          " fraction:")
    print(table(rows, ["factorize", "layers"] + [str(fr) for fr in FRACTIONS]))
    kinds = list(dict.fromkeys(k for e in doc["head_energy"].values() for k in e))
    print(f"\nshare of each spectrum's energy in its first {ma.calib_samples} directions (= calibration sequences; "
          "median over layers):")
    print(table([[f] + [e.get(k) for k in kinds] for f, e in doc["head_energy"].items()], ["factorize"] + kinds))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    bench_main(main)

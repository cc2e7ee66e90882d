"""LEMS's ILP, the search baselines, and reusing a saved allocation (`--allocate load` / `--ranks`)."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest

from svdpress.allocate import AllocationProblem, allocate
from svdpress.allocate.common import slack_ok
from svdpress.allocate.lems import LemsConfig, depth_bias, solve_mckp
from svdpress.allocate.record import ranks_document
from svdpress.errors import SvdpressError
from svdpress.params import count_params

PROBE = {"probe_samples": 2, "probe_seqlen": 32}
METHODS = {
    "lems": {**PROBE, "rank_multiple": 4},
    "asvd-threshold": {**PROBE, "fractions": [0.4, 0.7]},
    "mrcs": {**PROBE, "fractions": [0.4, 0.7]},
    "atp": {**PROBE, "beta_steps": 3},
    "svd-llm-v2": {},
}


def brute_force(costs, errors, budget):
    best = None
    for choice in itertools.product(*[range(len(c)) for c in costs]):
        if sum(c[j] for c, j in zip(costs, choice)) <= budget:
            e = sum(err[j] for err, j in zip(errors, choice))
            best = e if best is None or e < best else best
    return best


@pytest.mark.parametrize("seed", range(6))
def test_ilp_is_optimal_and_within_budget(seed):
    """Random multiple-choice knapsacks (5 layers × 2-5 options): HiGHS finds the brute-force optimum."""
    rng = np.random.default_rng(seed)
    costs, errors = [], []
    for _ in range(5):
        k = int(rng.integers(2, 6))
        costs.append(np.sort(rng.integers(1, 100, k)).astype(float))
        errors.append(np.sort(rng.random(k))[::-1].copy())  # more parameters, less error (not required)
    budget = float(rng.integers(int(sum(c[0] for c in costs)), int(sum(c[-1] for c in costs))))
    res = solve_mckp(costs, errors, budget, mip_rel_gap=0)
    assert res.status == "optimal"
    assert sum(c[j] for c, j in zip(costs, res.choice)) <= budget
    assert res.objective == pytest.approx(brute_force(costs, errors, budget), abs=1e-9)


def test_depth_bias_runs_from_one_plus_gamma_to_one():
    cfg = LemsConfig(gamma=5.0, alpha=0.0)
    d = [depth_bias(b, 6, cfg) for b in range(6)]
    assert d[0] == pytest.approx(6.0) and d[-1] == pytest.approx(1.0)
    assert all(a > b for a, b in zip(d, d[1:]))


def svd_spectra(model):
    """Plain SVD spectra of every target layer (no calibration: fast, and independent of the pipeline)."""
    from svdpress.factorize import spectrum_from_svd
    from svdpress.model import arch_map

    return {t.name: spectrum_from_svd(model.get_submodule(t.name).weight.detach().double())
            for t in arch_map(model).targets}


@pytest.fixture(scope="module")
def problem_parts(tokenizer, text_file):
    from conftest import make_llama

    from svdpress.data import calibration_samples
    from svdpress.model import Placement, Runner

    model = make_llama(len(tokenizer), layers=2)
    samples, _ = calibration_samples(tokenizer, text_file, 4, 48, seed=0)
    spectra = svd_spectra(model)
    with Runner(model, Placement(offload="none")) as runner:
        # the last: a cache shared by every problem here
        yield runner, samples, spectra, runner.arch.shapes(), {}


def make_problem(parts, ratio=0.6, options=None, rank_multiple=4):
    runner, samples, spectra, shapes, cache = parts
    return AllocationProblem(shapes, spectra, ratio, rank_multiple, dict(options or {}), runner=runner,
                             samples=samples, progress=False, cache=cache)


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("ratio", [0.5, 0.8])
def test_allocator_meets_budget_within_one_rank_step(problem_parts, method, ratio):
    p = make_problem(problem_parts, ratio, METHODS[method])
    a = allocate(p, method)
    assert slack_ok(p, a.ranks, 4), (count_params(p.shapes, a.ranks), p.target)
    assert all(r is None or r % 4 == 0 for r in a.ranks.values())


def test_lems_records_solver_and_is_optimal_for_its_surrogate(problem_parts):
    p = make_problem(problem_parts, 0.6, METHODS["lems"])
    info = allocate(p, "lems").info
    assert info["status"] == "optimal" and info["mip_gap"] <= 1e-6
    assert info["surrogate"] > 0 and info["probes"] == len(p.shapes) and info["rank_multiple"] == 4


def test_lems_defaults_to_rank_multiple_16(problem_parts):
    p = make_problem(problem_parts, 0.6, PROBE, rank_multiple=1)
    a = allocate(p, "lems")
    assert a.info["rank_multiple"] == 16 and all(r is None or r % 16 == 0 for r in a.ranks.values())


def test_unknown_option_is_a_user_error(problem_parts):
    with pytest.raises(SvdpressError, match="unknown option"):
        allocate(make_problem(problem_parts, 0.6, {"gama": 3}), "lems")


def write_ranks(tmp_path, doc, name="ranks.json"):
    path = tmp_path / name
    path.write_text(json.dumps(doc))
    return str(path)


def test_load_round_trips_a_written_allocation(problem_parts, tmp_path):
    p = make_problem(problem_parts, 0.6, METHODS["svd-llm-v2"])
    original = allocate(p, "svd-llm-v2").ranks
    path = write_ranks(tmp_path, ranks_document("svd-llm-v2", p.shapes, original, 0.6))
    loaded = allocate(make_problem(problem_parts, 0.6, {"ranks": path}), "load").ranks
    assert loaded == original


def test_bad_rank_files_are_user_errors(problem_parts, tmp_path):
    p = make_problem(problem_parts, 0.6, METHODS["svd-llm-v2"])
    good = ranks_document("x", p.shapes, allocate(p, "svd-llm-v2").ranks, 0.6)
    name = next(iter(good["layers"]))
    renamed = json.loads(json.dumps(good))
    renamed["layers"]["model.layers.9.mlp.up_proj"] = renamed["layers"].pop(name)
    reshaped = json.loads(json.dumps(good))
    reshaped["layers"][name]["shape"] = [7, 7]
    bad_rank = json.loads(json.dumps(good))
    bad_rank["layers"][name]["rank"] = -3
    dense = json.loads(json.dumps(good))
    for e in dense["layers"].values():
        e["rank"] = None
    cases = {"missing.json": None, "notjson.json": "{", "format.json": {"layers": {}}, "names.json": renamed,
             "shape.json": reshaped, "rank.json": bad_rank, "budget.json": dense}
    for fname, doc in cases.items():
        path = tmp_path / fname
        if doc is not None:
            path.write_text(doc if isinstance(doc, str) else json.dumps(doc))
        with pytest.raises(SvdpressError):
            allocate(make_problem(problem_parts, 0.6, {"ranks": str(path)}), "load")
    with pytest.raises(SvdpressError, match="needs a rank file"):
        allocate(make_problem(problem_parts, 0.6, {}), "load")


def test_cli_ranks_flag_reuses_an_exported_allocation(tiny_model_dir, text_file, tmp_path):
    """compress --out A writes ranks.json; compress --ranks A/ranks.json rebuilds exactly the same ranks."""
    from svdpress.cli import main

    common = ["--model", tiny_model_dir, "--calib", text_file, "--calib-samples", "4", "--calib-seqlen", "32",
              "--ratio", "0.7", "--rank-multiple", "4", "--no-progress", "--device", "cpu"]
    assert main(["compress", *common, "--allocate", "svd-llm-v2", "--out", str(tmp_path / "a")]) == 0
    ranks_file = tmp_path / "a" / "ranks.json"
    assert main(["compress", *common, "--ranks", str(ranks_file), "--out", str(tmp_path / "b")]) == 0
    a, b = (json.loads((tmp_path / d / "ranks.json").read_text()) for d in "ab")
    assert a["layers"] == b["layers"] and b["method"] == "load"
    assert main(["compress", *common, "--allocate", "lems", "--ranks", str(ranks_file)]) == 2


def test_lems_tuning_picks_the_grid_point_with_the_lowest_kl(problem_parts):
    opts = {**METHODS["lems"], "tune": True, "tune_alphas": [0.0], "tune_gammas": [0.0, 5.0]}
    p = make_problem(problem_parts, 0.6, opts)
    info = allocate(p, "lems").info
    trials = info["tuning"]
    assert len(trials) == 2 and min(trials, key=trials.get) == f"alpha=0.0,gamma={info['gamma']}"
    assert slack_ok(p, allocate(p, "lems").ranks, 4)

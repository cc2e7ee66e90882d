"""asvd-plus and mrcs-plus: the baselines with LEMS's propagation bias and Optuna-tuned (α, γ)."""

from __future__ import annotations

import builtins

import pytest

from svdpress.allocate import ALLOCATORS, allocate, check_options
from svdpress.allocate.common import slack_ok
from svdpress.allocate.lems import LemsConfig, depth_bias
from svdpress.allocate.tune import DEFAULT_TRIALS, depth_weights
from svdpress.errors import SvdpressError

from test_allocate_more import PROBE, make_problem, problem_parts  # noqa: F401  (the module's fixture)

PLUS = {
    "asvd-plus": {**PROBE, "fractions": [0.4, 0.7], "n_trials": 2},
    "mrcs-plus": {**PROBE, "fractions": [0.4, 0.7], "n_trials": 2},
}


def test_registered_with_lems_trial_budget():
    for name in PLUS:
        assert name in ALLOCATORS
        cfg = check_options(name, {})
        assert cfg.n_trials == DEFAULT_TRIALS == len(LemsConfig.tune_alphas) * len(LemsConfig.tune_gammas) == 12
        assert cfg.tune and cfg.alpha_range == (0.0, 3.0) and cfg.gamma_range == (0.0, 7.0)


@pytest.mark.parametrize("method", list(PLUS))
@pytest.mark.parametrize("ratio", [0.5, 0.8])
def test_plus_meets_budget_within_one_rank_step(problem_parts, method, ratio):  # noqa: F811
    p = make_problem(problem_parts, ratio, PLUS[method])
    a = allocate(p, method)
    assert slack_ok(p, a.ranks, 4)
    assert all(r is None or r % 4 == 0 for r in a.ranks.values())
    info = a.info
    assert len(info["tuning"]) == 2 and info["trials"] == 2
    assert min(info["tuning"].values()) == info["tuning"][f"alpha={info['alpha']:.4g},gamma={info['gamma']:.4g}"]
    lo, hi = (0.0, 3.0), (0.0, 7.0)
    assert lo[0] <= info["alpha"] <= lo[1] and hi[0] <= info["gamma"] <= hi[1]


@pytest.mark.parametrize("method", list(PLUS))
def test_plus_is_deterministic_for_a_seed(problem_parts, method):  # noqa: F811
    a = allocate(make_problem(problem_parts, 0.6, PLUS[method]), method)
    b = allocate(make_problem(problem_parts, 0.6, PLUS[method]), method)
    assert a.ranks == b.ranks and a.info["tuning"] == b.info["tuning"]
    assert (a.info["alpha"], a.info["gamma"]) == (b.info["alpha"], b.info["gamma"])


@pytest.mark.parametrize("base,plus", [("asvd-threshold", "asvd-plus"), ("mrcs", "mrcs-plus")])
def test_constant_bias_is_the_baseline(problem_parts, base, plus):  # noqa: F811
    """d(b) = 1 (or γ = 0 untuned) leaves the baseline's search unchanged: the "+" adds only the bias."""
    opts = {k: v for k, v in PLUS[plus].items() if k != "n_trials"}
    ref = allocate(make_problem(problem_parts, 0.6, opts), base).ranks
    assert allocate(make_problem(problem_parts, 0.6, {**opts, "bias": "constant"}), plus).ranks == ref
    assert allocate(make_problem(problem_parts, 0.6, {**opts, "tune": False, "alpha": 1.0, "gamma": 0.0}),
                    plus).ranks == ref


def test_depth_weights_are_lems_bias(problem_parts):  # noqa: F811
    p = make_problem(problem_parts, 0.6, {})
    cfg = check_options("asvd-plus", {"tune": False})
    w = depth_weights(p, cfg, 1.0, 5.0)
    lems = LemsConfig(alpha=1.0, gamma=5.0)
    for name, d in w.items():
        assert d == depth_bias(int(name.split(".")[2]), 2, lems)
    assert max(w.values()) == 6.0 and min(w.values()) == 1.0


def test_missing_optuna_names_the_extra(monkeypatch):
    real_import = builtins.__import__

    def no_optuna(name, *a, **k):
        if name == "optuna" or name.startswith("optuna."):
            raise ImportError("No module named 'optuna'")
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_optuna)
    for name in PLUS:
        with pytest.raises(SvdpressError, match=r"pip install 'svdpress\[tune\]'"):
            check_options(name, {})  # at option checking, before any model is loaded
        check_options(name, {"tune": False})  # fixed (α, γ) need no Optuna


@pytest.mark.parametrize("bad", [{"bias": "cubic"}, {"gamma": -1}, {"n_trials": 0}, {"alpha_range": [3, 1]},
                                 {"gamma_range": [0, 1, 2]}])
def test_bad_options_are_user_errors(bad):
    for name in PLUS:
        with pytest.raises(SvdpressError, match=name):
            check_options(name, bad)

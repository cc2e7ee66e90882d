"""FermiGrad: the soft mask, the smooth count, the budget, and that training moves μ where it should."""

from __future__ import annotations

import pytest
import torch

from svdpress.allocate import AllocationProblem, allocate
from svdpress.allocate.fermigrad import (FermiGradConfig, FermiLinear, hard_ranks, mu_max, smooth_params,
                                         smooth_rank)
from svdpress.errors import SvdpressError
from svdpress.models import find_targets
from svdpress.params import LayerShape, count_params, layer_params
from svdpress.pipeline import Timer, factorize_model

FAST = {"steps": 30, "samples": 4, "seqlen": 32, "batch_size": 2, "lr": 0.05, "r_min": 2, "top_k": 16}


def make_problem(model, calib, ratio, options=None):
    spectra = factorize_model(model, calib, "svd-llm", "cpu", Timer(), batch_size=4, progress=False)
    shapes = {t.name: t.shape for t in find_targets(model)}
    return AllocationProblem(shapes, spectra, ratio, options=dict(options or {}), model=model, samples=calib,
                             progress=False)


def layer_io(model, calib, name):
    layer = model.get_submodule(name)
    x = torch.randn(3, 5, layer.in_features, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return layer, x, layer(x)


def test_mask_open_reproduces_the_dense_layer(tiny_model, calib):
    p = make_problem(tiny_model, calib, 0.5)
    for name in ("model.layers.0.self_attn.k_proj", "model.layers.1.mlp.down_proj"):
        layer, x, y = layer_io(tiny_model, calib, name)
        N = p.spectra[name].full_rank
        T = 0.01
        u = torch.nn.Parameter(torch.tensor([mu_max(N, T, 10.0) / N]))  # top of the box: every direction open
        masked = FermiLinear(p.spectra[name], layer.bias, u, 0, T, 10.0, N)
        with torch.no_grad():
            torch.testing.assert_close(masked(x), y, rtol=1e-4, atol=1e-4 * float(y.abs().max()))
            u.fill_(1.0)  # μ = N exactly, T → 0: the hard mask at full rank
            cold = FermiLinear(p.spectra[name], layer.bias, u, 0, 1e-4, 10.0, N)
            torch.testing.assert_close(cold(x), y, rtol=1e-5, atol=1e-5 * float(y.abs().max()))
            u.fill_(0.5)  # half open: differs from the dense layer
            assert (masked(x) - y).norm() > 1e-3 * y.norm()


def test_soft_mask_at_low_temperature_is_the_hard_truncation(tiny_model, calib):
    p = make_problem(tiny_model, calib, 0.5)
    name = "model.layers.0.mlp.up_proj"
    layer, x, _ = layer_io(tiny_model, calib, name)
    spec, r = p.spectra[name], 17
    u = torch.nn.Parameter(torch.tensor([r / spec.full_rank]))
    soft = FermiLinear(spec, layer.bias, u, 0, 1e-4, 10.0, spec.full_rank)
    A, B = spec.factors(r)
    with torch.no_grad():
        torch.testing.assert_close(soft(x), x @ B.T @ A.T, rtol=1e-4, atol=1e-5)


def test_smooth_count_is_differentiable_and_hard_in_the_cold_limit():
    shape = LayerShape(160, 64)
    for r in (1, 5, 20, shape.break_even - 1):
        cold = smooth_params(torch.tensor(float(r), dtype=torch.float64), shape, 1e-5)
        assert float(cold) == pytest.approx(layer_params(shape, r), rel=1e-9)
    mu = torch.tensor(20.3, dtype=torch.float64, requires_grad=True)
    c = smooth_params(mu, shape, 0.01)
    (g,) = torch.autograd.grad(c, mu)
    assert float(g) > 0 and float(c.detach()) == pytest.approx(20.3 * (160 + 64), rel=1e-3)  # Σ F ≈ μ inside the range
    # past break-even the smooth count prices the factors, an upper bound of the dense count that is stored
    assert float(smooth_params(torch.tensor(60.0), shape, 1e-5)) >= layer_params(shape, 60)
    assert float(smooth_rank(torch.tensor(64.0 * 1.2), 64, 0.01)) == pytest.approx(64, abs=1e-3)


def sharp_llama(vocab: int, scale: dict[str, float] | None = None):
    """The tiny random Llama with its final norm ×30: a random model's next-token distribution is nearly uniform,
    so no layer would matter to the KL; sharpened logits make the layers matter unequally, as in a real model."""
    from conftest import make_llama

    model = make_llama(vocab)
    with torch.no_grad():
        model.model.norm.weight.mul_(30.0)
        for name, s in (scale or {}).items():
            model.get_submodule(name).weight.mul_(s)
    return model


@pytest.mark.parametrize("ratio", [0.8, 0.5])
def test_final_ranks_meet_the_budget_never_above(tokenizer, calib, ratio):
    model = sharp_llama(len(tokenizer))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    modules = {t.name: model.get_submodule(t.name) for t in find_targets(model)}
    p = make_problem(model, calib, ratio, FAST)
    alloc = allocate(p, "fermigrad")
    kept = count_params(p.shapes, alloc.ranks)
    assert kept <= p.target
    step = max(s.m + s.n for s in p.shapes.values())
    assert p.target - kept < 2 * step  # the fill leaves no room for another rank anywhere useful
    info = alloc.info
    assert info["steps"] == FAST["steps"] and set(info["mu"]) == set(p.shapes)
    # on the tokens it trained on, the hard-cut allocation beats uniform's KL at the same budget
    assert info["kl_fermigrad"] < info["kl_uniform"], (info["kl_fermigrad"], info["kl_uniform"])
    # the dense model is back, untouched: same modules, same weights, gradient flags as they were
    for name, m in modules.items():
        assert model.get_submodule(name) is m
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert all(q.requires_grad for q in model.parameters())


def test_greedy_adjust_never_exceeds_even_from_full_rank(tiny_model, calib):
    p = make_problem(tiny_model, calib, 0.6)
    mu = {n: float(s.full_rank) for n, s in p.shapes.items()}  # everything dense: far over budget
    dkl = {n: -1e-3 * (i + 1) for i, n in enumerate(p.shapes)}
    ranks, moves = hard_ranks(p, mu, dkl, r_min=2)
    ranks = {n: (None if r >= p.shapes[n].full_rank else r) for n, r in ranks.items()}
    assert count_params(p.shapes, ranks) <= p.target
    assert moves["trimmed"] > 0


def test_a_layer_with_tiny_singular_values_loses_rank(tokenizer, calib):
    """The same model twice, once with one v_proj scaled by 1e-3 (its singular values are tiny, its output
    barely reaches the residual stream): there FermiGrad takes its rank away; in the control it keeps it."""
    layer = "model.layers.1.self_attn.v_proj"
    mu = {}
    for s in (1.0, 1e-3):
        p = make_problem(sharp_llama(len(tokenizer), {layer: s}), calib, 0.6, FAST)
        mu[s] = allocate(p, "fermigrad").info["mu"][layer]
    shape = p.shapes[layer]
    uniform_rank = 0.6 * shape.m * shape.n / (shape.m + shape.n)
    assert mu[1e-3] < uniform_rank - 2, mu
    assert mu[1.0] > mu[1e-3] + 8, mu


def test_options_are_checked():
    with pytest.raises(SvdpressError, match="unknown fermigrad option"):
        FermiGradConfig.from_options({"stepz": 3})
    with pytest.raises(SvdpressError, match="positive"):
        FermiGradConfig.from_options({"steps": 0})
    with pytest.raises(SvdpressError):
        FermiGradConfig.from_options({"init": "random"})
    cfg = FermiGradConfig.from_options({"steps": "7", "temperature": 0.02, "report_uniform_kl": "false"})
    assert cfg.steps == 7 and cfg.temperature == 0.02 and cfg.report_uniform_kl is False

"""FermiGrad: the soft mask, the smooth count, the budget, the chunked KL, that training moves μ where it should, and
that streaming the model from disk gives the same μ and ranks as holding it whole."""

from __future__ import annotations

import pytest
import torch

from svdpress.allocate import AllocationProblem, allocate
from svdpress.allocate.fermigrad import (FermiGradConfig, FermiLinear, hard_ranks, initial_theta, mu_max,
                                         rank_scales, smooth_params, smooth_rank, topk_kl, train)
from svdpress.errors import SvdpressError
from svdpress.factorize import spectrum_from_svd
from svdpress.model import Head, Placement, Runner, arch_map
from svdpress.params import LayerShape, count_params, layer_params

FAST = {"steps": 30, "samples": 4, "seqlen": 32, "batch_size": 2, "lr": 0.05, "r_min": 2, "top_k": 16}


def spectra_of(model):
    """Plain SVD spectra of every target layer (no calibration: fast, and independent of the pipeline)."""
    return {t.name: spectrum_from_svd(model.get_submodule(t.name).weight.detach().double())
            for t in arch_map(model).targets}


def make_problem(model, calib, ratio, options=None, spectra=None, offload="none"):
    """The problem on `model` behind its runner (close `p.runner` to give the model its gradient flags back)."""
    spectra = spectra if spectra is not None else spectra_of(model)
    runner = Runner(model, Placement(offload=offload))
    return AllocationProblem(runner.arch.shapes(), spectra, ratio, options=dict(options or {}), runner=runner,
                             samples=calib, progress=False)


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
    p = make_problem(model, calib, ratio, FAST)
    modules = {name: model.get_submodule(name) for name in p.shapes}
    with p.runner:
        alloc = allocate(p, "fermigrad")
    kept = count_params(p.shapes, alloc.ranks)
    assert kept <= p.target
    step = max(s.m + s.n for s in p.shapes.values())
    assert p.target - kept < 2 * step  # the fill leaves no room for another rank anywhere useful
    info = alloc.info
    assert info["steps"] == FAST["steps"] and set(info["mu"]) == set(p.shapes)
    # on the tokens it trained on, the hard-cut allocation beats uniform's KL at the same budget
    assert info["kl_fermigrad"] < info["kl_uniform"], (info["kl_fermigrad"], info["kl_uniform"])
    # the dense model is untouched: same modules, same weights, gradient flags as they were (runner closed)
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
        with p.runner:
            mu[s] = allocate(p, "fermigrad").info["mu"][layer]
    shape = p.shapes[layer]
    uniform_rank = 0.6 * shape.m * shape.n / (shape.m + shape.n)
    assert mu[1e-3] < uniform_rank - 2, mu
    assert mu[1.0] > mu[1e-3] + 8, mu


def test_options_are_checked():
    with pytest.raises(SvdpressError, match="unknown option.*fermigrad: stepz; known: .*steps"):
        FermiGradConfig.from_options({"stepz": 3})
    with pytest.raises(SvdpressError, match="positive"):
        FermiGradConfig.from_options({"steps": 0})
    with pytest.raises(SvdpressError):
        FermiGradConfig.from_options({"init": "random"})
    cfg = FermiGradConfig.from_options({"steps": "7", "temperature": 0.02, "report_uniform_kl": "false"})
    assert cfg.steps == 7 and cfg.temperature == 0.02 and cfg.report_uniform_kl is False


def full_logits_topk_kl(logits, t_idx, t_logp):
    """The KL as it was computed before the runner: from the logits of every token over the whole vocabulary."""
    q = torch.log_softmax(logits.float(), -1)
    q_top = q.gather(-1, t_idx)
    p_top = t_logp.exp()
    p_rest = (1 - p_top.sum(-1)).clamp_min(1e-12)
    q_rest = (1 - q_top.exp().sum(-1)).clamp_min(1e-12)
    kl = (p_top * (t_logp - q_top)).sum(-1) + p_rest * (p_rest.log() - q_rest.log())
    return kl.mean()


@pytest.mark.parametrize("bias,softcap", [(False, None), (True, 3.0)])
def test_chunked_kl_equals_the_full_logits_formula(bias, softcap):
    g = torch.Generator().manual_seed(0)
    T, d, V, k = 24, 16, 1000, 8
    W = torch.randn(V, d, generator=g)
    b = torch.randn(V, generator=g) if bias else None
    teacher = torch.randn(T, V, generator=g) * 3
    t_logp, t_idx = torch.log_softmax(teacher, -1).topk(k, -1)
    head = Head(lambda a, c: W[a:c], V, b, softcap, elements=T * 300)  # 300 columns a chunk: 4 chunks
    assert len(head.spans(T)) == 4
    h = (torch.randn(T, d, generator=g) * 0.5).requires_grad_(True)
    kl = topk_kl(head, h, t_idx, t_logp)
    (grad,) = torch.autograd.grad(kl, h)

    h_ref = h.detach().clone().requires_grad_(True)
    z = h_ref @ W.T + (b if bias else 0)
    if softcap:
        z = torch.tanh(z / softcap) * softcap
    ref = full_logits_topk_kl(z, t_idx, t_logp)
    (grad_ref,) = torch.autograd.grad(ref, h_ref)
    assert float(ref.detach()) > 1e-2  # a KL worth comparing
    torch.testing.assert_close(kl, ref, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(grad, grad_ref, rtol=1e-4, atol=1e-6 * float(grad_ref.abs().max()))


def test_streaming_from_disk_gives_the_same_mu_and_ranks(tokenizer, calib, monkeypatch):
    """The same tiny Llama (a fresh copy per mode: a disk runner moves an in-memory model's weights to an offload
    folder and leaves the model on meta) and the same spectra: held whole or streamed block by block from disk,
    a few FermiGrad steps give the same μ, the same ranks and the same KLs. Held whole, every mask is built once;
    streamed, a block's masks are built each time the block is materialized."""
    import svdpress.allocate.fermigrad as fg

    built = []

    class Counted(FermiLinear):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            built.append(self)

    monkeypatch.setattr(fg, "FermiLinear", Counted)
    opts = {"steps": 3, "samples": 4, "seqlen": 32, "batch_size": 2, "lr": 0.05, "r_min": 2, "top_k": 16}
    cfg = FermiGradConfig.from_options(opts)
    spectra = spectra_of(sharp_llama(len(tokenizer)))
    runs, allocs, builds = {}, {}, {}
    for offload in ("none", "disk"):
        model = sharp_llama(len(tokenizer))
        p = make_problem(model, calib, 0.6, opts, spectra=spectra, offload=offload)
        with p.runner as runner:
            assert runner.offload == offload
            if offload == "disk":  # really streamed: no weight of a block is in memory between blocks
                assert all(q.device.type == "meta" for q in runner.blocks.parameters())
            originals = {name: model.get_submodule(name) for name in p.shapes}
            built.clear()
            runs[offload] = train(p, cfg)  # μ unrounded (the record rounds it to 1e-3)
            builds[offload] = len(built)
            allocs[offload] = allocate(p, "fermigrad")
            assert all(model.get_submodule(name) is m for name, m in originals.items())
    assert builds["none"] == len(p.shapes)
    assert builds["disk"] == 2 * cfg.steps * len(p.shapes)  # forward, then the block's recomputation, every step
    a, b = runs["none"], runs["disk"]
    mu0 = dict(zip(p.shapes, (initial_theta(p, cfg).double() * rank_scales(p)).tolist()))
    assert max(abs(a["mu"][n] - mu0[n]) for n in mu0) > 0.5  # the steps moved μ: the comparison is not vacuous
    for name in a["mu"]:
        assert b["mu"][name] == pytest.approx(a["mu"][name], rel=1e-5), name
        assert b["dkl_dmu"][name] == pytest.approx(a["dkl_dmu"][name], rel=1e-4, abs=1e-9), name
    assert [h["kl"] for h in b["history"]] == pytest.approx([h["kl"] for h in a["history"]], rel=1e-5)
    assert allocs["disk"].ranks == allocs["none"].ranks
    for key in ("final_kl", "kl_fermigrad", "kl_uniform"):
        assert allocs["disk"].info[key] == pytest.approx(allocs["none"].info[key], rel=1e-5), key

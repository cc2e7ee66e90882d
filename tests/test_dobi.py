"""Dobi-SVD (arXiv 2502.02723): the output-activation PCA factorizer `dobi-svd` and the trained truncation
positions of the allocator `dobi`, on the tiny random Llama."""

from __future__ import annotations

import pytest
import torch

from svdpress.allocate import AllocationProblem, allocate, check_options
from svdpress.allocate.dobi import DobiLinear, open_position
from svdpress.calibrate import InputStats, iter_block_stats
from svdpress.errors import SvdpressError
from svdpress.factorize import FACTORIZERS, LayerStats
from svdpress.factorize.whiten import eigen
from svdpress.model import Placement, Runner
from svdpress.params import count_params

from conftest import make_llama

FAST = {"steps": 8, "samples": 4, "seqlen": 32, "batch_size": 2, "lr": 0.05}


@pytest.fixture(scope="module")
def setup(tokenizer, text_file):
    from svdpress.data import calibration_samples

    model = make_llama(len(tokenizer))
    samples, _ = calibration_samples(tokenizer, text_file, 8, 64, seed=0)
    blocks = list(iter_block_stats(model, samples, batch_size=4, progress=False))
    return model, samples, blocks


def dobi_spectra(model, blocks):
    fn = FACTORIZERS["dobi-svd"].fn
    return {name: fn(model.get_submodule(name).weight.detach().double(), LayerStats(inputs))
            for bs in blocks for name, inputs in bs.inputs.items()}


def block0_inputs(model, samples) -> dict[str, torch.Tensor]:
    """The raw inputs X (tokens × n) of block 0's target layers, gathered by hooks on a plain forward."""
    xs: dict[str, list[torch.Tensor]] = {}
    names = [n for n, _ in model.named_modules() if n.startswith("model.layers.0.") and n.endswith("_proj")]
    hooks = [model.get_submodule(n).register_forward_hook(
        lambda m, a, o, n=n: xs.setdefault(n, []).append(a[0].detach().reshape(-1, a[0].shape[-1]).double()))
        for n in names]
    with torch.no_grad():
        for i in range(0, len(samples), 4):
            model(input_ids=samples[i:i + 4])
    for h in hooks:
        h.remove()
    return {n: torch.cat(v) for n, v in xs.items()}


def test_rank_cut_is_the_pca_projection_of_the_outputs(setup):
    """Every rank-r cut of the spectrum is Q_r·Q_rᵀ·W, Q the principal directions of the stacked outputs
    Y = X·Wᵀ computed here directly (SVD of Y), and S are Y's singular values: both routes (m ≤ n: eigen of
    W C Wᵀ; m > n: SVD of W·S with C = S Sᵀ) and the one taken when C was already consumed by a sibling.
    (The tiny model's block-0 inputs have fewer distinct tokens than dimensions: C is singular, which both
    routes must survive.)"""
    model, samples, blocks = setup
    X = block0_inputs(model, samples)
    routes = set()
    for name, calibrated in blocks[0].inputs.items():
        W = model.get_submodule(name).weight.detach().double()
        x = X[name]
        exact = InputStats(x.T @ x, x.abs().sum(0), x.shape[0])  # float64 from the same activations
        # calibration's float32-accumulated statistics are these, to float32 rounding
        assert float((calibrated.xtx - exact.xtx).norm() / exact.xtx.norm()) < 1e-5
        Y = x @ W.T
        _, sig, Qt = torch.linalg.svd(Y, full_matrices=False)
        spec = FACTORIZERS["dobi-svd"].fn(W, LayerStats(exact))
        consumed = InputStats(None, exact.abs_sum, exact.tokens)  # X·Xᵀ gone: only the cached whitener left
        consumed._cache["eigen"] = eigen(exact.xtx)
        spec2 = FACTORIZERS["dobi-svd"].fn(W, LayerStats(consumed))
        spec3 = FACTORIZERS["dobi-svd"].fn(W, LayerStats(calibrated))
        routes.add(W.shape[0] <= W.shape[1])
        k = min(W.shape)
        assert spec.full_rank == k and torch.all(spec.S[:-1] >= spec.S[1:])
        torch.testing.assert_close(spec.S, sig[:k], rtol=1e-6, atol=1e-6 * float(sig[0]))
        torch.testing.assert_close(spec3.S, sig[:k], rtol=0, atol=2e-3 * float(sig[0]))
        assert float((spec.weight() - W).norm() / W.norm()) < 1e-5, name
        for r in (1, 5, 17, 24):
            Q = Qt[:r].T
            ref = Q @ (Q.T @ W)
            for s, tol in ((spec, 1e-6), (spec2, 1e-4), (spec3, 1e-3)):
                assert float((s.weight(r) - ref).norm() / ref.norm()) < tol, (name, r, tol)
            # the truncation error is the energy of the activations cut: ‖X (W − W_r)ᵀ‖² = Σ_{j≥r} S_j²
            err = float(((x @ (W - spec.weight(r)).T) ** 2).sum())
            assert err == pytest.approx(spec.tail_energy(r), rel=1e-6)
    assert routes == {True, False}


def test_same_cut_as_svd_llm_when_inputs_are_full_rank(setup):
    """With C positive definite, SVD-LLM's whitened truncation is the same projection W_r = Q_r Q_rᵀ W (both are the
    Eckart–Young optimum of ‖(W − W_r)X‖_F); only the route differs (no Cholesky here)."""
    model, _, blocks = setup
    for name in ("model.layers.0.self_attn.o_proj", "model.layers.0.mlp.down_proj"):
        inputs = blocks[0].inputs[name]
        W = model.get_submodule(name).weight.detach().double()
        dobi = FACTORIZERS["dobi-svd"].fn(W, LayerStats(inputs))
        llm = FACTORIZERS["svd-llm"].fn(W, LayerStats(inputs))
        for r in (3, 20):
            ref = llm.weight(r)
            assert float((dobi.weight(r) - ref).norm() / ref.norm()) < 1e-4, (name, r)


def test_mask_open_is_dense_and_sharp_mask_is_the_hard_cut(setup):
    model, _, blocks = setup
    spectra = dobi_spectra(model, blocks[:1])
    x = torch.randn(3, 5, 64, generator=torch.Generator().manual_seed(0))
    for name in ("model.layers.0.self_attn.k_proj", "model.layers.0.mlp.up_proj"):
        layer, spec = model.get_submodule(name), spectra[name]
        N = spec.full_rank
        theta = torch.nn.Parameter(torch.tensor([open_position(N, 10.0, 10.0) / N]))
        masked = DobiLinear(spec, layer.bias, theta, 0, beta=10.0, cutoff=10.0)
        with torch.no_grad():
            y = layer(x)
            torch.testing.assert_close(masked(x), y, rtol=1e-4, atol=1e-4 * float(y.abs().max()))
            r = 7
            theta.fill_(r / N)
            A, B = spec.factors(r)
            torch.testing.assert_close(masked(x), x @ B.T @ A.T, rtol=1e-4, atol=1e-5)
        theta.grad = None
        masked(x).square().sum().backward()
        assert theta.grad is not None and torch.isfinite(theta.grad).all()


def make_problem(model, samples, spectra, ratio, options=None, pivga=False):
    runner = Runner(model, Placement(offload="none"))
    return AllocationProblem(runner.arch.shapes(), spectra, ratio, options=dict(options or FAST), runner=runner,
                             samples=samples, progress=False, pivga=pivga)


@pytest.mark.parametrize("ratio,pivga,loss", [(0.8, False, "ppl"), (0.5, False, "kl"), (0.4, True, "ppl")])
def test_allocation_meets_the_budget_never_above(setup, ratio, pivga, loss):
    model, samples, blocks = setup
    before = {k: v.clone() for k, v in model.state_dict().items()}
    spectra = dobi_spectra(model, blocks)
    p = make_problem(model, samples, spectra, ratio, {**FAST, "loss": loss}, pivga)
    with p.runner:
        alloc = allocate(p, "dobi")
    kept = count_params(p.shapes, alloc.ranks, pivga)
    assert kept <= p.target
    assert p.target - kept < max(s.m + s.n for s in p.shapes.values())  # less than one rank of one layer left
    info = alloc.info
    assert info["budget_counting"] == ("pivga" if pivga else "classical")
    assert set(info["k"]) == set(p.shapes) and len(info["history"]) == FAST["steps"]
    assert abs(info["smooth_ratio_final"] - ratio) < 0.05  # the budget term holds the soft ratio near the target
    for k, v in model.state_dict().items():  # the dense model is untouched
        assert torch.equal(v, before[k]), k


def test_same_seed_same_positions_and_ranks(setup):
    model, samples, blocks = setup
    spectra = dobi_spectra(model, blocks)
    runs = []
    for _ in range(2):
        p = make_problem(model, samples, spectra, 0.6)
        with p.runner:
            runs.append(allocate(p, "dobi"))
    assert runs[0].ranks == runs[1].ranks
    assert runs[0].info["k"] == runs[1].info["k"]
    assert runs[0].info["history"] == runs[1].info["history"]


def test_options_are_checked():
    assert check_options("dobi", {"steps": "3", "loss": "kl"}).steps == 3
    for bad in ({"stepz": 3}, {"loss": "nll"}, {"beta": 0}, {"lr_final": 2}):
        with pytest.raises(SvdpressError):
            check_options("dobi", bad)


def test_cli_pairs_dobi_svd_with_dobi():
    from svdpress.cli import allocation_args

    assert allocation_args(None, None, {}, "dobi-svd") == ("dobi", {})
    assert allocation_args("uniform", None, {}, "dobi-svd") == ("uniform", {})
    assert allocation_args(None, None, {}, "svd-llm") == ("uniform", {})


def test_compress_export_load_round_trip(tokenizer, text_file, tmp_path):
    import svdpress
    from svdpress.config import CompressConfig

    out = tmp_path / "dobi"

    def config(**kw):
        return CompressConfig(factorize="dobi-svd", allocate="dobi", ratio=0.5, calib=text_file, calib_samples=8,
                              calib_seqlen=64, progress=False, options=dict(FAST), **kw)

    model, report = svdpress.compress(make_llama(len(tokenizer)), config(out=str(out)), tokenizer=tokenizer)
    assert report["factorize"] == "dobi-svd" and report["allocate"] == "dobi"
    assert report["params"]["linear_kept"] <= int(0.5 * report["params"]["linear_dense"])
    x = torch.randint(0, len(tokenizer), (2, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(input_ids=x).logits
    loaded, _ = svdpress.load(str(out))
    loaded.eval()
    assert type(loaded.model.layers[0].mlp.up_proj).__name__ == "LowRankLinear"
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=x).logits, ref, rtol=0, atol=1e-5)
    # the same settings again give the same model (seeded)
    model2, report2 = svdpress.compress(make_llama(len(tokenizer)), config(), tokenizer=tokenizer)
    assert {n: v["rank"] for n, v in report2["layers"].items()} == {n: v["rank"] for n, v in report["layers"].items()}
    with torch.no_grad():
        torch.testing.assert_close(model2(input_ids=x).logits, ref, rtol=0, atol=0)


def test_streamed_from_disk_gives_the_same_positions_and_ranks(tokenizer, setup):
    """Held whole or streamed block by block from disk (a fresh copy of the model per mode: a disk runner moves
    an in-memory model's weights to an offload folder), a few steps give the same positions and ranks."""
    _, samples, blocks = setup
    spectra = dobi_spectra(make_llama(len(tokenizer)), blocks)
    out = {}
    for offload in ("none", "disk"):
        model = make_llama(len(tokenizer))
        runner = Runner(model, Placement(offload=offload))
        p = AllocationProblem(runner.arch.shapes(), spectra, 0.6, options=dict(FAST), runner=runner,
                              samples=samples, progress=False)
        with runner:
            assert runner.offload == offload
            out[offload] = allocate(p, "dobi")
    assert out["none"].ranks == out["disk"].ranks
    for n, k in out["none"].info["k"].items():
        assert out["disk"].info["k"][n] == pytest.approx(k, abs=1e-3)


def test_cli_compress_with_dobi_svd_allocates_with_dobi(tiny_model_dir, text_file, tmp_path, capsys):
    import json

    from svdpress.cli import main

    assert main(["compress", "--factorize", "nope", "--no-progress"]) == 2
    assert "unknown factorization 'nope'" in capsys.readouterr().err
    out = tmp_path / "out"
    argv = ["compress", "--model", tiny_model_dir, "--calib", text_file, "--calib-samples", "4", "--calib-seqlen",
            "64", "--ratio", "0.5", "--factorize", "dobi-svd", "--out", str(out), "--no-progress"]
    for k, v in FAST.items():
        argv += ["--opt", f"{k}={v}"]
    assert main(argv) == 0
    manifest = json.loads((out / "svdpress.json").read_text())
    assert manifest["factorize"] == "dobi-svd" and manifest["allocate"] == "dobi"
    assert manifest["ratio"]["achieved"] <= 0.5

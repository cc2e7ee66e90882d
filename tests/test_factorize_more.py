"""fwsvd, svd-llm-v2, kfac; the gradient statistics they use; and the on-disk statistics cache."""

from __future__ import annotations

import json

import pytest
import torch

from svdpress.calibrate import InputStats, gradient_stats, iter_block_stats
from svdpress.factorize import FACTORIZERS, LayerStats
from svdpress.factorize.kfac import kfac_spectrum

from conftest import make_llama

NEW = ["fwsvd", "svd-llm-v2", "kfac"]


@pytest.fixture(scope="module")
def setup(tokenizer, text_file):
    from svdpress.data import calibration_samples

    model = make_llama(len(tokenizer))
    samples, _ = calibration_samples(tokenizer, text_file, 8, 64, seed=0)
    grads = gradient_stats(model, samples, batch_size=4, progress=False)
    block0 = next(iter_block_stats(model, samples, batch_size=4, progress=False))
    return model, samples, grads, block0


def weighted_error(W, Wr, G, C) -> float:
    """tr(ΔWᵀ G ΔW C) = ‖L_Gᵀ ΔW L_C‖²: the K-FAC Fisher-weighted error."""
    D = W - Wr
    return float(torch.trace(D.T @ G @ D @ C))


@pytest.mark.parametrize("method", NEW)
def test_full_rank_reconstructs_w(setup, method):
    model, _, grads, block0 = setup
    assert FACTORIZERS[method].needs_gradients == (method != "svd-llm-v2")
    for name, inputs in block0.inputs.items():
        W = model.get_submodule(name).weight.detach().double()
        spec = FACTORIZERS[method].fn(W, LayerStats(inputs, **grads[name]))
        assert float((spec.weight() - W).norm() / W.norm()) < 1e-5, name
        assert torch.all(spec.S[:-1] >= spec.S[1:])


def test_kfac_with_identity_output_factor_is_svd_llm(setup):
    model, _, _, block0 = setup
    for name in ("model.layers.0.self_attn.q_proj", "model.layers.0.mlp.down_proj"):
        W = model.get_submodule(name).weight.detach().double()
        ref = FACTORIZERS["svd-llm"].fn(W, LayerStats(block0.inputs[name]))
        for damping in (0.0, 0.01):  # damping of I only rescales Σ by √(1+δ)
            ours = kfac_spectrum(W, block0.inputs[name], torch.eye(W.shape[0], dtype=torch.float64), damping)
            torch.testing.assert_close(ours.S / ours.S[0], ref.S / ref.S[0], rtol=1e-9, atol=1e-12)
            for r in (1, 5, min(W.shape) // 2):
                torch.testing.assert_close(ours.weight(r), ref.weight(r), rtol=1e-5, atol=1e-6)


def test_kfac_beats_svd_llm_under_anisotropic_output_weighting():
    """With a known output-side weighting G (gradients concentrated on a few output channels), kfac's
    Fisher-weighted error is below svd-llm's at every truncated rank, and is exactly its tail energy."""
    g = torch.Generator().manual_seed(0)
    m, n, T = 24, 16, 400
    W = torch.randn(m, n, generator=g, dtype=torch.float64)
    X = torch.randn(T, n, generator=g, dtype=torch.float64) * torch.logspace(0, 1, n, dtype=torch.float64)
    C = X.T @ X
    Q, _ = torch.linalg.qr(torch.randn(m, m, generator=g, dtype=torch.float64))
    G = Q @ torch.diag(torch.logspace(-3, 2, m, dtype=torch.float64)) @ Q.T
    inputs = InputStats(C, X.abs().sum(0), T)
    svdllm = FACTORIZERS["svd-llm"].fn(W, LayerStats(inputs))
    exact = kfac_spectrum(W, inputs, G, damping=0.0)
    default = FACTORIZERS["kfac"].fn(W, LayerStats(inputs, out_grad=G))
    for r in range(1, n):
        e_ref = weighted_error(W, svdllm.weight(r), G, C)
        e_exact = weighted_error(W, exact.weight(r), G, C)
        assert e_exact < e_ref, r
        assert abs(exact.tail_energy(r) - e_exact) <= 1e-6 * e_ref
        assert weighted_error(W, default.weight(r), G, C) < e_ref, r  # the damped factor keeps the advantage


def test_fwsvd_weights_rows_by_fisher():
    """FWSVD is the optimum of the row-weighted error ‖diag(√I)(W − W_r)‖ (I = row sums of the Fisher)."""
    g = torch.Generator().manual_seed(1)
    W = torch.randn(12, 8, generator=g, dtype=torch.float64)
    F = torch.rand(12, 8, generator=g, dtype=torch.float64) * torch.logspace(-2, 2, 12, dtype=torch.float64)[:, None]
    stats = LayerStats(InputStats(torch.eye(8, dtype=torch.float64), torch.ones(8, dtype=torch.float64), 1),
                       weight_fisher=F)
    w = F.sum(1).sqrt()[:, None]
    ours, plain = FACTORIZERS["fwsvd"].fn(W, stats), FACTORIZERS["svd"].fn(W, stats)
    for r in range(1, 8):
        err = lambda s: float((w * (W - s.weight(r))).norm())  # noqa: E731
        assert err(ours) < err(plain), r


def test_gradient_stats_matches_direct_computation(tokenizer):
    model = make_llama(len(tokenizer), layers=1)
    samples = torch.randint(0, len(tokenizer), (3, 12), generator=torch.Generator().manual_seed(0))
    names = ["model.layers.0.self_attn.v_proj", "model.layers.0.mlp.down_proj"]
    stats = gradient_stats(model, samples, batch_size=2, progress=False)  # batches of 2 + 1: sums must not care

    G = {n: 0 for n in names}
    F = {n: 0 for n in names}
    for s in samples:  # one sequence at a time, plain autograd
        outs = {}

        def keep(name):
            def fn(_m, _a, out):
                out.retain_grad()
                outs[name] = out
            return fn

        hs = [model.get_submodule(n).register_forward_hook(keep(n)) for n in names]
        model.zero_grad()
        logits = model(input_ids=s[None]).logits[0, :-1]
        torch.nn.functional.cross_entropy(logits, s[1:], reduction="sum").backward()
        for h in hs:
            h.remove()
        for n in names:
            g = outs[n].grad[0].double()
            G[n] = G[n] + g.T @ g  # Σ_t g_t g_tᵀ
            F[n] = F[n] + model.get_submodule(n).weight.grad.double() ** 2  # (∂L_s/∂W)²
    for n in names:  # the loss goes through the chunked-vocabulary head: float32 rounding relative to the scale
        torch.testing.assert_close(stats[n]["out_grad"], G[n], rtol=1e-4, atol=1e-6 * float(G[n].abs().max()))
        torch.testing.assert_close(stats[n]["weight_fisher"], F[n], rtol=1e-4, atol=1e-6 * float(F[n].abs().max()))
    assert all(p.requires_grad for p in model.parameters())  # parameters unfrozen again


# ------------------------------------------------------------------ stats cache

def _counting(monkeypatch):
    import svdpress.stats_cache as sc

    calls = {"blocks": 0, "grads": 0}
    real_blocks = sc.iter_block_stats

    def blocks(*a, **k):
        calls["blocks"] += 1
        yield from real_blocks(*a, **k)

    def grads(*a, **k):
        calls["grads"] += 1
        return gradient_stats(*a, **k)

    monkeypatch.setattr(sc, "iter_block_stats", blocks)
    monkeypatch.setattr(sc, "gradient_stats", grads)
    return calls


def _spectra(model, samples, cache_dir, method="kfac"):
    from svdpress.model import Placement, Runner
    from svdpress.pipeline import Stages, factorize_model

    with Runner(model, Placement(offload="none")) as runner:
        return factorize_model(runner, samples, method, Stages(), batch_size=4, progress=False, stats_cache=cache_dir)


def test_stats_cache_hit_stale_and_corrupt(setup, tmp_path, monkeypatch):

    calls = _counting(monkeypatch)
    model, samples, _, _ = setup
    model, samples = make_llama(model.config.vocab_size, layers=1), samples[:4, :32]
    first = _spectra(model, samples, tmp_path)
    assert calls == {"blocks": 1, "grads": 1}
    again = _spectra(model, samples, tmp_path)
    assert calls == {"blocks": 1, "grads": 1}  # hit: nothing recomputed
    name = "model.layers.0.mlp.down_proj"
    torch.testing.assert_close(again[name].weight(), first[name].weight())
    entries = sorted(p.name for p in tmp_path.iterdir())
    assert len(entries) == 2 and not any(e.startswith(".") for e in entries)

    inputs_dir = next(tmp_path.glob("inputs-*"))
    block = sorted(inputs_dir.glob("block_*.pt"))[0]
    block.write_bytes(block.read_bytes()[:100])  # truncated: checksum fails, rebuilt
    with pytest.warns(UserWarning, match="checksum"):
        _spectra(model, samples, tmp_path)
    assert calls == {"blocks": 2, "grads": 1}

    manifest = inputs_dir / "manifest.json"
    doc = json.loads(manifest.read_text())
    doc["key"]["data"] = "0" * 64  # an entry that claims other data: stale
    manifest.write_text(json.dumps(doc))
    with pytest.warns(UserWarning, match="stale"):
        _spectra(model, samples, tmp_path)
    assert calls == {"blocks": 3, "grads": 1}

    (next(tmp_path.glob("gradients-*")) / "manifest.json").write_text("{not json")
    with pytest.warns(UserWarning, match="unusable"):
        _spectra(model, samples, tmp_path)
    assert calls == {"blocks": 3, "grads": 2}

    with torch.no_grad():  # other weights: another key, so both statistics are computed afresh
        model.model.layers[0].mlp.up_proj.weight.mul_(1.01)
    _spectra(model, samples, tmp_path)
    assert calls == {"blocks": 4, "grads": 3}
    _spectra(model, samples[:2], tmp_path)  # other calibration data: another key
    assert calls == {"blocks": 5, "grads": 4}


def test_cholesky_inplace_against_torch_on_every_rung(monkeypatch):
    """The in-place ladder (CPU potrf over one triangle, restored from the other) gives torch's Cholesky of
    the same (jittered) matrix: full rank → no jitter; rank-deficient → the first jitter that works."""
    from svdpress.factorize import whiten
    from svdpress.factorize.whiten import JITTERS, cholesky_inplace

    monkeypatch.setattr(whiten, "TILE", 24)  # several tiles, one of them ragged
    monkeypatch.setattr(whiten, "INPLACE_MIN", 8)  # the in-place (potrf over one triangle) path at test sizes

    g = torch.Generator().manual_seed(0)
    X = torch.randn(300, 64, generator=g, dtype=torch.float64)
    C = X.T @ X
    C[3, 5] += 1e-9  # a not quite symmetric C: the symmetric part is factored
    wh = cholesky_inplace(C.clone())
    sym = (C + C.T) / 2
    assert wh.note == "" and torch.allclose(wh.S, torch.linalg.cholesky(sym), rtol=1e-10, atol=1e-10)

    X = torch.randn(20, 64, generator=g, dtype=torch.float64)  # rank 20 < 64: singular
    C = X.T @ X
    wh = cholesky_inplace(C.clone())
    assert "jitter" in wh.note
    eps = float(wh.note.split()[2].split("*")[0])
    assert eps in JITTERS
    want = torch.linalg.cholesky(C + eps * C.diagonal().mean() * torch.eye(64, dtype=torch.float64))
    assert torch.allclose(wh.S, want, rtol=1e-9, atol=1e-9)
    smaller = [e for e in JITTERS if e < eps]  # every smaller jitter really fails
    for e in smaller:
        _, info = torch.linalg.cholesky_ex(C + e * C.diagonal().mean() * torch.eye(64, dtype=torch.float64))
        assert int(info) != 0

    wh = cholesky_inplace(-torch.eye(8, dtype=torch.float64))  # never positive definite: eigen fallback
    assert "eigen fallback" in wh.note and torch.isfinite(wh.S).all()


def test_gradient_stats_in_several_passes_equal_one(setup, monkeypatch):
    """A block's backward repeated once per layer (what a small --max-memory does to wide layers) gives the
    same G and Fisher as one pass, and leaves no gradient in the model."""
    from svdpress import calibrate

    model, samples, grads, _ = setup
    monkeypatch.setattr(calibrate, "_passes", lambda targets, *_: [[t] for t in targets])
    split = gradient_stats(model, samples, batch_size=4, progress=False)
    assert split.keys() == grads.keys()
    for name in grads:
        for k in grads[name]:
            torch.testing.assert_close(split[name][k], grads[name][k], rtol=1e-10, atol=1e-12)
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("method", ["svd-llm", "svd-llm-v2", "kfac"])
def test_consuming_factorizers_give_the_same_spectrum(setup, method):
    """With consume=True (the pipeline's case) W and G are overwritten in place: same spectrum as with copies."""
    import copy

    model, _, grads, block0 = setup
    name = "model.layers.0.mlp.down_proj"
    W = model.get_submodule(name).weight.detach().double()
    ref = FACTORIZERS[method].fn(W.clone(), LayerStats(copy.deepcopy(block0.inputs[name]), **grads[name]))
    inputs = copy.deepcopy(block0.inputs[name])
    inputs._cache.clear()  # no whitener cached by an earlier test
    inputs._cache["release_after_whitening"] = True
    g = {k: v.clone() for k, v in grads[name].items()}
    ours = FACTORIZERS[method].fn(W.clone(), LayerStats(inputs, **g, consume=True))
    torch.testing.assert_close(ours.S, ref.S, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(ours.weight(8), ref.weight(8), rtol=1e-6, atol=1e-8)
    assert inputs.xtx is None  # X·Xᵀ was consumed


def test_thin_svd_over_the_matrix_equals_torch(monkeypatch):
    """The in-place (scipy gesdd over M's memory) SVD gives torch's singular values and a factorization of M;
    M is left alone unless it may be overwritten."""
    import svdpress.factorize as F

    monkeypatch.setattr(F, "SVD_INPLACE_MIN", 0)
    M = torch.randn(300, 120, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    U0, S0, Vh0 = torch.linalg.svd(M, full_matrices=False)
    keep = M.clone()
    U, S, Vh = F.thin_svd(M.clone(), overwrite=True)
    torch.testing.assert_close(S, S0, rtol=1e-12, atol=0)
    torch.testing.assert_close((U * S) @ Vh, keep, rtol=0, atol=1e-12)
    torch.testing.assert_close(U.T @ U, torch.eye(120, dtype=torch.float64), rtol=0, atol=1e-12)
    F.thin_svd(M, overwrite=False)
    assert torch.equal(M, keep)

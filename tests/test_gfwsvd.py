"""gfwsvd: the per-sequence gradient factor, its rank collapse next to kfac's token-wise one, and the method end to
end (budget, export, load)."""

from __future__ import annotations

import pytest
import torch

from svdpress.calibrate import gradient_stats, iter_block_stats
from svdpress.config import CompressConfig
from svdpress.errors import SvdpressError
from svdpress.factorize import FACTORIZERS, LayerStats
from svdpress.factorize.kfac import kfac_spectrum
from svdpress.models import find_targets
from svdpress.params import count_params, model_params

from conftest import make_llama

S = 4  # calibration sequences


@pytest.fixture(scope="module")
def both(tokenizer):
    model = make_llama(len(tokenizer), layers=1)
    samples = torch.randint(0, len(tokenizer), (S, 24), generator=torch.Generator().manual_seed(0))
    stats = gradient_stats(model, samples, batch_size=3, progress=False, fisher=False, out_grad="both")
    return model, samples, stats


def _rank(G: torch.Tensor) -> int:
    e = torch.linalg.eigvalsh(G)
    return int((e > 1e-6 * float(e.max())).sum())  # float32 accumulation leaves ~1e-8 of noise


def test_per_sequence_factor_collapses_to_the_number_of_sequences(both):
    """rank(Σ_s ḡ_s ḡ_sᵀ) ≤ S, while the token-wise Σ_t g_t g_tᵀ of the same pass has far higher rank."""
    _, _, stats = both
    for name, s in stats.items():
        assert set(s) == {"out_grad", "out_grad_seq"}
        m = s["out_grad"].shape[0]
        assert _rank(s["out_grad_seq"]) <= S, name
        assert _rank(s["out_grad"]) > 2 * S, name  # 23 predicted tokens per sequence, m ≥ 32
        assert m > 2 * S


def test_per_sequence_factor_matches_direct_computation(both):
    model, samples, stats = both
    name = "model.layers.0.mlp.down_proj"
    out = {}

    def keep(_m, _a, o):
        o.retain_grad()
        out["y"] = o

    h = model.get_submodule(name).register_forward_hook(keep)
    try:
        G = 0
        for s in samples:
            model.zero_grad()
            logits = model(input_ids=s[None]).logits[0, :-1]
            torch.nn.functional.cross_entropy(logits, s[1:], reduction="sum").backward()
            g = out["y"].grad[0].double().sum(0)  # ḡ_s = Σ_t g_t
            G = G + torch.outer(g, g)
    finally:
        h.remove()
    ref = stats[name]["out_grad_seq"]
    torch.testing.assert_close(ref, G, rtol=1e-4, atol=1e-6 * float(G.abs().max()))


def test_sequence_only_pass_gathers_only_that_factor(both, tokenizer):
    model, samples, both_stats = both
    seq = gradient_stats(model, samples, batch_size=3, progress=False, fisher=False, out_grad="sequence")
    for name, s in seq.items():
        assert set(s) == {"out_grad_seq"}
        torch.testing.assert_close(s["out_grad_seq"], both_stats[name]["out_grad_seq"], rtol=1e-5,
                                   atol=1e-8 * float(s["out_grad_seq"].abs().max()))
    with pytest.raises(SvdpressError, match="out_grad must be one of"):
        gradient_stats(model, samples, progress=False, out_grad="tokens")


def test_gfwsvd_is_kfac_with_the_per_sequence_factor(both):
    model, samples, stats = both
    assert FACTORIZERS["gfwsvd"].needs_gradients and FACTORIZERS["gfwsvd"].out_grad == "sequence"
    block0 = next(iter_block_stats(model, samples, batch_size=4, progress=False))
    for name, inputs in block0.inputs.items():
        W = model.get_submodule(name).weight.detach().double()
        spec = FACTORIZERS["gfwsvd"].fn(W, LayerStats(inputs, **stats[name]))
        assert float((spec.weight() - W).norm() / W.norm()) < 1e-5, name  # full rank reconstructs W
        ref = kfac_spectrum(W, inputs, stats[name]["out_grad_seq"])
        torch.testing.assert_close(spec.S, ref.S)
        with pytest.raises(SvdpressError, match="per-sequence"):
            FACTORIZERS["gfwsvd"].fn(W, LayerStats(inputs, out_grad=stats[name]["out_grad"]))
        break


def test_gfwsvd_meets_the_budget_exports_and_loads(tokenizer, text_file, tmp_path):
    import svdpress

    tiny = make_llama(len(tokenizer))
    shapes = {t.name: t.shape for t in find_targets(tiny)}
    dense_total = model_params(tiny)
    out = tmp_path / "gfwsvd"
    cfg = CompressConfig(ratio=0.5, factorize="gfwsvd", calib=text_file, calib_samples=4, calib_seqlen=48,
                         progress=False, out=str(out), stats_cache=str(tmp_path / "cache"))
    model, report = svdpress.compress(tiny, cfg, tokenizer=tokenizer)
    p = report["params"]
    ranks = {n: x["rank"] for n, x in report["layers"].items()}
    assert p["linear_kept"] <= int(0.5 * p["linear_dense"]) and p["linear_dense"] == count_params(shapes)
    assert p["linear_kept"] == count_params(shapes, ranks)  # the budget as counted = the tensors built
    assert dense_total - model_params(model) == p["linear_dense"] - p["linear_kept"]
    x = torch.randint(0, len(tokenizer), (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(input_ids=x).logits
    assert torch.isfinite(ref).all()
    loaded, _ = svdpress.load(str(out))
    loaded.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=x).logits, ref, rtol=0, atol=1e-5)
    entries = [d.name for d in (tmp_path / "cache").iterdir() if d.name.startswith("gradients-")]
    assert len(entries) == 1  # the per-sequence statistics have their own cache entry

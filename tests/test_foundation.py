"""The foundation: calibration, spectra, counting, uniform allocation, build, export and load."""

from __future__ import annotations

import pytest
import torch

from svdpress.calibrate import iter_block_stats
from svdpress.config import CompressConfig
from svdpress.factorize import FACTORIZERS, LayerStats
from svdpress.models import find_targets
from svdpress.params import LayerShape, count_params, layer_params, model_params


def block0_stats(model, calib):
    return next(iter_block_stats(model, calib, batch_size=4, progress=False))


def test_targets_found_generically(tiny_model):
    kinds = sorted({t.kind for t in find_targets(tiny_model)})
    assert kinds == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
    assert len(find_targets(tiny_model)) == 2 * 7


def test_shared_inputs_share_one_xtx(tiny_model, calib):
    bs = block0_stats(tiny_model, calib)
    p = "model.layers.0."
    assert bs.inputs[p + "self_attn.q_proj"] is bs.inputs[p + "self_attn.k_proj"] is bs.inputs[p + "self_attn.v_proj"]
    assert bs.inputs[p + "mlp.gate_proj"] is bs.inputs[p + "mlp.up_proj"]
    assert bs.inputs[p + "self_attn.o_proj"] is not bs.inputs[p + "self_attn.q_proj"]
    assert sorted(len(g) for g in bs.groups) == [1, 1, 2, 3]
    assert bs.inputs[p + "self_attn.q_proj"].tokens == calib.numel()


def test_xtx_matches_direct_computation(tiny_model, calib):
    """C = Σ x xᵀ accumulated by the hooks equals X·Xᵀ of the captured input."""
    bs = block0_stats(tiny_model, calib)
    captured = []
    layer = tiny_model.model.layers[0].mlp.down_proj
    h = layer.register_forward_hook(lambda m, a, o: captured.append(a[0].detach().reshape(-1, a[0].shape[-1])))
    with torch.no_grad():
        tiny_model(input_ids=calib)
    h.remove()
    X = captured[0].double()
    torch.testing.assert_close(bs.inputs["model.layers.0.mlp.down_proj"].xtx, X.T @ X, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method", ["svd", "asvd", "svd-llm"])
def test_spectrum_reconstructs_at_full_rank(tiny_model, calib, method):
    bs = block0_stats(tiny_model, calib)
    for name, inputs in bs.inputs.items():
        W = tiny_model.get_submodule(name).weight.detach().double()
        spec = FACTORIZERS[method].fn(W, LayerStats(inputs))
        rel = (spec.weight() - W).norm() / W.norm()
        assert rel < 1e-5, (name, float(rel))
        assert torch.all(spec.S[:-1] >= spec.S[1:])  # descending: the first r terms are the ones to keep


def test_svd_llm_whitened_error_never_above_plain_svd(tiny_model, calib):
    """On the calibration inputs, ‖(W − W_r) X‖² = tr(ΔW C ΔWᵀ); SVD-LLM is optimal for it at every rank."""
    bs = block0_stats(tiny_model, calib)
    for name in ("model.layers.0.self_attn.q_proj", "model.layers.0.mlp.down_proj"):
        inputs = bs.inputs[name]
        W = tiny_model.get_submodule(name).weight.detach().double()
        ours = FACTORIZERS["svd-llm"].fn(W, LayerStats(inputs))
        plain = FACTORIZERS["svd"].fn(W, LayerStats(inputs))
        C = inputs.xtx
        for r in range(1, min(W.shape) + 1):
            err = lambda s: float(torch.trace((W - s.weight(r)) @ C @ (W - s.weight(r)).T))  # noqa: E731
            assert err(ours) <= err(plain) * (1 + 1e-9) + 1e-9, (name, r)
            # and the whitened tail energy is exactly that error
            assert abs(ours.tail_energy(r) - err(ours)) <= 1e-4 * max(1.0, err(plain))  # jitter may perturb C


def test_non_positive_definite_statistics_fall_back(tiny_model, calib):
    from svdpress.calibrate import InputStats

    W = tiny_model.model.layers[0].self_attn.q_proj.weight.detach().double()
    n = W.shape[1]
    X = torch.randn(5, n, dtype=torch.float64)  # 5 tokens: C has rank 5 < n
    bad = InputStats(X.T @ X, X.abs().sum(0), 5)
    spec = FACTORIZERS["svd-llm"].fn(W, LayerStats(bad))
    assert spec.note, "the fallback must be recorded"
    assert torch.isfinite(spec.U).all() and torch.isfinite(spec.V).all() and torch.isfinite(spec.S).all()
    zero = InputStats(torch.zeros(n, n, dtype=torch.float64), torch.zeros(n, dtype=torch.float64), 0)
    for method in ("svd-llm", "asvd"):
        spec = FACTORIZERS[method].fn(W, LayerStats(zero))
        assert torch.isfinite(spec.weight()).all()


def test_parameter_counting_is_exact():
    s = LayerShape(m=576, n=192)
    assert s.break_even == 144  # 576·192/768
    assert layer_params(s, 100) == 100 * 768
    assert layer_params(s, 143) == 143 * 768
    assert layer_params(s, 144) == 576 * 192  # at break-even: dense
    assert layer_params(s, None) == 576 * 192
    assert layer_params(s, 100, pivga=True) == 100 * 768 - 100 * 100
    sb = LayerShape(10, 6, bias=True)
    assert layer_params(sb, 2) == 2 * 16 + 10 and layer_params(sb, None) == 70


def test_compress_counts_match_the_built_model(tiny_model, tokenizer, text_file):
    from svdpress.pipeline import compress

    dense_total = model_params(tiny_model)
    shapes = {t.name: t.shape for t in find_targets(tiny_model)}
    cfg = CompressConfig(ratio=0.6, calib=text_file, calib_samples=8, calib_seqlen=64, progress=False)
    model, report = compress(tiny_model, cfg, tokenizer=tokenizer)
    p = report["params"]
    assert p["linear_kept"] <= 0.6 * p["linear_dense"]
    assert p["linear_dense"] == count_params(shapes)
    # the counting function agrees with the tensors actually in the model
    assert dense_total - model_params(model) == p["linear_dense"] - p["linear_kept"]
    assert p["model_compressed"] == model_params(model)
    ranks = {n: x["rank"] for n, x in report["layers"].items()}
    assert p["linear_kept"] == count_params(shapes, ranks)
    assert all(r is not None for r in ranks.values())


def test_ratio_one_keeps_everything_dense(tiny_model, tokenizer, text_file):
    from svdpress.pipeline import compress

    cfg = CompressConfig(ratio=1.0, calib=text_file, calib_samples=2, calib_seqlen=32, progress=False)
    _, report = compress(tiny_model, cfg, tokenizer=tokenizer)
    assert report["params"]["linear_ratio"] == 1.0


def test_save_load_gives_identical_logits(tiny_model, tokenizer, text_file, tmp_path):
    import svdpress
    from transformers import AutoModelForCausalLM

    out = tmp_path / "compressed"
    cfg = CompressConfig(ratio=0.5, calib=text_file, calib_samples=8, calib_seqlen=64, progress=False, out=str(out))
    model, report = svdpress.compress(tiny_model, cfg, tokenizer=tokenizer)
    x = torch.randint(0, len(tokenizer), (2, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(input_ids=x).logits
    assert (out / "svdpress.json").is_file() and (out / "model.safetensors.index.json").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "temporary directory left behind"
    loaded, _ = svdpress.load(str(out))
    hf = AutoModelForCausalLM.from_pretrained(str(out), trust_remote_code=True)
    for m in (loaded, hf):
        m.eval()
        assert type(m.model.layers[0].self_attn.q_proj).__name__ == "LowRankLinear"
        with torch.no_grad():
            torch.testing.assert_close(m(input_ids=x).logits, ref, rtol=0, atol=1e-5)
    ranks = {n: x["rank"] for n, x in report["layers"].items()}
    saved = hf.config.svdpress["layers"]
    assert {n: s["rank"] for n, s in saved.items()} == {n: r for n, r in ranks.items() if r is not None}


def test_existing_output_is_not_clobbered(tiny_model, tokenizer, text_file, tmp_path):
    import svdpress
    from svdpress.errors import SvdpressError

    out = tmp_path / "o"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    cfg = CompressConfig(ratio=0.5, calib=text_file, calib_samples=2, calib_seqlen=32, progress=False, out=str(out))
    with pytest.raises(SvdpressError, match="--overwrite"):
        svdpress.compress(tiny_model, cfg, tokenizer=tokenizer)
    assert (out / "keep.txt").read_text() == "mine"

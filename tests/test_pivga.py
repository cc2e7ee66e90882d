"""PivGa: lossless gauge fixing of low-rank layers, exact parameter savings, export round trip, CLI."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
import torch.nn as nn

from svdpress.config import CompressConfig
from svdpress.errors import SvdpressError
from svdpress.lowrank import LowRankLinear, PivGaLinear, set_module
from svdpress.model import Placement, Runner, arch_map
from svdpress.params import LayerShape, count_params, layer_params, model_params
from svdpress.pivga import absorbers_of, apply_pivga, merge_reports, to_pivga


def find_targets(model: nn.Module):
    return arch_map(model).targets


def factor_all(model: nn.Module, rank: int) -> None:
    """Every target layer as a LowRankLinear of the truncated SVD at `rank` (A = U√S, B = √S Vᵀ)."""
    for t in find_targets(model):
        lin = model.get_submodule(t.name)
        U, S, V = torch.linalg.svd(lin.weight.detach().double(), full_matrices=False)
        s = S[:rank].sqrt()
        bias = lin.bias.detach() if lin.bias is not None else None
        set_module(model, t.name, LowRankLinear.from_factors((U[:, :rank] * s).float(), (s[:, None] * V[:rank]).float(),
                                                             bias))


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def random_lowrank(m: int, n: int, r: int, bias: bool = False, decay: float = 0.0, seed: int = 0) -> LowRankLinear:
    """Random factors; `decay` > 0 gives a real-looking spectrum S_j = j^-decay split as A = U√S, B = √S V."""
    g = torch.Generator().manual_seed(seed)
    U = torch.linalg.qr(torch.randn(m, r, generator=g, dtype=torch.float64))[0]
    V = torch.linalg.qr(torch.randn(n, r, generator=g, dtype=torch.float64))[0].T
    s = torch.arange(1, r + 1, dtype=torch.float64) ** (-decay / 2) if decay else torch.ones(r, dtype=torch.float64)
    A, B = (U * s).float(), (s[:, None] * V).float()
    if not decay:
        A, B = torch.randn(m, r, generator=g), torch.randn(r, n, generator=g)
    b = torch.randn(m, generator=g) if bias else None
    return LowRankLinear.from_factors(A, B, b)


def n_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


SHAPES = [(576, 576, 172, False, 0.0), (192, 576, 100, False, 2.0), (1536, 576, 270, False, 1.0),
          (576, 1536, 270, False, 2.0), (10, 6, 3, True, 0.0), (80, 64, 64, True, 1.0)]


@pytest.mark.parametrize("m,n,r,bias,decay", SHAPES)
def test_pivga_layer_is_lossless_and_saves_r_squared(m, n, r, bias, decay):
    low = random_lowrank(m, n, r, bias, decay)
    piv = to_pivga(low)
    x = torch.randn(3, 7, n, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert rel(piv(x), low(x)) <= 1e-5
    assert piv.perm.dtype == torch.int64 and sorted(piv.perm.tolist()) == list(range(n))
    shape = LayerShape(m, n, bias)
    assert n_params(piv) == r * (m + n) - r * r + (m if bias else 0) == layer_params(shape, r, pivga=True)
    assert n_params(low) - n_params(piv) == r * r
    assert piv.D.weight.numel() == 0 or piv.D.weight.abs().max() < 50  # pivoting keeps |D| bounded


def test_rank_deficient_factor_is_handled_without_nan():
    low = random_lowrank(48, 32, 8)
    with torch.no_grad():
        low.B.weight[5] = low.B.weight[2]  # duplicate rows: B (and A·B) has rank 7
        low.B.weight[7] = 2 * low.B.weight[0]  # rank 6
    piv = to_pivga(low)
    assert piv.rank == 6
    x = torch.randn(5, 32)
    with torch.no_grad():
        y = piv(x)
        assert torch.isfinite(y).all() and torch.isfinite(piv.D.weight).all()
        assert rel(y, low(x)) <= 1e-5
    zero = LowRankLinear.from_factors(torch.randn(4, 2), torch.zeros(2, 6))
    with pytest.raises(SvdpressError, match="zero"):
        to_pivga(zero)


def test_rank_deficient_layer_is_reported_in_model(tiny_model):
    layer = tiny_model.model.layers[0].self_attn.q_proj
    low = random_lowrank(layer.out_features, layer.in_features, 6)
    with torch.no_grad():
        low.B.weight[3] = low.B.weight[1]
    tiny_model.model.layers[0].self_attn.q_proj = low
    report = apply_pivga(tiny_model, progress=False)
    name = "model.layers.0.self_attn.q_proj"
    assert report["rank_reduced"] == {name: (6, 5)}
    assert report["per_layer"] == {name: 25} and report["params_saved"] == 25


class NotElementwise(nn.Module):
    """Has gate/up/down names but mixes features between gate and down: the permutation must not be absorbed."""

    def __init__(self, low):
        super().__init__()
        self.gate_proj, self.up_proj = nn.Linear(8, 12), nn.Linear(8, 12)
        self.down_proj = low

    def forward(self, x):
        return self.down_proj(self.gate_proj(x).flip(-1) * self.up_proj(x))


def test_permutation_absorbed_only_where_it_is_exact(tiny_model):
    odd = NotElementwise(random_lowrank(5, 12, 4))
    x = torch.randn(2, 8)
    with torch.no_grad():
        ref = odd(x)
    report = apply_pivga(odd, absorbers={"down_proj": ["gate_proj", "up_proj"]}, progress=False)
    assert report["absorbed"] == [] and report["layers"]["down_proj"]["gather"]
    with torch.no_grad():
        assert rel(odd(x), ref) <= 1e-5

    factor_all(tiny_model, 10)
    ids = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = tiny_model(input_ids=ids).logits
    report = apply_pivga(tiny_model, progress=False)  # pairs from the architecture map of the factored model
    assert sorted(report["absorbed"]) == [f"model.layers.{i}.mlp.down_proj" for i in range(2)]
    down = tiny_model.model.layers[0].mlp.down_proj
    assert torch.equal(down.perm, torch.arange(down.in_features))  # gate/up now emit the skeleton first
    with torch.no_grad():
        assert rel(tiny_model(input_ids=ids).logits, ref) <= 1e-5


def test_absorbers_come_from_the_architecture_map(tiny_model):
    """The pairs of the dense model's map; a factored model's map lists none (its consumers are no longer
    nn.Linear), so they are rebuilt from the declared family."""
    dense = arch_map(tiny_model).absorbers
    assert dense == {f"model.layers.{i}.mlp.down_proj": [f"model.layers.{i}.mlp.{p}_proj" for p in ("gate", "up")]
                     for i in range(2)}
    factor_all(tiny_model, 10)
    assert absorbers_of(tiny_model) == dense
    assert absorbers_of(tiny_model, consumers=["model.layers.1.mlp.down_proj"]) == {
        "model.layers.1.mlp.down_proj": dense["model.layers.1.mlp.down_proj"]}
    report = apply_pivga(tiny_model, absorbers={}, progress=False)  # no pairs: every layer keeps its gather
    assert report["absorbed"] == [] and all(x["gather"] for x in report["layers"].values())


@pytest.mark.parametrize("family", ["opt", "gpt_neox"])
def test_other_families_absorb_their_declared_pairs(family):
    """OPT's fc1 → fc2 (checked on the whole decoder layer, their common parent) and GPT-NeoX's MLP."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM, OPTConfig, OPTForCausalLM

    torch.manual_seed(0)
    if family == "opt":
        model = OPTForCausalLM(OPTConfig(vocab_size=100, hidden_size=32, ffn_dim=64, num_hidden_layers=2,
                                         num_attention_heads=4, max_position_embeddings=64, word_embed_proj_dim=32))
        consumer = "model.decoder.layers.{}.fc2"
    else:
        model = GPTNeoXForCausalLM(GPTNeoXConfig(vocab_size=100, hidden_size=32, intermediate_size=64,
                                                 num_hidden_layers=2, num_attention_heads=4,
                                                 max_position_embeddings=64))
        consumer = "gpt_neox.layers.{}.mlp.dense_4h_to_h"
    model.eval()
    factor_all(model, 8)
    ids = torch.randint(0, 100, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(input_ids=ids).logits
    report = apply_pivga(model, progress=False)
    assert report["absorbed"] == [consumer.format(i) for i in range(2)]
    with torch.no_grad():
        assert rel(model(input_ids=ids).logits, ref) <= 1e-5


def test_per_block_conversion_equals_whole_model(tiny_model):
    """One block at a time (as the streaming export does, with the map of the dense model) gives the very same
    tensors and the same report as one whole-model call."""
    arch = arch_map(tiny_model)
    factor_all(tiny_model, 10)
    whole, blocks = tiny_model, copy.deepcopy(tiny_model)
    report = apply_pivga(whole, progress=False)
    per_block = [apply_pivga(blocks, arch, names=[t.name for t in arch.in_block(i)], progress=False)
                 for i in range(arch.num_blocks)]
    merged = merge_reports(per_block)
    assert merged == report
    assert sorted(merged["absorbed"]) == [f"model.layers.{i}.mlp.down_proj" for i in range(2)]
    a, b = whole.state_dict(), blocks.state_dict()
    assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)
    # names that are not LowRankLinear (already converted, dense, or missing) are skipped
    assert apply_pivga(blocks, arch, names=["model.layers.0.mlp.down_proj", "no.such.layer"], progress=False)[
        "layers"] == {}
    with pytest.raises(SvdpressError, match="no LowRankLinear"):
        apply_pivga(blocks, progress=False)


def test_per_block_conversion_of_a_disk_streamed_model(tiny_model, tmp_path):
    """Gauge fixing inside the runner's block rebuild: the block is materialized, its other blocks sit on the
    meta device, and the result is the whole-model conversion."""
    from svdpress.model.weights import OffloadFolder

    if not hasattr(Runner, "rebuild_block"):
        pytest.skip("the runner has no rebuild_block")
    factor_all(tiny_model, 10)
    whole = copy.deepcopy(tiny_model)
    report = apply_pivga(whole, progress=False)
    ids = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = whole(input_ids=ids).logits
    folder = OffloadFolder(str(tmp_path))
    with Runner(tiny_model, Placement(offload="disk")) as runner:
        arch, reports = runner.arch, []
        for i in range(arch.num_blocks):
            names = [n for n, m in runner.blocks[i].named_modules(prefix=arch.block_prefix(i))
                     if type(m) is LowRankLinear]
            runner.rebuild_block(i, lambda _b, names=names: reports.append(
                apply_pivga(runner.model, names=names, progress=False)), folder.write)
        assert merge_reports(reports) == report
        assert type(tiny_model.model.layers[1].mlp.down_proj) is PivGaLinear
        with runner.streamed() as model, torch.no_grad():
            torch.testing.assert_close(model(input_ids=ids).logits, ref, rtol=0, atol=1e-6)
    folder.close()


def test_compress_with_pivga_counts_and_round_trips(tiny_model, tokenizer, text_file, tmp_path):
    """compress(pivga=True) meets the budget under PivGa counting, so every layer gets at least the rank of the plain
    run (some more); the manifest counts the gauge-fixed model exactly. Today's PivGa-after-allocation, the plain
    model gauge-fixed in place, stays lossless and exactly Σ r² smaller."""
    import svdpress
    from transformers import AutoModelForCausalLM

    shapes = {t.name: t.shape for t in find_targets(tiny_model)}
    dense_total = model_params(tiny_model)
    base = CompressConfig(ratio=0.6, calib=text_file, calib_samples=8, calib_seqlen=64, progress=False)
    ids = torch.randint(0, len(tokenizer), (2, 20), generator=torch.Generator().manual_seed(1))
    plain, plain_report = svdpress.compress(copy.deepcopy(tiny_model), base, tokenizer=tokenizer)
    plain_ranks = {n: x["rank"] for n, x in plain_report["layers"].items()}
    after = copy.deepcopy(plain)
    saved = apply_pivga(after, progress=False)["params_saved"]
    with torch.no_grad():
        assert rel(after(input_ids=ids).logits, plain(input_ids=ids).logits) <= 1e-5
    assert saved == sum(r * r for r in plain_ranks.values() if r is not None)
    assert model_params(plain) - model_params(after) == saved

    out = tmp_path / "piv"
    model, report = svdpress.compress(tiny_model, dataclasses.replace(base, pivga=True, out=str(out)), tokenizer=tokenizer)
    with torch.no_grad():
        got = model(input_ids=ids).logits
    assert plain_report["allocation"]["budget_counting"] == "classical"
    assert report["allocation"]["budget_counting"] == "pivga"
    ranks = {n: x["rank"] for n, x in report["layers"].items()}
    assert all(ranks[n] >= plain_ranks[n] for n in ranks) and any(ranks[n] > plain_ranks[n] for n in ranks)
    p = report["params"]
    target = int(0.6 * p["linear_dense"])
    assert p["linear_kept"] == count_params(shapes, ranks, pivga=True) <= target
    assert target - p["linear_kept"] < sum(s.m + s.n for s in shapes.values())  # uniform: < 1 rank a layer
    assert p["linear_dense"] - p["linear_kept"] == dense_total - model_params(model)
    assert report["pivga_report"]["params_saved"] == sum(r * r for r in ranks.values() if r is not None)
    assert report["ratio"]["achieved"] == p["linear_ratio"]
    for name, x in report["layers"].items():
        assert x["params"] == layer_params(shapes[name], x["rank"], pivga=True)

    loaded, _ = svdpress.load(str(out))
    hf = AutoModelForCausalLM.from_pretrained(str(out), trust_remote_code=True)
    for m in (loaded, hf):
        m.eval()
        q = m.model.layers[0].self_attn.q_proj
        assert type(q).__name__ == "PivGaLinear" and q.perm.dtype == torch.int64
        assert torch.equal(q.perm, model.model.layers[0].self_attn.q_proj.perm)
        with torch.no_grad():
            torch.testing.assert_close(m(input_ids=ids).logits, got, rtol=0, atol=1e-6)
    assert {s["kind"] for s in hf.config.svdpress["layers"].values()} == {"pivga"}


def test_cli_pivga_converts_a_compressed_directory(tiny_model, tokenizer, text_file, tmp_path, capsys):
    import svdpress
    from svdpress.cli import main
    from svdpress.export import read_manifest

    src, dst = tmp_path / "svd", tmp_path / "svd-pivga"
    cfg = CompressConfig(ratio=0.5, calib=text_file, calib_samples=4, calib_seqlen=32, progress=False, out=str(src))
    model, report = svdpress.compress(tiny_model, cfg, tokenizer=tokenizer)
    assert main(["pivga", str(src), "--out", str(dst), "--no-progress"]) == 0
    man = read_manifest(dst)
    ranks = {n: x["rank"] for n, x in report["layers"].items()}
    saved = sum(r * r for r in ranks.values() if r is not None)
    assert man["pivga"] and man["pivga_report"]["params_saved"] == saved
    assert man["params"]["linear_kept"] == report["params"]["linear_kept"] - saved
    assert (dst / "ranks.json").is_file()
    loaded, _ = svdpress.load(str(dst))
    ids = torch.randint(0, len(tokenizer), (1, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert rel(loaded(input_ids=ids).logits, model(input_ids=ids).logits) <= 1e-5
    capsys.readouterr()
    assert main(["pivga", str(dst), "--out", str(tmp_path / "again")]) == 2  # already PivGa: one-line error
    assert "already" in capsys.readouterr().err


@pytest.mark.slow
def test_real_layers_are_lossless():
    """SmolLM2-135M's own weights, plain truncated SVD at the 0.6 uniform rank: PivGa changes nothing."""
    from svdpress.models import load_model

    model, _, _ = load_model("default")
    for t in find_targets(model)[:7]:
        W = model.get_submodule(t.name).weight.double()
        U, S, V = torch.linalg.svd(W, full_matrices=False)
        r = int(0.6 * t.shape.m * t.shape.n / (t.shape.m + t.shape.n))
        s = S[:r].sqrt()
        low = LowRankLinear.from_factors((U[:, :r] * s).float(), (s[:, None] * V[:r]).float())
        piv = to_pivga(low)
        x = torch.randn(64, t.shape.n)
        with torch.no_grad():
            assert rel(piv(x), low(x)) <= 1e-5, t.name
        assert n_params(low) - n_params(piv) == r * r


def test_gradients_flow_like_the_lowrank_layer():
    """The in-place GEMM over the gathered copy must not break autograd (healing trains these layers)."""
    low = random_lowrank(24, 16, 6, bias=True)
    piv = to_pivga(low)
    x1 = torch.randn(4, 16, requires_grad=True)
    x2 = x1.detach().clone().requires_grad_(True)
    low(x1).square().sum().backward()
    piv(x2).square().sum().backward()
    assert rel(x2.grad, x1.grad) <= 1e-5
    assert piv.D.weight.grad is not None and torch.isfinite(piv.C.weight.grad).all()

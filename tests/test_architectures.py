"""Every declared family (MoE included), compress → export → reload, from a tiny random config (issue #14).

For each family a tiny model is built from its config class (no hub), compressed with two method combinations
(svd-llm + uniform, kfac + lems, svd-llm + fermigrad with 2 steps; PivGa on one of them), saved,
and loaded back twice: with `svdpress.load` and with `AutoModelForCausalLM.from_pretrained(dir,
trust_remote_code=True)`. The three models must give the same logits (fp32, ≤ 1e-5 relative), and the manifest's
parameter counts must equal a direct count of the loaded model's tensors (an answer independent of params.py).
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn as nn

import svdpress
from svdpress.config import CompressConfig
from svdpress.lowrank import LAYER_KINDS

transformers = pytest.importorskip("transformers")
from transformers import AutoConfig, AutoModelForCausalLM  # noqa: E402
from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES  # noqa: E402

BASE = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=8, max_position_embeddings=128, pad_token_id=0, bos_token_id=1,
            eos_token_id=2, initializer_range=0.2)
CONFIGS = {
    "llama": dict(tie_word_embeddings=False),
    "mistral": {},
    "qwen2": dict(tie_word_embeddings=True),
    "qwen3": {},
    "gemma2": dict(final_logit_softcapping=2.0),
    "gemma3_text": dict(final_logit_softcapping=2.0, rope_local_base_freq=10.0,
                        layer_types=["sliding_attention", "full_attention"]),
    "phi3": dict(tie_word_embeddings=False),
    "olmo2": {},
    "gpt_neox": dict(tie_word_embeddings=False),
    "opt": dict(ffn_dim=64, word_embed_proj_dim=32),
    "gpt2": dict(n_embd=32, n_layer=2, n_head=4, n_positions=128, n_inner=64, bos_token_id=1, eos_token_id=2),
    # MoE: every routed expert's matrices are targets (svdpress.moe)
    "mixtral": dict(num_local_experts=4, num_experts_per_tok=2),
    "qwen2_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=24,
                      shared_expert_intermediate_size=32, decoder_sparse_step=1, mlp_only_layers=[]),
    "qwen3_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=24, decoder_sparse_step=1,
                      mlp_only_layers=[]),
    "olmoe": dict(num_experts=4, num_experts_per_tok=2),
}
GPT2_KEEP = ("vocab_size",)  # GPT-2's config takes its own names; only these come from BASE/the tokenizer

UNIFORM = ("svd-llm", "uniform", {})
SECOND = [("kfac", "lems", dict(probe_samples=2, probe_seqlen=32, rank_multiple=2)),
          ("svd-llm", "fermigrad", dict(steps=2, samples=4, seqlen=32, batch_size=2, r_min=2))]
FAMILIES = list(CONFIGS)
CALIB = dict(calib_samples=4, calib_seqlen=32, calib_batch_size=4)


def build(model_type: str, vocab: int) -> nn.Module:
    if model_type not in CONFIG_MAPPING_NAMES:
        pytest.skip(f"transformers {transformers.__version__} has no {model_type}")
    kw = dict(CONFIGS[model_type], vocab_size=vocab)
    if model_type != "gpt2":
        kw = {**BASE, **kw}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cfg = AutoConfig.for_model(model_type, **kw)
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(cfg).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # random norms and biases, so that a lost or doubled norm/bias shows in the logits
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn(p.shape, generator=g))
    return model


def direct_count(model: nn.Module) -> int:
    """Parameters of a model counted by hand from its tensors (tied tensors once, by storage)."""
    seen = {}
    for p in model.parameters():
        seen[p.data_ptr()] = p.numel()
    return sum(seen.values())


def factored_layers(model: nn.Module) -> set[str]:
    """Names of the factored layers (by class name: the remote code's lowrank.py is its own module copy)."""
    kinds = {k.__name__ for k in LAYER_KINDS.values()}
    return {n for n, m in model.named_modules() if type(m).__name__ in kinds}


def logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits.double()


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def runs_for(i: int, model_type: str):
    """Three compressions per family: svd-llm + uniform (PivGa on every other family), kfac + lems and svd-llm +
    fermigrad (2 steps), the last two with PivGa on the families the first has it not."""
    return [(*UNIFORM, i % 2 == 1), (*SECOND[0], i % 2 == 0), (*SECOND[1], False)]


@pytest.mark.parametrize("model_type", FAMILIES)
def test_round_trip(model_type, tokenizer, text_file, tmp_path):
    i = FAMILIES.index(model_type)
    vocab = len(tokenizer)
    ids = torch.randint(3, vocab - 1, (2, 16), generator=torch.Generator().manual_seed(2))
    for k, (fac, alloc, options, pivga) in enumerate(runs_for(i, model_type)):
        model = build(model_type, vocab)
        dense_logits = logits(model, ids)
        out = tmp_path / f"out{k}"
        cfg = CompressConfig(factorize=fac, allocate=alloc, ratio=0.6, calib=text_file, options=dict(options),
                             pivga=pivga, out=str(out), progress=False, **CALIB)
        compressed, report = svdpress.compress(model, cfg, tokenizer=tokenizer)
        what = f"{model_type} {fac}+{alloc}{' pivga' if pivga else ''}"
        ref = logits(compressed, ids)
        assert torch.isfinite(ref).all(), what
        assert rel(ref, dense_logits) > 1e-4, f"{what}: compression changed nothing"
        factored = factored_layers(compressed)
        assert factored, f"{what}: no layer was factored"

        loaded, _ = svdpress.load(str(out))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            hf = AutoModelForCausalLM.from_pretrained(str(out), trust_remote_code=True)
        for name, m in (("svdpress.load", loaded), ("from_pretrained", hf)):
            m.eval()
            got = factored_layers(m)
            assert got == factored, f"{what} via {name}: factored layers differ"
            assert rel(logits(m, ids), ref) <= 1e-5, f"{what} via {name}: logits differ"
            assert report["params"]["model_compressed"] == direct_count(m), f"{what} via {name}: model count"
        # the linear layers' count in the manifest, against the factored and dense target tensors in the model
        p = report["params"]
        layers = report["layers"]
        kept = sum(sum(t.numel() for t in loaded.get_submodule(n).parameters()) for n in layers)
        assert kept == p["linear_kept"], f"{what}: linear count {p['linear_kept']} vs {kept} in the tensors"
        dense = sum(layers[n]["dense_params"] for n in layers)
        assert dense == p["linear_dense"]
        assert p["linear_kept"] <= 0.6 * p["linear_dense"] + 1, f"{what}: over budget"


def test_conv1d_is_the_transposed_linear_map(tokenizer):
    """GPT-2's Conv1D computes x·W + b with W (in, out): the runner hands the factorizers Wᵀ (out, in), the shape
    in the architecture map is (out, in), and y = x·(Wᵀ)ᵀ + b reproduces the layer."""
    from svdpress.model import Placement, Runner

    model = build("gpt2", len(tokenizer))
    x = torch.randn(3, 5, 32, generator=torch.Generator().manual_seed(0))
    with Runner(model, Placement(offload="none")) as runner:
        names = [t.name for t in runner.arch.targets]
        assert names == [f"transformer.h.{i}.{p}" for i in range(2)
                         for p in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")]
        for t in runner.arch.targets:
            layer = model.get_submodule(t.name)
            W = runner.weight(t.name)
            assert (t.shape.m, t.shape.n) == tuple(W.shape) == tuple(layer.weight.shape[::-1])
            xin = x if t.shape.n == 32 else torch.randn(3, 5, t.shape.n, generator=torch.Generator().manual_seed(1))
            with torch.no_grad():
                torch.testing.assert_close(xin @ W.T + layer.bias, layer(xin))


# ---- fused projections: --split-fused ----------------------------------------------------------------------

@pytest.mark.parametrize("model_type", ["phi3", "gpt_neox", "gpt2"])
def test_split_fused_layers_are_exact(model_type, tokenizer):
    """Splitting a fused layer into its parts changes no output (GPT-NeoX's parts interleave per head), and each
    part holds the rows of the fused weight written out by hand from the modeling code."""
    from svdpress.model import arch_map
    from svdpress.model.fused import split_fused

    model = build(model_type, len(tokenizer))
    ids = torch.randint(3, len(tokenizer) - 1, (2, 10), generator=torch.Generator().manual_seed(0))
    before = logits(model, ids)
    W = {t.name: (model.get_submodule(t.name).weight.t() if model_type == "gpt2"
                  else model.get_submodule(t.name).weight).detach().clone() for t in arch_map(model).targets}
    names = split_fused(model)
    torch.testing.assert_close(logits(model, ids), before, rtol=0, atol=1e-10)
    paths = {t.path for t in arch_map(model).targets}
    if model_type == "phi3":  # q: 4 heads·8, k, v: 2 heads·8; gate, up: 64 each
        assert {"self_attn.qkv_proj.q", "self_attn.qkv_proj.k", "self_attn.qkv_proj.v", "mlp.gate_up_proj.gate",
                "mlp.gate_up_proj.up"} <= paths
        w = W["model.layers.0.self_attn.qkv_proj"]
        torch.testing.assert_close(model.model.layers[0].self_attn.qkv_proj.k.weight, w[32:48])
        torch.testing.assert_close(model.model.layers[0].mlp.gate_up_proj.up.weight,
                                   W["model.layers.0.mlp.gate_up_proj"][64:])
    elif model_type == "gpt_neox":  # per head h (d = 8): q rows 24h..24h+7, k the next 8, v the next 8
        assert {"attention.query_key_value.q", "attention.query_key_value.k"} <= paths
        w = W["gpt_neox.layers.0.attention.query_key_value"]
        k_rows = [24 * h + 8 + t for h in range(4) for t in range(8)]
        torch.testing.assert_close(model.gpt_neox.layers[0].attention.query_key_value.k.weight, w[k_rows])
    else:  # GPT-2: c_attn columns [q | k | v] of n_embd each (Conv1D weight transposed)
        w = W["transformer.h.0.attn.c_attn"]
        torch.testing.assert_close(model.transformer.h[0].attn.c_attn.v.weight, w[64:96])
    assert len(names) == len([t for t in W if t.endswith(("qkv_proj", "gate_up_proj", "query_key_value",
                                                            "c_attn"))])


@pytest.mark.parametrize("model_type", ["phi3", "gpt_neox", "gpt2"])
def test_split_fused_round_trip(model_type, tokenizer, text_file, tmp_path):
    model = build(model_type, len(tokenizer))
    ids = torch.randint(3, len(tokenizer) - 1, (2, 16), generator=torch.Generator().manual_seed(2))
    cfg = CompressConfig(ratio=0.6, calib=text_file, split_fused=True, out=str(tmp_path / "o"), progress=False,
                         **CALIB)
    compressed, report = svdpress.compress(model, cfg, tokenizer=tokenizer)
    ref = logits(compressed, ids)
    parts = [n for n in report["layers"] if n.endswith((".q", ".k", ".v", ".gate", ".up"))]
    assert parts and all(report["layers"][n]["rank"] for n in parts)
    loaded, _ = svdpress.load(str(tmp_path / "o"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf = AutoModelForCausalLM.from_pretrained(str(tmp_path / "o"), trust_remote_code=True)
    for m in (loaded, hf):
        assert factored_layers(m.eval()) == factored_layers(compressed)
        assert rel(logits(m, ids), ref) <= 1e-5
        assert report["params"]["model_compressed"] == direct_count(m)


# ---- --budget-of model -------------------------------------------------------------------------------------

def _counts(model: nn.Module) -> tuple[int, int, int]:
    """(every parameter, the target layers' dense weights+biases, their count at rank 1), by hand: Llama's seven
    projections per block, no biases."""
    total = direct_count(model)
    lin = one = 0
    for blk in model.model.layers:
        for m in (blk.self_attn.q_proj, blk.self_attn.k_proj, blk.self_attn.v_proj, blk.self_attn.o_proj,
                  blk.mlp.gate_proj, blk.mlp.up_proj, blk.mlp.down_proj):
            lin += m.weight.numel()
            one += sum(m.weight.shape)
    return total, lin, one


def test_budget_of_model_counts_every_parameter(tokenizer, text_file):
    model = build("llama", len(tokenizer))
    total, lin, _ = _counts(model)
    ratio = 0.8
    cfg = CompressConfig(ratio=ratio, budget_of="model", calib=text_file, progress=False, **CALIB)
    compressed, report = svdpress.compress(model, cfg, tokenizer=tokenizer)
    kept = direct_count(compressed)
    assert kept <= ratio * total and kept > (ratio - 0.05) * total
    assert report["ratio"]["budget_of"] == "model" and report["ratio"]["achieved"] == kept / total
    other = total - lin  # embeddings, the untied head, norms
    assert report["ratio"]["linear_target"] == pytest.approx((ratio * total - other) / lin)
    assert report["params"]["linear_ratio"] < ratio  # the layers pay for the parameters that stay dense


def test_budget_of_model_below_the_uncompressible_part_names_the_smallest_ratio(tokenizer, text_file):
    from svdpress.errors import SvdpressError

    model = build("llama", len(tokenizer))
    total, lin, one = _counts(model)
    smallest = (total - lin + one) / total
    cfg = CompressConfig(ratio=smallest - 0.01, budget_of="model", calib=text_file, progress=False, **CALIB)
    with pytest.raises(SvdpressError, match=rf"smallest ratio possible is {math.ceil(smallest * 1000) / 1000}"):
        svdpress.compress(model, cfg, tokenizer=tokenizer)
    with pytest.raises(SvdpressError, match="--budget-of 'all' is unknown; choose one of linear, model"):
        CompressConfig(budget_of="all").validate()


# ---- svdpress plan -----------------------------------------------------------------------------------------

def test_plan_counts_by_hand(tiny_model_dir, tmp_path, capsys):
    """conftest's Llama: V×64 tied embeddings, 2 blocks of q,o 64×64, k,v 32×64, gate,up 160×64, down 64×160 and
    two 64-wide norms each, a final norm. Uniform at 0.6: r = ⌊0.6·m·n/(m+n)⌋."""
    import json

    from svdpress.cli import main

    out = tmp_path / "plan.json"
    assert main(["plan", tiny_model_dir, "--ratio", "0.6", "--json", str(out)]) == 0
    p = json.loads(out.read_text())
    V = json.loads((__import__("pathlib").Path(tiny_model_dir) / "config.json").read_text())["vocab_size"]
    shapes = {"self_attn.q_proj": (64, 64), "self_attn.k_proj": (32, 64), "self_attn.v_proj": (32, 64),
              "self_attn.o_proj": (64, 64), "mlp.gate_proj": (160, 64), "mlp.up_proj": (160, 64),
              "mlp.down_proj": (64, 160)}
    lin = sum(m * n for m, n in shapes.values())
    P = p["params"]
    assert P["embeddings"] == V * 64 and P["head"] == 0 and P["head_tied"]
    assert P["per_block"] == [lin + 2 * 64] * 2 and P["other"] == 64
    assert P["total"] == V * 64 + 2 * (lin + 128) + 64 and P["targets_dense"] == 2 * lin
    for path, (m, n) in shapes.items():
        assert p["kinds"][path]["ranks"] == [int(0.6 * m * n / (m + n))], path
    kept = 2 * sum(int(0.6 * m * n / (m + n)) * (m + n) for m, n in shapes.values())
    assert p["target"]["linear_kept_uniform"] == kept
    text = capsys.readouterr().out
    assert "tied to the embeddings" in text and "mlp.down_proj" in text


def test_plan_budget_of_model_and_its_floor(tiny_model_dir, capsys):
    from svdpress.cli import main

    assert main(["plan", tiny_model_dir, "--ratio", "0.9", "--budget-of", "model"]) == 0
    assert "--budget-of model --ratio 0.9" in capsys.readouterr().out
    assert main(["plan", tiny_model_dir, "--ratio", "0.05", "--budget-of", "model"]) != 0
    assert "smallest ratio possible is" in capsys.readouterr().err


def test_split_fused_on_a_family_without_fused_layers_is_an_error(tokenizer, text_file):
    from svdpress.errors import SvdpressError

    model = build("llama", len(tokenizer))
    cfg = CompressConfig(ratio=0.6, calib=text_file, split_fused=True, progress=False, **CALIB)
    with pytest.raises(SvdpressError, match=r"--split-fused: LlamaForCausalLM has no fused projections.*phi3"):
        svdpress.compress(model, cfg, tokenizer=tokenizer)
    with pytest.raises(SvdpressError, match="--split-fused needs the model in memory"):
        CompressConfig(split_fused=True, offload="disk").validate()


def test_cli_budget_of_and_split_fused(tmp_path, capsys):
    """The flags reach the config: a bad --budget-of is argparse's error; --split-fused on Llama is ours."""
    from svdpress.cli import main

    with pytest.raises(SystemExit):
        main(["compress", "--budget-of", "everything"])
    assert "--budget-of" in capsys.readouterr().err


def test_uniform_leaves_biases_whole_within_the_budget():
    """GPT-NeoX/GPT-2/OPT layers have biases: at ratio c a layer may keep c·(m·n + m), its bias m stays whole, so
    the factors get r = ⌊(c·(m·n + m) − m)/(m+n)⌋ (this overran the budget when the bias was forgotten)."""
    from svdpress.allocate import AllocationProblem, allocate
    from svdpress.params import LayerShape, count_params

    shapes = {"a": LayerShape(128, 32, True), "b": LayerShape(64, 16, True), "c": LayerShape(40, 40, False)}
    for c in (0.2, 0.4, 0.6):
        ranks = allocate(AllocationProblem(shapes, {}, c, progress=False), "uniform").ranks
        want = {n: int((c * s.dense - (s.m if s.bias else 0)) / (s.m + s.n)) for n, s in shapes.items()}
        assert ranks == {n: max(1, r) for n, r in want.items()}
        assert c == 0.6 or ranks["a"] < int(c * 128 * 32 / 160)  # forgetting the bias would give one more
        assert count_params(shapes, ranks) <= c * sum(s.dense for s in shapes.values())


# ---- --lm-head ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("model_type", ["llama", "gpt_neox"])
def test_lm_head_factored_round_trip(model_type, tokenizer, text_file, tmp_path):
    """An untied head becomes a LowRankLinear at the uniform fraction of its own parameters; both loaders give
    the same logits, the manifest counts the tensors, and the runner's chunked head (A_c·B) gives the model's NLL."""
    from svdpress.model import Placement, Runner

    model = build(model_type, len(tokenizer))
    head = "lm_head"
    V, d = model.get_submodule(head).weight.shape
    ids = torch.randint(3, len(tokenizer) - 1, (2, 16), generator=torch.Generator().manual_seed(2))
    cfg = CompressConfig(ratio=0.6, calib=text_file, lm_head=True, out=str(tmp_path / "o"), progress=False, **CALIB)
    compressed, report = svdpress.compress(model, cfg, tokenizer=tokenizer)
    assert type(compressed.get_submodule(head)).__name__ == "LowRankLinear"
    assert report["layers"][head]["rank"] == int(0.6 * V * d / (V + d))
    ref = logits(compressed, ids)
    loaded, _ = svdpress.load(str(tmp_path / "o"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf = AutoModelForCausalLM.from_pretrained(str(tmp_path / "o"), trust_remote_code=True)
    for m in (loaded, hf):
        assert "lm_head" in factored_layers(m.eval())
        assert rel(logits(m, ids), ref) <= 1e-5
        assert report["params"]["model_compressed"] == direct_count(m)
    kept = sum(sum(t.numel() for t in loaded.get_submodule(n).parameters()) for n in report["layers"])
    assert kept == report["params"]["linear_kept"]
    nll = nn.functional.cross_entropy(ref[:, :-1].reshape(-1, ref.shape[-1]), ids[:, 1:].reshape(-1),
                                      reduction="sum")
    from svdpress.model.head import nll_sum

    with Runner(loaded, Placement(offload="none")) as runner, torch.no_grad():
        (h,) = runner.forward(runner.embed([ids]))
        got = nll_sum(runner.head, runner.final(h)[:, :-1].reshape(-1, d), ids[:, 1:].reshape(-1))
    assert float(got) == pytest.approx(float(nll), rel=1e-5)


def test_lm_head_tied_stays_dense_and_bad_combinations(tokenizer, text_file):
    from svdpress.errors import SvdpressError

    model = build("qwen2", len(tokenizer))  # tied embeddings
    cfg = CompressConfig(ratio=0.6, calib=text_file, lm_head=True, progress=False, **CALIB)
    with pytest.warns(UserWarning, match="tied to the input embeddings; it stays dense"):
        compressed, report = svdpress.compress(model, cfg, tokenizer=tokenizer)
    assert "lm_head" not in report["layers"] and "lm_head" not in factored_layers(compressed)
    for bad, msg in ((dict(factorize="kfac"), "gradient statistics"), (dict(allocate="lems"), "--allocate uniform"),
                     (dict(pivga=True), "--pivga")):
        with pytest.raises(SvdpressError, match=msg):
            CompressConfig(lm_head=True, **bad).validate()


def test_plan_lm_head(tokenizer, tmp_path, capsys):
    import json

    from svdpress.cli import main

    model = build("llama", len(tokenizer))  # untied head
    model.save_pretrained(tmp_path / "m")
    V = len(tokenizer)
    assert main(["plan", str(tmp_path / "m"), "--ratio", "0.6", "--lm-head", "--json", str(tmp_path / "p.json")]) == 0
    p = json.loads((tmp_path / "p.json").read_text())
    assert p["lm_head"] and p["params"]["head"] == V * 32
    assert p["kinds"]["lm_head"]["ranks"] == [int(0.6 * V * 32 / (V + 32))]
    assert "target layers (blocks + head)" in capsys.readouterr().out

"""MoE experts (svdpress.moe): every routed expert's matrices are targets; the split is exact; the statistics of
an expert count only its routed tokens (against a brute-force per-token sum); the fallback rule is applied and
recorded; ranks differ per expert and survive export; routers are never targets. The compress → export → both
loaders round trip of every MoE family with four method combinations is in test_architectures.py."""

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

import svdpress
from svdpress.calibrate import iter_block_stats
from svdpress.config import CompressConfig
from svdpress.errors import SvdpressError
from svdpress.lowrank import ExpertList
from svdpress.model import Runner
from svdpress.moe import MIN_TOKENS, is_experts, split_experts

FAMILIES = {
    "mixtral": dict(num_local_experts=4, num_experts_per_tok=2),
    "qwen2_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=24,
                      shared_expert_intermediate_size=32, decoder_sparse_step=1, mlp_only_layers=[]),
    "qwen3_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=24, decoder_sparse_step=1,
                      mlp_only_layers=[], head_dim=8),
    "olmoe": dict(num_experts=4, num_experts_per_tok=2),
}
E = 4


def tiny(model_type, vocab_size=64):
    torch.manual_seed(0)
    cfg = AutoConfig.for_model(model_type, vocab_size=vocab_size, hidden_size=32, intermediate_size=24,
                               num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                               max_position_embeddings=64, **FAMILIES[model_type])
    cfg._attn_implementation = "eager"
    return AutoModelForCausalLM.from_config(cfg).float().eval()


def ids(n=2, t=24, seed=1, vocab=64):
    return torch.randint(0, vocab, (n, t), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("mt", list(FAMILIES))
def test_experts_are_targets_and_routers_never(mt):
    model = tiny(mt)
    with Runner(model) as runner:
        targets = runner.arch.targets
    experts = [t for t in targets if t.expert]
    assert len(experts) == 2 * E * 2  # 2 blocks × 4 experts × (gate_up_proj, down_proj)
    assert {t.path for t in experts} == {f"mlp.experts.{e}.{p}" for e in range(E)
                                         for p in ("gate_up_proj", "down_proj")}
    names = {t.name for t in targets}
    assert not any(n.endswith((".gate", "router", "shared_expert_gate")) for n in names)
    others = {t.path for t in targets if not t.expert}
    want = {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"}
    if mt == "qwen2_moe":  # shared experts are ordinary targets
        want |= {f"mlp.shared_expert.{p}" for p in ("gate_proj", "up_proj", "down_proj")}
    assert others == want


@pytest.mark.parametrize("mt", list(FAMILIES))
def test_split_is_exact(mt):
    model = tiny(mt)
    x = ids()
    with torch.no_grad():
        ref = model(x).logits
        fused = {n: (m.gate_up_proj.clone(), m.down_proj.clone()) for n, m in model.named_modules() if is_experts(m)}
        slices = split_experts(model)
        out = model(x).logits
    assert not any(is_experts(m) for m in model.modules())
    assert torch.equal(out, ref)  # the same loop in the same order: bit for bit
    for n, (gu, down) in fused.items():
        lst = model.get_submodule(n)
        assert isinstance(lst, ExpertList) and len(lst) == E
        for e in range(E):
            assert torch.equal(lst[e].gate_up_proj.weight, gu[e]) and torch.equal(lst[e].down_proj.weight, down[e])
            assert slices[f"{n}.{e}.down_proj.weight"] == (f"{n}.down_proj", e)


@pytest.mark.parametrize("mt", ["mixtral", "qwen2_moe"])
def test_routed_statistics_equal_brute_force(mt):
    """X·Xᵀ of expert e's layers from the calibration pass = Σ over the tokens routed to e, one token at a time
    in float64, of x xᵀ (gate_up_proj) and h hᵀ (down_proj), h = act(gate x) ⊙ (up x)."""
    model = tiny(mt)
    split_experts(model)
    lists = {n: m for n, m in model.named_modules() if isinstance(m, ExpertList)}
    seen = {}
    hooks = [m.register_forward_pre_hook(lambda m, a, n=n: seen.setdefault(n, []).append(a[:2]))
             for n, m in lists.items()]
    samples = ids(3, 16)
    stats = {}
    for bs in iter_block_stats(model, samples, batch_size=2, progress=False):
        stats.update(bs.inputs)
    for h in hooks:
        h.remove()
    for name, calls in seen.items():
        m = lists[name]
        for e in range(E):
            W = m[e].gate_up_proj.weight.double()
            f = W.shape[0] // 2
            Cgu, Cd, count = torch.zeros(W.shape[1], W.shape[1], dtype=torch.float64), \
                torch.zeros(f, f, dtype=torch.float64), 0
            for x, idx in calls:
                for t in range(x.shape[0]):
                    if e in idx[t].tolist():
                        xt = x[t].double()
                        z = W @ xt
                        h = m.act_fn(z[:f]) * z[f:]
                        Cgu += torch.outer(xt, xt)
                        Cd += torch.outer(h, h)
                        count += 1
            for proj, want in (("gate_up_proj", Cgu), ("down_proj", Cd)):
                got = stats[f"{name}.{e}.{proj}"]
                assert got.tokens == count
                if count:
                    assert ((got.xtx - want).norm() / want.norm()).item() <= 1e-5


def test_fallback_is_applied_and_recorded_and_ranks_differ_per_expert(tokenizer, text_file, tmp_path):
    """Few calibration tokens: experts below MIN_TOKENS routed tokens are factored by plain SVD (the spectrum of
    W itself) and listed in the manifest with every expert layer's token count; lems gives experts ranks of
    their own; export → svdpress.load reproduces the logits and the factored experts."""
    from test_architectures import build, factored_layers, logits, rel

    model = build("olmoe", len(tokenizer))
    out = tmp_path / "o"
    cfg = CompressConfig(factorize="svd-llm", allocate="lems", ratio=0.6, calib=text_file, calib_samples=2,
                         calib_seqlen=8, calib_batch_size=2, progress=False, out=str(out),
                         options=dict(probe_samples=2, probe_seqlen=8, rank_multiple=1))
    compressed, report = svdpress.compress(model, cfg, tokenizer=tokenizer)
    ex = report["experts"]
    tokens = ex["routed_tokens"]
    assert len(tokens) == 2 * E * 2 and sum(tokens[n] for n in tokens if n.endswith("gate_up_proj")) == 2 * 2 * 8 * 2
    assert ex["fell_back"] == [n for n, t in tokens.items() if t < MIN_TOKENS] and ex["fell_back"]
    for n in ex["fell_back"]:
        assert "plain SVD" in report["numerics"][n]
    ranks = {n: report["layers"][n]["rank"] for n in tokens if n.endswith("down_proj")}
    assert len(set(ranks.values())) > 1, ranks  # per-expert ranks
    loaded, _ = svdpress.load(str(out))
    x = torch.randint(3, len(tokenizer) - 1, (2, 12), generator=torch.Generator().manual_seed(3))
    assert factored_layers(loaded) == factored_layers(compressed)
    assert rel(logits(loaded, x), logits(compressed, x)) <= 1e-5


def test_experts_can_be_left_dense_with_ignore(tokenizer, text_file):
    from test_architectures import build

    model = build("mixtral", len(tokenizer))
    cfg = CompressConfig(factorize="svd-llm", allocate="uniform", ratio=0.6, calib=text_file, calib_samples=2,
                         calib_seqlen=16, progress=False, ignore=["re:.*experts.*"])
    compressed, report = svdpress.compress(model, cfg, tokenizer=tokenizer)
    assert not any("experts" in n for n in report["layers"]) and "experts" not in report


def test_non_finite_expert_weights_are_a_clear_error(tokenizer, text_file):
    from test_architectures import build

    model = build("mixtral", len(tokenizer))
    with torch.no_grad():
        model.model.layers[1].mlp.experts.down_proj[2, 0, 0] = float("nan")
    cfg = CompressConfig(factorize="svd-llm", allocate="uniform", ratio=0.6, calib=text_file, calib_samples=2,
                         calib_seqlen=16, progress=False)
    with pytest.raises(SvdpressError, match=r"layer model\.layers\.1\.mlp\.experts\.2\.down_proj: its weights"):
        svdpress.compress(model, cfg, tokenizer=tokenizer)

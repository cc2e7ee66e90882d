"""MoE experts (svdpress.moe): routed statistics against a brute-force per-token sum, the factored experts module
exact at full rank in the whole model, SVD-LLM on routed tokens never worse than plain SVD on them, fallback."""

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from svdpress.errors import SvdpressError
from svdpress.lowrank import set_module
from svdpress.model.arch import arch_map
from svdpress.moe import FactoredExperts, RoutedStats, factor_experts, expert_targets, experts_modules

FAMILIES = {
    "mixtral": dict(num_local_experts=4, num_experts_per_tok=2),
    "qwen2_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=24,
                      shared_expert_intermediate_size=32, decoder_sparse_step=1, mlp_only_layers=[]),
    "qwen3_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=24, decoder_sparse_step=1,
                      mlp_only_layers=[], head_dim=8),
    "olmoe": dict(num_experts=4, num_experts_per_tok=2),
}


def tiny(model_type, vocab_size=64):
    torch.manual_seed(0)
    cfg = AutoConfig.for_model(model_type, vocab_size=vocab_size, hidden_size=32, intermediate_size=24, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                               **FAMILIES[model_type])
    cfg._attn_implementation = "eager"
    return AutoModelForCausalLM.from_config(cfg).float().eval()


def ids(n=2, t=24, seed=1):
    return torch.randint(0, 64, (n, t), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("mt", list(FAMILIES))
def test_experts_are_found_and_routers_never_linear_targets(mt):
    model = tiny(mt)
    mods = experts_modules(model)
    assert len(mods) == 2  # one experts module per block
    E = 4
    assert len(expert_targets(model)) == 2 * E * 2
    names = {t.name for t in arch_map(model).targets}
    assert not any("gate_up" in n and "experts" in n for n in names)  # the linear discovery does not list them
    assert not any(n.endswith((".gate", "router", "shared_expert_gate")) for n in names)
    if mt == "qwen2_moe":  # shared experts are ordinary nn.Linear targets
        assert any("shared_expert.down_proj" in n for n in names)


@pytest.mark.parametrize("mt", list(FAMILIES))
def test_routed_gram_equals_brute_force(mt):
    model = tiny(mt)
    seen = {}
    hooks = [m.register_forward_pre_hook(
        lambda m, a, k, n=n: seen.setdefault(n, []).append([*a, *k.values()][:3]), with_kwargs=True)
        for n, m in experts_modules(model).items()]
    with torch.no_grad(), RoutedStats(model) as st:
        model(ids())
    for h in hooks:
        h.remove()
    for name, calls in seen.items():
        m = experts_modules(model)[name]
        f = m.down_proj.shape[2]
        for e in range(m.gate_up_proj.shape[0]):
            Ggu = torch.zeros(m.gate_up_proj.shape[2], m.gate_up_proj.shape[2], dtype=torch.float64)
            Gd = torch.zeros(f, f, dtype=torch.float64)
            count = 0
            for x, idx, _ in calls:
                for t in range(x.shape[0]):  # one token at a time, in float64
                    if e in idx[t].tolist():
                        xt = x[t].double()
                        z = m.gate_up_proj[e].double() @ xt
                        h = m.act_fn(z[:f]) * z[f:]
                        Ggu += torch.outer(xt, xt)
                        Gd += torch.outer(h, h)
                        count += 1
            key = f"{name}.{e}"
            assert st.tokens[f"{key}.gate_up_proj"] == count
            if count:
                for got, want in ((st.gram[f"{key}.gate_up_proj"], Ggu), (st.gram[f"{key}.down_proj"], Gd)):
                    assert got.dtype == torch.float64  # float32 matmuls, float64 sums: relative error ~1e-7
                    assert ((got - want).norm() / want.norm()).item() <= 1e-5


@pytest.mark.parametrize("mt", list(FAMILIES))
def test_full_rank_factored_experts_reproduce_the_model(mt):
    model = tiny(mt)
    x = ids()
    with torch.no_grad():
        ref = model(x).logits
        with RoutedStats(model) as st:
            model(x)
        for name, m in list(experts_modules(model).items()):
            E, f2, d = m.gate_up_proj.shape
            new, fb = factor_experts(m, [min(f2, d)] * E, [min(f2 // 2, d)] * E, st.gram, st.tokens,
                                                   prefix=name, min_tokens=1)
            set_module(model, name, new)
        out = model(x).logits
    assert not any(is_e for is_e in [type(m).__name__.endswith("Experts") and not isinstance(m, FactoredExperts)
                                     for m in model.modules()])
    assert ((out - ref).norm() / ref.norm()).item() <= 1e-5


def test_routed_whitening_beats_plain_svd_on_routed_tokens_and_fallback_is_recorded():
    model = tiny("mixtral")
    name, m = next(iter(experts_modules(model).items()))
    with torch.no_grad(), RoutedStats(model) as st:
        model(ids(4, 32))
    E = m.gate_up_proj.shape[0]
    r = 6
    whit, fb = factor_experts(m, [r] * E, [r] * E, st.gram, st.tokens, prefix=name, min_tokens=1)
    plain, _ = factor_experts(m, [r] * E, [r] * E, None, prefix=name)
    assert fb == []
    for e in range(E):
        G = st.gram[f"{name}.{e}.gate_up_proj"]
        W = m.gate_up_proj[e].double()
        err = lambda F: torch.trace((W - F.gu_A[e].double() @ F.gu_B[e].double()) @ G
                                    @ (W - F.gu_A[e].double() @ F.gu_B[e].double()).T).item()  # ‖(W−W')X‖²
        assert err(whit) <= err(plain) * (1 + 1e-6)
    counts = [st.tokens[f"{name}.{e}.gate_up_proj"] for e in range(E)]
    thr = sorted(counts)[-1]  # every expert below the largest count falls back
    _, fb = factor_experts(m, [r] * E, [r] * E, st.gram, st.tokens, prefix=name, min_tokens=thr)
    assert fb == [e for e in range(E) if counts[e] < thr] and fb


def test_bad_ranks_are_clear_errors():
    model = tiny("olmoe")
    name, m = next(iter(experts_modules(model).items()))
    with pytest.raises(SvdpressError, match="rank 0 outside"):
        factor_experts(m, [0] * 4, [1] * 4, prefix=name)
    with pytest.raises(SvdpressError, match="need 4 ranks"):
        factor_experts(m, [1] * 3, [1] * 4, prefix=name)


def compress_experts(model, x, rank_of, min_tokens=1):
    """SVD-LLM on the routed Grams with per-expert ranks rank_of(e, proj, full) → names of experts that fell back."""
    with torch.no_grad(), RoutedStats(model) as st:
        model(x)
    fell = {}
    for name, m in list(experts_modules(model).items()):
        E, f2, d = m.gate_up_proj.shape
        new, fb = factor_experts(m, [rank_of(e, "gu", min(f2, d)) for e in range(E)],
                                 [rank_of(e, "down", min(f2 // 2, d)) for e in range(E)], st.gram, st.tokens,
                                 prefix=name, min_tokens=min_tokens)
        set_module(model, name, new)
        fell[name] = fb
    return fell


@pytest.mark.parametrize("mt", list(FAMILIES))
def test_round_trip_both_loaders_and_parameter_count(mt, tmp_path, tokenizer):
    import svdpress
    from svdpress.export import save
    from svdpress.params import model_params

    model = tiny(mt)
    x = ids()
    dense = model_params(model)
    shapes = {n: m.gate_up_proj.shape for n, m in experts_modules(model).items()}
    compress_experts(model, x, lambda e, proj, full: 1 + (e * 3) % full)  # ranks differ per expert
    with torch.no_grad():
        ref = model(x).logits
    # direct count: dense minus every expert's 3-D weights plus its factors r·(2f + d) + r·(d + f)
    expect = dense
    for n, (E, f2, d) in shapes.items():
        expect -= E * f2 * d * 3 // 2
        for e in range(E):
            expect += (1 + (e * 3) % min(f2, d)) * (f2 + d) + (1 + (e * 3) % min(f2 // 2, d)) * (d + f2 // 2)
    assert model_params(model) == expect < dense
    out = save(model, tokenizer, tmp_path / "m", {"params": model_params(model)})
    for load in (lambda: svdpress.load(str(out))[0],
                 lambda: AutoModelForCausalLM.from_pretrained(str(out), trust_remote_code=True).float().eval()):
        m2 = load()
        assert sum(type(m).__name__ == "FactoredExperts" for m in m2.modules()) == len(shapes)
        assert model_params(m2) == expect
        with torch.no_grad():
            got = m2(x).logits
        assert ((got - ref).norm() / ref.norm()).item() <= 1e-5


def test_compress_experts_uniform_counts_and_reports_fallbacks():
    from svdpress.moe import compress_experts, uniform_rank
    from svdpress.params import model_params

    model = tiny("qwen3_moe")
    E, f2, d = next(iter(experts_modules(model).values())).gate_up_proj.shape
    dense = model_params(model)
    rep = compress_experts(model, [ids(1, 8)], 0.5, min_tokens=5)
    r_gu, r_d = uniform_rank(f2, d, 0.5), uniform_rank(d, f2 // 2, 0.5)
    assert (r_gu, r_d) == (int(0.5 * f2 * d / (f2 + d)), int(0.5 * d * f2 // 2 / (d + f2 // 2)))
    per_expert_before, per_expert_after = f2 * d + d * f2 // 2, r_gu * (f2 + d) + r_d * (d + f2 // 2)
    assert model_params(model) == dense - 2 * E * (per_expert_before - per_expert_after)
    for r in rep["experts"].values():  # 8 tokens × top-2 over 4 experts: some see fewer than 5
        assert r["fell_back"] == [e for e, t in enumerate(r["tokens"]) if t < 5]
        assert sum(r["tokens"]) == 8 * 2 and r["fell_back"]  # 16 routings over 4 experts: one sees < 5
    with pytest.raises(SvdpressError, match="ratio must be"):
        compress_experts(tiny("olmoe"), [ids()], 1.5)


@pytest.mark.parametrize("mt", list(FAMILIES))
def test_moe_families_are_declared(mt):
    from svdpress.model.arch import FAMILIES as TABLE

    model = tiny(mt)
    am = arch_map(model)
    assert am.declared and am.model_type == mt
    fam = TABLE[mt]
    assert set(experts_modules(model)) == {f"{am.blocks_path}.{i}.{fam.experts}" for i in range(am.num_blocks)}
    leaves = {t.path for t in am.targets}
    want = {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"}
    if mt == "qwen2_moe":
        want |= {f"mlp.shared_expert.{p}" for p in ("gate_proj", "up_proj", "down_proj")}
    assert leaves == want


def test_non_finite_expert_weights_are_an_error():
    model = tiny("mixtral")
    name, m = next(iter(experts_modules(model).items()))
    with torch.no_grad():
        m.down_proj[2, 0, 0] = float("nan")
    with pytest.raises(SvdpressError, match="non-finite weights in expert 2"):
        factor_experts(m, [4] * 4, [4] * 4, prefix=name)

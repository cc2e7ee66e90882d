"""The architecture map across families, and the runner against each model's own forward.

Tiny random models are built from each family's config class (no hub). The expected layouts below are written
out by hand from the transformers modeling code: an answer independent of `FAMILIES`. Sibling groups are also
checked with forward hooks (the grouped layers receive the very same input tensor object) and absorbers by
permuting the producers' output rows and the consumer's input columns together (the block must not change).
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Optional

import pytest
import torch
import torch.nn as nn

from svdpress.errors import SvdpressError
from svdpress.model import FAMILIES, Placement, Runner, arch_map
from svdpress.model import arch as arch_module
from svdpress.model.head import nll_sum

transformers = pytest.importorskip("transformers")
from transformers import AutoConfig, AutoModelForCausalLM  # noqa: E402
from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES  # noqa: E402

V = 128
BASE = dict(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=8, max_position_embeddings=64, pad_token_id=0, bos_token_id=1,
            eos_token_id=2, initializer_range=0.2)

ATTN = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"]
LLAMA_TARGETS = ATTN + ["self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
LLAMA_PATHS = ("model.layers", "model.embed_tokens", "model.norm", "lm_head")


@dataclasses.dataclass
class Layout:
    paths: tuple[str, str, Optional[str], str]  # blocks, embedding, final norm, head
    targets: list[str]  # block-relative, in the block's order
    groups: list[list[str]]  # block-relative sibling groups (layers reading the same input tensor)
    absorbers: dict[str, list[str]]  # block-relative consumer -> producers
    config: dict = dataclasses.field(default_factory=dict)
    tied: Optional[bool] = None  # the head shares the embedding matrix


LLAMA_LIKE = dict(targets=LLAMA_TARGETS, groups=[ATTN, ["mlp.gate_proj", "mlp.up_proj"]],
                  absorbers={"mlp.down_proj": ["mlp.gate_proj", "mlp.up_proj"]})

LAYOUTS: dict[str, Layout] = {
    "llama": Layout(LLAMA_PATHS, **LLAMA_LIKE, config=dict(tie_word_embeddings=False), tied=False),
    "mistral": Layout(LLAMA_PATHS, **LLAMA_LIKE),
    "qwen2": Layout(LLAMA_PATHS, **LLAMA_LIKE, config=dict(tie_word_embeddings=True), tied=True),
    "qwen3": Layout(LLAMA_PATHS, **LLAMA_LIKE),  # q_norm / k_norm are not targets
    "gemma": Layout(LLAMA_PATHS, **LLAMA_LIKE, tied=True),  # scaled embedding
    "gemma2": Layout(LLAMA_PATHS, **LLAMA_LIKE, config=dict(final_logit_softcapping=2.0), tied=True),
    "gemma3_text": Layout(LLAMA_PATHS, **LLAMA_LIKE, tied=True,
                          config=dict(final_logit_softcapping=2.0, rope_local_base_freq=10.0,
                                      layer_types=["sliding_attention", "full_attention"])),
    "olmo": Layout(LLAMA_PATHS, **LLAMA_LIKE),
    "olmo2": Layout(LLAMA_PATHS, **LLAMA_LIKE),
    "granite": Layout(LLAMA_PATHS, **LLAMA_LIKE, config=dict(
        logits_scaling=4.0, embedding_multiplier=3.0, residual_multiplier=0.5, attention_multiplier=0.3)),
    "smollm3": Layout(LLAMA_PATHS, **LLAMA_LIKE),
    # parallel block: attention and MLP read the one input_layernorm output
    "cohere": Layout(LLAMA_PATHS, targets=LLAMA_TARGETS, groups=[ATTN + ["mlp.gate_proj", "mlp.up_proj"]],
                     absorbers={"mlp.down_proj": ["mlp.gate_proj", "mlp.up_proj"]}, config=dict(logit_scale=0.5),
                     tied=True),
    # fused projections; the fused gate_up feeding down_proj is not an elementwise row-for-row producer
    "phi3": Layout(LLAMA_PATHS, targets=["self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj",
                                         "mlp.down_proj"], groups=[], absorbers={}),
    "gpt_neox": Layout(("gpt_neox.layers", "gpt_neox.embed_in", "gpt_neox.final_layer_norm", "lm_head"),
                       targets=["attention.query_key_value", "attention.dense", "mlp.dense_h_to_4h",
                                "mlp.dense_4h_to_h"], groups=[],  # attention and MLP have their own norms
                       absorbers={"mlp.dense_4h_to_h": ["mlp.dense_h_to_4h"]},
                       config=dict(tie_word_embeddings=False), tied=False),
    "opt": Layout(("model.decoder.layers", "model.decoder.embed_tokens", "model.decoder.final_layer_norm",
                   "lm_head"), targets=ATTN + ["self_attn.out_proj", "fc1", "fc2"], groups=[ATTN],
                  absorbers={"fc2": ["fc1"]}, config=dict(ffn_dim=64, word_embed_proj_dim=32), tied=True),
}
DECLARED = sorted(LAYOUTS)

def _tweak(model: nn.Module) -> nn.Module:
    """Random norm weights and biases, so that forgetting a norm (or applying it twice) shows."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn(p.shape, generator=g))
    return model


def build(model_type: str, **overrides) -> nn.Module:
    if model_type not in CONFIG_MAPPING_NAMES:
        pytest.skip(f"transformers {transformers.__version__} has no {model_type}")
    kw = {**BASE, **(LAYOUTS[model_type].config if model_type in LAYOUTS else {}), **overrides}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cfg = AutoConfig.for_model(model_type, **kw)
        torch.manual_seed(0)
        return _tweak(AutoModelForCausalLM.from_config(cfg).eval())


def ids_for(seed: int = 0, T: int = 12) -> torch.Tensor:
    return torch.randint(3, V - 8, (2, T), generator=torch.Generator().manual_seed(seed))


def reference_nll(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        logits = model(ids).logits.double()
    return nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                                       reduction="sum")


def runner_nll(model: nn.Module, ids: torch.Tensor, offload: str, arch=None) -> torch.Tensor:
    with Runner(model, Placement(offload=offload), arch=arch) as runner:
        states = runner.embed([ids])
        (h,) = runner.forward(states)
        h = runner.final(h)
        head = runner.head
        return sum(nll_sum(head, h[b, :-1], ids[b, 1:]) for b in range(ids.shape[0])).double()


def hook_groups(model: nn.Module, arch, ids: torch.Tensor) -> dict[int, set[frozenset[str]]]:
    """Per block, the target layers that received the very same input tensor object (groups of two or more)."""
    seen: dict[str, torch.Tensor] = {}

    def hook(name):
        def fn(_m, args, _out):
            seen[name] = args[0]  # kept alive: no id reuse
        return fn

    handles = [model.get_submodule(t.name).register_forward_hook(hook(t.name)) for t in arch.targets]
    try:
        with torch.no_grad():
            model(ids)
    finally:
        for h in handles:
            h.remove()
    out: dict[int, set[frozenset[str]]] = {}
    for i in range(arch.num_blocks):
        names = [t.name for t in arch.in_block(i)]
        groups = []
        for n in names:
            g = next((g for g in groups if seen[g[0]] is seen[n]), None)
            g.append(n) if g is not None else groups.append([n])
        out[i] = {frozenset(g) for g in groups if len(g) > 1}
    return out


def _rows(m: nn.Linear) -> list[torch.Tensor]:
    return [t for t in (m.weight, m.bias) if t is not None]


# ---------------------------------------------------------------------------------------------------------------
# 1. The declared table, family by family
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("model_type", DECLARED)
def test_declared_family_layout(model_type):
    spec = LAYOUTS[model_type]
    model = build(model_type)
    arch = arch_map(model)
    assert arch.declared and arch.model_type == model_type
    paths = spec.paths
    if hasattr(model, "embed_out"):  # GPT-NeoX's head before transformers 5
        paths = (*paths[:3], "embed_out")
    assert (arch.blocks_path, arch.embed_path, arch.norm_path, arch.head_path) == paths
    assert arch.num_blocks == 2
    assert model.get_submodule(arch.embed_path) is model.get_input_embeddings()
    assert model.get_submodule(arch.head_path) is model.get_output_embeddings()
    if spec.tied is not None:
        assert (model.get_output_embeddings().weight is model.get_input_embeddings().weight) == spec.tied
    blocks = model.get_submodule(spec.paths[0])
    for i in range(2):
        prefix = f"{spec.paths[0]}.{i}."
        layers = arch.in_block(i)
        assert [t.path for t in layers] == spec.targets
        assert [t.name for t in layers] == [prefix + p for p in spec.targets]
        assert all(t.block == i and t.kind == t.path.rsplit(".", 1)[-1] for t in layers)
        for t in layers:
            w = model.get_submodule(t.name).weight
            assert (t.shape.m, t.shape.n) == tuple(w.shape)
        # nothing forgotten: every nn.Linear of the block is a target
        assert {n for n, m in blocks[i].named_modules() if isinstance(m, nn.Linear)} == set(spec.targets)
        assert {frozenset(g) for g in arch.groups.get(i, [])} == {frozenset(prefix + p for p in g)
                                                                  for g in spec.groups}
    want_absorbers = {f"{spec.paths[0]}.{i}.{c}": [f"{spec.paths[0]}.{i}.{p}" for p in ps]
                      for i in range(2) for c, ps in spec.absorbers.items()}
    assert arch.absorbers == want_absorbers
    softcap = getattr(model.config, "final_logit_softcapping", None)
    assert arch.softcap == (float(softcap) if softcap else None)


@pytest.mark.parametrize("model_type", DECLARED)
def test_declared_groups_share_one_input_tensor(model_type):
    """Independently of the table: forward hooks see the grouped layers receive the very same tensor."""
    model = build(model_type)
    arch = arch_map(model)
    seen = hook_groups(model, arch, ids_for())
    for i in range(arch.num_blocks):
        assert seen[i] == {frozenset(g) for g in arch.groups.get(i, [])}, f"block {i}"


@pytest.mark.parametrize("model_type", [t for t in DECLARED if LAYOUTS[t].absorbers])
def test_declared_absorbers_commute_with_permutations(model_type):
    """Permuting the producers' output rows and the consumer's input columns together leaves the model's
    output unchanged exactly when the consumer's input is an elementwise function of the producers' outputs."""
    model = build(model_type)
    arch = arch_map(model)
    ids = ids_for()
    with torch.no_grad():
        before = model(ids).logits
        for consumer, producers in arch.absorbers.items():
            c = model.get_submodule(consumer)
            perm = torch.randperm(c.in_features, generator=torch.Generator().manual_seed(3))
            for p in producers:
                for t in _rows(model.get_submodule(p)):
                    t.copy_(t[perm])
            c.weight.copy_(c.weight[:, perm])
        after = model(ids).logits
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# 2. The runner reproduces each model's own loss: embed → blocks → final → chunked head, resident and streamed
# ---------------------------------------------------------------------------------------------------------------

EQUIV = [pytest.param(t, {}, id=t) for t in DECLARED] + [
    pytest.param("granite", dict(logits_scaling=1.0), id="granite-unscaled-logits"),
    # Gemma 3's real layout mixes sliding and full layers (local and global rotary tables); uniform layers too
    pytest.param("gemma3_text", dict(layer_types=["sliding_attention"] * 2), id="gemma3_text-uniform-layers"),
    pytest.param("gemma2", dict(sliding_window=4), id="gemma2-window-shorter-than-input"),
    pytest.param("qwen2", dict(use_sliding_window=True, sliding_window=4, max_window_layers=1),
                 id="qwen2-sliding-window"),
    pytest.param("opt", dict(do_layer_norm_before=False, word_embed_proj_dim=16), id="opt-350m-layout"),
]


@pytest.mark.parametrize("offload", ["none", "disk"])
@pytest.mark.parametrize("model_type,overrides", EQUIV)
def test_runner_matches_model_loss(model_type, overrides, offload):
    ids = ids_for()
    want = reference_nll(build(model_type, **overrides), ids)
    got = runner_nll(build(model_type, **overrides), ids, offload)  # a fresh model: disk leaves it on meta
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_opt_350m_layout_is_declared():
    """OPT-350m: no final norm (final_layer_norm is None), a projection after the blocks (project_out)."""
    model = build("opt", do_layer_norm_before=False, word_embed_proj_dim=16)
    arch = arch_map(model)
    assert arch.declared and arch.norm_path is None and arch.out_proj_path == "model.decoder.project_out"
    assert [t.path for t in arch.in_block(0)] == LAYOUTS["opt"].targets


def test_logit_factors_are_declared():
    assert arch_map(build("cohere")).logit_scale == pytest.approx(0.5)
    assert arch_map(build("granite")).logit_scale == pytest.approx(0.25)
    assert arch_map(build("llama")).logit_scale == 1.0


# ---------------------------------------------------------------------------------------------------------------
# 3. Discovery by type: an undeclared family, a multimodal wrapper, MoE routers, GPT-2's Conv1D
# ---------------------------------------------------------------------------------------------------------------

def test_family_removed_from_table_is_discovered(monkeypatch):
    monkeypatch.delitem(arch_module.FAMILIES, "llama")
    model = build("llama")
    arch = arch_map(model)
    assert not arch.declared
    assert (arch.blocks_path, arch.embed_path, arch.norm_path, arch.head_path) == LLAMA_PATHS
    assert [t.path for t in arch.in_block(1)] == LLAMA_TARGETS
    assert arch.groups == {}  # found during calibration instead
    assert arch.absorbers == {f"model.layers.{i}.mlp.down_proj": [f"model.layers.{i}.mlp.gate_proj",
                                                                  f"model.layers.{i}.mlp.up_proj"] for i in (0, 1)}
    ids = ids_for()
    torch.testing.assert_close(runner_nll(build("llama"), ids, "disk"), reference_nll(model, ids), rtol=1e-5,
                               atol=1e-6)


UNDECLARED = {  # model_type: (config overrides, blocks, norm, block-relative targets)
    "starcoder2": ({}, "model.layers", "model.norm",
                   ATTN + ["self_attn.o_proj", "mlp.c_fc", "mlp.c_proj"]),
    "stablelm": ({}, "model.layers", "model.norm", LLAMA_TARGETS),
    "phi": ({}, "model.layers", "model.final_layernorm",
            ATTN + ["self_attn.dense", "mlp.fc1", "mlp.fc2"]),
    "falcon": (dict(head_dim=None, new_decoder_architecture=False), "transformer.h", "transformer.ln_f",
               ["self_attention.query_key_value", "self_attention.dense", "mlp.dense_h_to_4h",
                "mlp.dense_4h_to_h"]),
}


@pytest.mark.parametrize("model_type", sorted(UNDECLARED))
def test_undeclared_family_is_discovered_and_runs(model_type):
    overrides, blocks, norm, targets = UNDECLARED[model_type]

    def make():  # an override of None removes the setting (Falcon's config computes head_dim itself)
        if model_type not in CONFIG_MAPPING_NAMES:
            pytest.skip(f"no {model_type} in this transformers")
        kw = {k: v for k, v in {**BASE, **overrides}.items() if v is not None}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.manual_seed(0)
            return _tweak(AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **kw)).eval())

    assert model_type not in FAMILIES
    model = make()
    arch = arch_map(model)
    assert not arch.declared
    assert (arch.blocks_path, arch.norm_path) == (blocks, norm)
    assert model.get_submodule(arch.head_path) is model.get_output_embeddings()
    assert [t.path for t in arch.in_block(0)] == targets
    ids = ids_for()
    want = reference_nll(model, ids)
    for offload in ("none", "disk"):
        torch.testing.assert_close(runner_nll(make(), ids, offload), want, rtol=1e-5, atol=1e-6)


def test_multimodal_wrapper_uses_its_text_model():
    """Gemma 3's multimodal model: the declared gemma3_text layout under model.language_model, never the
    vision tower's encoder layers (which also number num_hidden_layers here)."""
    if "gemma3" not in CONFIG_MAPPING_NAMES:
        pytest.skip("no gemma3")
    text = {k: v for k, v in BASE.items() if k != "initializer_range"}
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=28,
                  patch_size=14)

    def make():
        cfg = AutoConfig.for_model("gemma3", text_config=text, vision_config=vision, mm_tokens_per_image=4,
                                   image_token_index=V - 1, boi_token_index=V - 3, eoi_token_index=V - 2)
        torch.manual_seed(0)
        return _tweak(AutoModelForCausalLM.from_config(cfg).eval())

    model = make()
    arch = arch_map(model)
    assert arch.declared and arch.model_type == "gemma3_text"
    assert (arch.blocks_path, arch.embed_path, arch.norm_path, arch.head_path) == (
        "model.language_model.layers", "model.language_model.embed_tokens", "model.language_model.norm", "lm_head")
    assert [t.path for t in arch.in_block(0)] == LLAMA_TARGETS
    assert not any("vision" in t.name for t in arch.targets)
    ids = ids_for()
    want = reference_nll(model, ids)
    for offload in ("none", "disk"):
        torch.testing.assert_close(runner_nll(make(), ids, offload), want, rtol=1e-5, atol=1e-6)


def test_discovery_prefers_the_blocks_next_to_the_embeddings(monkeypatch):
    """Without the table either, the decoder is the block list beside the input embeddings."""
    if "gemma3" not in CONFIG_MAPPING_NAMES:
        pytest.skip("no gemma3")
    monkeypatch.delitem(arch_module.FAMILIES, "gemma3_text")
    text = {k: v for k, v in BASE.items() if k != "initializer_range"}
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=28,
                  patch_size=14)
    cfg = AutoConfig.for_model("gemma3", text_config=text, vision_config=vision, mm_tokens_per_image=4)
    arch = arch_map(AutoModelForCausalLM.from_config(cfg))
    assert not arch.declared
    assert (arch.blocks_path, arch.norm_path) == ("model.language_model.layers", "model.language_model.norm")


MOE = {  # model_type: (config, what discovery finds in block 0 with transformers 5's fused experts)
    "mixtral": (dict(num_local_experts=4, num_experts_per_tok=2), ATTN + ["self_attn.o_proj"]),
    "qwen2_moe": (dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
                       shared_expert_intermediate_size=32),
                  ATTN + ["self_attn.o_proj", "mlp.shared_expert.gate_proj", "mlp.shared_expert.up_proj",
                          "mlp.shared_expert.down_proj"]),
    "qwen3_moe": (dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16), ATTN + ["self_attn.o_proj"]),
    "olmoe": (dict(num_experts=4, num_experts_per_tok=2), ATTN + ["self_attn.o_proj"]),
}


def _is_routerish(path: str) -> bool:
    leaf = path.rsplit(".", 1)[-1]
    return leaf in ("gate", "router") or leaf.endswith(("_gate", "_router"))


@pytest.mark.parametrize("model_type", sorted(MOE))
def test_moe_routers_are_never_targets(model_type):
    config, expected = MOE[model_type]
    model = build(model_type, **config)
    arch = arch_map(model)
    assert arch.declared  # #14: MoE families are declared (model/arch.py), their experts handled by svdpress.moe
    assert not any(_is_routerish(t.path) for t in arch.targets)
    fused = any(p.dim() == 3 for n, p in model.named_parameters() if ".experts." in n)
    if fused:  # transformers 5: experts are 3-D parameters (not factored yet), routers their own module type
        assert [t.path for t in arch.in_block(0)] == expected
    # a router that is an nn.Linear (transformers 4 layout) is recognized by its name and width
    blk = arch.blocks(model)[0]
    blk.mlp.gate = nn.Linear(32, 4, bias=False)
    assert "mlp.gate" not in [t.path for t in arch_map(model).in_block(0)]


def test_gpt2_conv1d_layers_are_targets():
    """Declared (issue 14): GPT-2's Conv1D layers are targets with (out, in) shapes; discovery finds them too."""
    model = build("gpt2", n_embd=32, n_layer=2, n_head=4, n_positions=64, n_inner=64)
    want = ["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"]
    arch = arch_map(model)
    assert arch.declared and _paths(arch, 0) == want
    assert [(t.shape.m, t.shape.n) for t in arch.in_block(0)] == [(96, 32), (32, 32), (64, 32), (32, 64)]
    model.config.model_type = "not_declared"
    assert [t.path for t in arch_map(model).in_block(0)] == want


class _Mixer(nn.Module):
    def __init__(self, n: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(n))

    def forward(self, x, *args, **kwargs):
        return x * self.weight


def test_blocks_without_linear_layers_are_one_clear_error():
    """An architecture outside the table whose blocks hold no linear layer: the message names the class, the
    block list and the module types where the weights were found."""
    model = build("gpt2", n_embd=32, n_layer=2, n_head=4, n_positions=64, n_inner=64)
    model.config.model_type = "not_declared"
    for blk in model.transformer.h:
        for sub in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"):
            parent, _, leaf = sub.rpartition(".")
            setattr(blk.get_submodule(parent), leaf, _Mixer(32))
    with pytest.raises(SvdpressError, match=r"GPT2LMHeadModel.*transformer\.h.*no nn\.Linear.*_Mixer"):
        arch_map(model)
    with pytest.raises(SvdpressError, match="GPT2LMHeadModel"):
        Runner(model, Placement(offload="none"))


def test_no_block_list_is_one_clear_error():
    class Flat(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = nn.Linear(4, 4)

    with pytest.raises(SvdpressError, match="unsupported architecture Flat: no list of decoder blocks"):
        arch_map(Flat())


# ---------------------------------------------------------------------------------------------------------------
# 4. --targets / --ignore patterns
# ---------------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def llama():
    return build("llama")


def _paths(arch, block=None) -> list[str]:
    return [t.name for t in arch.targets] if block is None else [t.path for t in arch.in_block(block)]


@pytest.mark.parametrize("targets,ignore,want", [
    (["re:.*mlp\\.(gate|up)_proj$"], [], ["mlp.gate_proj", "mlp.up_proj"]),  # regex on the full name
    (["self_attn.*"], [], ATTN + ["self_attn.o_proj"]),  # glob on the block-relative path
    (["down_proj", "q_proj"], [], ["self_attn.q_proj", "mlp.down_proj"]),  # leaf names
    (["*.mlp.*"], [], ["mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]),  # glob on the full name
    ([], ["self_attn.o_proj", "re:.*\\.k_proj"], ["self_attn.q_proj", "self_attn.v_proj", "mlp.gate_proj",
                                                  "mlp.up_proj", "mlp.down_proj"]),
    (["*_proj"], ["mlp.*"], ATTN + ["self_attn.o_proj"]),
])
def test_patterns_select_layers(llama, targets, ignore, want):
    arch = arch_map(llama, targets=targets, ignore=ignore)
    for i in range(2):
        assert _paths(arch, i) == want


def test_full_name_globs_and_groups_follow_the_selection(llama):
    arch = arch_map(llama, targets=["model.layers.1.*"])
    assert _paths(arch) == [f"model.layers.1.{p}" for p in LLAMA_TARGETS]
    arch = arch_map(llama, targets=["q_proj", "k_proj", "up_proj"])
    assert arch.groups[0] == [["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj"],
                              ["model.layers.0.mlp.up_proj"]]


@pytest.mark.parametrize("targets,ignore,bad", [
    (["qproj"], [], "'qproj'"),  # a typo
    (["q_proj", "mlp.gate"], [], "'mlp.gate'"),  # one good pattern does not hide a dead one
    (["re:mlp\\..*"], [], "re:mlp"),  # re.match: the regex is anchored at the start of the full name
    ([], ["o-proj"], "--ignore pattern 'o-proj'"),
    (["self_attn.*"], ["*_proj"], "matches no linear layer"),  # everything selected is ignored
])
def test_patterns_matching_nothing_are_errors_listing_the_layers(llama, targets, ignore, bad):
    with pytest.raises(SvdpressError) as e:
        arch_map(llama, targets=targets, ignore=ignore)
    msg = str(e.value)
    assert bad in msg
    assert all(p in msg for p in LLAMA_TARGETS), msg  # the layers found, to pick from


def test_invalid_regex_is_an_error(llama):
    with pytest.raises(SvdpressError, match="invalid regular expression"):
        arch_map(llama, targets=["re:("])

"""The architecture map: where a causal LM keeps its embeddings, decoder blocks, final norm, LM head and the
linear layers svdpress factors, which of them read the same input, and which producer feeds which consumer.

Known families are declared in `FAMILIES` (module paths relative to the model, target paths relative to a
block), the way llm-compressor and GPTQModel declare architectures. Any other model falls back to discovery by
type: the blocks are the `nn.ModuleList` with `config.num_hidden_layers` entries, the targets every `nn.Linear`
inside a block except MoE routers, and sibling groups are found during calibration (layers whose forward
hooks see the very same input tensor). Every stage asks this map; none guesses module names itself.

`--targets` / `--ignore` take patterns as in llm-compressor: `re:REGEX` is matched (re.match) against the full
layer name; anything else is a glob (fnmatch) matched against the full name, the block-relative path
(`mlp.down_proj`) and the leaf name (`down_proj`).
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch.nn as nn

from ..errors import SvdpressError
from ..params import LayerShape

ATTN = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
MLP = ("mlp.gate_proj", "mlp.up_proj")


@dataclass(frozen=True)
class Family:
    """One model family's layout: module paths from the model root; targets, groups and pairs per block."""

    blocks: str
    embed: str
    norm: str
    head: str
    targets: tuple[str, ...]
    groups: tuple[tuple[str, ...], ...] = ()  # siblings that read the same input tensor
    # (consumer, producers): the consumer's input is an elementwise function of the producers' outputs, so a
    # permutation of the consumer's input features can be absorbed into the producers' output rows (PivGa)
    pairs: tuple[tuple[str, tuple[str, ...]], ...] = ()


LLAMA = Family(
    blocks="model.layers", embed="model.embed_tokens", norm="model.norm", head="lm_head",
    targets=ATTN + ("self_attn.o_proj",) + MLP + ("mlp.down_proj",),
    groups=(ATTN, MLP),
    pairs=(("mlp.down_proj", MLP),),
)
PHI3 = Family(  # fused projections: factored as one matrix each
    blocks="model.layers", embed="model.embed_tokens", norm="model.norm", head="lm_head",
    targets=("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj"),
)
GPT_NEOX = Family(
    blocks="gpt_neox.layers", embed="gpt_neox.embed_in", norm="gpt_neox.final_layer_norm", head="embed_out",
    targets=("attention.query_key_value", "attention.dense", "mlp.dense_h_to_4h", "mlp.dense_4h_to_h"),
    pairs=(("mlp.dense_4h_to_h", ("mlp.dense_h_to_4h",)),),
)
OPT = Family(
    blocks="model.decoder.layers", embed="model.decoder.embed_tokens", norm="model.decoder.final_layer_norm",
    head="lm_head",
    targets=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "fc1", "fc2"),
    groups=(("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),),
    pairs=(("fc2", ("fc1",)),),
)

# config.model_type → layout. Llama-style families share one declaration.
FAMILIES: dict[str, Family] = {
    **{t: LLAMA for t in ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "olmo", "olmo2",
                          "granite", "smollm3", "cohere")},
    "phi3": PHI3,
    "gpt_neox": GPT_NEOX,
    "opt": OPT,
}

ROUTER_NAMES = ("gate", "router")


@dataclass(frozen=True)
class TargetLayer:
    name: str  # dotted module path, e.g. model.layers.3.self_attn.q_proj
    block: int  # decoder block index
    kind: str  # last path component, e.g. q_proj
    shape: LayerShape
    path: str = ""  # path inside the block, e.g. self_attn.q_proj


@dataclass
class ArchMap:
    """Everything the stages need to know about a model's layout (see the module docstring)."""

    model_type: str
    declared: bool  # from FAMILIES (True) or discovered by type (False)
    blocks_path: str
    embed_path: str
    norm_path: Optional[str]
    head_path: str
    targets: list[TargetLayer]
    groups: dict[int, list[list[str]]] = field(default_factory=dict)  # declared sibling groups per block
    absorbers: dict[str, list[str]] = field(default_factory=dict)  # consumer name → producer names
    softcap: Optional[float] = None  # final logit soft-capping (Gemma 2/3)
    num_blocks: int = 0

    def blocks(self, model: nn.Module) -> nn.ModuleList:
        return model.get_submodule(self.blocks_path)

    def block_prefix(self, i: int) -> str:
        return f"{self.blocks_path}.{i}"

    def in_block(self, i: int) -> list[TargetLayer]:
        return [t for t in self.targets if t.block == i]

    def block_of(self, name: str) -> int:
        return self._by_name[name].block

    def shapes(self) -> dict[str, LayerShape]:
        return {t.name: t.shape for t in self.targets}

    def __post_init__(self) -> None:
        self._by_name = {t.name: t for t in self.targets}


def _leaf_linears(block: nn.Module) -> list[tuple[str, nn.Linear]]:
    factored = _factored_kinds()
    skip = [sub + "." for sub, m in block.named_modules() if isinstance(m, factored)]
    return [(sub, m) for sub, m in block.named_modules()
            if isinstance(m, nn.Linear) and not sub.startswith(tuple(skip))]


def _factored_kinds() -> tuple[type, ...]:
    from ..lowrank import LAYER_KINDS

    return tuple(LAYER_KINDS.values())


def _is_router(model: nn.Module, path: str, m: nn.Linear) -> bool:
    """An MoE router: a linear layer named gate/router whose outputs are the experts."""
    cfg = getattr(model, "config", None)
    experts = [getattr(cfg, k, None) for k in ("num_experts", "num_local_experts", "n_routed_experts")]
    return path.rsplit(".", 1)[-1] in ROUTER_NAMES and m.out_features in [e for e in experts if e]


def discover_blocks(model: nn.Module) -> str:
    """The decoder blocks: the ModuleList with num_hidden_layers entries that contains nn.Linear layers."""
    n = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    candidates = [(name, m) for name, m in model.named_modules()
                  if isinstance(m, nn.ModuleList) and len(m) > 0 and (n is None or len(m) == n)]
    for name, blocks in candidates:
        if any(isinstance(x, (nn.Linear,) + _factored_kinds()) for x in blocks[0].modules()):
            return name
    arch = type(model).__name__
    if candidates:
        raise SvdpressError(f"unsupported architecture {arch}: its decoder blocks contain no nn.Linear layers "
                            "(e.g. GPT-2's Conv1D); only models built from nn.Linear can be factored")
    raise SvdpressError(f"unsupported architecture {arch}: no list of decoder blocks found")


def _discover_norm(model: nn.Module, blocks_path: str) -> Optional[str]:
    parent = blocks_path.rpartition(".")[0]
    for n in ("norm", "final_layernorm", "final_layer_norm", "ln_f"):
        path = f"{parent}.{n}" if parent else n
        try:
            model.get_submodule(path)
            return path
        except AttributeError:
            continue
    return None


def _module_path(model: nn.Module, module: Optional[nn.Module]) -> Optional[str]:
    if module is None:
        return None
    return next((n for n, m in model.named_modules() if m is module), None)


def _exists(model: nn.Module, path: str) -> bool:
    try:
        model.get_submodule(path)
        return True
    except AttributeError:
        return False


def matches(name: str, path: str, patterns: Sequence[str]) -> bool:
    leaf = name.rsplit(".", 1)[-1]
    for p in patterns:
        if p.startswith("re:"):
            if re.match(p[3:], name):
                return True
        elif any(fnmatch.fnmatchcase(x, p) for x in (name, path, leaf)):
            return True
    return False


def arch_map(model: nn.Module, targets: Sequence[str] = (), ignore: Sequence[str] = ()) -> ArchMap:
    """The architecture map of `model`: declared for known families, discovered by type otherwise."""
    cfg = getattr(model, "config", None)
    model_type = getattr(cfg, "model_type", "") or ""
    fam = FAMILIES.get(model_type)
    if fam is not None and not (_exists(model, fam.blocks) and _exists(model, fam.norm)):
        fam = None  # a variant with another layout (e.g. a multimodal wrapper): discover instead
    if fam is not None:
        blocks_path, norm_path = fam.blocks, fam.norm
        embed_path = fam.embed if _exists(model, fam.embed) else _module_path(model, model.get_input_embeddings())
        head_path = fam.head if _exists(model, fam.head) else _module_path(model, model.get_output_embeddings())
    else:
        blocks_path = discover_blocks(model)
        norm_path = _discover_norm(model, blocks_path)
        embed_path = _module_path(model, model.get_input_embeddings())
        head_path = _module_path(model, model.get_output_embeddings())
    if embed_path is None or head_path is None:
        raise SvdpressError(f"unsupported architecture {type(model).__name__}: no input embeddings / LM head found")
    blocks = model.get_submodule(blocks_path)
    found: list[TargetLayer] = []
    groups: dict[int, list[list[str]]] = {}
    absorbers: dict[str, list[str]] = {}
    for i, block in enumerate(blocks):
        prefix = f"{blocks_path}.{i}"
        if fam is not None:
            linears = [(p, block.get_submodule(p)) for p in fam.targets if _exists(block, p)]
            linears = [(p, m) for p, m in linears if isinstance(m, nn.Linear)]
        else:
            linears = [(p, m) for p, m in _leaf_linears(block) if not _is_router(model, p, m)]
        for path, m in linears:
            name = f"{prefix}.{path}"
            shape = LayerShape(m.out_features, m.in_features, m.bias is not None)
            found.append(TargetLayer(name, i, path.rsplit(".", 1)[-1], shape, path))
        if fam is not None:
            have = {p for p, _ in linears}
            groups[i] = [[f"{prefix}.{p}" for p in g if p in have] for g in fam.groups]
            groups[i] = [g for g in groups[i] if g]
            for consumer, producers in fam.pairs:
                if consumer in have and all(_exists(block, p) for p in producers):
                    absorbers[f"{prefix}.{consumer}"] = [f"{prefix}.{p}" for p in producers]
    everything = list(found)
    if targets:
        found = [t for t in found if matches(t.name, t.path, targets)]
    if ignore:
        found = [t for t in found if not matches(t.name, t.path, ignore)]
    if not found:
        kinds = sorted({t.path for t in everything})
        what = f"--targets {','.join(targets)}" if targets else "the architecture's layer list"
        raise SvdpressError(f"{what}{' with --ignore ' + ','.join(ignore) if ignore else ''} matches no linear "
                            f"layer of {type(model).__name__} ({len(blocks)} blocks); layers found in each block: "
                            f"{', '.join(kinds) or 'none'}")
    keep = {t.name for t in found}
    groups = {i: [[n for n in g if n in keep] for g in gs] for i, gs in groups.items()}
    groups = {i: [g for g in gs if g] for i, gs in groups.items()}
    softcap = getattr(cfg, "final_logit_softcapping", None)
    return ArchMap(model_type, fam is not None, blocks_path, embed_path, norm_path, head_path, found, groups,
                   absorbers, float(softcap) if softcap else None, len(blocks))

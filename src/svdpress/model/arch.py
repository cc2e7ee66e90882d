"""The architecture map: where a causal LM keeps its embeddings, decoder blocks, final norm, LM head and the
linear layers svdpress factors, which of them read the same input, and which producer feeds which consumer.

Known families are declared in `FAMILIES` (module paths relative to the model, target paths relative to a
block), the way llm-compressor and GPTQModel declare architectures. Any other model falls back to discovery by
type: the blocks are the `nn.ModuleList` with `config.num_hidden_layers` entries, the targets every `nn.Linear`
inside a block except MoE routers, and sibling groups are found during calibration (layers whose forward
hooks see the very same input tensor). Every stage asks this map; none guesses module names itself.

A model whose config nests the language model's (a multimodal wrapper such as Gemma 3's, `config.text_config`)
uses its text config: a declared family is found there and its paths moved under the text model (the module
holding the input embeddings); discovery counts the text config's layers and prefers the block list next to the
input embeddings, so a vision tower's layers are never taken for the decoder.

Besides the norm, what turns the last block's output into logits is declared too: a projection after the norm
(OPT-350m's `project_out`), a factor on the logits (Cohere's `logit_scale`, Granite's `1/logits_scaling`) and
the final soft-capping (Gemma 2/3), so that a runner computing embed → blocks → final → head reproduces the
model's own logits.

`--targets` / `--ignore` take patterns as in llm-compressor: `re:REGEX` is matched (re.match) against the full
layer name; anything else is a glob (fnmatch) matched against the full name, the block-relative path
(`mlp.down_proj`) and the leaf name (`down_proj`).
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Optional, Sequence

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
    out_proj: str = ""  # a projection after the final norm, where the model has one (OPT-350m's project_out)
    logit_scale: Optional[Callable[[Any], float]] = None  # config -> factor on the logits (before soft-capping)
    experts: str = ""  # MoE: the experts module in a block (split into per-expert layers, all targets; svdpress.moe)


def _cohere_scale(cfg: Any) -> float:
    return float(getattr(cfg, "logit_scale", 1.0) or 1.0)  # logits = lm_head(h) * logit_scale


def _granite_scale(cfg: Any) -> float:
    return 1.0 / float(getattr(cfg, "logits_scaling", 1.0) or 1.0)  # logits = lm_head(h) / logits_scaling


LLAMA = Family(
    blocks="model.layers", embed="model.embed_tokens", norm="model.norm", head="lm_head",
    targets=ATTN + ("self_attn.o_proj",) + MLP + ("mlp.down_proj",),
    groups=(ATTN, MLP),
    pairs=(("mlp.down_proj", MLP),),
)
# Cohere's blocks are parallel: attention and MLP both read the one input_layernorm output
COHERE = replace(LLAMA, groups=(ATTN + MLP,), logit_scale=_cohere_scale)
GRANITE = replace(LLAMA, logit_scale=_granite_scale)
PHI3 = Family(  # fused projections: factored as one matrix each; no siblings (attention and MLP have own norms)
    blocks="model.layers", embed="model.embed_tokens", norm="model.norm", head="lm_head",
    targets=("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj"),
)
GPT_NEOX = Family(
    # the head is lm_head in transformers 5 (embed_out before: found through get_output_embeddings)
    blocks="gpt_neox.layers", embed="gpt_neox.embed_in", norm="gpt_neox.final_layer_norm", head="lm_head",
    targets=("attention.query_key_value", "attention.dense", "mlp.dense_h_to_4h", "mlp.dense_4h_to_h"),
    pairs=(("mlp.dense_4h_to_h", ("mlp.dense_h_to_4h",)),),
)
GPT2 = Family(  # Conv1D layers (y = x·W + b, W: (in, out)), factored as the linear map Wᵀ; head tied to wte
    blocks="transformer.h", embed="transformer.wte", norm="transformer.ln_f", head="lm_head",
    targets=("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"),
)
OPT = Family(  # OPT-350m: no final norm (final_layer_norm is None) and a project_out after the blocks
    blocks="model.decoder.layers", embed="model.decoder.embed_tokens", norm="model.decoder.final_layer_norm",
    head="lm_head", out_proj="model.decoder.project_out",
    targets=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "fc1", "fc2"),
    groups=(("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),),
    pairs=(("fc2", ("fc1",)),),
)

# MoE (transformers 5): routed experts are one fused module per block (svdpress.moe makes one target per expert
# and projection); routers are their own module type, never listed. The Llama MLP paths stay listed for blocks that
# keep a dense MLP (mlp_only_layers / decoder_sparse_step); Qwen2-MoE's shared expert is an ordinary MLP (a target),
# its scalar shared_expert_gate is not.
MOE = replace(LLAMA, experts="mlp.experts")
SHARED = ("mlp.shared_expert.gate_proj", "mlp.shared_expert.up_proj")
QWEN2_MOE = replace(MOE, targets=MOE.targets + SHARED + ("mlp.shared_expert.down_proj",),
                    groups=MOE.groups + (SHARED,),
                    pairs=MOE.pairs + (("mlp.shared_expert.down_proj", SHARED),))

# config.model_type → layout. Llama-style families share one declaration.
FAMILIES: dict[str, Family] = {
    **{t: LLAMA for t in ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "olmo", "olmo2",
                          "smollm3")},
    "granite": GRANITE,
    "cohere": COHERE,
    "phi3": PHI3,
    "gpt_neox": GPT_NEOX,
    "opt": OPT,
    "gpt2": GPT2,
    **{t: MOE for t in ("mixtral", "qwen3_moe", "olmoe")},
    "qwen2_moe": QWEN2_MOE,
}

ROUTER_NAMES = ("gate", "router")


def is_conv1d(m: nn.Module) -> bool:
    """GPT-2's transformers.pytorch_utils.Conv1D: y = x·W + b with W of shape (in, out), i.e. a linear layer whose
    weight is stored transposed. svdpress factors the linear map Wᵀ (out, in) and replaces it by the same
    LowRankLinear, so a Conv1D is a target like an nn.Linear."""
    return type(m).__name__ == "Conv1D" and getattr(m, "weight", None) is not None and m.weight.dim() == 2


def is_linear(m: nn.Module) -> bool:
    """A layer svdpress can factor: nn.Linear or GPT-2's Conv1D."""
    return isinstance(m, nn.Linear) or is_conv1d(m)


def linear_shape(m: nn.Module) -> LayerShape:
    """(out, in, bias) of an nn.Linear or a Conv1D (whose weight is (in, out))."""
    if is_conv1d(m):
        return LayerShape(int(m.weight.shape[1]), int(m.weight.shape[0]), m.bias is not None)
    return LayerShape(m.out_features, m.in_features, m.bias is not None)


@dataclass(frozen=True)
class TargetLayer:
    name: str  # dotted module path, e.g. model.layers.3.self_attn.q_proj
    block: int  # decoder block index
    kind: str  # last path component, e.g. q_proj
    shape: LayerShape
    path: str = ""  # path inside the block, e.g. self_attn.q_proj
    expert: bool = False  # a routed expert's layer (mlp.experts.3.down_proj): sees only its routed tokens


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
    logit_scale: float = 1.0  # logits = logit_scale · (h Wᵀ + b), then soft-capped (Cohere, Granite)
    out_proj_path: Optional[str] = None  # applied after the final norm (OPT-350m's project_out)

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
            if is_linear(m) and not sub.startswith(tuple(skip))]


def _expert_layers(block: nn.Module) -> list[tuple[str, nn.Module]]:
    """The layers of every routed expert in the block (an ExpertList: the runner splits fused experts)."""
    return [(sub, m) for sub, m in block.named_modules() if is_linear(m) and _in_expert(block, sub)]


def _in_expert(block: nn.Module, path: str) -> bool:
    from ..lowrank import ExpertList

    parts = path.split(".")
    return len(parts) > 2 and isinstance(block.get_submodule(".".join(parts[:-2])), ExpertList)


def _split_parts(layers: list[tuple[str, nn.Module]]) -> list[tuple[str, nn.Module]]:
    """A fused layer split by --split-fused (lowrank.SplitLinear) stands for its parts: path.q, path.k, …"""
    from ..lowrank import SplitLinear

    out = []
    for p, m in layers:
        out += [(f"{p}.{n}", getattr(m, n)) for n in m.names] if isinstance(m, SplitLinear) else [(p, m)]
    return out


def _factored_kinds() -> tuple[type, ...]:
    from ..lowrank import LAYER_KINDS

    return tuple(LAYER_KINDS.values())


def _is_router(model: nn.Module, path: str, m: nn.Linear) -> bool:
    """An MoE router: a linear layer named gate/router (or *_gate, *_router) whose outputs are the experts, or
    a shared expert's scalar gate (Qwen2-MoE's shared_expert_gate, one output). In transformers 5 most routers
    are their own module type and the experts fused 3-D parameters, which discovery does not list anyway."""
    cfg = _text_config(getattr(model, "config", None))
    experts = {e for e in (getattr(cfg, k, None) for k in ("num_experts", "num_local_experts", "n_routed_experts"))
               if isinstance(e, int) and e > 0}
    leaf = path.rsplit(".", 1)[-1]
    named = leaf in ROUTER_NAMES or leaf.endswith(tuple(f"_{n}" for n in ROUTER_NAMES))
    out = linear_shape(m).m
    return bool(experts) and named and (out in experts or out == 1)


def _text_config(cfg: Any) -> Any:
    """The language model's config (`text_config` of a multimodal wrapper), else `cfg` itself."""
    get = getattr(cfg, "get_text_config", None)
    if get is None:
        return cfg
    try:
        tc = get(decoder=True)
    except TypeError:
        tc = get()
    return tc if tc is not None else cfg


def discover_blocks(model: nn.Module) -> str:
    """The decoder blocks: the ModuleList with num_hidden_layers entries (of the text config) that contains
    nn.Linear layers; among several, the one nearest the input embeddings (not a vision tower's)."""
    n = getattr(_text_config(getattr(model, "config", None)), "num_hidden_layers", None)
    candidates = [(name, m) for name, m in model.named_modules()
                  if isinstance(m, nn.ModuleList) and len(m) > 0 and (n is None or len(m) == n)]
    emb = (_module_path(model, _input_embeddings(model)) or "").split(".")

    def nearness(item) -> int:
        parts = item[0].split(".")
        common = next((k for k, (a, b) in enumerate(zip(parts, emb)) if a != b), min(len(parts), len(emb)))
        return -common

    for name, blocks in sorted(candidates, key=nearness):
        if any(is_linear(x) or isinstance(x, _factored_kinds()) for x in blocks[0].modules()):
            return name
    arch = type(model).__name__
    if candidates:
        name, blocks = sorted(candidates, key=nearness)[0]
        kinds = sorted({type(x).__name__ for x in blocks[0].modules()
                        if not list(x.children()) and getattr(x, "weight", None) is not None})
        raise SvdpressError(f"unsupported architecture {arch}: its decoder blocks ({name}) contain no nn.Linear "
                            f"or Conv1D layers (weights found in: {', '.join(kinds) or 'none'}); only models built "
                            "from linear layers can be factored")
    raise SvdpressError(f"unsupported architecture {arch}: no list of decoder blocks found")


def _input_embeddings(model: nn.Module) -> Optional[nn.Module]:
    try:
        return model.get_input_embeddings()
    except (AttributeError, NotImplementedError):
        return None


def _output_embeddings(model: nn.Module) -> Optional[nn.Module]:
    try:
        return model.get_output_embeddings()
    except (AttributeError, NotImplementedError):
        return None


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
    if not path:
        return False
    try:
        model.get_submodule(path)
        return True
    except AttributeError:
        return False


def _set_to_none(model: nn.Module, path: str) -> bool:
    """The module at `path` is declared but absent in this variant (its attribute is None, e.g. OPT-350m's
    final_layer_norm)."""
    parent, _, leaf = path.rpartition(".")
    try:
        mod = model.get_submodule(parent) if parent else model
    except AttributeError:
        return False
    return hasattr(mod, leaf) and getattr(mod, leaf) is None


def _layout(model: nn.Module, fam: Family) -> Optional[dict[str, str]]:
    """The family's module paths in `model`: as declared, or moved under the text model of a wrapper (the module
    holding the input embeddings, e.g. Gemma 3's model.language_model); None when the model has another layout."""
    declared = {"blocks": fam.blocks, "embed": fam.embed, "norm": fam.norm, "head": fam.head, "out_proj": fam.out_proj}
    layouts = [declared]
    root, _, leaf = fam.embed.rpartition(".")
    emb = _module_path(model, _input_embeddings(model))
    if emb and root and emb.rpartition(".")[2] == leaf and emb.rpartition(".")[0] != root:
        base = emb.rpartition(".")[0]
        layouts.append({k: base + v[len(root):] if v.startswith(root + ".") else v for k, v in declared.items()})
    for paths in layouts:
        if _exists(model, paths["blocks"]) and (_exists(model, paths["norm"]) or _set_to_none(model, paths["norm"])):
            return paths
    return None


def compile_patterns(patterns: Sequence[str]) -> None:
    """Check the `re:` patterns' syntax (before any model is loaded)."""
    for p in patterns:
        if p.startswith("re:"):
            try:
                re.compile(p[3:])
            except re.error as e:
                raise SvdpressError(f"invalid regular expression in layer pattern {p!r}: {e}") from None


def matches(name: str, path: str, patterns: Sequence[str]) -> bool:
    leaf = name.rsplit(".", 1)[-1]
    for p in patterns:
        if p.startswith("re:"):
            try:
                hit = re.match(p[3:], name)
            except re.error as e:
                raise SvdpressError(f"invalid regular expression in layer pattern {p!r}: {e}") from None
            if hit:
                return True
        elif any(fnmatch.fnmatchcase(x, p) for x in (name, path, leaf)):
            return True
    return False


def arch_map(model: nn.Module, targets: Sequence[str] = (), ignore: Sequence[str] = ()) -> ArchMap:
    """The architecture map of `model`: declared for known families, discovered by type otherwise."""
    cfg = getattr(model, "config", None)
    text_cfg = _text_config(cfg)
    model_type = getattr(cfg, "model_type", "") or ""
    fam: Optional[Family] = None
    paths: Optional[dict[str, str]] = None
    for t in dict.fromkeys([model_type, getattr(text_cfg, "model_type", "") or ""]):  # the wrapper's, the text's
        if t in FAMILIES:
            paths = _layout(model, FAMILIES[t])
            if paths is not None:  # else a variant with another layout: discover instead
                fam, model_type = FAMILIES[t], t
                break
    out_proj_path = None
    if fam is not None and paths is not None:
        blocks_path = paths["blocks"]
        norm_path = paths["norm"] if _exists(model, paths["norm"]) else None
        out_proj_path = paths["out_proj"] if _exists(model, paths["out_proj"]) else None
        embed_path = paths["embed"] if _exists(model, paths["embed"]) else _module_path(model, _input_embeddings(model))
        head_path = paths["head"] if _exists(model, paths["head"]) else _module_path(model, _output_embeddings(model))
    else:
        blocks_path = discover_blocks(model)
        norm_path = _discover_norm(model, blocks_path)
        embed_path = _module_path(model, _input_embeddings(model))
        head_path = _module_path(model, _output_embeddings(model))
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
            linears = [(p, m) for p, m in _split_parts(linears) if is_linear(m)] + _expert_layers(block)
        else:
            linears = [(p, m) for p, m in _leaf_linears(block) if not _is_router(model, p, m)]
        for path, m in linears:
            name = f"{prefix}.{path}"
            shape = linear_shape(m)
            found.append(TargetLayer(name, i, path.rsplit(".", 1)[-1], shape, path, _in_expert(block, path)))
        if fam is not None:
            have = {p for p, _ in linears}
            groups[i] = [[f"{prefix}.{p}" for p in g if p in have] for g in fam.groups]
            groups[i] = [g for g in groups[i] if g]
            pairs = fam.pairs
        else:  # discovered: the Llama-style MLP pair when its three layers are there (PivGa checks it anyway)
            pairs = (("mlp.down_proj", MLP),)
        kinds = (nn.Linear,) + _factored_kinds()  # a factored model keeps its pairs (Conv1D rows are columns: none)
        for consumer, producers in pairs:
            if all(_exists(block, p) and isinstance(block.get_submodule(p), kinds) for p in (consumer, *producers)):
                absorbers[f"{prefix}.{consumer}"] = [f"{prefix}.{p}" for p in producers]
    everything = list(found)
    _check_patterns(model, everything, targets, ignore, len(blocks))
    if targets:
        found = [t for t in found if matches(t.name, t.path, targets)]
    if ignore:
        found = [t for t in found if not matches(t.name, t.path, ignore)]
    compressed = not everything and any(isinstance(m, _factored_kinds()) for m in blocks.modules())
    if not found and (targets or ignore or not compressed):
        kinds = list(dict.fromkeys(t.path for t in everything))
        what = f"--targets {','.join(targets)}" if targets else "the architecture's layer list"
        raise SvdpressError(f"{what}{' with --ignore ' + ','.join(ignore) if ignore else ''} matches no linear "
                            f"layer of {type(model).__name__} ({len(blocks)} blocks); layers found in each block: "
                            f"{', '.join(kinds) or 'none'}")
    keep = {t.name for t in found}
    groups = {i: [[n for n in g if n in keep] for g in gs] for i, gs in groups.items()}
    groups = {i: [g for g in gs if g] for i, gs in groups.items()}
    softcap = getattr(text_cfg, "final_logit_softcapping", None)
    scale = fam.logit_scale(text_cfg) if fam is not None and fam.logit_scale is not None else 1.0
    return ArchMap(model_type, fam is not None, blocks_path, embed_path, norm_path, head_path, found, groups,
                   absorbers, float(softcap) if softcap else None, len(blocks), float(scale), out_proj_path)


def _check_patterns(model: nn.Module, everything: list[TargetLayer], targets: Sequence[str], ignore: Sequence[str],
                    n_blocks: int) -> None:
    """Every --targets / --ignore pattern must match at least one layer: a pattern matching nothing is a typo
    (or another model's name), and silently compressing more or less than asked is worse than stopping."""
    for option, patterns in (("--targets", targets), ("--ignore", ignore)):
        dead = [p for p in patterns if not any(matches(t.name, t.path, [p]) for t in everything)]
        if dead:
            kinds = list(dict.fromkeys(t.path for t in everything))
            raise SvdpressError(f"{option} pattern{'s' if len(dead) > 1 else ''} {', '.join(map(repr, dead))} "
                                f"match{'' if len(dead) > 1 else 'es'} no linear layer of {type(model).__name__} "
                                f"({n_blocks} blocks); layers found in each block: {', '.join(kinds) or 'none'} "
                                "(patterns: re:REGEX on the full name, or globs on the full name, the path in the "
                                "block or the leaf name)")

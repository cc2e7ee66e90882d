"""`svdpress plan MODEL --ratio R`: where a model's parameters are and what a ratio would keep, without calibrating.

Nothing is measured: the model is built (on the meta device when it has safetensors; a GGUF file is read), the
architecture map lists its targets, params.py counts them, and the uniform allocator (the registry's, on shapes
alone) gives the ranks every layer would get. So a user can see before a long run that, say, 40% of a small
model sits in its embeddings, and what `--budget-of model` leaves for the decoder's layers.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any, Sequence

import torch.nn as nn

from .allocate import AllocationProblem, allocate, check_ratio
from .model import arch_map
from .params import count_params, dense_count, linear_ratio_for_model, model_params


def skeleton(spec: str) -> nn.Module:
    """The model of `spec` on the meta device: built from its config alone (a GGUF file's metadata is read, its
    weights are not de-quantized), which is all a count needs. A compressed directory loads lazily instead."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    from .errors import SvdpressError
    from .models import load_model, resolve_model

    src = resolve_model(spec)
    if src.compressed:
        import torch

        return load_model(spec, torch.float32, "cpu", lazy=True)[0]
    try:
        cfg = (AutoConfig.from_pretrained(src.path, gguf_file=src.gguf_file) if src.gguf_file
               else AutoConfig.from_pretrained(src.path))
    except (OSError, ValueError) as e:
        raise SvdpressError(f"cannot read the config of {spec}: {str(e).splitlines()[0]}") from None
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(cfg)
    model.tie_weights()  # as from_pretrained does: a tied head is the embedding matrix, counted once
    return model


def _unique_numel(modules: Sequence[nn.Module], seen: set[int]) -> int:
    """Parameters of `modules` not counted yet (tied tensors once, across calls sharing `seen`)."""
    n = 0
    for m in modules:
        for p in m.parameters():
            if id(p) not in seen:
                seen.add(id(p))
                n += p.numel()
    return n


def plan(model: nn.Module, ratio: float, budget_of: str = "linear", pivga: bool = False, rank_multiple: int = 1,
         targets: Sequence[str] = (), ignore: Sequence[str] = (), lm_head: bool = False) -> dict[str, Any]:
    """Where the parameters of `model` are, the target count at `ratio` and the ranks uniform gives."""
    from .config import BUDGETS
    from .errors import SvdpressError

    check_ratio(ratio)
    if budget_of not in BUDGETS:
        raise SvdpressError(f"--budget-of {budget_of!r} is unknown; choose one of {', '.join(BUDGETS)}")
    from .moe import split_experts

    split_experts(model)  # MoE: every expert's matrices are targets, as in compress (meta tensors stay meta)
    arch = arch_map(model, targets, ignore)
    shapes = arch.shapes()
    total = model_params(model)
    seen: set[int] = set()
    embed = _unique_numel([model.get_submodule(arch.embed_path)], seen)
    head_module = model.get_submodule(arch.head_path)
    head = _unique_numel([head_module], seen)
    tied = head == 0 and head_module.weight.numel() > 0
    targets_ = list(arch.targets)
    if lm_head and not tied:  # --lm-head: the untied head is one more target (a tied one stays dense)
        from .model.arch import TargetLayer, linear_shape

        targets_.append(TargetLayer(arch.head_path, arch.num_blocks, "lm_head", linear_shape(head_module),
                                    arch.head_path))
        shapes[arch.head_path] = targets_[-1].shape
    blocks = arch.blocks(model)
    per_block = [_unique_numel([b], seen) for b in blocks]
    rest = total - embed - head - sum(per_block)  # final norm, position embeddings, anything else
    per_kind: dict[str, dict[str, Any]] = defaultdict(lambda: {"layers": 0, "dense": 0, "shape": None})
    def kind(t: TargetLayer) -> str:  # an expert's layers are one kind across experts: mlp.experts.*.down_proj
        if not t.expert:
            return t.path
        head, _, leaf = t.path.rpartition(".")
        return f"{head.rpartition('.')[0]}.*.{leaf}"

    for t in targets_:
        k = per_kind[kind(t)]
        k["layers"] += 1
        k["dense"] += t.shape.dense
        k["shape"] = [t.shape.m, t.shape.n]
    linear_dense = dense_count(shapes)
    linear_ratio = ratio if budget_of == "linear" else linear_ratio_for_model(ratio, total, shapes, pivga)
    problem = AllocationProblem(shapes, {}, linear_ratio, rank_multiple, pivga=pivga, progress=False)
    ranks = allocate(problem, "uniform").ranks
    kept = count_params(shapes, ranks, pivga)
    for t in targets_:
        k = per_kind[kind(t)]
        k.setdefault("ranks", set()).add(ranks[t.name])
        k["kept"] = k.get("kept", 0) + count_params({t.name: t.shape}, ranks, pivga)
    kinds = {p: {**k, "ranks": sorted(r for r in k["ranks"] if r is not None) or None} for p, k in per_kind.items()}
    return {
        "architecture": type(model).__name__, "model_type": arch.model_type, "declared": arch.declared,
        "ratio": ratio, "budget_of": budget_of, "pivga": pivga, "lm_head": lm_head and not tied,
        "params": {"total": total, "embeddings": embed, "head": head, "head_tied": tied,
                   "blocks": sum(per_block), "per_block": per_block, "other": rest,
                   "targets_dense": linear_dense, "outside_targets": total - linear_dense},
        "kinds": kinds,
        "target": {"linear_ratio": linear_ratio, "linear_budget": int(linear_ratio * linear_dense),
                   "linear_kept_uniform": kept, "model_kept_uniform": total - linear_dense + kept,
                   "model_ratio_uniform": (total - linear_dense + kept) / total},
        "ranks": ranks,
    }


def format_plan(p: dict[str, Any]) -> str:
    from .table import table

    P, T = p["params"], p["target"]
    pct = lambda n: f"{100 * n / P['total']:.1f}%"  # noqa: E731
    where = [["embeddings", P["embeddings"], pct(P["embeddings"])],
             ["LM head", P["head"], "tied to the embeddings" if P["head_tied"] else pct(P["head"])],
             [f"decoder blocks ({len(P['per_block'])})", P["blocks"], pct(P["blocks"])],
             ["target layers (blocks + head)" if p["lm_head"] else "  of which target layers", P["targets_dense"],
              pct(P["targets_dense"])],
             ["other (final norm, positions, ...)", P["other"], pct(P["other"])],
             ["total", P["total"], "100%"]]
    per_block = sorted(set(P["per_block"]))
    lines = [f"{p['architecture']} ({p['model_type']}, {'declared family' if p['declared'] else 'discovered'})",
             table(where, ["where", "parameters", "share"]),
             f"per block: {', '.join(f'{n:,}' for n in per_block)}" + (" (every block)" if len(per_block) == 1
                                                                        else ""), ""]
    rows = [[path, f"{k['shape'][0]}x{k['shape'][1]}", k["layers"], k["dense"],
             ",".join(map(str, k["ranks"])) if k["ranks"] else "dense", k["kept"]] for path, k in p["kinds"].items()]
    lines.append(table(rows, ["kind", "shape (out x in)", "layers", "dense", "uniform rank", "kept"]))
    if p["budget_of"] == "model":
        lines.append(f"\n--budget-of model --ratio {p['ratio']}: {p['ratio'] * P['total']:,.0f} of {P['total']:,} "
                     f"parameters; {P['outside_targets']:,} stay dense outside the targets, so the target layers "
                     f"keep ratio {T['linear_ratio']:.4f}")
    else:
        lines.append(f"\n--ratio {p['ratio']} of the target layers: budget {T['linear_budget']:,} of "
                     f"{P['targets_dense']:,} parameters")
    lines.append(f"uniform{' (PivGa counting)' if p['pivga'] else ''} keeps {T['linear_kept_uniform']:,} in the "
                 f"targets, {T['model_kept_uniform']:,} in the whole model (model ratio "
                 f"{T['model_ratio_uniform']:.4f})")
    return "\n".join(lines)

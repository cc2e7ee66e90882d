"""Low-rank linear layers and the function that swaps them into a model.

This file imports nothing but torch: it is copied verbatim next to every exported model, so that
`AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)` can rebuild the layers without svdpress.
"""

from __future__ import annotations

from typing import Mapping, Optional

import torch
import torch.nn as nn


class LowRankLinear(nn.Module):
    """y = A (B x) + b with A: (m, r), B: (r, n). Two matmuls; the dense W = A·B is never formed.

    A and B are nn.Linear so that PEFT/LoRA and optimizers see ordinary linear layers.
    """

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = False,
                 device=None, dtype=None) -> None:
        super().__init__()
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.B = nn.Linear(in_features, rank, bias=False, device=device, dtype=dtype)  # B: (r, n)
        self.A = nn.Linear(rank, out_features, bias=bias, device=device, dtype=dtype)  # A: (m, r)

    @classmethod
    def from_factors(cls, A: torch.Tensor, B: torch.Tensor, bias: Optional[torch.Tensor] = None,
                     dtype: Optional[torch.dtype] = None) -> "LowRankLinear":
        dtype = dtype or (bias.dtype if bias is not None else A.dtype)
        layer = cls(B.shape[1], A.shape[0], A.shape[1], bias is not None, device=A.device, dtype=dtype)
        with torch.no_grad():
            layer.A.weight.copy_(A)
            layer.B.weight.copy_(B)
            if bias is not None:
                layer.A.bias.copy_(bias)
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.A(self.B(x))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"


class PivGaLinear(nn.Module):
    """Gauge-fixed low-rank layer (PivGa, arXiv 2512.03062): W = C·[I_r | D]·Pᵀ, so y = C (x_π[:r] + D x_π[r:]) + b.

    A·B has the gauge freedom (A G⁻¹)(G B); choosing G = B0⁻¹ for r skeleton columns B0 of B turns those
    columns into an identity block that is not stored: r·(m+n) − r² parameters instead of r·(m+n).
    C = A·B0: (m, r), D = B0⁻¹·B1: (r, n−r), `perm` (int64, saved): skeleton columns first, then the rest.
    When the producing layer already emits its outputs in `perm` order (e.g. gate/up rows permuted for
    down_proj), `perm` is the identity and the forward needs no gather at all.
    """

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = False,
                 device=None, dtype=None) -> None:
        super().__init__()
        if not 0 < rank <= in_features:
            raise ValueError(f"PivGaLinear needs 0 < rank ≤ in_features, got rank {rank} for {in_features}")
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.D = nn.Linear(in_features - rank, rank, bias=False, device=device, dtype=dtype)  # D: (r, n−r)
        self.C = nn.Linear(rank, out_features, bias=bias, device=device, dtype=dtype)  # C: (m, r)
        self.register_buffer("perm", torch.arange(in_features, device=device, dtype=torch.int64), persistent=True)
        self._gather: Optional[bool] = None  # perm ≠ identity; read once from the buffer (a loaded value)

    @classmethod
    def from_parts(cls, C: torch.Tensor, D: torch.Tensor, perm: torch.Tensor, bias: Optional[torch.Tensor] = None,
                   dtype: Optional[torch.dtype] = None) -> "PivGaLinear":
        dtype = dtype or (bias.dtype if bias is not None else C.dtype)
        r = C.shape[1]
        layer = cls(r + D.shape[1], C.shape[0], r, bias is not None, device=C.device, dtype=dtype)
        with torch.no_grad():
            layer.C.weight.copy_(C)
            layer.D.weight.copy_(D)
            layer.perm.copy_(perm)
            if bias is not None:
                layer.C.bias.copy_(bias)
        return layer

    @property
    def skeleton(self) -> torch.Tensor:
        """Indices of the r input features that pass through the identity block."""
        return self.perm[: self.rank]

    def input_permuted(self) -> None:
        """The producer now emits inputs in `perm` order: forget the permutation, skip the gather."""
        with torch.no_grad():
            self.perm.copy_(torch.arange(self.in_features, device=self.perm.device))
        self._gather = None

    def _load_from_state_dict(self, *args, **kwargs):
        self._gather = None
        return super()._load_from_state_dict(*args, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._gather is None:
            self._gather = bool((self.perm != torch.arange(self.in_features, device=self.perm.device)).any())
        lead = x.shape[:-1]
        x = x.reshape(-1, self.in_features)  # 2-D: index_select along dim 1 of a 2-D tensor is the fast path
        r, Dt = self.rank, self.D.weight.t()
        if self._gather:
            x = x.index_select(1, self.perm)  # one contiguous gather: [skeleton | rest]
        if self._gather and not torch.is_grad_enabled():
            z = x[:, :r].addmm_(x[:, r:], Dt)  # z = x_s + D x_r: one GEMM over x_s of our own gathered copy
        else:  # autograd needs x_r intact; an absorbed input belongs to the caller
            z = torch.addmm(x[:, :r], x[:, r:], Dt)
        return self.C(z).view(*lead, self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"


class SplitLinear(nn.Module):
    """A fused projection split into its logical parts, each its own layer: y = [W_q x + b_q | W_k x + b_k | …],
    with the outputs put back in the fused layer's order by `order` where the parts' rows were interleaved
    (GPT-NeoX's query_key_value, per head [q k v]). The parts are nn.Linear children named after their role
    (q, k, v; gate, up), so each can be replaced by a factored layer and given its own rank."""

    def __init__(self, in_features: int, parts: Mapping[str, int], bias: bool = False, interleaved: bool = False,
                 device=None, dtype=None) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, sum(parts.values())
        self.names = list(parts)
        for name, size in parts.items():
            self.add_module(name, nn.Linear(in_features, size, bias=bias, device=device, dtype=dtype))
        if interleaved:  # output j of the fused layer is output order[j] of the concatenated parts
            self.register_buffer("order", torch.arange(self.out_features, device=device), persistent=True)
        else:
            self.order = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.cat([getattr(self, n)(x) for n in self.names], dim=-1)
        return y if self.order is None else y.index_select(-1, self.order)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, parts={self.names}"


class Expert(nn.Module):
    """One routed expert as two ordinary layers: gate_up_proj (2f × d, gate and up fused, as the model stores
    them) and down_proj (d × f); y = down(act(gate) ⊙ up). Each may be an nn.Linear or a factored layer."""

    def __init__(self, gate_up_proj: nn.Module, down_proj: nn.Module) -> None:
        super().__init__()
        self.gate_up_proj, self.down_proj = gate_up_proj, down_proj


class ExpertList(nn.Module):
    """Drop-in replacement for a transformers MoE experts module (fused 3-D `gate_up_proj` (E, 2f, d) and
    `down_proj` (E, d, f) parameters): expert e is `self[e]`, an `Expert` of two layers, so every expert's
    matrices are layers with names of their own (`mlp.experts.3.gate_up_proj`) that svdpress factors, hooks and
    counts like any linear layer, each with its own rank. The forward is transformers' eager experts loop:
    expert e runs on the tokens routed to it, its output scaled by their routing weights."""

    def __init__(self, experts, act_fn: nn.Module) -> None:
        super().__init__()
        experts = list(experts)
        for e, expert in enumerate(experts):
            self.add_module(str(e), expert)
        self.act_fn = act_fn
        self.num_experts = len(experts)

    def __getitem__(self, e: int) -> Expert:
        return self._modules[str(e)]

    def __len__(self) -> int:
        return self.num_experts

    @classmethod
    def from_fused(cls, old: nn.Module) -> "ExpertList":
        """The fused parameters as per-expert nn.Linear layers (each its own copy, so it can be saved, replaced
        and freed alone; done one module at a time, the copy costs one experts module; meta stays meta)."""
        experts = []
        for e in range(old.gate_up_proj.shape[0]):
            layers = []
            for W in (old.gate_up_proj[e], old.down_proj[e]):
                lin = nn.Linear(W.shape[1], W.shape[0], bias=False, device="meta", dtype=W.dtype)
                lin.weight = nn.Parameter(W.detach().clone(), requires_grad=old.gate_up_proj.requires_grad)
                layers.append(lin)
            experts.append(Expert(*layers))
        return cls(experts, old.act_fn)

    @classmethod
    def empty_for(cls, old: nn.Module, spec) -> "ExpertList":
        """Empty experts shaped like `old` (the original fused module, as built by from_pretrained), to receive
        saved weights; factored experts are then installed over their dense layers by name."""
        E, f2, d = old.gate_up_proj.shape
        kw = dict(bias=False, device=old.gate_up_proj.device, dtype=old.gate_up_proj.dtype)
        return cls([Expert(nn.Linear(d, f2, **kw), nn.Linear(f2 // 2, d, **kw)) for _ in range(E)], old.act_fn)

    def spec(self) -> dict:
        return {"kind": "experts", "num_experts": self.num_experts}

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        final = torch.zeros_like(hidden_states)
        with torch.no_grad():
            hit = torch.unique(top_k_index[top_k_index < self.num_experts]).tolist()
        for e in hit:
            pos, tok = torch.where((top_k_index == e).T)  # transformers' order: by routing slot, then token
            expert = self[e]
            gate, up = expert.gate_up_proj(hidden_states[tok]).chunk(2, dim=-1)
            h = expert.down_proj(self.act_fn(gate) * up) * top_k_weights[tok, pos, None]
            final.index_add_(0, tok, h.to(final.dtype))
        return final


def set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    """Replace the submodule at dotted path `name`."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def install_empty_layers(model: nn.Module, layers: Mapping[str, Mapping]) -> None:
    """Swap in empty factored layers described by a saved spec {name: {"kind", "rank", ...}} before loading
    weights. Used by the svdpress loader and by the remote code, so both read the same format."""
    parents_first = sorted(layers.items(), key=lambda kv: kv[1].get("kind") not in ("split", "experts"))  # stable
    for name, spec in parents_first:  # a split fused layer (an experts list) is installed before its parts are
        old = model.get_submodule(name)
        if spec.get("kind") in MODULE_KINDS:  # a whole module replaced (MoE experts), not a linear layer
            set_module(model, name, MODULE_KINDS[spec["kind"]].empty_for(old, spec))
            continue
        if spec.get("kind") == "split":
            n_in = old.in_features if hasattr(old, "in_features") else old.weight.shape[0]
            set_module(model, name, SplitLinear(n_in, {str(p): int(k) for p, k in spec["parts"]}, old.bias is not None,
                                                bool(spec.get("interleaved")), old.weight.device, old.weight.dtype))
            continue
        dtype, device = old.weight.dtype, old.weight.device
        bias = old.bias is not None
        kind = spec.get("kind", "lowrank")
        if kind not in LAYER_KINDS:
            raise ValueError(f"unknown factored layer kind {kind!r} for {name}")
        if hasattr(old, "in_features"):  # nn.Linear
            n_in, n_out = old.in_features, old.out_features
        else:  # GPT-2's Conv1D: y = x·W + b, W stored (in, out)
            n_in, n_out = old.weight.shape
        new = LAYER_KINDS[kind](n_in, n_out, int(spec["rank"]), bias=bias, device=device, dtype=dtype)
        set_module(model, name, new)


LAYER_KINDS: dict[str, type] = {"lowrank": LowRankLinear, "pivga": PivGaLinear}
MODULE_KINDS: dict[str, type] = {"experts": ExpertList}  # parents of factored layers

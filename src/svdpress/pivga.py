"""PivGa: lossless second compression of low-rank layers by gauge fixing (arXiv 2512.03062, Mechanism 3).

A·B = (A·G⁻¹)(G·B) for any invertible G. Column-pivoted QR of B (float64) picks r well-conditioned skeleton
columns, B·P = Q·[R11 | R12]; with G = B0⁻¹ the skeleton block becomes the identity, which is not stored:
C = A·B0 = A·Q·R11 and D = B0⁻¹·B1 = R11⁻¹·R12, so W = C·[I | D]·Pᵀ with r·(m+n) − r² parameters.
Column pivoting keeps |D| bounded (every |R11⁻¹R12| entry is small in practice; the maximum is reported).

Speed: the gather x[perm] is avoided where the producing layer can emit its outputs already permuted
(`ABSORBERS`: the MLP intermediate feeding down_proj is elementwise in gate/up, so their output rows are
permuted instead). Attention's o_proj is not absorbed: v_proj rows can only be permuted within a head (and
identically for every query head of a group), which cannot move a skeleton column across heads.
"""

from __future__ import annotations

from typing import Any, Optional

import numpy as np
import scipy.linalg
import torch
import torch.nn as nn
from tqdm.auto import tqdm

from .errors import SvdpressError
from .lowrank import LowRankLinear, PivGaLinear, set_module
from .params import LayerShape, layer_params, model_params

RANK_RTOL = 1e-10  # |R_kk| ≤ RANK_RTOL·|R_00| in float64: B has rank < k (e.g. duplicate rows); drop the tail

# consumer leaf name → sibling producers whose output rows feed it elementwise (Llama/Mistral/Qwen/Gemma MLPs)
ABSORBERS: dict[str, tuple[str, ...]] = {"down_proj": ("gate_proj", "up_proj")}


def interpolative(A: torch.Tensor, B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A·B = C·[I_k | D]·Pᵀ with k = numerical rank of B (float64): returns C (m, k), D (k, n−k), perm (n,)."""
    Q, R, P = scipy.linalg.qr(B.detach().double().cpu().numpy(), mode="economic", pivoting=True)  # B P = Q R
    d = np.abs(np.diag(R))
    if d.size == 0 or d[0] == 0.0:
        raise SvdpressError("PivGa: factor B is zero, the layer has no skeleton columns")
    k = int((d > RANK_RTOL * d[0]).sum())  # CPQR: |R_kk| non-increasing, rows past k are ≈ 0
    R11 = R[:k, :k]
    D = scipy.linalg.solve_triangular(R11, R[:k, k:])  # D = R11⁻¹ R12 = B0⁻¹ B1
    C = A.detach().double().cpu().numpy() @ (Q[:, :k] @ R11)  # C = A B0 (= A Q R11)
    return torch.from_numpy(C), torch.from_numpy(D), torch.from_numpy(P.astype(np.int64))


def to_pivga(layer: LowRankLinear) -> PivGaLinear:
    """The PivGa form of one LowRankLinear, computed in float64 and cast back to the layer's dtype."""
    w = layer.A.weight
    C, D, perm = interpolative(w, layer.B.weight)
    bias = layer.A.bias.detach() if layer.A.bias is not None else None
    new = PivGaLinear.from_parts(C.to(w.dtype), D.to(w.dtype), perm, bias, w.dtype)
    return new.to(w.device)


def output_weights(m: nn.Module) -> Optional[list[torch.Tensor]]:
    """The tensors whose rows are the module's output features (weight and bias of its last linear map)."""
    last = {LowRankLinear: lambda x: x.A, PivGaLinear: lambda x: x.C, nn.Linear: lambda x: x}
    for cls, get in last.items():
        if type(m) is cls:
            lin = get(m)
            return [t for t in (lin.weight, lin.bias) if t is not None]
    return None


def permute_rows(tensors: list[torch.Tensor], perm: torch.Tensor) -> None:
    with torch.no_grad():
        for t in tensors:
            t.copy_(t[perm.to(t.device)])


def absorb(model: nn.Module, name: str, layer: PivGaLinear, check_seed: int = 0) -> bool:
    """Permute the producers' output rows so `layer` receives its input already in `perm` order, when the
    producers are known (ABSORBERS) and the parent module's output stays the same (checked on a random input)."""
    parent_name, _, leaf = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    producers = [getattr(parent, p, None) for p in ABSORBERS.get(leaf, ())]
    rows = [output_weights(p) if p is not None else None for p in producers]
    if not producers or any(r is None for r in rows):
        return False
    n_in = next(iter(producers)).in_features
    w = layer.C.weight
    x = torch.randn(2, 3, n_in, generator=torch.Generator().manual_seed(check_seed), dtype=torch.float32)
    x = x.to(device=w.device, dtype=w.dtype)
    perm = layer.perm.clone()
    inv = torch.argsort(perm)
    with torch.no_grad():
        before = parent(x)
        for r in rows:
            permute_rows(r, perm)
        layer.input_permuted()
        after = parent(x)
    tol = 1e-3 if w.dtype in (torch.float16, torch.bfloat16) else 1e-5
    if torch.allclose(after, before, rtol=tol, atol=tol * float(before.abs().max())):
        return True
    for r in rows:  # not elementwise after all: undo
        permute_rows(r, inv)
    with torch.no_grad():
        layer.perm.copy_(perm)
    layer._gather = None
    return False


def apply_pivga(model: nn.Module, absorb_permutations: bool = True, progress: bool = True) -> dict[str, Any]:
    """Convert every LowRankLinear of `model` in place; returns {params_saved, per_layer, layers, absorbed}."""
    names = [n for n, m in model.named_modules() if type(m) is LowRankLinear]
    if not names:
        raise SvdpressError("PivGa needs a compressed model: no LowRankLinear layers found")
    layers: dict[str, dict] = {}
    for name in tqdm(names, desc="pivga", disable=not progress):
        old = model.get_submodule(name)
        new = to_pivga(old)
        set_module(model, name, new)
        layers[name] = {"rank": new.rank, "rank_before": old.rank, "saved": new.rank ** 2,
                        "max_abs_D": float(new.D.weight.detach().abs().max()) if new.D.weight.numel() else 0.0}
    for name in names:
        layers[name]["gather"] = not (absorb_permutations and absorb(model, name, model.get_submodule(name)))
    reduced = {n: (x["rank_before"], x["rank"]) for n, x in layers.items() if x["rank"] < x["rank_before"]}
    return {
        "params_saved": sum(x["saved"] for x in layers.values()),
        "per_layer": {n: x["saved"] for n, x in layers.items()},
        "layers": layers,
        "absorbed": [n for n, x in layers.items() if not x["gather"]],
        "rank_reduced": reduced,
        "pivoting": "column-pivoted QR of B in float64 (scipy.linalg.qr, pivoting=True)",
        "note": "per_layer = r² parameters removed by gauge fixing; layers whose B had numerical rank < r are "
                "stored at that rank (rank_reduced), which is still exact",
    }


def record_in_manifest(manifest: dict, model: nn.Module, report: dict) -> dict:
    """Make the manifest's per-layer ranks/params, totals and achieved ratio describe the PivGa model."""
    manifest["pivga"] = True
    manifest["pivga_report"] = report
    kept = 0
    for name, entry in manifest.get("layers", {}).items():
        if name in report["layers"]:
            entry["rank"] = report["layers"][name]["rank"]
        m, n = entry["shape"]
        bias = entry.get("dense_params", m * n) != m * n  # dense_params = m·n (+ m with a bias)
        entry["params"] = layer_params(LayerShape(m, n, bias), entry["rank"], pivga=True)
        kept += entry["params"]
    p = manifest.get("params")
    if p and manifest.get("layers"):
        p["linear_kept"] = kept
        p["linear_ratio"] = kept / p["linear_dense"]
        p["model_compressed"] = model_params(model)
        p["model_ratio"] = p["model_compressed"] / p["model_dense"]
        manifest.setdefault("ratio", {})["achieved"] = p["linear_ratio"]
    return manifest


def convert_directory(source: str, out: str, overwrite: bool = False, progress: bool = True) -> dict:
    """`svdpress pivga IN --out OUT`: load a compressed directory, gauge-fix it, save it with an updated manifest."""
    from pathlib import Path

    from . import load
    from .export import read_manifest, save

    manifest = read_manifest(source)
    if manifest.get("pivga"):
        raise SvdpressError(f"{source} is already PivGa-compressed")
    if Path(out).resolve() == Path(source).resolve():
        raise SvdpressError("--out must differ from the source directory")
    model, tokenizer = load(source, dtype=(manifest.get("model") or {}).get("dtype", "float32"))
    report = apply_pivga(model, progress=progress)
    record_in_manifest(manifest, model, report)
    extra = {f: (Path(source) / f).read_bytes() for f in ("ranks.json", "ranks.png") if (Path(source) / f).is_file()}
    save(model, tokenizer, out, manifest, overwrite=overwrite, extra_files=extra)
    return manifest

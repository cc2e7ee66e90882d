"""PivGa: lossless second compression of low-rank layers by gauge fixing (arXiv 2512.03062, Mechanism 3).

A·B = (A·G⁻¹)(G·B) for any invertible G. Column-pivoted QR of B (float64) picks r well-conditioned skeleton
columns, B·P = Q·[R11 | R12]; with G = B0⁻¹ the skeleton block becomes the identity, which is not stored:
C = A·B0 = A·Q·R11 and D = B0⁻¹·B1 = R11⁻¹·R12, so W = C·[I | D]·Pᵀ with r·(m+n) − r² parameters.
Column pivoting keeps |D| bounded (every |R11⁻¹R12| entry is small in practice; the maximum is reported).

Speed: the gather x[perm] is avoided where the producing layers can emit their outputs already permuted.
Which layer feeds which comes from the architecture map (`ArchMap.absorbers`, consumer → producers, e.g. the
MLP intermediate feeding down_proj is elementwise in gate/up, so their output rows are permuted instead); each
absorption is checked on a random input and undone when the output changes. Attention's o_proj is not absorbed:
v_proj rows can only be permuted within a head (and identically for every query head of a group), which cannot
move a skeleton column across heads.

`apply_pivga(model, names=...)` converts only the named layers, so a streaming export can gauge-fix one decoder
block while it is materialized (`merge_reports` joins the per-block reports); the result is the same as one
whole-model call.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Iterable, Mapping, Optional, Sequence

import numpy as np
import scipy.linalg
import torch
import torch.nn as nn
from tqdm.auto import tqdm

from .errors import SvdpressError
from .lowrank import LowRankLinear, PivGaLinear, set_module
from .params import LayerShape, layer_params, model_params

if TYPE_CHECKING:
    from .model import ArchMap

RANK_RTOL = 1e-10  # |R_kk| ≤ RANK_RTOL·|R_00| in float64: B has rank < k (e.g. duplicate rows); drop the tail

PIVOTING = "column-pivoted QR of B in float64 (scipy.linalg.qr, pivoting=True)"
NOTE = ("per_layer = r² parameters removed by gauge fixing; layers whose B had numerical rank < r are stored at "
        "that rank (rank_reduced), which is still exact")


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


def absorbers_of(model: nn.Module, arch: Optional["ArchMap"] = None,
                 consumers: Optional[Iterable[str]] = None) -> dict[str, list[str]]:
    """consumer name → producer names whose output rows feed the consumer's input elementwise (the
    architecture map's pairs, which it keeps for factored layers too), restricted to `consumers` when given."""
    from .model import arch_map

    arch = arch or arch_map(model)
    want = None if consumers is None else set(consumers)
    return {k: list(v) for k, v in arch.absorbers.items() if want is None or k in want}


def _find(model: nn.Module, name: str) -> Optional[nn.Module]:
    try:
        return model.get_submodule(name)
    except AttributeError:
        return None


def _common_parent(names: Sequence[str]) -> str:
    """The deepest module containing every named layer (e.g. the MLP for down_proj and gate/up)."""
    parts = [n.split(".")[:-1] for n in names]
    common: list[str] = []
    for level in zip(*parts):
        if any(x != level[0] for x in level):
            break
        common.append(level[0])
    return ".".join(common)


def _first_tensor(out: Any) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    if hasattr(out, "to_tuple"):
        return _first_tensor(out.to_tuple())
    raise TypeError(f"no tensor in a {type(out).__name__} output")


def absorb(model: nn.Module, name: str, layer: PivGaLinear, producers: Sequence[str], check_seed: int = 0) -> bool:
    """Permute the producers' output rows so `layer` receives its input already in `perm` order, when the
    module holding them all gives the same output (checked on a random input); undone otherwise."""
    mods = [_find(model, p) for p in producers]
    rows = [output_weights(p) if p is not None else None for p in mods]
    if not mods or any(r is None for r in rows):
        return False
    parent_name = _common_parent([name, *producers])
    parent = model.get_submodule(parent_name) if parent_name else model
    n_in = mods[0].in_features
    w = layer.C.weight
    x = torch.randn(2, 3, n_in, generator=torch.Generator().manual_seed(check_seed), dtype=torch.float32)
    x = x.to(device=w.device, dtype=w.dtype)
    perm = layer.perm.clone()
    inv = torch.argsort(perm)
    try:
        with torch.no_grad():
            before = _first_tensor(parent(x))
    except Exception:  # a module that needs more than hidden states: cannot check, so do not absorb
        return False
    permuted = False
    try:
        with torch.no_grad():
            for r in rows:
                permute_rows(r, perm)
            permuted = True
            layer.input_permuted()
            after = _first_tensor(parent(x))
        tol = 1e-3 if w.dtype in (torch.float16, torch.bfloat16) else 1e-5
        if torch.allclose(after, before, rtol=tol, atol=tol * float(before.abs().max())):
            return True
    except Exception:
        pass
    if permuted:  # not elementwise after all: undo
        for r in rows:
            permute_rows(r, inv)
    with torch.no_grad():
        layer.perm.copy_(perm)
    layer._gather = None
    return False


def apply_pivga(model: nn.Module, arch: Optional["ArchMap"] = None, names: Optional[Iterable[str]] = None,
                absorb_permutations: bool = True, progress: bool = True,
                absorbers: Optional[Mapping[str, Sequence[str]]] = None) -> dict[str, Any]:
    """Convert the LowRankLinear layers of `model` in place (all of them, or those among `names`) and absorb
    their input permutations into their producers where `absorbers` (consumer → producers; default: from the
    architecture map `arch`, built from `model` when None) says so and a check on a random input agrees.
    Returns {params_saved, per_layer, layers, absorbed, rank_reduced, pivoting, note}.

    With `names` (e.g. one decoder block's layers while it is materialized) a missing or non-LowRankLinear name
    is skipped and an empty report is returned when nothing is left to convert; without, a model with no
    LowRankLinear layer is an error."""
    if names is None:
        todo = [n for n, m in model.named_modules() if type(m) is LowRankLinear]
        if not todo:
            raise SvdpressError("PivGa needs a compressed model: no LowRankLinear layers found")
    else:
        todo = [n for n in dict.fromkeys(names) if type(_find(model, n)) is LowRankLinear]
    if absorb_permutations and absorbers is None and todo:
        absorbers = absorbers_of(model, arch, todo)
    layers: dict[str, dict] = {}
    for name in tqdm(todo, desc="pivga", disable=not progress or not todo):
        old = model.get_submodule(name)
        new = to_pivga(old)
        set_module(model, name, new)
        layers[name] = {"rank": new.rank, "rank_before": old.rank, "saved": new.rank ** 2,
                        "max_abs_D": float(new.D.weight.detach().abs().max()) if new.D.weight.numel() else 0.0}
    for name in todo:
        producers = list((absorbers or {}).get(name, ()))
        done = absorb_permutations and bool(producers) and absorb(model, name, model.get_submodule(name), producers)
        layers[name]["gather"] = not done
    return _report(layers)


def _report(layers: dict[str, dict]) -> dict[str, Any]:
    reduced = {n: (x["rank_before"], x["rank"]) for n, x in layers.items() if x["rank"] < x["rank_before"]}
    return {
        "params_saved": sum(x["saved"] for x in layers.values()),
        "per_layer": {n: x["saved"] for n, x in layers.items()},
        "layers": layers,
        "absorbed": [n for n, x in layers.items() if not x["gather"]],
        "rank_reduced": reduced,
        "pivoting": PIVOTING,
        "note": NOTE,
    }


def merge_reports(reports: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """One report from per-block `apply_pivga(..., names=...)` reports (the whole-model call's report)."""
    layers: dict[str, dict] = {}
    for r in reports:
        layers.update(r["layers"])
    return _report(layers)


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
    from .export import check_out

    check_out(Path(out), overwrite)  # before the model is loaded
    model, tokenizer = load(source, dtype=(manifest.get("model") or {}).get("dtype", "float32"))
    report = apply_pivga(model, progress=progress)
    record_in_manifest(manifest, model, report)
    extra = {f: (Path(source) / f).read_bytes() for f in ("ranks.json", "ranks.png") if (Path(source) / f).is_file()}
    save(model, tokenizer, out, manifest, overwrite=overwrite, extra_files=extra)
    return manifest

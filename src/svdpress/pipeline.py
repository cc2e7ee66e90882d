"""compress(): load → calibrate → factorize → allocate → build → (pivga) → export → (evaluate).

Each stage is a call into its own module with plain data in between; this file only sequences them, times
them, and writes down what happened (the manifest).
"""

from __future__ import annotations

import datetime as _dt
import time
from contextlib import contextmanager
from typing import Any, Optional

import torch
import torch.nn as nn

from . import __version__
from .allocate import AllocationProblem, allocate
from .config import CompressConfig, EvalConfig, resolve_device, torch_dtype
from .data import calibration_samples
from .factorize import FACTORIZERS, LayerSpectrum, LayerStats
from .lowrank import LowRankLinear, set_module
from .models import ModelSource, find_targets, load_model
from .params import count_params, dense_count, layer_params, model_params


class Timer:
    """Wall-clock seconds per stage, accumulated (a stage may run in pieces, e.g. per block)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, stage: str):
        t = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[stage] = self.seconds.get(stage, 0.0) + time.perf_counter() - t


def factorize_model(model: nn.Module, samples: torch.Tensor, method: str, device: str, timer: Timer,
                    batch_size: int = 8, progress: bool = True,
                    stats_cache: Optional[str] = None) -> dict[str, LayerSpectrum]:
    """Spectra of every target layer, computed block by block right after that block's calibration, so the
    statistics of only one block are held at a time. With `stats_cache` (a directory) the statistics are read
    from / written to disk (stats_cache.py), so later runs on the same model and samples skip calibration."""
    from .stats_cache import StatsCache, block_stats, grad_stats

    fac = FACTORIZERS[method]
    cache = StatsCache(stats_cache, model, samples) if stats_cache else None
    grads: dict[str, dict] = {}
    if fac.needs_gradients:  # backward-pass statistics (KFAC, FWSVD)
        with timer("calibrate_gradients"):
            grads = grad_stats(cache, model, samples, batch_size, device, progress)
    spectra: dict[str, LayerSpectrum] = {}
    blocks = block_stats(cache, model, samples, batch_size, device, progress)
    while True:
        with timer("calibrate"):
            bs = next(blocks, None)
        if bs is None:
            break
        with timer("factorize"):
            for name, inputs in bs.inputs.items():
                W = model.get_submodule(name).weight.detach().to(device=device, dtype=torch.float64)
                stats = LayerStats(inputs=_to_device(inputs, device), **grads.get(name, {}))
                spectra[name] = _cpu(fac.fn(W, stats))
    return spectra


def _to_device(inputs, device):
    if inputs.xtx.device.type == torch.device(device).type:
        return inputs
    if "_moved" not in inputs._cache:
        moved = type(inputs)(inputs.xtx.to(device), inputs.abs_sum.to(device), inputs.tokens)
        inputs._cache["_moved"] = moved
    return inputs._cache["_moved"]


def _cpu(s: LayerSpectrum) -> LayerSpectrum:
    return LayerSpectrum(s.U.cpu(), s.S.cpu(), s.V.cpu(), s.note)


def build(model: nn.Module, spectra: dict[str, LayerSpectrum], ranks: dict[str, Optional[int]]) -> nn.Module:
    """Swap every layer with a rank for a LowRankLinear holding A = U_r√S_r, B = √S_r V_r (no dense W kept)."""
    for name, r in ranks.items():
        if r is None:
            continue
        old = model.get_submodule(name)
        A, B = spectra[name].factors(r, dtype=old.weight.dtype)
        bias = old.bias.detach() if old.bias is not None else None
        new = LowRankLinear.from_factors(A.to(old.weight.device), B.to(old.weight.device), bias, old.weight.dtype)
        set_module(model, name, new)
    return model


def param_report(model_dense_total: int, model: nn.Module, shapes, ranks, pivga: bool = False) -> dict:
    dense = dense_count(shapes)
    kept = count_params(shapes, ranks, pivga)
    return {
        "linear_dense": dense,
        "linear_kept": kept,
        "linear_ratio": kept / dense,
        "model_dense": model_dense_total,
        "model_compressed": model_params(model),
        "model_ratio": model_params(model) / model_dense_total,
        "other_params": model_dense_total - dense,
        "note": "linear_* count the decoder blocks' linear layers (the compression target); model_* count every "
                "parameter, embeddings and LM head included (tied tensors once)",
    }


def compress(model_or_id: Any = None, config: CompressConfig | None = None, tokenizer=None, **overrides):
    """Compress a causal LM; returns (compressed model, report dict). Writes `config.out` if set.

    `model_or_id`: a hub id / path / "default", or an already loaded model (then pass its `tokenizer`).
    """
    cfg = config or CompressConfig()
    for k, v in overrides.items():
        setattr(cfg, k, v)
    if isinstance(model_or_id, str):
        cfg.model = model_or_id
    cfg.validate()
    device = resolve_device(cfg.device)
    timer = Timer()
    t0 = time.perf_counter()

    with timer("load"):
        if isinstance(model_or_id, nn.Module):
            model, source = model_or_id, ModelSource(type(model_or_id).__name__, "<in memory>")
            if tokenizer is None:
                from .errors import SvdpressError
                raise SvdpressError("compress(model, ...) with a loaded model needs its tokenizer=")
        else:
            model, tokenizer, source = load_model(cfg.model, torch_dtype(cfg.dtype), "cpu")
    targets = find_targets(model)
    shapes = {t.name: t.shape for t in targets}
    total_dense = model_params(model)

    with timer("data"):
        samples, calib_part = calibration_samples(tokenizer, cfg.calib, cfg.calib_samples, cfg.calib_seqlen, cfg.seed)
    torch.manual_seed(cfg.seed)
    spectra = factorize_model(model, samples, cfg.factorize, device, timer, cfg.calib_batch_size, cfg.progress,
                              cfg.stats_cache)

    problem = AllocationProblem(shapes, spectra, cfg.ratio, cfg.rank_multiple, dict(cfg.options), model, samples,
                                device, cfg.seed, cfg.progress)
    with timer("allocate"):
        alloc = allocate(problem, cfg.allocate)
    with timer("build"):
        build(model, spectra, alloc.ranks)
    notes = {name: s.note for name, s in spectra.items() if s.note}  # jitter / eigen fallbacks, per layer
    del spectra, problem
    pivga_report = None
    if cfg.pivga:
        from .pivga import apply_pivga

        with timer("pivga"):
            pivga_report = apply_pivga(model)

    params = param_report(total_dense, model, shapes, alloc.ranks, cfg.pivga)
    report: dict[str, Any] = {
        "svdpress_version": __version__,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "model": {"source": source.spec, "path": source.path, "gguf_file": source.gguf_file,
                  "architecture": type(model).__name__, "dtype": cfg.dtype},
        "factorize": cfg.factorize,
        "allocate": cfg.allocate,
        "options": cfg.options,
        "pivga": cfg.pivga,
        "ratio": {"target": cfg.ratio, "achieved": params["linear_ratio"],
                  "definition": "kept / dense parameters of the decoder blocks' linear layers"},
        "params": params,
        "calibration": {"text": calib_part.describe(), "samples": cfg.calib_samples, "seqlen": cfg.calib_seqlen,
                        "tokens": int(samples.numel())},
        "seed": cfg.seed,
        "device": device,
        "layers": {name: {"shape": [s.m, s.n], "rank": alloc.ranks[name],
                          "params": layer_params(s, alloc.ranks[name], cfg.pivga), "dense_params": s.dense}
                   for name, s in shapes.items()},
        "allocation": alloc.info,
    }
    if pivga_report is not None:
        from .pivga import record_in_manifest

        record_in_manifest(report, model, pivga_report)  # per-layer ranks/params and totals after PivGa
    report["numerics"] = notes
    if cfg.eval is not None:
        with timer("evaluate"):
            report["eval"] = evaluate_model(model, tokenizer, cfg.eval, device, cfg.progress)
    report["timings_s"] = {**{k: round(v, 2) for k, v in timer.seconds.items()},
                           "total": round(time.perf_counter() - t0, 2)}
    if cfg.out:
        import json

        from .allocate.record import plot_ranks, ranks_document
        from .export import save

        with timer("export"):
            doc = ranks_document(cfg.allocate, shapes, alloc.ranks, cfg.ratio)
            extra = {"ranks.json": (json.dumps(doc, indent=1) + "\n").encode(), "ranks.png": plot_ranks(doc)}
            save(model, tokenizer, cfg.out, report, overwrite=cfg.overwrite, extra_files=extra)
        report["timings_s"]["export"] = round(timer.seconds["export"], 2)
    return model, report


def evaluate_model(model: nn.Module, tokenizer, cfg: EvalConfig, device: str = "cpu", progress: bool = True) -> dict:
    """Perplexities (and zero-shot tasks when asked) of an in-memory model."""
    from .evaluate import text_perplexity

    home = next(model.parameters()).device
    model.to(device)
    try:
        out: dict[str, Any] = {"ppl": {}}
        for name in cfg.ppl:
            out["ppl"][name] = text_perplexity(model, tokenizer, name, cfg.seqlen, cfg.limit, cfg.batch_size, progress)
        if cfg.tasks:
            from .evaluate.zeroshot import zero_shot

            out["tasks"] = zero_shot(model, tokenizer, cfg.tasks, limit=cfg.task_limit, seed=cfg.seed,
                                     batch_size=cfg.batch_size, device=device, source=cfg.task_source)
    finally:
        model.to(home)
    return out

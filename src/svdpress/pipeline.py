"""compress(): load → calibrate → factorize → allocate → build → (pivga) → export → (evaluate).

Each stage is a call into its own module with plain data in between; this file only sequences them, times
them, records their peak memory, and writes down what happened (the manifest). Placement is the runner's.

Under torchrun (distributed.py) every process runs this same sequence: calibration is data-parallel, each block's
layers are factored by the rank that owns them and their spectra broadcast, the allocators divide their
measurements, and after allocation rank 0 alone builds, writes and evaluates.
"""

from __future__ import annotations

import datetime as _dt
import time
from collections.abc import MutableMapping
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from . import __version__
from . import distributed as dist
from .allocate import Allocation, AllocationProblem, allocate
from .config import CompressConfig, EvalConfig, resolve_device, torch_dtype
from .data import calibration_samples
from .errors import SvdpressError
from .export import ShardWriter
from .factorize import FACTORIZERS, LayerSpectrum, LayerStats
from .lowrank import LowRankLinear, set_module
from .memory import PeakMemory, trim
from .model import Placement, Runner
from .models import ModelSource, load_model
from .params import count_params, dense_count, layer_params, linear_ratio_for_model, model_params
from .store import SpectrumStore, TensorStore


class Stages:
    """Wall-clock seconds and peak memory (CPU RSS, GPU allocation) per stage, accumulated over the pieces a
    stage may run in (e.g. calibration interleaved with factorization, block by block)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.peaks = PeakMemory()

    @contextmanager
    def __call__(self, stage: str):
        t = time.perf_counter()
        try:
            with self.peaks(stage):
                yield
        finally:
            self.seconds[stage] = self.seconds.get(stage, 0.0) + time.perf_counter() - t


Timer = Stages  # the name benches and tests know


def factorize_model(runner: Runner, samples: torch.Tensor, method: str, stages: Stages, batch_size: int = 8,
                    progress: bool = True, stats_cache: Optional[str] = None,
                    spectra: Optional[MutableMapping] = None, grads: Optional[MutableMapping] = None,
                    routed: Optional[dict] = None):
    """Spectra of every target layer, computed block by block right after that block's calibration, so the
    statistics of only one block are held at a time. With `stats_cache` (a directory) the statistics are read
    from / written to disk (stats_cache.py), so later runs on the same model and samples skip calibration.
    `spectra` / `grads` are where results go (dicts, or disk-backed stores for models larger than memory).
    MoE: a routed expert's layer that saw fewer than moe.MIN_TOKENS tokens is factored by plain SVD; `routed`
    receives every expert layer's token count ("routed_tokens") and the layers that fell back ("fell_back")."""
    from .moe import FALLBACK, MIN_TOKENS

    from .stats_cache import StatsCache, block_stats, grad_stats

    fac = FACTORIZERS[method]
    cache = StatsCache(stats_cache, runner, samples) if stats_cache else None
    grads = {} if grads is None else grads
    spectra = {} if spectra is None else spectra
    owner = layer_owners(runner)  # who factors each layer (every layer rank 0's in one process)
    me = dist.world().rank
    if fac.needs_gradients:  # backward-pass statistics (KFAC, GFWSVD, FWSVD)
        with stages("calibrate_gradients"):
            mine = grads if not dist.active() else _Owned(grads, lambda n: owner[n] == me)
            grad_stats(cache, runner, samples, batch_size, progress, mine, fac.needs_fisher, fac.out_grad)
    device = runner.device
    blocks = block_stats(cache, runner, samples, batch_size, progress)
    while True:
        with stages("calibrate"):
            bs = next(blocks, None)
        if bs is None:
            break
        with stages("factorize"):
            left = {id(bs.inputs[g[0]]): len(g) for g in bs.groups}  # layers still to factor, per shared input
            # widest input first: its X·Xᵀ (down_proj's, 8·f² bytes) is consumed before any wide G is read back
            order = sorted(bs.inputs.items(), key=lambda kv: -kv[1].abs_sum.numel())
            experts = {t.name for t in runner.arch.in_block(bs.block) if t.expert}
            for name, inputs in order:
                few = name in experts and inputs.tokens < MIN_TOKENS
                if name in experts and routed is not None:
                    routed.setdefault("routed_tokens", {})[name] = int(inputs.tokens)
                    if few:
                        routed.setdefault("fell_back", []).append(name)
                if owner[name] != me:  # another rank's layer (torchrun): its spectrum arrives below
                    continue
                # W (a float64 copy) and the gradient statistics are used once: the factorizer may overwrite them
                W = runner.weight(name).to(device=device, dtype=torch.float64, copy=True)
                large = W.numel() * 8 >= TRIM_MIN
                g = grads.pop(name) if name in grads else {}
                stats = LayerStats(inputs=_to_device(inputs, device), **g, consume=True)
                check_finite(name, W, stats)
                stats.inputs._cache["release_after_whitening"] = True  # X·Xᵀ freed once whitened
                if few:  # whitening by a Gram of rank < MIN_TOKENS would fit only the few tokens seen
                    s = FACTORIZERS[FALLBACK].fn(W, stats)
                    s.note = "; ".join(x for x in (s.note, f"{inputs.tokens} routed tokens < {MIN_TOKENS}: "
                                                            f"plain SVD") if x)
                else:
                    s = fac.fn(W, stats)
                spectra[name] = _cpu(s)
                del s
                left[id(inputs)] -= 1
                if not left[id(inputs)]:  # the group's last layer: its whitener goes
                    inputs._cache.clear()
                    stats.inputs._cache.clear()
                del W, stats, g
                if large:
                    trim()
        if dist.active():
            for inputs in bs.inputs.values():
                inputs._cache.clear()
            with stages("share_spectra"):
                share_spectra(spectra, list(bs.inputs), owner)
        bs = inputs = None  # this block's statistics and whiteners go before the next block is calibrated
        trim()
    return spectra


def layer_owners(runner: Runner) -> dict[str, int]:
    """The rank that factors each target layer: within every block, layers are divided among ranks balanced by
    their SVD cost m·n·min(m, n). Per block, not over the whole model, because calibration is data-parallel:
    every rank waits for the others at the next block's all-reduce, so each block's share must be even."""
    out: dict[str, int] = {}
    for i in range(len(runner.blocks)):
        out.update(dist.assign({t.name: dist.svd_cost(t.shape.m, t.shape.n) for t in runner.arch.in_block(i)}))
    return out


def share_spectra(spectra: MutableMapping, names: list[str], owner: dict[str, int]) -> None:
    """Every layer's spectrum, broadcast by the rank that factored it, so every rank holds every spectrum (the
    allocators that measure the model, FermiGrad and the probes, run it whole on every rank). One layer at a
    time: with a disk-backed store each arriving spectrum goes straight to disk, so memory holds one layer's
    U, S, V beyond what one process holds. Traffic: Σ (m + n)·k·4 + 8k bytes per layer, about the size of the
    float32 weights, sent once."""
    me = dist.world().rank
    for name in names:
        src = owner[name]
        s = spectra[name] if src == me else None
        (U, S, V), note = dist.broadcast_tensors([s.U, s.S, s.V] if s is not None else None, src,
                                                 f"spectrum of {name}", s.note if s is not None else None)
        if src != me:
            spectra[name] = LayerSpectrum(U, S, V, note)


class _Owned(MutableMapping):
    """A view of a statistics store that keeps only this rank's layers (the others' are dropped on arrival):
    after the all-reduce every rank holds every layer's G, but only the layer's owner factors it."""

    def __init__(self, store: MutableMapping, keep) -> None:
        self.store, self.keep = store, keep

    def __setitem__(self, name, value) -> None:
        if self.keep(name):
            self.store[name] = value

    def __getitem__(self, name):
        return self.store[name]

    def __delitem__(self, name) -> None:
        del self.store[name]

    def __iter__(self):
        return iter(self.store)

    def __len__(self) -> int:
        return len(self.store)


# Heap trims only after large temporaries: below glibc's largest mmap threshold (32 MiB) freed chunks are reused
# by the next layer anyway, and a trim would hand them back only for the next layer to fault them in again
# (the quick start factors 210 layers under 8 MB each).
TRIM_MIN = 32 * 2**20


def _large_gradients(runner: Runner, method: str) -> bool:
    """Gradient statistics (G: m×m float64 a layer, + the m×n Fisher for fwsvd) wait on disk when together they
    would weigh more than half the model: they are read back one layer at a time."""
    fac = FACTORIZERS[method]
    if not fac.needs_gradients:
        return False
    est = sum(8 * s.m * (s.m + (s.n if fac.needs_fisher else 0)) for s in runner.arch.shapes().values())
    return est > runner.model_bytes() // 2


def check_finite(name: str, W: torch.Tensor, stats: LayerStats) -> None:
    """Weights and calibration statistics must be finite before they are factorized (a NaN would silently
    become a NaN model): the first bad layer is named."""
    if not all_finite(W):
        raise SvdpressError(f"layer {name}: its weights contain NaN or Inf; the model itself is broken")
    for what, t in (("input statistics", stats.inputs.xtx), ("gradient statistics", stats.out_grad),
                    ("per-sequence gradient statistics", stats.out_grad_seq),
                    ("Fisher statistics", stats.weight_fisher)):
        if t is not None and not all_finite(t):
            raise SvdpressError(f"layer {name}: its {what} contain NaN or Inf (overflowing activations in "
                                f"--dtype {str(W.dtype)}? try float32)")


def all_finite(t: torch.Tensor, rows: int = 256) -> bool:
    """torch.isfinite(t).all(), a slice of rows at a time: isfinite builds |t| and two masks, which for an
    8192-wide float64 matrix would be 640 MB of temporaries."""
    return all(bool(torch.isfinite(t[i:i + rows]).all()) for i in range(0, t.shape[0], rows))


def _to_device(inputs, device):
    """The statistics on the factorization device (moved once per shared input; X·Xᵀ may already be freed)."""
    if inputs.xtx is None or inputs.xtx.device.type == torch.device(device).type:
        return inputs._cache.get("_moved", inputs)
    if "_moved" not in inputs._cache:
        moved = type(inputs)(inputs.xtx.to(device), inputs.abs_sum.to(device), inputs.tokens)
        inputs._cache["_moved"] = moved
    return inputs._cache["_moved"]


def _cpu(s: LayerSpectrum) -> LayerSpectrum:
    return LayerSpectrum(s.U.cpu(), s.S.cpu(), s.V.cpu(), s.note)


def build(runner: Runner, spectra, ranks: dict[str, Optional[int]], pivga: bool = False, write=None,
          progress: bool = True) -> Optional[dict]:
    """Swap every layer with a rank for a LowRankLinear holding A = U_r√S_r, B = √S_r V_r (no dense W kept),
    block by block through the runner; with `pivga` each block is gauge-fixed right away. `write` receives each
    finished block's tensors (the export's shard writer). Returns the PivGa report when asked for."""
    from .pivga import apply_pivga, merge_reports

    model, arch = runner.model, runner.arch
    absorbers = dict(arch.absorbers)
    reports = []

    def factor(i: int):
        def fn(_blk):
            names = [t.name for t in arch.in_block(i) if ranks.get(t.name) is not None]
            for name in names:
                old = model.get_submodule(name)
                A, B = spectra[name].factors(ranks[name], dtype=old.weight.dtype)
                bias = old.bias.detach() if old.bias is not None else None
                new = LowRankLinear.from_factors(A.to(old.weight.device), B.to(old.weight.device), bias,
                                                 old.weight.dtype)
                set_module(model, name, new)
            if pivga and names:
                reports.append(apply_pivga(model, names=names, absorbers=absorbers, progress=False))
        return fn

    for i in tqdm(range(len(runner.blocks)), desc="build", unit="block", disable=not progress):
        runner.rebuild_block(i, factor(i), write)
        if runner.block_bytes() >= TRIM_MIN:
            trim()
    return merge_reports(reports) if pivga else None



def build_layer(model: nn.Module, name: str, spectrum, rank: int) -> None:
    """One layer outside the blocks (the LM head) replaced by its factors at `rank`."""
    old = model.get_submodule(name)
    A, B = spectrum.factors(rank, dtype=old.weight.dtype)
    bias = old.bias.detach() if old.bias is not None else None
    set_module(model, name, LowRankLinear.from_factors(A.to(old.weight.device), B.to(old.weight.device), bias,
                                                       old.weight.dtype))


def lm_head_target(runner: Runner):
    """The LM head as a target (`--lm-head`), or None when it is tied to the input embeddings: then one matrix is
    both the lookup table and the output projection, and it stays dense (factoring it would either untie it, adding
    a matrix, or push every embedding lookup through the factors). Tied heads get a one-line warning."""
    import warnings

    from .model.arch import TargetLayer, linear_shape

    arch, model = runner.arch, runner.model
    head, emb = model.get_submodule(arch.head_path), model.get_submodule(arch.embed_path)
    if head.weight is emb.weight:
        warnings.warn("--lm-head: the LM head is tied to the input embeddings; it stays dense", stacklevel=2)
        return None
    return TargetLayer(arch.head_path, arch.num_blocks, "lm_head", linear_shape(head), arch.head_path)


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
    """Compress a causal LM; returns (compressed model, report dict). Writes `config.out` if set. A model that
    was streamed from disk is never in memory: then the model returned is None (load `config.out`).

    `model_or_id`: a hub id / path / "default", or an already loaded model (then pass its `tokenizer`).
    The model is run through a `Runner` (model/runner.py) that owns its placement: with `offload="disk"`
    (or "auto" when it does not fit) it is streamed from its safetensors block by block, the spectra and
    gradient statistics wait on disk, and the output is written shard by shard as blocks are factored.

    Under torchrun (or any initialized torch.distributed group) the work is divided among the processes (see
    distributed.py); rank 0 returns the report and writes `config.out`, the other ranks return (None, a short
    report) once allocation is done.
    """
    cfg = config or CompressConfig()
    for k, v in overrides.items():
        setattr(cfg, k, v)
    if isinstance(model_or_id, str):
        cfg.model = model_or_id
    cfg.validate()
    if isinstance(model_or_id, nn.Module) and tokenizer is None:
        raise SvdpressError("compress(model, ...) with a loaded model needs its tokenizer=")
    world = dist.world()
    if world.active and cfg.stats_cache:
        raise SvdpressError("--stats-cache is not supported with several processes yet (each rank holds a shard "
                            "of the statistics): run without it, or in one process")
    if cfg.out and world.rank == 0:  # only the main rank writes the output (under torchrun)
        from .export import check_out

        check_out(Path(cfg.out), cfg.overwrite)
    device = dist.local_device(resolve_device(cfg.device))
    stages = Stages()
    t0 = time.perf_counter()
    with ExitStack() as stack:
        with stages("load"):
            if isinstance(model_or_id, nn.Module):
                model, source = model_or_id, ModelSource(type(model_or_id).__name__, "<in memory>")
            else:
                model, tokenizer, source = load_model(cfg.model, torch_dtype(cfg.dtype), "cpu",
                                                      lazy=cfg.offload != "none" and not cfg.split_fused)
            if cfg.split_fused:  # fused projections become one target per logical part (model/fused.py)
                from .model.fused import split_fused

                split_fused(model)
            runner = stack.enter_context(Runner(model, cfg.placement(device), source.tensors,
                                                targets=cfg.targets, ignore=cfg.ignore))
        on_disk = runner.offload == "disk"
        shapes = runner.arch.shapes()
        total_dense = model_params(model)
        head = lm_head_target(runner) if cfg.lm_head else None
        if head is not None and on_disk:
            raise SvdpressError("--lm-head needs the model in memory, but it is streamed from disk (it does not fit "
                                "the memory budget, or --offload disk): run without --lm-head")
        if head is not None:  # the untied LM head is one more target, after the blocks
            shapes[head.name] = head.shape
        # the ratio the target layers get: --ratio itself, or with --budget-of model what is left of R·(all
        # parameters) once the uncompressible ones (embeddings, head, norms) are paid for
        linear_target = (cfg.ratio if cfg.budget_of == "linear"
                         else linear_ratio_for_model(cfg.ratio, total_dense, shapes, cfg.pivga))
        check_model = getattr(cfg.allocation_settings, "check_model", None)
        if check_model is not None:  # e.g. --ranks against the model's layers and the budget, before calibration
            check_model(shapes, linear_target, cfg.pivga)
        spectra = SpectrumStore(on_disk, cfg.offload_dir)
        stack.callback(spectra.close)

        routed: dict = {}  # MoE: routed tokens per expert layer, and those factored by the fallback
        if linear_target >= 1:  # nothing to factor: the model goes through the same export, without calibration
            samples, calib_part = torch.zeros(0, 0, dtype=torch.long), None
            alloc = Allocation({name: None for name in shapes}, {"note": "ratio 1: every layer kept dense"})
        else:
            with stages("data"):
                samples, calib_part = calibration_samples(tokenizer, cfg.calib, cfg.calib_samples,
                                                          cfg.calib_seqlen, cfg.seed)
            runner.check_waiting(-(-samples.numel() // dist.world().size))  # before any block runs (a rank's share)
            torch.manual_seed(cfg.seed)
            grads = TensorStore(on_disk or _large_gradients(runner, cfg.factorize), cfg.offload_dir)
            stack.callback(grads.close)
            batch = dist.min_int(runner.batch_size(cfg.calib_seqlen, cfg.calib_batch_size))  # one for every rank
            factorize_model(runner, samples, cfg.factorize, stages, batch, cfg.progress,
                            cfg.stats_cache, spectra, grads, routed)
            if head is not None:
                from .calibrate import head_input_stats

                with stages("calibrate"):
                    inputs = head_input_stats(runner, samples, batch)
                with stages("factorize"):
                    W = runner.weight(head.name).to(device=device, dtype=torch.float64, copy=True)
                    stats = LayerStats(inputs=_to_device(inputs, device), consume=True)
                    check_finite(head.name, W, stats)
                    spectra[head.name] = _cpu(FACTORIZERS[cfg.factorize].fn(W, stats))
                    del W, stats, inputs
            grads.close()
            problem = AllocationProblem(shapes, spectra, linear_target, cfg.rank_multiple, dict(cfg.options), runner,
                                        samples, cfg.seed, cfg.progress, pivga=cfg.pivga)
            with stages("allocate"):
                alloc = allocate(problem, cfg.allocate)
            del problem
        # under torchrun rank 0 builds and writes; with --eval every rank builds too and scores its share
        helper_builds = world.active and cfg.eval is not None
        dist_record = None
        if world.active and not helper_builds:
            dist_record, done = _gather_timings(world, stages, alloc)
            if done is not None:
                return done
        writing = cfg.out if world.rank == 0 else None
        writer = ShardWriter(writing, cfg.overwrite) if (writing or on_disk) else None
        if writer is not None:
            stack.callback(writer.abort)  # nothing half-written is left behind; a no-op after finish
        with stages("build"):
            pivga_report = build(runner, spectra, alloc.ranks, cfg.pivga, writer.add if writer else None,
                                 cfg.progress)
            if head is not None and alloc.ranks.get(head.name) is not None:
                build_layer(model, head.name, spectra[head.name], alloc.ranks[head.name])
        notes = {name: s.note for name, s in spectra.items() if s.note}  # jitter / eigen fallbacks, per layer
        spectra.close()

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
            "ratio": ({"target": cfg.ratio, "achieved": params["linear_ratio"], "budget_of": "linear",
                       "definition": "kept / dense parameters of the decoder blocks' linear layers"}
                      if cfg.budget_of == "linear" else
                      {"target": cfg.ratio, "achieved": params["model_ratio"], "budget_of": "model",
                       "linear_target": linear_target, "linear_achieved": params["linear_ratio"],
                       "definition": "kept / dense parameters of the whole model (embeddings, head, norms "
                                     "included; tied tensors once)"}),
            "params": params,
            "calibration": None if calib_part is None else {
                "text": calib_part.describe(), "samples": cfg.calib_samples, "seqlen": cfg.calib_seqlen,
                "tokens": int(samples.numel()), "batch_size": batch},
            "seed": cfg.seed,
            "device": device,
            "placement": runner.describe(),
            "targets": {"include": list(cfg.targets), "ignore": list(cfg.ignore), "layers": len(shapes),
                        "split_fused": cfg.split_fused},
            "layers": {name: {"shape": [s.m, s.n], "rank": alloc.ranks[name],
                              "params": layer_params(s, alloc.ranks[name], cfg.pivga), "dense_params": s.dense}
                       for name, s in shapes.items()},
            "allocation": alloc.info,
        }
        if pivga_report is not None:
            from .pivga import record_in_manifest

            record_in_manifest(report, model, pivga_report)  # per-layer ranks/params and totals after PivGa
        report["numerics"] = notes
        if any(t.expert for t in runner.arch.targets):
            from .moe import record

            report["experts"] = record(routed.get("routed_tokens", {}), routed.get("fell_back", []))
        if cfg.eval is not None:
            from .evaluate.run import evaluate

            with stages("evaluate"):
                report["eval"] = evaluate(runner, tokenizer, cfg.eval, cfg.progress)
        if helper_builds:
            dist_record, done = _gather_timings(world, stages, alloc)
            if done is not None:
                return done
        if dist_record is not None:
            report["distributed"] = dist_record
        if cfg.out:
            import json

            from .allocate.record import plot_ranks, ranks_document

            with stages("export"):
                doc = ranks_document(cfg.allocate, shapes, alloc.ranks, linear_target, cfg.pivga)
                extra = {"ranks.json": (json.dumps(doc, indent=1) + "\n").encode(), "ranks.png": plot_ranks(doc)}
                _record_time(report, stages, t0)
                writer.finish(runner, tokenizer, report, extra)
        _record_time(report, stages, t0)
        streamed = runner.offload == "disk"
    return (None if streamed else model), report


def _record_time(report: dict, stages: Stages, t0: float) -> None:
    report["timings_s"] = {**{k: round(v, 2) for k, v in stages.seconds.items()},
                           "total": round(time.perf_counter() - t0, 2)}
    report["memory"] = {"stages": stages.peaks.stages, "peak": stages.peaks.overall(),
                        "note": "cpu_rss_peak_mb: resident set of the process, sampled while the stage ran; "
                                "gpu_peak_mb: torch.cuda.max_memory_allocated during the stage"}


def _gather_timings(world, stages: Stages, alloc) -> tuple[dict, Optional[tuple[None, dict]]]:
    """The last collective of a distributed run: every rank's timings, for rank 0's manifest. Rank 0 goes on
    to write (second item None); the other ranks are done and return the second item."""
    record = dist.describe(dist.gather_object(dist.rank_record(stages.seconds), "per-rank timings"))
    if world.rank == 0:
        return record, None
    return record, (None, {"distributed": record, "rank": world.rank, "ranks": dict(alloc.ranks)})


def evaluate_model(model_or_runner, tokenizer, cfg: EvalConfig, device: str = "cpu", progress: bool = True) -> dict:
    """Perplexities (and zero-shot tasks when asked) of a model, through its runner."""
    from .evaluate.run import evaluate

    if isinstance(model_or_runner, Runner):
        return evaluate(model_or_runner, tokenizer, cfg, progress)
    with Runner(model_or_runner, Placement(device=str(device), offload="none")) as runner:
        return evaluate(runner, tokenizer, cfg, progress)

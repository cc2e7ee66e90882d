"""Healing: distil the dense model back into a compressed one, training only what compression left.

    teacher (dense) ──► top-k log-probs of every window, cached once (disk when large) ──► teacher freed
    student (compressed) ──► KL(teacher ‖ student) on the cached top-k (+ w · next-token NLL) ──► AdamW

What trains (`mode`):
* `factors`: A and B of every LowRankLinear (LEMS's `tune_svd`);
* `lora`: peft LoRA adapters on the factor layers A and B, merged back into them at the end (y = (A + ΔA)(B + ΔB)x
  is again a LowRankLinear of the same rank), so the format and the parameter count do not change;
* `norms=True` adds the norms and every bias but the LM head's.

Data: calibration text only. Each text's first half is tokenized; its last `val_fraction` is the held-out
validation slice, the rest is cut into non-overlapping training windows. The evaluation halves are never read.
The validation KL is measured every `eval_every` steps; the best checkpoint (lowest validation KL, the start
included) is kept in memory and restored at the end; `patience` evaluations without improvement stop the run.

PivGa: healing works on LowRankLinear factors, before PivGa (`svdpress heal`, then `svdpress pivga`; `compress
--pivga --heal ...` does it in that order). PivGa is lossless and exactly r² smaller per layer, so the order keeps
both properties; a PivGa directory is refused with that advice.

The student runs through its runner (`svdpress.model.Runner`, resident on the device: what trains must stay
put), block by block with optional gradient checkpointing per block; the KL and NLL come from the chunked
vocabulary losses (`model.head`), so the logits of all tokens are never held at once.
"""

from __future__ import annotations

import gc
import math
import time
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from .config import HealConfig
from .errors import SvdpressError
from .lowrank import LowRankLinear, PivGaLinear, set_module

if typing.TYPE_CHECKING:
    from .model import Runner

MEMORY_CACHE_BYTES = 1 << 30  # a teacher cache larger than this waits on disk


# ---------------------------------------------------------------------------------------------------------------
# Data: training and validation windows from the calibration halves


@dataclass
class HealData:
    train: torch.Tensor  # (N, seqlen) token ids, in a seeded order
    val: torch.Tensor  # (M, seqlen)
    parts: list[dict] = field(default_factory=list)  # per text: what was used

    def describe(self) -> dict:
        return {"texts": self.parts, "train_windows": len(self.train), "val_windows": len(self.val),
                "seqlen": int(self.train.shape[1]), "train_tokens": int(self.train.numel()),
                "val_tokens": int(self.val.numel()),
                "note": "windows from the calibration (first) half of each text only; the validation windows come "
                        "from the last val_fraction of it, the training windows from the rest; the evaluation "
                        "(second) half is never read"}


def heal_data(tokenizer, cfg: HealConfig) -> HealData:
    """Non-overlapping windows of `seqlen` tokens: validation from the tail of each calibration half, training
    from the rest, shuffled with the seed and cut to `samples`, or to the steps × batch_size windows the run can
    see (several texts: interleaved by the shuffle)."""
    from .data import TEXT_NAMES, load_text, split_text

    L = cfg.seqlen
    trains, vals, parts = [], [], []
    texts = cfg.texts()
    for name in texts:
        text = split_text(load_text(name), "calib")
        ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"][0]
        n_val = max(L * max(1, math.ceil(cfg.val_samples / len(texts))), int(len(ids) * cfg.val_fraction))
        if len(ids) < n_val + L * (cfg.batch_size if len(texts) == 1 else 1):
            raise SvdpressError(f"heal text {name!r} has {len(ids)} tokens in its calibration half, too few for one "
                                f"batch of {cfg.batch_size}×{L} tokens plus a validation slice: use a longer text, "
                                f"or a smaller seqlen / batch_size")
        cut = len(ids) - n_val
        tr = ids[:cut // L * L].reshape(-1, L)
        va = ids[cut:][: (len(ids) - cut) // L * L].reshape(-1, L)
        trains.append(tr)
        vals.append(va)
        parts.append({"text": name if name in TEXT_NAMES else Path(name).name, "part": "calib (first half)",
                      "chars": len(text), "tokens": int(len(ids)), "train_token_range": [0, int(cut)],
                      "val_token_range": [int(cut), int(len(ids))]})
    g = torch.Generator().manual_seed(cfg.seed)
    train = torch.cat(trains)
    # windows beyond steps × batch_size would never be trained on: they are not taken (nor is the teacher run on them)
    train = train[torch.randperm(len(train), generator=g)][: min(cfg.samples, cfg.steps * cfg.batch_size)]
    val = torch.cat(vals)
    val = val[torch.randperm(len(val), generator=g)][: cfg.val_samples]
    if len(train) < cfg.batch_size:
        raise SvdpressError(f"heal texts {', '.join(texts)} give {len(train)} training windows of {L} tokens, fewer "
                            f"than one batch of {cfg.batch_size}: use a longer text, or a smaller seqlen / batch_size")
    train = train[: len(train) // cfg.batch_size * cfg.batch_size]
    return HealData(train, val, parts)


# ---------------------------------------------------------------------------------------------------------------
# Teacher cache


class TeacherCache:
    """The dense model's top-k next-token log-probs per batch of windows (FermiGrad's cache), computed once;
    in memory, or one safetensors file per batch in a temporary folder when larger than MEMORY_CACHE_BYTES."""

    def __init__(self, batches: int, tokens: int, k: int, parent: Optional[str]) -> None:
        from .store import TensorStore

        self.bytes = tokens * k * (8 + 4)
        self.store = TensorStore(self.bytes > MEMORY_CACHE_BYTES, parent)
        self.batches = batches
        self.hit: Optional[str] = None  # the persistent entry it was read from (cfg.teacher_cache), if any

    def __setitem__(self, i: int, value: tuple[torch.Tensor, torch.Tensor]) -> None:
        self.store[str(i)] = {"idx": value[0].cpu().contiguous(), "logp": value[1].cpu().contiguous()}

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        t = self.store[str(i)]
        return t["idx"], t["logp"]

    def close(self) -> None:
        self.store.close()

    @property
    def on_disk(self) -> bool:
        return self.store.folder is not None


@torch.no_grad()
def cache_teacher(teacher: nn.Module, batches: list[torch.Tensor], cfg: HealConfig, device: str,
                  tensors=None) -> TeacherCache:
    """One pass of the dense model over every batch (through its own runner, streamed if it does not fit).

    With `cfg.teacher_cache`, the top-k are also kept on disk as a stats-cache entry (stats_cache.Entry: keyed by
    the teacher's weights, the windows' token ids, top_k, the batch size and the device type, a checksum per
    file, written atomically), and a later heal of any model compressed from this teacher, on the same data,
    reads them instead of running the teacher again (`cache.hit`)."""
    from .allocate.fermigrad import teacher_topk
    from .model import Placement, Runner

    cache = TeacherCache(len(batches), sum(b.numel() for b in batches), cfg.top_k, cfg.cache_dir)
    writer = None
    try:
        with Runner(teacher, Placement(device=device, offload="auto"), tensors) as runner:
            entry = teacher_entry(runner, batches, cfg) if cfg.teacher_cache else None
            files = entry.valid_files() if entry is not None else None
            if files is not None and len(files) == len(batches):
                for i, f in enumerate(files):
                    t = torch.load(f, map_location="cpu", weights_only=True)
                    cache[i] = (t["idx"], t["logp"])
                cache.hit = str(entry.path)
                return cache
            writer = entry.writer() if entry is not None else None
            for i, b in enumerate(tqdm(batches, desc="teacher", unit="batch", disable=not cfg.progress)):
                (idx, logp), = teacher_topk(runner, runner.embed([b]), cfg.top_k)
                cache[i] = (idx, logp)
                if writer is not None:
                    writer.add(f"batch_{i:05d}.pt", {"idx": idx.cpu().contiguous(), "logp": logp.cpu().contiguous()})
            if writer is not None:
                writer.commit()
    except BaseException:
        cache.close()
        raise
    finally:
        if writer is not None:
            writer.abort()  # no-op after commit (the folder was renamed)
    return cache


def teacher_entry(runner: "Runner", batches: list[torch.Tensor], cfg: HealConfig):
    """The teacher cache's entry for these windows (what the top-k depend on is its key)."""
    from .stats_cache import StatsCache

    return StatsCache(cfg.teacher_cache, runner, torch.cat(batches)).entry(
        "teacher", top_k=cfg.top_k, batch_size=cfg.batch_size, device=runner.device.type)


# ---------------------------------------------------------------------------------------------------------------
# The student: what trains, its loss, LoRA in and out


def factored_layers(model: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules() if isinstance(m, (LowRankLinear, PivGaLinear))}


NOT_COMPRESSED = ("{where} is not compressed (no factored layers): healing trains the factors of a compressed "
                  "model; compress it first (svdpress compress ... --heal KEY=VALUE)")


def check_student(model: nn.Module, where: str) -> None:
    layers = factored_layers(model)
    if not layers:
        raise SvdpressError(NOT_COMPRESSED.format(where=where))
    if any(isinstance(m, PivGaLinear) for m in layers.values()):
        raise SvdpressError(f"{where} is PivGa-compressed: heal before PivGa (svdpress heal the directory compressed "
                            f"without --pivga, then svdpress pivga; compress --pivga --heal does both in order)")


def add_lora(model: nn.Module, cfg: HealConfig) -> list[str]:
    """peft LoRA adapters on the factor layers (A and B) of every LowRankLinear; returns their names."""
    from peft import LoraConfig, inject_adapter_in_model

    names = [f"{n}.{part}" for n, m in model.named_modules() if isinstance(m, LowRankLinear) for part in ("A", "B")]
    config = LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                        target_modules=names, bias="none")
    inject_adapter_in_model(config, model)
    return names


def merge_lora(model: nn.Module) -> int:
    """Merge every LoRA adapter into its factor layer and put the plain nn.Linear back; returns how many."""
    from peft.tuners.lora import LoraLayer

    merged = [(n, m) for n, m in model.named_modules() if isinstance(m, LoraLayer)]
    for name, layer in merged:
        layer.merge(safe_merge=True)
        base = layer.get_base_layer()
        set_module(model, name, base)
    for attr in ("peft_config", "_hf_peft_config_loaded"):
        if attr in model.__dict__:
            delattr(model, attr)
    return len(merged)


def trainable(model: nn.Module, cfg: HealConfig) -> dict[str, nn.Parameter]:
    """name → parameter that trains; every other parameter is frozen."""
    from peft.tuners.lora import LoraLayer

    model.requires_grad_(False)
    chosen: dict[str, nn.Parameter] = {}
    for name, m in model.named_modules():
        if cfg.mode == "factors" and isinstance(m, LowRankLinear):
            chosen[f"{name}.A.weight"] = m.A.weight
            chosen[f"{name}.B.weight"] = m.B.weight
        if cfg.mode == "lora" and isinstance(m, LoraLayer):
            for pn, p in m.named_parameters(recurse=True):
                if "lora_" in pn:
                    chosen[f"{name}.{pn}"] = p
        if cfg.norms and "norm" in type(m).__name__.lower():
            for pn, p in m.named_parameters(recurse=False):
                chosen[f"{name}.{pn}"] = p
    if cfg.norms:  # and the biases (of every linear layer but the LM head's)
        head = model.get_output_embeddings()
        skip = {id(getattr(head, "bias", None))}
        for name, p in model.named_parameters():
            if name.endswith(".bias") and "lora_" not in name and id(p) not in skip:
                chosen.setdefault(name, p)
    for p in chosen.values():
        p.requires_grad_(True)
    return chosen


def hidden(runner: "Runner", batch: torch.Tensor, checkpointing: bool) -> torch.Tensor:
    """The student's final hidden states (after the final norm) for a batch of token ids: (B·T, d)."""
    from torch.utils.checkpoint import checkpoint

    (h, kw), = runner.embed([batch])
    h = h.to(runner.device)
    for blk in runner.blocks:
        if checkpointing and torch.is_grad_enabled():
            h = checkpoint(runner.run, blk, h, kw, use_reentrant=False)
        else:
            h = runner.run(blk, h, kw)
    z = runner.final(h)
    return z.reshape(-1, z.shape[-1])


def loss_terms(runner: "Runner", batch: torch.Tensor, teacher: tuple[torch.Tensor, torch.Tensor], cfg: HealConfig,
               autocast: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, kl): KL on the teacher's top-k (+ nll_weight × mean next-token NLL)."""
    from .allocate.fermigrad import topk_kl
    from .model.head import nll_sum

    dev = runner.device
    with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=autocast):
        z = hidden(runner, batch, dev.type == "cuda" if cfg.checkpointing is None else cfg.checkpointing)
    z = z.float()
    head = runner.head
    t_idx, t_logp = (t.to(dev) for t in teacher)
    kl = topk_kl(head, z, t_idx, t_logp)
    loss = kl
    if cfg.nll_weight > 0:
        T = batch.shape[1]
        zz = z.view(batch.shape[0], T, -1)[:, :-1].reshape(-1, z.shape[-1])
        nll = nll_sum(head, zz, batch[:, 1:].reshape(-1).to(dev)) / zz.shape[0]
        loss = kl + cfg.nll_weight * nll
    return loss, kl


@torch.no_grad()
def validation_kl(runner: "Runner", batches: list[torch.Tensor], cache: TeacherCache, offset: int, cfg: HealConfig,
                  autocast: bool) -> float:
    total, n = 0.0, 0
    for i, b in enumerate(batches):
        _, kl = loss_terms(runner, b, cache[offset + i], cfg, autocast)
        total += float(kl) * b.numel()
        n += b.numel()
    return total / n


def lr_at(step: int, cfg: HealConfig) -> float:
    """Linear warmup over `warmup` steps, then cosine from lr down to lr·lr_final at the last step (a factor)."""
    if step < cfg.warmup:
        return (step + 1) / (cfg.warmup + 1)
    span = max(1, cfg.steps - cfg.warmup)
    t = min(1.0, (step - cfg.warmup) / span)
    return cfg.lr_final + (1 - cfg.lr_final) * 0.5 * (1 + math.cos(math.pi * t))


def _finite(params) -> bool:
    return all(bool(torch.isfinite(p).all()) for p in params)


# ---------------------------------------------------------------------------------------------------------------
# The loop


def train(runner: "Runner", params: dict[str, nn.Parameter], data: HealData, cache: TeacherCache,
          cfg: HealConfig, monitor: Optional[Callable[[int, "Runner"], dict]] = None) -> dict[str, Any]:
    """AdamW + warmup/cosine over fixed batches (every batch once per epoch, in a seeded order); the validation
    KL every `eval_every` steps, the best state kept in memory and restored at the end. A non-finite loss,
    gradient or validation KL stops the run (the best state is restored). `monitor(step, runner)`, called at each
    validation point (step 0 included), may add figures to that point of the curve (the bench's perplexities);
    its time is not counted as training time."""
    dev = runner.device
    autocast = dev.type == "cuda" and cfg.bf16
    bs = cfg.batch_size
    train_batches = list(data.train.split(bs))
    val_batches = list(data.val.split(bs))
    n_train = len(train_batches)
    opt = torch.optim.AdamW(list(params.values()), lr=cfg.lr, weight_decay=cfg.weight_decay, foreach=False)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_at(s, cfg))
    g = torch.Generator().manual_seed(cfg.seed)
    order = torch.cat([torch.randperm(n_train, generator=g) for _ in range(cfg.steps // n_train + 1)]).tolist()

    def snapshot() -> dict[str, torch.Tensor]:
        return {n: p.detach().to("cpu", copy=True) for n, p in params.items()}

    t0 = time.perf_counter()
    paused = 0.0  # seconds spent in the monitor

    def watch(step: int, point: dict) -> dict:
        nonlocal paused
        if monitor is not None:
            t = time.perf_counter()
            point.update(monitor(step, runner))
            paused += time.perf_counter() - t
        return point

    val0 = validation_kl(runner, val_batches, cache, n_train, cfg, autocast)
    best = {"step": 0, "val_kl": val0, "state": snapshot()}
    curve: list[dict] = []
    val_curve = [watch(0, {"step": 0, "tokens": 0, "val_kl": val0, "time_s": round(time.perf_counter() - t0, 2)})]
    stopped, bad, tokens = "steps", 0, 0
    bar = tqdm(range(cfg.steps), desc=f"heal ({cfg.mode})", unit="step", disable=not cfg.progress)
    step = 0
    for step in bar:
        b = order[step]
        opt.zero_grad(set_to_none=True)
        loss, kl = loss_terms(runner, train_batches[b], cache[b], cfg, autocast)
        if not torch.isfinite(loss):
            stopped = f"nan: the loss was {float(loss.detach())} at step {step + 1}"
            break
        loss.backward()
        grads = [p.grad for p in params.values() if p.grad is not None]
        norm = (torch.nn.utils.clip_grad_norm_(list(params.values()), cfg.grad_clip) if cfg.grad_clip > 0
                else torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(x) for x in grads])))
        if not torch.isfinite(norm):
            stopped = f"nan: the gradient norm was {float(norm)} at step {step + 1}"
            break
        opt.step()
        sched.step()
        tokens += train_batches[b].numel()
        curve.append({"step": step + 1, "tokens": tokens, "loss": float(loss.detach()), "kl": float(kl.detach()),
                      "lr": opt.param_groups[0]["lr"], "grad_norm": float(norm)})
        last = step + 1 == cfg.steps
        out_of_time = cfg.time_limit > 0 and time.perf_counter() - t0 - paused >= cfg.time_limit
        if (step + 1) % cfg.eval_every == 0 or last or out_of_time:
            v = validation_kl(runner, val_batches, cache, n_train, cfg, autocast)
            point = {"step": step + 1, "tokens": tokens, "val_kl": v if math.isfinite(v) else None,
                     "time_s": round(time.perf_counter() - t0 - paused, 2)}
            if not math.isfinite(v) or not _finite(params.values()):
                val_curve.append(point)
                stopped = f"nan: the validation KL was {v} at step {step + 1}"
                break
            val_curve.append(watch(step + 1, point))
            if v < best["val_kl"]:
                best = {"step": step + 1, "val_kl": v, "state": snapshot()}
                bad = 0
            else:
                bad += 1
                if cfg.patience and bad >= cfg.patience:
                    stopped = f"early stop: no better validation KL in {bad} evaluations"
                    break
        bar.set_postfix(loss=f"{float(loss.detach()):.4f}", val_kl=f"{val_curve[-1]['val_kl']:.4f}")
        if out_of_time:
            stopped = f"time limit ({cfg.time_limit:g} s)"
            break
    train_s = time.perf_counter() - t0 - paused
    with torch.no_grad():  # the best state back in place (the start itself when nothing improved)
        for n, p in params.items():
            p.copy_(best["state"][n].to(p.device))
    opt.zero_grad(set_to_none=True)
    del opt
    return {"curve": curve, "val_curve": val_curve, "best_step": best["step"], "best_val_kl": best["val_kl"],
            "initial_val_kl": val0, "stopped": stopped, "steps_run": len(curve), "tokens_seen": tokens,
            "train_s": round(train_s, 2), "monitor_s": round(paused, 2)}


# ---------------------------------------------------------------------------------------------------------------
# Entry point


def heal(model_or_dir: Any, config: Optional[HealConfig] = None, tokenizer=None, teacher: Any = None,
         monitor: Optional[Callable[[int, "Runner"], dict]] = None, **overrides) -> tuple[nn.Module, dict]:
    """Heal a compressed model by distillation from its dense original; returns (model, report).

    `model_or_dir`: an svdpress output directory (its manifest names the teacher and is carried over, with a
    `heal` section, to `config.out`), or a loaded compressed model (then pass `tokenizer=` and `teacher=`, a
    loaded dense model or a model id/path). The healed model has the same format and parameter count.
    `monitor(step, runner)` adds figures to the validation curve (see `train`)."""
    from . import __version__
    from .config import resolve_device
    from .export import check_out, read_manifest
    from .model import Placement, Runner
    from .models import load_model
    from .params import model_params

    cfg = config or HealConfig()
    for k, v in overrides.items():
        setattr(cfg, k, v)
    cfg.validate()
    t_start = time.perf_counter()
    if cfg.out:
        if isinstance(model_or_dir, (str, Path)) and Path(cfg.out).resolve() == Path(model_or_dir).resolve():
            raise SvdpressError("--out must differ from the source directory")
        check_out(Path(cfg.out), cfg.overwrite)
    source_dir: Optional[str] = None
    model: Optional[nn.Module] = None
    if isinstance(model_or_dir, (str, Path)):  # the student is loaded after the teacher is done and freed
        from transformers import AutoTokenizer

        from .models import resolve_model

        source_dir = str(model_or_dir)
        manifest = read_manifest(source_dir)
        if manifest.get("pivga"):
            raise SvdpressError(f"{source_dir} is PivGa-compressed: heal before PivGa (svdpress heal the directory "
                                f"compressed without --pivga, then svdpress pivga; compress --pivga --heal does "
                                f"both in order)")
        if not resolve_model(source_dir).compressed:
            raise SvdpressError(NOT_COMPRESSED.format(where=source_dir))
        tokenizer = AutoTokenizer.from_pretrained(source_dir)
        teacher = teacher if teacher is not None else (cfg.teacher or (manifest.get("model") or {}).get("source"))
        if teacher is None:
            raise SvdpressError(f"{source_dir}/svdpress.json names no model source: pass the dense model (teacher=)")
    else:
        if not isinstance(model_or_dir, nn.Module):
            raise SvdpressError("heal() takes an svdpress output directory or a loaded compressed model")
        if tokenizer is None:
            raise SvdpressError("heal(model, ...) with a loaded model needs its tokenizer=")
        teacher = teacher if teacher is not None else cfg.teacher
        if teacher is None:
            raise SvdpressError("heal(model, ...) with a loaded model needs the dense model: teacher= (a model or id)")
        model, manifest = model_or_dir, {}
        check_student(model, "the model")
    device = resolve_device(cfg.device)
    torch.manual_seed(cfg.seed)

    # data, then the teacher's outputs (the teacher is freed before the student is loaded or trained)
    data = heal_data(tokenizer, cfg)
    batches = list(data.train.split(cfg.batch_size)) + list(data.val.split(cfg.batch_size))
    t0 = time.perf_counter()
    teacher_spec = teacher if isinstance(teacher, str) else type(teacher).__name__
    tensors = None
    if isinstance(teacher, str):
        teacher, _, src = load_model(teacher, torch.float32, "cpu", lazy=True)
        tensors = src.tensors
    if factored_layers(teacher):
        raise SvdpressError(f"the teacher {teacher_spec} is itself compressed: heal from the dense original model")
    vocab = teacher.get_output_embeddings().weight.shape[0]
    cache = cache_teacher(teacher, batches, cfg, device, tensors)
    teacher = tensors = None
    gc.collect()
    teacher_s = time.perf_counter() - t0

    try:
        if model is None:
            from .config import torch_dtype

            model, _, _ = load_model(source_dir, torch_dtype((manifest.get("model") or {}).get("dtype", "float32")))
            check_student(model, source_dir)
        student_vocab = model.get_output_embeddings().weight.shape[0]
        if student_vocab != vocab:
            raise SvdpressError(f"the teacher {teacher_spec} has a vocabulary of {vocab}, the compressed model "
                                f"{student_vocab}: not the model it was compressed from")
    except BaseException:
        cache.close()
        raise
    params_before = model_params(model)

    try:
        with Runner(model, Placement(device=device, offload="none")) as runner:
            if cfg.mode == "lora":
                torch.manual_seed(cfg.seed)
                add_lora(model, cfg)
            params = trainable(model, cfg)
            n_trainable = sum(p.numel() for p in params.values())
            run = train(runner, params, data, cache, cfg, monitor)
            for p in params.values():
                p.requires_grad_(False)
            merged = merge_lora(model) if cfg.mode == "lora" else 0
            model.requires_grad_(False)
            if not _finite(model.parameters()):
                raise SvdpressError("healing left non-finite weights (a bug): nothing was written")
            if model_params(model) != params_before:
                raise SvdpressError(f"healing changed the parameter count ({params_before} → {model_params(model)}): "
                                    f"nothing was written")
            if run["stopped"].startswith("nan") and run["best_step"] == 0:
                raise SvdpressError(f"healing diverged ({run['stopped'][5:]}; lr {cfg.lr:g} too high?) before "
                                    f"improving on the start: nothing was written")
            results, t_eval = None, time.perf_counter()
            if cfg.eval is not None:
                from .evaluate.run import evaluate

                results = evaluate(runner, tokenizer, cfg.eval, cfg.progress)
            eval_s = time.perf_counter() - t_eval
            placement = runner.describe()
    finally:
        cache.close()
    model.eval()

    report_heal = {
        "settings": cfg.settings(),
        "teacher": teacher_spec,
        "data": data.describe(),
        "teacher_cache": {"top_k": cfg.top_k, "mb": round(cache.bytes / 2**20, 1), "on_disk": cache.on_disk,
                          "read_from": cache.hit},
        "trainable_params": n_trainable,
        "lora_layers_merged": merged,
        "params": {"before": params_before, "after": model_params(model)},
        "best_step": run["best_step"],
        "initial_val_kl": run["initial_val_kl"],
        "best_val_kl": run["best_val_kl"],
        "stopped": run["stopped"],
        "steps_run": run["steps_run"],
        "tokens_seen": run["tokens_seen"],
        "curve": run["curve"],
        "val_curve": run["val_curve"],
        "time_s": {"teacher": round(teacher_s, 2), "train": run["train_s"],
                   "total": round(time.perf_counter() - t_start - run["monitor_s"] - eval_s, 2),
                   "evaluation": round(eval_s + run["monitor_s"], 2),
                   "note": "total: everything from loading to the healed model, evaluation excluded"},
        "device": device,
        "placement": placement,
        "svdpress_version": __version__,
        "note": "KL(teacher || student) on the teacher's top-k log-probs (+ the rest of the vocabulary as one "
                "bucket); the best checkpoint by validation KL is kept (step 0 = the model as it came)",
    }
    manifest = dict(manifest)
    if "eval" in manifest:  # the compressed model's figures describe the model before healing
        report_heal["eval_before"] = manifest.pop("eval")
    if results is not None:
        manifest["eval"] = results
    manifest["heal"] = report_heal
    if run["stopped"].startswith("nan"):
        tqdm.write(f"svdpress: warning: healing stopped ({run['stopped'][5:]}); the best checkpoint, step "
                   f"{run['best_step']}, was kept")
    if cfg.out:
        from .export import save

        extra = {}
        if source_dir is not None:
            extra = {f: (Path(source_dir) / f).read_bytes() for f in ("ranks.json", "ranks.png")
                     if (Path(source_dir) / f).is_file()}
        save(model, tokenizer, cfg.out, manifest, overwrite=cfg.overwrite, extra_files=extra)
    return model, manifest


def summarize(report: dict) -> str:
    """A short table of one heal run (the CLI prints it)."""
    from .table import table

    h = report["heal"]
    rows = [
        ["mode", h["settings"]["mode"] + (" + norms" if h["settings"]["norms"] else "")],
        ["teacher", str(h["teacher"])],
        ["data", f"{', '.join(p['text'] for p in h['data']['texts'])} (calibration half): "
                 f"{h['data']['train_windows']}×{h['data']['seqlen']} train, {h['data']['val_windows']} val windows"],
        ["steps", f"{h['steps_run']} run, best {h['best_step']} ({h['stopped']}); {h['tokens_seen']:,} tokens seen"],
        ["validation KL", f"{h['initial_val_kl']:.4f} → {h['best_val_kl']:.4f}"],
        ["params", f"{h['params']['after']:,} (unchanged; {h['trainable_params']:,} trained)"],
        ["time (s)", ", ".join(f"{k} {v}" for k, v in h["time_s"].items() if k != "note")],
    ]
    from .evaluate.run import eval_rows

    rows += eval_rows(report.get("eval") or {}, seqlen=False)
    return table(rows, ["", "heal"])

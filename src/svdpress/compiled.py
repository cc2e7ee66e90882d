"""torch.compile of a loaded model (dense or factored), with a fallback that never stops the user's work.

A factored layer runs as two GEMMs (LowRankLinear) or a gather, a GEMM-add and a GEMM (PivGaLinear); at small
batch each is launch-bound, and torch.compile (inductor: fused elementwise work and, with
`mode="reduce-overhead"`, CUDA graphs for decode) removes most of that overhead. The compiler is not always
there: inductor needs Triton on CUDA and a C++ compiler on CPU, and some builds or Python versions lack dynamo.
`compile_model` therefore compiles, runs one short warm-up forward so that a missing or failing compiler shows up
now rather than at the first real call, and on any failure restores the uncompiled forward and says so in one
line (a `UserWarning`, printed as `svdpress: warning: ...` by the CLI).
"""

from __future__ import annotations

import warnings
from typing import Optional

import torch
import torch.nn as nn

MODES = (None, "default", "reduce-overhead", "max-autotune")
RECOMPILE_LIMIT = 64  # graphs kept per code object: every model of one class shares `forward`'s (dynamo's is 8)


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__


def compile_model(model: nn.Module, mode: Optional[str] = None, backend: str = "inductor",
                  warmup_tokens: int = 8) -> tuple[nn.Module, Optional[str]]:
    """(model, None) with `model.forward` compiled in place, or (model, why) running uncompiled after one
    warning when the compiler is unavailable or fails on this model."""
    from .errors import SvdpressError

    if mode not in MODES:
        raise SvdpressError(f"unknown compile mode {mode!r}; choose one of "
                            f"{', '.join(m for m in MODES if m)}")
    original = model.forward
    try:
        if not torch._dynamo.is_dynamo_supported():
            raise RuntimeError("torch.compile is not supported on this Python/torch build")
        # dense, svd and pivga models of one class, each at prefill and decode shapes, are recompiles of the one
        # `forward`: past dynamo's limit of 8 the rest would silently run uncompiled
        cfg = torch._dynamo.config
        cfg.recompile_limit = max(getattr(cfg, "recompile_limit", 8), RECOMPILE_LIMIT)
        model.forward = torch.compile(original, mode=mode, backend=backend)
        param = next(model.parameters(), None)
        device = param.device if param is not None and param.device.type != "meta" else torch.device("cpu")
        ids = torch.zeros(1, warmup_tokens, dtype=torch.long, device=device)
        with torch.no_grad():
            model(input_ids=ids, use_cache=False)
    except Exception as e:  # noqa: BLE001 (compiler failures come in many types: missing Triton, no C++ compiler)
        model.forward = original
        torch._dynamo.reset()
        why = _first_line(e)
        warnings.warn(f"compile unavailable ({why}); running uncompiled", UserWarning, stacklevel=2)
        return model, why
    return model, None

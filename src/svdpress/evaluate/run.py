"""One evaluation of a placed model: perplexities on the named texts, then zero-shot tasks when asked.

The model is never moved here: the `Runner` that owns its placement (resident, or streamed block by block from
CPU RAM or disk) runs it, for perplexity through `runner.forward` and for lm-eval through `runner.streamed()`.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from ..config import EvalConfig
from ..errors import SvdpressError
from .perplexity import text_perplexity

if TYPE_CHECKING:
    from ..model import Runner


def evaluate(runner: "Runner", tokenizer, cfg: EvalConfig, progress: bool = True) -> dict:
    """{"ppl": {text: text_perplexity record}, "tasks": {task: zero-shot record} (only when cfg.tasks)}."""
    out: dict[str, Any] = {"ppl": {}}
    for name in cfg.ppl:
        out["ppl"][name] = rec = text_perplexity(runner, tokenizer, name, cfg.seqlen, cfg.limit, cfg.batch_size,
                                                 progress)
        finite(f"perplexity on {name}", rec["ppl"])
    if cfg.tasks:
        from .zeroshot import zero_shot

        out["tasks"] = zero_shot(runner, tokenizer, cfg.tasks, limit=cfg.task_limit, seed=cfg.seed,
                                 batch_size=cfg.batch_size, source=cfg.task_source)
        for task, rec in out["tasks"].items():
            for metric in ("acc", "acc_norm"):
                if metric in rec:
                    finite(f"{task} {metric}", rec[metric])
    return out


def finite(what: str, value: float) -> float:
    """A figure is finite or it is an error: NaN/Inf means the model's outputs are broken (e.g. a NaN weight)."""
    if not math.isfinite(value):
        raise SvdpressError(f"{what} is {value}: the model produces non-finite outputs (NaN/Inf in its weights?)")
    return value


def eval_rows(ev: dict, seqlen: bool = True) -> list[list[str]]:
    """Summary-table rows of an evaluation's results: one per perplexity (with its window when `seqlen`), one per
    zero-shot task, and their average accuracy."""
    rows = []
    for name, res in (ev.get("ppl") or {}).items():
        window = f", seqlen {res['seqlen']}" if seqlen else ""
        rows.append([f"ppl {name}", f"{res['ppl']:.3f} ({res['tokens']} tokens of {res['part']}{window})"])
    if ev.get("tasks"):
        from .zeroshot import average_acc, task_summary

        rows += [[name, task_summary(res)] for name, res in ev["tasks"].items()]
        rows.append(["average acc", f"{average_acc(ev['tasks']):.4f} over {len(ev['tasks'])} tasks"])
    return rows

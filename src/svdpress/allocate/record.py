"""One JSON format and one plot for every allocation, whatever method produced it.

ranks.json:
    {"format": "svdpress-ranks/1", "method": "fermigrad", "ratio": {"target": 0.8, "achieved": 0.7996},
     "budget_counting": "classical",
     "layers": {"model.layers.0.self_attn.q_proj": {"shape": [576, 576], "rank": 230}, ...}}
A rank of null means the layer is kept dense. `budget_counting` (classical | pivga, absent in older files) is the
counting the ratio was met under: a PivGa budget gives ranks past the classical break-even. `--allocate load
--ranks ranks.json` reads it back and re-checks the budget under the counting in force.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Mapping, Optional

from ..errors import SvdpressError
from ..params import Counting, LayerShape, dense_count

FORMAT = "svdpress-ranks/1"


def ranks_document(method: str, shapes: Mapping[str, LayerShape], ranks: Mapping[str, Optional[int]],
                   target: float, pivga: Optional[bool] = None) -> dict:
    """The ranks.json document; `achieved` and `budget_counting` follow the counting the allocation was made
    under: `pivga`, or when None the counting `ranks` carries (`allocate()` returns `Ranks`), else classical."""
    counting = Counting(pivga) if pivga is not None else getattr(ranks, "counting", Counting())
    return {
        "format": FORMAT,
        "method": method,
        "ratio": {"target": target, "achieved": counting.total(shapes, ranks) / dense_count(shapes)},
        "budget_counting": counting.name,
        "layers": {n: {"shape": [s.m, s.n], "rank": ranks.get(n)} for n, s in shapes.items()},
    }


def read_layers(path: str | Path) -> dict[str, tuple[Optional[tuple[int, int]], Optional[int]]]:
    """{layer: (shape [m, n] or None when absent, rank or None)}; a clear error for a missing or malformed file."""
    return _read(path)[1]


def read_counting(path: str | Path) -> Optional[str]:
    """The file's `budget_counting` (classical | pivga), None when it does not say (files before it was recorded)."""
    return _read(path)[0]


def _read(path: str | Path) -> tuple[Optional[str], dict[str, tuple[Optional[tuple[int, int]], Optional[int]]]]:
    try:
        doc = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise SvdpressError(f"rank file {path} does not exist") from None
    except IsADirectoryError:
        raise SvdpressError(f"rank file {path} is a directory; give the ranks.json inside it") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SvdpressError(f"rank file {path} is not valid JSON: {e}") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT or not isinstance(doc.get("layers"), dict):
        raise SvdpressError(f"rank file {path} is not in the {FORMAT} format")
    counting = doc.get("budget_counting")
    if counting not in (None, "classical", "pivga"):
        raise SvdpressError(f"rank file {path}: budget_counting must be classical or pivga, got {counting!r}")
    out: dict[str, tuple[Optional[tuple[int, int]], Optional[int]]] = {}
    for name, entry in doc["layers"].items():
        if not isinstance(entry, dict):
            raise SvdpressError(f"rank file {path}: layer {name} entry must be an object with shape and rank")
        r, shape = entry.get("rank"), entry.get("shape")
        if r is not None and (isinstance(r, bool) or not isinstance(r, int) or r < 1):
            raise SvdpressError(f"rank file {path}: layer {name} has invalid rank {r!r}")
        if shape is not None and (not isinstance(shape, list) or len(shape) != 2
                                  or not all(isinstance(x, int) and x > 0 for x in shape)):
            raise SvdpressError(f"rank file {path}: layer {name} has invalid shape {shape!r}")
        out[name] = (tuple(shape) if shape is not None else None, r)
    return counting, out


def read_ranks(path: str | Path) -> dict[str, Optional[int]]:
    """{layer: rank or None}; a clear error for a missing or malformed file."""
    return {name: r for name, (_, r) in read_layers(path).items()}


def plot_ranks(doc: dict, title: str = "") -> bytes:
    """PNG of the kept fraction (r·(m+n), or r·(m+n) − r² under a PivGa budget, over m·n) per block, one line per
    projection type: where the budget went."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    counting = Counting(doc.get("budget_counting") == "pivga")
    series: dict[str, list[tuple[int, float, float]]] = {}
    for name, e in doc["layers"].items():
        m, n = e["shape"]
        parts = name.split(".")
        block = next((int(p) for p in parts if p.isdigit()), 0)
        r = e["rank"]
        kept = counting.layer(LayerShape(m, n), r) / (m * n)
        series.setdefault(parts[-1], []).append((block, kept, min(m, n) if r is None else r))
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.2))
    for kind, pts in sorted(series.items()):
        pts.sort()
        ax1.plot([p[0] for p in pts], [p[2] for p in pts], marker="o", ms=3, label=kind)
        ax2.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ms=3, label=kind)
    ax1.set(xlabel="block", ylabel="rank", title="rank per layer")
    ax2.set(xlabel="block", ylabel="kept parameter fraction", title="kept fraction (1 = dense)")
    ax2.axhline(doc["ratio"]["target"], color="gray", ls="--", lw=1)
    ax2.legend(fontsize=8, ncol=2)
    fig.suptitle(title or f"{doc['method']}: ratio {doc['ratio']['achieved']:.4f} (target {doc['ratio']['target']})")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()

"""Side-by-side comparison of several models (original included): a Markdown table and PNG plots.

Each entry is one of
- a compressed directory (its `svdpress.json` manifest: method, ratio, parameters, and the "eval" entry),
- a JSON file: a manifest (from `compress --json`) or an evaluation (from `svdpress eval ... --json`),
- a model that is not compressed ('default', a hub id or a local model directory): the original, ratio 1.

Figures not recorded for a model are shown as '-'. Speed and memory are read wherever a `tokens_per_s` /
`peak_mb` figure was recorded (the speed benchmark's keys).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Optional

from .errors import SvdpressError
from .export import read_json
from .models import MANIFEST

SPEED_KEYS = ("tokens_per_s",)
MEMORY_KEYS = ("peak_mb", "peak_memory_mb")


@dataclass
class Entry:
    """One model's row: what it is and what was measured."""
    label: str
    method: str  # "dense" for the original
    ratio: float  # kept / dense parameters of the decoder linear layers (1 for the original)
    params: Optional[int]  # every parameter of the model
    ppl: dict[str, float] = field(default_factory=dict)
    tasks: dict[str, float] = field(default_factory=dict)  # task → acc
    tokens_per_s: Optional[float] = None
    peak_mb: Optional[float] = None


def _find(doc: Any, keys: Iterable[str]) -> Optional[float]:
    """First number stored under one of `keys`, depth first (speed results nest them per workload)."""
    keys = tuple(keys)
    if isinstance(doc, dict):
        for k in keys:
            if isinstance(doc.get(k), (int, float)) and not isinstance(doc.get(k), bool):
                return float(doc[k])
        for v in doc.values():
            if (x := _find(v, keys)) is not None:
                return x
    return None


def _eval_figures(e: Entry, ev: dict, extra: Optional[dict] = None) -> Entry:
    e.ppl = {k: float(v["ppl"]) for k, v in (ev.get("ppl") or {}).items()}
    e.tasks = {k: float(v["acc"]) for k, v in (ev.get("tasks") or {}).items()}
    where = {"eval": ev, **(extra or {})}
    e.tokens_per_s, e.peak_mb = _find(where, SPEED_KEYS), _find(where, MEMORY_KEYS)
    return e


def from_manifest(doc: dict, label: str) -> Entry:
    method = f"{doc['factorize']}+{doc['allocate']}" + ("+pivga" if doc.get("pivga") else "")
    e = Entry(label, method, float(doc["params"]["linear_ratio"]), int(doc["params"]["model_compressed"]))
    return _eval_figures(e, doc.get("eval") or {}, {k: v for k, v in doc.items() if k in ("speed", "memory")})


def from_eval(doc: dict, label: str) -> Entry:
    """An `svdpress eval --json` document: the evaluated model's own manifest decides dense vs compressed."""
    e = Entry(label, doc.get("method", "dense"), float(doc.get("ratio", 1.0)), doc.get("params"))
    return _eval_figures(e, doc)


def load_entry(spec: str) -> Entry:
    p = Path(spec)
    if p.is_dir() and (p / MANIFEST).is_file():
        return from_manifest(read_json(p / MANIFEST), p.name)
    if p.is_file() and p.suffix == ".json":
        doc = read_json(p)
        if not isinstance(doc, dict):
            raise SvdpressError(f"{spec}: neither an svdpress manifest nor an svdpress eval result")
        if "params" in doc and isinstance(doc["params"], dict) and "factorize" in doc:
            return from_manifest(doc, p.stem)
        if "ppl" in doc or "tasks" in doc:
            return from_eval(doc, str(doc.get("model") or p.stem))
        raise SvdpressError(f"{spec}: neither an svdpress manifest nor an svdpress eval result")
    from .models import load_model
    from .params import model_params

    model, _, _ = load_model(spec)  # an uncompressed model without recorded figures: its size only
    return Entry(spec, "dense", 1.0, model_params(model))


def _slug(text: str) -> str:
    """A perplexity text's name fit for a file name (texts may be given as paths)."""
    return re.sub(r"[^\w.-]+", "_", Path(text).name)


def _columns(entries: list[Entry]) -> tuple[list[str], list[str]]:
    ppl = list(dict.fromkeys(k for e in entries for k in e.ppl))
    tasks = list(dict.fromkeys(k for e in entries for k in e.tasks))
    return ppl, tasks


def report_table(entries: list[Entry], markdown: bool = True) -> str:
    """model | method | ratio | params | ppl … | task acc … | avg acc | tokens/s | peak MB."""
    from .table import table

    ppl, tasks = _columns(entries)
    head = ["model", "method", "ratio", "params"] + [f"ppl {Path(k).name}" for k in ppl] + tasks + \
           ["avg acc", "tokens/s", "peak MB"]
    rows = []
    for e in entries:
        accs = [e.tasks.get(t) for t in tasks]
        have = [a for a in accs if a is not None]
        avg = sum(have) / len(have) if have and len(have) == len(tasks) else None  # only over the same tasks
        rows.append([e.label, e.method, round(e.ratio, 4), f"{e.params:,}" if e.params else None,
                     *[e.ppl.get(k) for k in ppl], *accs, avg, e.tokens_per_s, e.peak_mb])
    return table(rows, head, markdown=markdown)


def plot(entries: list[Entry], out_dir: Path) -> list[Path]:
    """accuracy.png (mean acc vs ratio) and perplexity.png (log scale), one line per method, the original as
    a star at ratio 1."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    _, tasks = _columns(entries)
    figures = {"accuracy.png": ("mean zero-shot acc", lambda e: sum(e.tasks.values()) / len(e.tasks)
                                if tasks and len(e.tasks) == len(tasks) else None, False)}
    for k in _columns(entries)[0]:
        figures[f"perplexity_{_slug(k)}.png"] = (f"perplexity ({k})", lambda e, k=k: e.ppl.get(k), True)
    written = []
    for name, (ylabel, value, log) in figures.items():
        fig, ax = plt.subplots(figsize=(6, 4))
        for method in dict.fromkeys(e.method for e in entries):
            pts = sorted((e.ratio, value(e)) for e in entries if e.method == method and value(e) is not None)
            if pts:
                style = dict(marker="*", markersize=14, linestyle="") if method == "dense" else dict(marker="o")
                ax.plot(*zip(*pts), label=method, **style)
        ax.set_xlabel("parameter ratio (decoder linear layers kept)")
        ax.set_ylabel(ylabel)
        if log:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = out_dir / name
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written.append(path)
    return written


def write_report(specs: list[str], out: Path) -> tuple[str, list[Path]]:
    """report.md with the table and the plots (written next to it); returns (markdown, plot paths)."""
    if not specs:
        raise SvdpressError("report needs at least one model directory or JSON file")
    entries = [load_entry(s) for s in specs]
    out.parent.mkdir(parents=True, exist_ok=True)
    pngs = plot(entries, out.parent)
    md = "# svdpress comparison\n\n" + report_table(entries) + "\n\n" + \
         "ratio: kept / dense parameters of the decoder blocks' linear layers; params: the whole model; " \
         "task columns: lm-eval acc; avg acc: mean over the tasks every model has.\n\n" + \
         "".join(f"![{p.stem}]({p.name})\n" for p in pngs)
    out.write_text(md)
    return md, pngs


def model_identity(model, source) -> dict[str, Any]:
    """What `svdpress eval --json` records so the report can place the model: its size, and for a compressed
    directory its method and ratio (from the manifest)."""
    from .params import model_params

    out: dict[str, Any] = {"params": model_params(model), "method": "dense", "ratio": 1.0}
    if not getattr(source, "compressed", False):
        return out
    manifest = Path(source.path) / MANIFEST
    if manifest.is_file():
        m = from_manifest(read_json(manifest), source.spec)
        out.update(method=m.method, ratio=m.ratio)
        return out
    # a compressed checkpoint without its manifest: what the model itself says (its factored layers)
    from .export import factored_layers
    from .model import arch_map

    layers = factored_layers(model)
    kinds = sorted({x["kind"] for x in layers.values()})
    out.update(method="factored (" + "+".join(kinds) + "; no svdpress.json: method unknown)",
               ratio=_linear_ratio(model, arch_map(model)))
    return out


def _linear_ratio(model, arch) -> float:
    """Kept / dense parameters of the decoder blocks' linear layers, read off a factored model."""
    from .lowrank import LAYER_KINDS, PivGaLinear
    from .model.arch import is_linear, linear_shape
    from .params import LayerShape, layer_params

    kept = dense = 0
    for blk in arch.blocks(model):
        factored = [n + "." for n, m in blk.named_modules() if isinstance(m, tuple(LAYER_KINDS.values()))]
        for name, m in blk.named_modules():
            is_factored = isinstance(m, tuple(LAYER_KINDS.values()))
            if not (is_factored or (is_linear(m) and not name.startswith(tuple(factored)))):
                continue
            bias = (m.A.bias if isinstance(m, LAYER_KINDS["lowrank"]) else m.C.bias if isinstance(m, PivGaLinear)
                    else m.bias) is not None
            shape = LayerShape(m.out_features, m.in_features, bias) if is_factored else linear_shape(m)
            dense += shape.dense
            kept += layer_params(shape, m.rank, isinstance(m, PivGaLinear)) if is_factored else shape.dense
    return kept / dense if dense else 1.0

"""Which calibration data keeps which knowledge: one compression per calibration source, scored on every text.

The FermiGrad paper's data claim is that the calibration set decides what survives compression (MMLU-train
calibration is best overall, math-heavy data preserves GSM8K). This bench tests "calibrate on X, keep X" on the
default model: it compresses at --ratio with each allocator (uniform, fermigrad) once per calibration source
(wiki, c4, code, multilingual, technical, task:mmlu, one mixture), and scores every result on every text's
held-out second half (and on the zero-shot tasks with --tasks). For each text that is also a source, the model
calibrated on it should have the lowest or second-lowest perplexity on it among all sources.

    python bench/calibration_data.py                                  # uniform + fermigrad, all sources
    python bench/calibration_data.py --allocators uniform --limit 4096 --tasks ""   # a quicker CPU run
    python bench/calibration_data.py --tasks piqa,hellaswag,winogrande,arc_easy,arc_challenge,boolq,openbookqa,mmlu \\
        --task-limit 200 --device auto                                 # with zero-shot (GPU)

Protocol: svd-llm spectra from 32×512 calibration tokens of each source's first half (seed 0); perplexity on
--limit tokens of each text's second half in --seqlen windows. The JSON (default
bench/results/calibration_data.json) is rewritten after every run, and a rerun skips the runs it already holds
in full (every text, and every --tasks task at this --task-limit; a run lacking one is measured again); a file
made under another setup (model, factorizer, ratio, protocol, options) is refused (`--fresh` to start over). Writes a table and one PNG (perplexity relative to the best source, per text).
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from svdpress.cli import bench_main, kept_ratio, parse_method_opts, positive_int, results_file  # noqa: E402
from svdpress.config import CompressConfig, EvalConfig, resolve_device  # noqa: E402
from svdpress.data.text import check_sources  # noqa: E402
from svdpress.errors import SvdpressError  # noqa: E402
from svdpress.evaluate.zeroshot import average_acc  # noqa: E402
from svdpress.export import as_read_back, read_json, write_json  # noqa: E402
from svdpress.models import load_model  # noqa: E402
from svdpress.pipeline import compress, evaluate_model  # noqa: E402
from svdpress.table import table  # noqa: E402

SOURCES = "wiki,c4,code,multilingual,technical,task:mmlu,wiki:0.5,code:0.25,multilingual:0.25"
MIXTURE = "wiki:0.5,code:0.25,multilingual:0.25"


def split_sources(spec: str) -> list[str]:
    """Sources separated by commas, except that a mixture (entries with :weights) is given whole with `+`
    between its entries or as the documented default mixture."""
    if spec == SOURCES:
        return ["wiki", "c4", "code", "multilingual", "technical", "task:mmlu", MIXTURE]
    return [s.replace("+", ",") for s in spec.split(",") if s]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="default")
    p.add_argument("--factorize", default="svd-llm")
    p.add_argument("--allocators", default="uniform,fermigrad")
    p.add_argument("--ratio", type=kept_ratio, default=0.8)
    p.add_argument("--sources", default=SOURCES,
                   help="calibration sources, comma list; a mixture's entries joined by + (wiki:0.5+code:0.5)")
    p.add_argument("--texts", default="wiki,c4,code,multilingual,technical,task:mmlu",
                   help="texts whose held-out second half is scored")
    p.add_argument("--opt", action="append", default=[], metavar="METHOD.KEY=VALUE", help="a method's option")
    p.add_argument("--calib-samples", type=positive_int, default=32)
    p.add_argument("--calib-seqlen", type=positive_int, default=512)
    p.add_argument("--seqlen", type=positive_int, default=1024)
    p.add_argument("--limit", type=positive_int, default=8192, help="perplexity tokens per text")
    p.add_argument("--tasks", default="", help="zero-shot tasks (comma list)")
    p.add_argument("--task-limit", type=positive_int, default=200)
    p.add_argument("--device", default="auto")
    p.add_argument("--stats-cache", default="/tmp/svdpress-calibration-bench")
    p.add_argument("--out", type=results_file, default=str(ROOT / "bench" / "results" / "calibration_data.json"))
    p.add_argument("--fresh", action="store_true", help="ignore the runs already in --out")
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def key(allocate: str, source: str) -> str:
    return f"{allocate}|{source}"


def resume(out: Path, setup: dict) -> dict:
    """The runs stored at out, when they were made under this setup (model, factorizer, ratio, calibration and
    evaluation protocol, method options); another setup's file is refused, never mixed with or replaced."""
    if not out.is_file():
        return {}
    doc = read_json(out, "this bench's JSON (pass another --out or --fresh)")
    if not isinstance(doc, dict) or not isinstance(doc.get("runs", {}), dict):
        raise SvdpressError(f"{out} is not this bench's JSON (no runs); pass another --out or --fresh")
    diff = {k: (doc.get(k), setup.get(k)) for k in [*setup, "options"] if doc.get(k) != setup.get(k)}
    if diff:
        raise SvdpressError(f"{out} holds runs of another setup (stored, this run: {diff}); pass another --out, "
                            "run with its settings to resume it, or --fresh to start over")
    return doc


def covers(run: dict, texts: list[str], tasks: tuple[str, ...], task_limit: int) -> bool:
    """A stored run is reused only when it holds every text asked for and, with --tasks, every task at this
    --task-limit; otherwise it is measured again (a resumed bench must not print a column it never measured)."""
    if any(t not in run.get("ppl", {}) for t in texts):
        return False
    return not tasks or (all(t in run.get("tasks", {}) for t in tasks) and run.get("task_limit") == task_limit)


def holds(doc: dict) -> list[dict]:
    """Per allocator and per text that is also a source: the rank (1 = lowest ppl) of the model calibrated on it."""
    out = []
    runs = doc["runs"]
    for allocate in doc["allocators"]:
        mine = {r["calib"]: r for r in runs.values() if r["allocate"] == allocate}
        for text in doc["texts"]:
            if text not in mine:
                continue
            order = sorted(mine, key=lambda s: mine[s]["ppl"][text])
            out.append({"allocate": allocate, "text": text, "rank": order.index(text) + 1, "of": len(order),
                        "complete": all(s in mine for s in doc["sources"]),
                        "best": order[0], "ppl_own": mine[text]["ppl"][text], "ppl_best": mine[order[0]]["ppl"][text]})
    return out


def verdict(x: dict) -> str:
    """'holds' / 'FAILS' once every source has a run for this allocator; before that a rank among the sources
    run so far proves nothing (second of two is always ≤ 2nd), and a missing source could still beat it."""
    if x["rank"] > 2:
        return "FAILS"
    return "holds" if x["complete"] else f"partial ({x['of']} sources run)"


def render(doc: dict) -> str:
    texts = doc["texts"]
    rows = []
    if doc.get("dense"):
        d = doc["dense"]
        rows.append(["dense", "-"] + [d["ppl"][t] for t in texts] + [d.get("avg_acc")])
    for r in doc["runs"].values():
        rows.append([r["allocate"], r["calib"]] + [r["ppl"][t] for t in texts] + [r.get("avg_acc")])
    out = [table(rows, ["allocate", "calibrated on"] + [f"ppl {t}" for t in texts] + ["avg acc"])]
    h = holds(doc)
    if h:
        out.append("\n'calibrate on X, keep X': rank of the X-calibrated model on X's held-out half (1 = best)")
        out.append(table([[x["allocate"], x["text"], f"{x['rank']} of {x['of']}", x["best"], x["ppl_own"],
                           x["ppl_best"], verdict(x)] for x in h],
                         ["allocate", "text", "rank", "best source", "ppl own", "ppl best", "≤ 2nd"]))
    return "\n".join(out)


def plot(doc: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    texts, allocs = doc["texts"], doc["allocators"]
    fig, axes = plt.subplots(1, len(allocs), figsize=(1.3 * len(texts) * len(allocs) + 3, 4.5), squeeze=False)
    for ax, allocate in zip(axes[0], allocs):
        runs = [r for r in doc["runs"].values() if r["allocate"] == allocate]
        if not runs:
            continue
        ppl = np.array([[r["ppl"][t] for t in texts] for r in runs])
        rel = ppl / ppl.min(axis=0, keepdims=True)
        im = ax.imshow(rel, cmap="viridis_r", vmin=1.0, vmax=max(1.5, float(rel.max())))
        ax.set_xticks(range(len(texts)), texts, rotation=30, ha="right")
        ax.set_yticks(range(len(runs)), [r["calib"] for r in runs])
        for i in range(len(runs)):
            for j in range(len(texts)):
                ax.text(j, i, f"{ppl[i, j]:.0f}", ha="center", va="center", fontsize=7,
                        color="white" if rel[i, j] > 1.25 else "black")
        ax.set_title(f"{doc['factorize']} + {allocate} @{doc['ratio']}: ppl / best source")
        ax.set_xlabel("scored on (held-out half)")
        ax.set_ylabel("calibrated on")
        fig.colorbar(im, ax=ax, shrink=0.8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def config(a, allocate: str, source: str, device: str, opts: dict) -> CompressConfig:
    """One run's compression settings: checked for every allocator before the model is loaded."""
    return CompressConfig(model=a.model, factorize=a.factorize, allocate=allocate, ratio=a.ratio, calib=source,
                          calib_samples=a.calib_samples, calib_seqlen=a.calib_seqlen, device=device,
                          stats_cache=a.stats_cache, progress=not a.no_progress, options=dict(opts.get(allocate, {})))


def main(argv=None) -> int:
    a = parse_args(argv)
    device = resolve_device(a.device)
    sources, texts = split_sources(a.sources), [t for t in a.texts.split(",") if t]
    allocators = [x for x in a.allocators.split(",") if x]
    tasks = tuple(t for t in a.tasks.split(",") if t)
    eval_cfg = EvalConfig(ppl=tuple(texts), seqlen=a.seqlen, limit=a.limit, tasks=tasks, task_limit=a.task_limit)
    try:  # every source, text, allocator, number and method option checked before the model is loaded
        for spec in sources + texts:
            check_sources(spec)
        opts = parse_method_opts(a.opt)
        for allocate in allocators:
            config(a, allocate, "wiki", device, opts).validate()
        eval_cfg.validate()
    except SvdpressError as e:
        raise SystemExit(f"error: {e}") from None
    out = Path(a.out)
    setup = {"model": a.model, "factorize": a.factorize, "ratio": a.ratio,
             "protocol": f"calibration {a.calib_samples}x{a.calib_seqlen} tokens of each source's first half "
                         f"(seed 0); perplexity on {a.limit} tokens of each text's second half, seqlen {a.seqlen}"}
    if opts:  # absent when none are given, as in the runs stored before options were recorded
        setup["options"] = as_read_back(opts)
    try:
        doc = resume(out, setup) if not a.fresh else {}
    except SvdpressError as e:
        raise SystemExit(f"error: {e}") from None
    doc.update({**setup, "device": device, "allocators": allocators, "sources": sources, "texts": texts,
                "tasks": list(tasks), "task_limit": a.task_limit if tasks else None})
    doc.setdefault("runs", {})
    dense, tok, _ = load_model(a.model)

    def score(model) -> dict:
        res = evaluate_model(model, tok, eval_cfg, device, progress=not a.no_progress)
        rec = {"ppl": {t: res["ppl"][t]["ppl"] for t in texts}}
        if res.get("tasks"):
            rec["tasks"] = {t: r["acc"] for t, r in res["tasks"].items()}
            rec["avg_acc"] = average_acc(res["tasks"])
        return rec

    def save() -> None:
        write_json(out, doc)

    if "dense" not in doc or not covers(doc["dense"], texts, tasks, a.task_limit):
        doc["dense"] = score(dense)
        if tasks:
            doc["dense"]["task_limit"] = a.task_limit
        save()
    for allocate in allocators:
        for source in sources:
            k = key(allocate, source)
            if k in doc["runs"] and covers(doc["runs"][k], texts, tasks, a.task_limit):
                continue
            cfg = config(a, allocate, source, device, opts)
            t0 = time.perf_counter()
            model, report = compress(copy.deepcopy(dense), cfg, tokenizer=tok)
            seconds = time.perf_counter() - t0
            rec = {"allocate": allocate, "calib": source, "compress_s": round(seconds, 1),
                   "linear_ratio": report["params"]["linear_ratio"], **score(model)}
            if tasks:
                rec["task_limit"] = a.task_limit
            doc["runs"][k] = rec
            print(f"{allocate} calibrated on {source}: " + ", ".join(f"{t} {v:.2f}" for t, v in rec["ppl"].items()),
                  file=sys.stderr, flush=True)
            del model
            save()
    doc["holds"] = holds(doc)
    save()
    print(render(doc))
    png = out.with_suffix(".png")
    plot(doc, png)
    print(f"\nwrote {out} and {png}")
    return 0


if __name__ == "__main__":
    bench_main(main)

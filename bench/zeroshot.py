"""Zero-shot accuracy (lm-eval, 7 tasks) of the dense model vs compressed ones at one parameter ratio.

    python bench/zeroshot.py --limit 100 --device auto
    python bench/zeroshot.py --methods dense,svd-llm:uniform,svd-llm:fermigrad --ratio 0.8 --limit 0   # full sets

A method is `factorize:allocate`; `dense` is the original. Every method, the ratio and the tasks are checked
before the first model is loaded: an unknown name is one line naming the registered ones. Prints a table and
writes JSON (bench/results/zeroshot.json), rewritten after every model so a long run keeps what it finished.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from svdpress.cli import bench_main, csv, results_file, seed
from svdpress.config import CompressConfig, EvalConfig, resolve_device
from svdpress.errors import SvdpressError
from svdpress.evaluate.zeroshot import PAPER_TASKS, average_acc
from svdpress.export import write_json
from svdpress.models import load_model
from svdpress.params import model_params
from svdpress.pipeline import compress, evaluate_model
from svdpress.table import table


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="default")
    p.add_argument("--methods", default="dense,svd-llm:uniform,svd-llm:fermigrad")
    p.add_argument("--ratio", type=float, default=0.8)
    p.add_argument("--tasks", default=",".join(PAPER_TASKS))
    p.add_argument("--limit", type=int, default=100, help="examples per task (0 = the full sets)")
    p.add_argument("--task-source", default="auto", choices=("auto", "local", "hub"))
    p.add_argument("--ppl-tokens", type=int, default=8192, help="wiki perplexity tokens (0 = skip perplexity)")
    p.add_argument("--calib-samples", type=int, default=32)
    p.add_argument("--calib-seqlen", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--seed", type=seed, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default); 1 is much "
                                                            "faster on a crowded CPU")
    p.add_argument("--out", type=results_file, default=Path("bench/results/zeroshot.json"))
    return p.parse_args()


def eval_config(a: argparse.Namespace) -> EvalConfig:
    return EvalConfig(ppl=("wiki",) if a.ppl_tokens else (), seqlen=1024, limit=a.ppl_tokens or None,
                      tasks=csv(a.tasks), task_limit=a.limit or None,
                      batch_size=a.batch_size, seed=a.seed, task_source=a.task_source)


def compress_config(method: str, a: argparse.Namespace, device: str) -> CompressConfig:
    fac, alloc = method.split(":", 1) if ":" in method else (method, "uniform")
    return CompressConfig(model=a.model, factorize=fac, allocate=alloc, ratio=a.ratio, calib_samples=a.calib_samples,
                          calib_seqlen=a.calib_seqlen, seed=a.seed, device=device, eval=eval_config(a))


def run_method(method: str, a: argparse.Namespace, device: str) -> dict:
    """Evaluate one model: the dense one, or the method's compression of it."""
    t0 = time.perf_counter()
    if method == "dense":
        model, tok, _ = load_model(a.model)
        ev = evaluate_model(model, tok, eval_config(a), device)
        params = model_params(model)
        return {"method": "dense", "ratio": 1.0, "model_params": params, "model_ratio": 1.0, "eval": ev,
                "seconds": time.perf_counter() - t0}
    _, rep = compress(None, compress_config(method, a, device))
    return {"method": method, "ratio": a.ratio, "model_params": rep["params"]["model_compressed"],
            "model_ratio": rep["params"]["model_ratio"], "linear_ratio": rep["params"]["linear_ratio"],
            "eval": rep["eval"], "seconds": time.perf_counter() - t0}


def render(rows: list[dict], tasks: list[str]) -> str:
    head = ["method", "ratio", "params", "ppl wiki"] + tasks + ["avg acc", "time (s)"]
    body = []
    for r in rows:
        ev = r["eval"]
        accs = [ev["tasks"][t]["acc"] if t in ev.get("tasks", {}) else None for t in tasks]
        ppl = ev.get("ppl", {}).get("wiki", {}).get("ppl")
        body.append([r["method"], r["ratio"], r["model_params"], ppl, *accs, average_acc(ev.get("tasks", {})),
                     round(r["seconds"])])
    return table(body, head)


def main() -> None:
    a = parse_args()
    tasks, methods = list(csv(a.tasks)), list(csv(a.methods))
    try:  # every method, the ratio, the tasks and the numbers before the first model is loaded
        if a.limit < 0 or a.ppl_tokens < 0 or a.threads < 0:
            raise SvdpressError("--limit, --ppl-tokens and --threads must be ≥ 0 (0: the full sets, no perplexity, "
                                "torch's default)")
        device = resolve_device(a.device)
        eval_config(a).validate()
        for method in methods:
            if method != "dense":
                compress_config(method, a, device).validate()
    except SvdpressError as e:
        raise SystemExit(f"error: {e}") from None
    if a.threads:
        import torch

        torch.set_num_threads(a.threads)
    rows: list[dict] = []
    a.out.parent.mkdir(parents=True, exist_ok=True)
    for method in methods:
        r = run_method(method, a, device)
        rows.append(r)
        doc = {"settings": {**vars(a), "out": str(a.out), "device": device}, "rows": rows}
        write_json(a.out, doc)  # atomic: a crash keeps every finished model
        print(render(rows, tasks), flush=True)
    splits = {t: res["split"] for r in rows for t, res in r["eval"].get("tasks", {}).items()}
    print(f"\nlimit {a.limit or 'full'} per task; splits {splits}; device {device}\nwrote {a.out}")


if __name__ == "__main__":
    bench_main(main)

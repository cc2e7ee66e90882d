"""Several processes (torchrun semantics) on the CPU with gloo: the same ranks and logits as one process, and a
failing rank ends the whole run with one clear error.

The two ranks are spawned once (torch.multiprocessing) with the environment torchrun sets (RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR, MASTER_PORT) and run the CLI itself (`svdpress.cli.main`), so the process group is
joined exactly as under `torchrun -m svdpress compress`. They run four compressions in a row (a fresh port and
process group each): svd-llm+uniform, kfac+lems (with --eval: perplexity and piqa, scored by both ranks),
svd-llm+fermigrad, then `svdpress eval` of the dense model, then one where rank 1 fails while factorizing. This
test process runs the same commands alone as the reference.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import socket
import time
from pathlib import Path

import pytest
import torch

from svdpress import distributed as dist

COMMON = ["--calib-samples", "8", "--calib-seqlen", "64", "--calib-batch-size", "2", "--ratio", "0.6",
          "--no-progress", "--dist-timeout", "60"]
RUNS = {
    "svd-llm+uniform": ["--factorize", "svd-llm", "--allocate", "uniform"],
    "kfac+lems": ["--factorize", "kfac", "--allocate", "lems", "--opt", "probe_samples=2", "--opt",
                  "probe_seqlen=32"],
    "svd-llm+fermigrad": ["--factorize", "svd-llm", "--allocate", "fermigrad", "--opt", "steps=3", "--opt",
                          "samples=4", "--opt", "seqlen=32", "--opt", "batch_size=2", "--opt",
                          "report_uniform_kl=false"],
}
FAIL = "injected failure while factorizing"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tasks() -> list[str]:
    """piqa where the offline task data is installed: 5 documents, an odd count, so lm-eval pads rank 1's share."""
    from svdpress.evaluate.tasks.local_data import data_root

    return ["piqa"] if data_root() is not None else []


SCORING = ["--seqlen", "48", "--ppl-limit", "1000", "--task-limit", "5"]  # several windows and a short tail


def _argv(model_dir: str, text: str, run: str, out: Path) -> list[str]:
    argv = ["compress", "--model", model_dir, "--calib", text, *COMMON, *RUNS[run], "--out", str(out)]
    if run == "kfac+lems":  # --eval under torchrun: every rank builds the model and scores its share
        argv += ["--eval", ",".join([f"ppl:{text}", *_tasks()]), *SCORING]
    return argv


def _eval_argv(model_dir: str, text: str, out: Path) -> list[str]:
    tasks = ["--tasks", *_tasks()] if _tasks() else []
    return ["eval", model_dir, "--ppl", text, *tasks, *SCORING, "--no-progress", "--dist-timeout", "60",
            "--json", str(out)]


def _worker(rank: int, world: int, jobs: list, results: str) -> None:
    """One rank: run each job's CLI command under its own port; rank 1 fails in the job marked `fail`."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    from svdpress import pipeline
    from svdpress.cli import main
    from svdpress.errors import SvdpressError

    out = {}
    for name, argv, port, fail in jobs:
        os.environ["MASTER_PORT"] = str(port)
        original = pipeline._cpu
        if fail and rank == 1:
            def boom(_s):
                raise SvdpressError(FAIL)
            pipeline._cpu = boom
        err = io.StringIO()
        t = time.perf_counter()
        try:
            with contextlib.redirect_stderr(err):
                rc = main(argv)
        finally:
            pipeline._cpu = original
        out[name] = {"rc": rc, "stderr": err.getvalue(), "seconds": time.perf_counter() - t}
    Path(results, f"rank{rank}.json").write_text(json.dumps(out))


@pytest.fixture(scope="module")
def two_ranks(tiny_model_dir, text_file, tmp_path_factory):
    """The four runs on 2 ranks; {rank: {run: {rc, stderr, seconds}}} and where the outputs went."""
    import torch.multiprocessing as mp

    base = tmp_path_factory.mktemp("dist")
    jobs = [(name, _argv(tiny_model_dir, text_file, name, base / f"two-{i}"), _free_port(), False)
            for i, name in enumerate(RUNS)]
    jobs.append(("eval", _eval_argv(tiny_model_dir, text_file, base / "eval-two.json"), _free_port(), False))
    jobs.append(("fail", _argv(tiny_model_dir, text_file, "svd-llm+uniform", base / "two-fail"), _free_port(), True))
    ctx = mp.start_processes(_worker, args=(2, jobs, str(base)), nprocs=2, join=False, start_method="spawn")
    deadline = time.monotonic() + 300
    while not ctx.join(timeout=1):
        if time.monotonic() > deadline:  # a hang is a failure of this test, not of the test session
            for p in ctx.processes:
                p.kill()
            pytest.fail("the 2-process runs did not finish in 300 s (a hang?)")
    results = {r: json.loads((base / f"rank{r}.json").read_text()) for r in range(2)}
    return results, base


@pytest.fixture(scope="module")
def one_rank(tiny_model_dir, text_file, tmp_path_factory):
    from svdpress.cli import main

    assert dist.from_env() is None  # this test process is one process
    base = tmp_path_factory.mktemp("single")
    for i, name in enumerate(RUNS):
        assert main(_argv(tiny_model_dir, text_file, name, base / f"one-{i}")) == 0
    assert main(_eval_argv(tiny_model_dir, text_file, base / "eval-one.json")) == 0
    return base


def _logits(path: Path, ids: torch.Tensor) -> torch.Tensor:
    import svdpress

    model, _ = svdpress.load(str(path))
    with torch.no_grad():
        return model(ids).logits.double()


@pytest.mark.parametrize("i,run", list(enumerate(RUNS)))
def test_two_ranks_same_ranks_and_logits(two_ranks, one_rank, calib, i, run):
    results, base = two_ranks
    for r in range(2):
        assert results[r][run]["rc"] == 0, results[r][run]["stderr"]
    one, two = one_rank / f"one-{i}", base / f"two-{i}"
    ranks_one = json.loads((one / "ranks.json").read_text())
    ranks_two = json.loads((two / "ranks.json").read_text())
    assert ranks_two == ranks_one
    cut = [v["rank"] for v in json.loads((two / "svdpress.json").read_text())["layers"].values()]
    assert any(r is not None for r in cut)  # something was factored: the comparison means something
    a, b = _logits(two, calib[:2]), _logits(one, calib[:2])
    rel = float((a - b).abs().max() / b.abs().max())
    assert rel < 1e-5, rel
    manifest = json.loads((two / "svdpress.json").read_text())
    d = manifest["distributed"]
    assert d["world_size"] == 2 and d["backend"] == "gloo"
    assert [x["rank"] for x in d["ranks"]] == [0, 1]
    assert all(x["timings_s"].get("calibrate", 0) > 0 for x in d["ranks"])
    single = json.loads((one / "svdpress.json").read_text())
    assert "distributed" not in single  # one process: the manifest is as before
    if run.endswith("fermigrad"):  # DDP: the same μ and KL as one process, not each rank's half of the batch
        mu1, mu2 = single["allocation"]["mu"], manifest["allocation"]["mu"]
        assert all(abs(mu1[n] - mu2[n]) <= 2e-3 for n in mu1), (mu1, mu2)
        assert manifest["allocation"]["final_kl"] == pytest.approx(single["allocation"]["final_kl"], rel=1e-4)


def _same_scores(two: dict, one: dict) -> None:
    """Perplexity within 1e-6 (only the grouping of float64 sums differs) and the same zero-shot documents
    and accuracies as one process."""
    assert two["ppl"].keys() == one["ppl"].keys() and one["ppl"]
    for name, rec in one["ppl"].items():
        assert two["ppl"][name]["tokens"] == rec["tokens"]
        assert two["ppl"][name]["ppl"] == pytest.approx(rec["ppl"], rel=1e-6)
        windows = -(-min(rec["tokens"], 1000) // 48)
        assert "windows_per_rank" not in rec and two["ppl"][name]["windows_per_rank"] == [
            -(-windows // 2), windows // 2]  # the work was divided, not repeated
    assert (two.get("tasks") or {}).keys() == (one.get("tasks") or {}).keys()
    for task, rec in (one.get("tasks") or {}).items():
        assert two["tasks"][task]["n"] == rec["n"] == 5  # every document scored once, the padding dropped
        for metric in ("acc", "acc_norm"):
            assert two["tasks"][task][metric] == pytest.approx(rec[metric], abs=1e-12)
        per_rank = two["tasks"][task]["requests_per_rank"]  # piqa: 2 choices per document, 3 + 2 padded to 3
        assert per_rank == [6, 6], per_rank


def test_eval_under_torchrun_scores_like_one_process(two_ranks, one_rank):
    results, base = two_ranks
    for r in range(2):
        assert results[r]["eval"]["rc"] == 0, results[r]["eval"]["stderr"]
    two = json.loads((base / "eval-two.json").read_text())
    _same_scores(two, json.loads((one_rank / "eval-one.json").read_text()))
    assert two["distributed"] == {"world_size": 2, "backend": "gloo"}
    # compress --eval: both ranks built the model, scored their shares, and rank 0 wrote one manifest
    i = list(RUNS).index("kfac+lems")
    two_m = json.loads((base / f"two-{i}" / "svdpress.json").read_text())
    _same_scores(two_m["eval"], json.loads((one_rank / f"one-{i}" / "svdpress.json").read_text())["eval"])
    assert all(x["timings_s"].get("evaluate", 0) > 0 for x in two_m["distributed"]["ranks"])


def test_failing_rank_stops_every_rank_with_one_clear_error(two_ranks):
    results, base = two_ranks
    for r in range(2):
        res = results[r]["fail"]
        lines = res["stderr"].strip().splitlines()
        assert res["rc"] == 2, res["stderr"]
        assert len(lines) == 1 and lines[0].startswith("svdpress: error: "), res["stderr"]
        assert FAIL in lines[0] and "rank 1 of 2" in lines[0], lines[0]
        assert res["seconds"] < 50  # the peer's failure was noticed, not waited out (--dist-timeout 60)
    assert "stopped" in results[0]["fail"]["stderr"]  # rank 0 names the rank that failed
    assert not (base / "two-fail").exists()
    assert not [p for p in base.iterdir() if p.name.startswith(".two-fail")]  # no half-written output


def test_helpers_in_one_process_are_no_ops():
    assert not dist.active() and dist.is_main() and dist.world().size == 1
    t = torch.arange(4, dtype=torch.float64)
    dist.all_reduce_sum([t])
    assert t.tolist() == [0, 1, 2, 3]
    assert dist.shard([1, 2, 3]) == [1, 2, 3] and dist.shard(t) is t
    assert dist.map_items([1, 2, 3], lambda x: x * 10) == [10, 20, 30]
    assert dist.min_int(7) == 7 and dist.sum_floats([1.5]) == [1.5]
    assert dist.local_device("cuda") == "cuda"


def test_assign_balances_by_cost():
    costs = {"q": dist.svd_cost(64, 64), "k": dist.svd_cost(32, 64), "v": dist.svd_cost(32, 64),
             "o": dist.svd_cost(64, 64), "gate": dist.svd_cost(160, 64), "up": dist.svd_cost(160, 64),
             "down": dist.svd_cost(64, 160)}
    owner = dist.assign(costs, size=2)
    assert list(owner) == list(costs)  # the caller's order
    load = [sum(c for n, c in costs.items() if owner[n] == r) for r in range(2)]
    assert max(load) / min(load) < 1.2  # LPT: within 20% here
    assert dist.assign(costs, size=2) == owner  # deterministic: every rank computes the same
    assert set(dist.assign(costs, size=1).values()) == {0}

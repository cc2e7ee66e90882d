"""Determinism and --ratio 1: the same command with the same seed writes byte-identical weights and ranks; the
JSON writer every stage shares refuses what is not a result and leaves nothing half-written."""

from __future__ import annotations

import hashlib
import math

import pytest

import svdpress
from svdpress.config import CompressConfig
from svdpress.errors import SvdpressError
from svdpress.export import read_json, write_json


def _digests(out):
    files = sorted(out.glob("model*.safetensors")) + [out / "ranks.json", out / "model.safetensors.index.json"]
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in files}


def test_same_seed_same_bytes(tiny_model_dir, text_file, tmp_path):
    cfg = dict(model=tiny_model_dir, ratio=0.6, calib=text_file, calib_samples=8, calib_seqlen=64,
               factorize="kfac", progress=False, seed=3)
    runs = []
    for i, offload in enumerate(("none", "none", "disk")):
        out = tmp_path / f"run{i}"
        svdpress.compress(None, CompressConfig(out=str(out), offload=offload, **cfg))
        runs.append(_digests(out))
    assert runs[0] == runs[1]  # byte-identical on the same machine
    assert runs[0] == runs[2]  # and the same whether the model was streamed or not


def test_ratio_one_skips_calibration(tiny_model_dir, tmp_path, monkeypatch):
    import svdpress.pipeline as pl

    def fail(*_a, **_k):
        raise AssertionError("calibrated at ratio 1")

    monkeypatch.setattr(pl, "factorize_model", fail)
    model, rep = svdpress.compress(None, CompressConfig(model=tiny_model_dir, ratio=1.0, out=str(tmp_path / "o"),
                                                        progress=False))
    assert all(v["rank"] is None for v in rep["layers"].values()) and rep["ratio"]["achieved"] == 1.0
    loaded, _ = svdpress.load(str(tmp_path / "o"))
    import torch

    x = torch.randint(0, 100, (1, 12))
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=x).logits, model(input_ids=x).logits, rtol=0, atol=0)


def test_eval_without_manifest_records_what_the_model_is(tiny_model_dir, text_file, tmp_path):
    """A compressed directory whose svdpress.json is gone is recognized from its config: it evaluates with its
    factored weights, and `--json` records it as factored at its real ratio (not as a dense model)."""
    import json

    from svdpress.cli import main

    out = tmp_path / "c"
    _, rep = svdpress.compress(None, CompressConfig(model=tiny_model_dir, ratio=0.5, calib=text_file,
                                                    calib_samples=4, calib_seqlen=32, progress=False, out=str(out)))
    (out / "svdpress.json").unlink()
    assert main(["eval", str(out), "--ppl", text_file, "--limit", "256", "--seqlen", "64", "--no-progress",
                 "--json", str(tmp_path / "r.json")]) == 0
    res = json.loads((tmp_path / "r.json").read_text())
    assert res["method"].startswith("factored") and abs(res["ratio"] - rep["ratio"]["achieved"]) < 1e-12


def test_json_writer_refuses_what_is_not_a_result_and_leaves_nothing_half_written(tmp_path):
    """write_json is every stage's and bench's writer: a NaN is an error (not JSON, not a figure), a directory in
    the way is named in the message, and a refused write leaves the old file whole and no temp file behind."""
    out = tmp_path / "r.json"
    write_json(out, {"ppl": 22.16})
    with pytest.raises(SvdpressError, match="non-finite"):
        write_json(out, {"ppl": math.nan})
    assert read_json(out) == {"ppl": 22.16}
    (tmp_path / "d.json").mkdir()
    with pytest.raises(SvdpressError, match=r"d\.json: it is a directory"):
        write_json(tmp_path / "d.json", {})
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(SvdpressError, match="not readable JSON"):
        read_json(tmp_path / "bad.json")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.json", "d.json", "r.json"]

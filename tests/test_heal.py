"""Healing (issue 12): distillation into the factors or LoRA, same format and parameter count, clean failures."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import svdpress
from svdpress.cli import main
from svdpress.config import HealConfig
from svdpress.errors import SvdpressError
from svdpress.export import read_manifest
from svdpress.heal import add_lora, merge_lora
from svdpress.params import model_params


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models gain nothing from threads, and lose a lot to a machine that is busy with something else."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def dense_dir(tmp_path_factory, tokenizer):
    """The tiny random Llama with its final norm ×10: sharper next-token distributions, so that compression
    costs a KL worth healing (a random model's near-uniform outputs barely notice it)."""
    from conftest import make_llama

    d = tmp_path_factory.mktemp("heal-dense")
    model = make_llama(len(tokenizer))
    with torch.no_grad():
        model.model.norm.weight.mul_(10)
    model.save_pretrained(d)
    tokenizer.save_pretrained(d)
    return str(d)


@pytest.fixture(scope="session")
def compressed_dir(tmp_path_factory, dense_dir, text_file):
    out = tmp_path_factory.mktemp("heal") / "c50"
    svdpress.compress(dense_dir, svdpress.CompressConfig(ratio=0.5, calib=text_file, calib_samples=8,
                                                         calib_seqlen=64, out=str(out), progress=False))
    return str(out)


def small(text_file: str, **kw) -> HealConfig:
    base = dict(calib=text_file, steps=20, seqlen=64, samples=32, val_samples=8, batch_size=4, eval_every=5,
                lr=1e-3, warmup=2, patience=0, progress=False, device="cpu")
    base.update(kw)
    return HealConfig(**base)


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def no_leftovers(out: Path) -> bool:
    return not out.exists() and not any(p.name.startswith(f".{out.name}.") for p in out.parent.iterdir())


def test_heal_factors_reduces_validation_kl_keeps_params_and_round_trips(compressed_dir, text_file, tmp_path):
    from transformers import AutoModelForCausalLM

    before, _ = svdpress.load(compressed_dir)
    out = tmp_path / "healed"
    model, report = svdpress.heal(compressed_dir, small(text_file, out=str(out)))
    h = report["heal"]
    assert h["best_val_kl"] < 0.9 * h["initial_val_kl"] and h["best_step"] > 0
    assert model_params(model) == model_params(before) == h["params"]["before"] == h["params"]["after"]
    assert h["data"]["texts"][0]["part"].startswith("calib") and h["curve"] and h["val_curve"][0]["step"] == 0
    manifest = read_manifest(out)
    assert manifest["heal"]["settings"]["mode"] == "factors"
    assert manifest["params"] == read_manifest(compressed_dir)["params"]
    assert (out / "ranks.json").is_file()
    ids = torch.randint(0, 300, (2, 32), generator=torch.Generator().manual_seed(0))
    loaded, _ = svdpress.load(str(out))
    remote = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    ref = logits(model, ids)
    assert torch.equal(ref, logits(loaded, ids)) and torch.equal(ref, logits(remote, ids))
    assert model_params(loaded) == model_params(before)
    assert not torch.equal(ref, logits(before, ids))  # it did change the factors


def test_lora_merge_gives_the_unmerged_logits_and_the_same_count(compressed_dir, text_file):
    from peft.tuners.lora import LoraLayer

    model, _ = svdpress.load(compressed_dir)
    n = model_params(model)
    torch.manual_seed(0)
    add_lora(model, small(text_file, mode="lora", lora_rank=4))
    with torch.no_grad():  # peft starts ΔW at zero: give the adapters values so the merge has something to do
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    ids = torch.randint(0, 300, (2, 32), generator=torch.Generator().manual_seed(1))
    unmerged = logits(model, ids)
    assert merge_lora(model) > 0
    assert not any(isinstance(m, LoraLayer) for m in model.modules())
    assert model_params(model) == n
    torch.testing.assert_close(logits(model, ids), unmerged, rtol=1e-5, atol=1e-5)


def test_heal_lora_end_to_end(compressed_dir, text_file, tmp_path):
    out = tmp_path / "lora"
    before, _ = svdpress.load(compressed_dir)
    model, report = svdpress.heal(compressed_dir, small(text_file, mode="lora", lr=1e-2, steps=10, out=str(out)))
    h = report["heal"]
    assert h["best_val_kl"] <= h["initial_val_kl"] and h["lora_layers_merged"] > 0
    loaded, _ = svdpress.load(str(out))
    assert model_params(loaded) == model_params(before) == model_params(model)
    ids = torch.randint(0, 300, (1, 16), generator=torch.Generator().manual_seed(2))
    assert torch.equal(logits(model, ids), logits(loaded, ids))


def test_heal_is_deterministic_for_a_seed(compressed_dir, dense_dir, text_file, tokenizer):
    from svdpress.models import load_model

    dense, _, _ = load_model(dense_dir)
    states = []
    for _ in range(2):
        model, _ = svdpress.load(compressed_dir)
        _, report = svdpress.heal(model, small(text_file, steps=6, norms=True), tokenizer=tokenizer, teacher=dense)
        states.append((model.state_dict(), [c["loss"] for c in report["heal"]["curve"]]))
    (a, la), (b, lb) = states
    assert la == lb and all(torch.equal(a[k], b[k]) for k in a)


def test_teacher_cache_is_reused_exactly_and_rebuilt_when_corrupt(compressed_dir, text_file, tmp_path,
                                                                    monkeypatch):
    """A second heal with the same teacher_cache reads the teacher's top-k instead of running the teacher, and
    trains to the very same weights; a corrupt entry is rebuilt (with a warning), and other windows get their own
    entry."""
    import svdpress.allocate.fermigrad as fermigrad

    cache = tmp_path / "teacher"
    first, r1 = svdpress.heal(compressed_dir, small(text_file, steps=6, teacher_cache=str(cache)))
    assert r1["heal"]["teacher_cache"]["read_from"] is None
    (entry,) = [p for p in cache.iterdir() if p.name.startswith("teacher-")]
    real = fermigrad.teacher_topk
    calls = []

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(fermigrad, "teacher_topk", counted)
    second, r2 = svdpress.heal(compressed_dir, small(text_file, steps=6, teacher_cache=str(cache)))
    assert not calls and r2["heal"]["teacher_cache"]["read_from"] == str(entry)
    a, b = first.state_dict(), second.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [c["loss"] for c in r1["heal"]["curve"]] == [c["loss"] for c in r2["heal"]["curve"]]

    victim = sorted(entry.glob("batch_*.pt"))[0]
    victim.write_bytes(victim.read_bytes()[:-7])
    with pytest.warns(UserWarning, match="unusable"):
        third, r3 = svdpress.heal(compressed_dir, small(text_file, steps=6, teacher_cache=str(cache)))
    assert calls and r3["heal"]["teacher_cache"]["read_from"] is None
    assert all(torch.equal(a[k], third.state_dict()[k]) for k in a)

    calls.clear()
    svdpress.heal(compressed_dir, small(text_file, steps=6, top_k=8, teacher_cache=str(cache)))
    assert calls and len([p for p in cache.iterdir() if p.name.startswith("teacher-")]) == 2


@pytest.mark.parametrize("opts, needle", [
    (["foo=1"], "unknown heal option(s): foo"),
    (["mode=nope"], "heal mode 'nope' is unknown"),
    (["steps"], "KEY=VALUE"),
    (["steps=0"], "steps must be a whole number ≥ 1"),
    (["lr=abc"], "heal option lr='abc' is not a valid float"),
    (["calib=/nonexistent.txt"], "unknown text"),
    (["lr=1e30"], "diverged"),
    (["teacher_cache=" + __file__], "is a file, not a folder"),
])
def test_bad_heal_options_are_one_clear_error_and_leave_nothing(opts, needle, compressed_dir, text_file, tmp_path,
                                                                capsys):
    out = tmp_path / "out"
    base = [f"calib={text_file}", "steps=3", "seqlen=64", "samples=8", "val_samples=4", "eval_every=1"]
    argv = ["heal", compressed_dir, "--out", str(out), "--no-progress"]
    for o in base + opts:
        argv += ["--opt", o]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("svdpress: error:") and needle in err[0], err
    assert no_leftovers(out)


def test_heal_refuses_dense_models_and_short_texts(tiny_model_dir, compressed_dir, text_file, tokenizer, tmp_path,
                                                   capsys):
    out = tmp_path / "out"
    assert main(["heal", tiny_model_dir, "--out", str(out), "--no-progress"]) == 2
    assert "not an svdpress output directory" in capsys.readouterr().err
    from svdpress.models import load_model

    dense, _, _ = load_model(tiny_model_dir)
    with pytest.raises(SvdpressError, match="is not compressed"):
        svdpress.heal(dense, small(text_file), tokenizer=tokenizer, teacher=dense)
    short = tmp_path / "short.txt"
    short.write_text("a few words only\n\nand a second paragraph")
    assert main(["heal", compressed_dir, "--out", str(out), "--no-progress", "--opt", f"calib={short}",
                 "--opt", "seqlen=64"]) == 2
    err = capsys.readouterr().err.strip()
    assert "too few for one batch" in err and len(err.splitlines()) == 1
    assert no_leftovers(out)


def test_compress_heal_pivga_cli(tiny_model_dir, text_file, tmp_path, capsys):
    """compress --pivga --heal: heals the LowRankLinear factors, then gauge-fixes (lossless, r² smaller)."""
    out = tmp_path / "chp"
    argv = ["compress", "--model", tiny_model_dir, "--calib", text_file, "--calib-samples", "4", "--calib-seqlen", "64",
            "--ratio", "0.5", "--pivga", "--out", str(out), "--no-progress"]
    for o in (f"calib={text_file}", "steps=4", "seqlen=64", "samples=8", "val_samples=4", "eval_every=2"):
        argv += ["--heal", o]
    assert main(argv) == 0, capsys.readouterr().err
    m = read_manifest(out)
    assert m["pivga"] and m["heal"]["steps_run"] == 4
    assert not any(p.name.startswith(f".{out.name}.") for p in tmp_path.iterdir())
    loaded, _ = svdpress.load(str(out))
    assert model_params(loaded) == m["params"]["model_compressed"]
    assert main(["heal", str(out), "--out", str(tmp_path / "again"), "--no-progress"]) == 2
    assert "heal before PivGa" in capsys.readouterr().err


def test_a_nan_loss_after_progress_keeps_the_last_good_checkpoint(compressed_dir, text_file, tmp_path, monkeypatch):
    import importlib

    H = importlib.import_module("svdpress.heal")  # the module (svdpress.heal is the function)
    real, calls = H.loss_terms, {"train": 0}

    def flaky(*args, **kw):
        loss, kl = real(*args, **kw)
        if torch.is_grad_enabled():
            calls["train"] += 1
            if calls["train"] >= 5:  # the 5th training step diverges
                return loss * float("nan"), kl
        return loss, kl

    monkeypatch.setattr(H, "loss_terms", flaky)
    out = tmp_path / "kept"
    model, report = svdpress.heal(compressed_dir, small(text_file, steps=10, eval_every=2, out=str(out)))
    h = report["heal"]
    assert h["stopped"].startswith("nan") and h["steps_run"] == 4 and h["best_step"] in (2, 4)
    assert h["best_val_kl"] < h["initial_val_kl"]
    loaded, _ = svdpress.load(str(out))
    assert all(torch.isfinite(p).all() for p in loaded.parameters())
    assert read_manifest(out)["heal"]["stopped"].startswith("nan")

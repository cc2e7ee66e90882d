"""The runner: streamed (disk) and in-memory placement give the same statistics, spectra, ranks and logits;
chunked vocabulary losses equal the full-logit ones; bad placement input ends in one clear error."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

import svdpress
from svdpress.config import CompressConfig
from svdpress.errors import SvdpressError
from svdpress.memory import parse_max_memory, parse_size
from svdpress.model import Placement, Runner
from svdpress.model.head import Head, gather_lse, nll_sum, topk_logprobs

from conftest import make_llama


def _compress(model_dir, text_file, out, **kw):
    cfg = CompressConfig(model=model_dir, ratio=0.6, calib=text_file, calib_samples=8, calib_seqlen=64,
                         calib_batch_size=4, progress=False, out=str(out), **kw)
    return svdpress.compress(None, cfg)[1]


@pytest.mark.parametrize("method", ["svd-llm", "kfac"])
def test_streamed_compression_equals_in_memory(tiny_model_dir, text_file, tmp_path, method):
    x = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(3))
    logits, ranks = {}, {}
    for offload in ("none", "disk"):
        rep = _compress(tiny_model_dir, text_file, tmp_path / offload, factorize=method, offload=offload,
                        offload_dir=str(tmp_path))
        assert rep["placement"]["offload"] == offload
        ranks[offload] = {n: v["rank"] for n, v in rep["layers"].items()}
        model, _ = svdpress.load(str(tmp_path / offload))
        with torch.no_grad():
            logits[offload] = model(input_ids=x).logits
    assert ranks["none"] == ranks["disk"]
    rel = (logits["none"] - logits["disk"]).abs().max() / logits["none"].abs().max()
    assert rel <= 1e-5
    assert not list(tmp_path.glob("svdpress-*")), "temporary offload folders left behind"


def test_in_memory_model_streamed_from_an_offload_folder(tiny_model, tokenizer, text_file, tmp_path):
    ref = make_llama(len(tokenizer))  # same seed: the same weights as tiny_model
    cfg = dict(ratio=0.6, calib=text_file, calib_samples=8, calib_seqlen=64, progress=False, offload_dir=str(tmp_path))
    a, rep_a = svdpress.compress(ref, CompressConfig(offload="none", **cfg), tokenizer=tokenizer)
    _, rep_b = svdpress.compress(tiny_model, CompressConfig(offload="disk", out=str(tmp_path / "out"), **cfg),
                                 tokenizer=tokenizer)
    assert {n: v["rank"] for n, v in rep_a["layers"].items()} == {n: v["rank"] for n, v in rep_b["layers"].items()}
    assert any(p.device.type == "meta" for p in tiny_model.parameters())  # the streamed model never came back
    b, _ = svdpress.load(str(tmp_path / "out"))
    x = torch.randint(0, len(tokenizer), (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(b(input_ids=x).logits, a(input_ids=x).logits, rtol=1e-5, atol=1e-5)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # offload folder and stores removed
    mem = rep_b["memory"]["stages"]
    assert {"load", "calibrate", "factorize", "build", "export"} <= set(mem)
    assert all(s["cpu_rss_peak_mb"] > 0 for s in mem.values())


def test_interrupt_leaves_nothing(tiny_model_dir, text_file, tmp_path, monkeypatch):
    import svdpress.pipeline as pl

    def boom(*_a, **_k):
        raise KeyboardInterrupt

    monkeypatch.setattr(pl, "build", boom)
    with pytest.raises(KeyboardInterrupt):
        _compress(tiny_model_dir, text_file, tmp_path / "out", offload="disk", offload_dir=str(tmp_path))
    assert list(tmp_path.iterdir()) == [], "an interrupted run left files behind"


def test_max_memory_too_small_names_the_smallest_that_works(tiny_model_dir, text_file, tmp_path):
    with pytest.raises(SvdpressError, match="too small.*smallest budget that works is about"):
        _compress(tiny_model_dir, text_file, tmp_path / "out", offload="disk", max_memory="cpu=1KB")
    assert not (tmp_path / "out").exists()


def test_truncated_shard_is_named(tiny_model_dir, tmp_path):
    from svdpress.models import load_model

    d = tmp_path / "broken"
    shutil.copytree(tiny_model_dir, d)
    f = next(d.glob("*.safetensors"))
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    for lazy in (True, False):
        with pytest.raises(SvdpressError, match=f.name):
            load_model(str(d), lazy=lazy)


def test_targets_and_ignore(tiny_model_dir, text_file, tmp_path):
    rep = _compress(tiny_model_dir, text_file, tmp_path / "a", ignore=("mlp.*",))
    assert rep["layers"] and all(".self_attn." in n for n in rep["layers"])
    rep = _compress(tiny_model_dir, text_file, tmp_path / "b", targets=("re:.*\\.0\\.mlp\\.down_proj",))
    assert list(rep["layers"]) == ["model.layers.0.mlp.down_proj"]
    with pytest.raises(SvdpressError, match="matches no linear layer.*mlp.down_proj"):
        _compress(tiny_model_dir, text_file, tmp_path / "c", targets=("lm_head",))


def test_placement_input_errors():
    assert parse_size("1.5GiB") == int(1.5 * 2**30) and parse_size("800MB") == 800 * 10**6
    assert parse_max_memory("cuda=2GiB, cpu=1GiB") == {"cuda:0": 2**31, "cpu": 2**30}
    for bad in ("cpu", "gpu=1GiB", "cpu=lots", "cpu=0"):
        with pytest.raises(SvdpressError):
            parse_max_memory(bad)
    with pytest.raises(SvdpressError, match="--offload"):
        CompressConfig(offload="ssd").validate()


def test_cli_max_memory_error_is_one_line(tiny_model_dir, text_file, tmp_path, capsys):
    from svdpress.cli import main

    code = main(["compress", "--model", tiny_model_dir, "--calib", text_file, "--calib-samples", "4",
                 "--offload", "disk", "--max-memory", "cpu=2KB", "--no-progress", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "too small" in err[0]


# ------------------------------------------------------------------ chunked vocabulary losses


def _head(V=1000, d=16, softcap=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(V, d, generator=g)
    return W, Head(lambda a, b: W[a:b], V, None, softcap, elements=300 * 7)  # several chunks per call


@pytest.mark.parametrize("softcap", [None, 5.0])
def test_chunked_nll_and_its_gradient_equal_full_logits(softcap):
    W, head = _head(softcap=softcap)
    assert len(head.spans(20)) > 1
    h = torch.randn(20, 16, generator=torch.Generator().manual_seed(1), requires_grad=True)
    t = torch.randint(0, 1000, (20,), generator=torch.Generator().manual_seed(2))
    ours = nll_sum(head, h, t)
    (g_ours,) = torch.autograd.grad(ours, h)
    z = h @ W.T
    z = torch.tanh(z / softcap) * softcap if softcap else z
    ref = torch.nn.functional.cross_entropy(z, t, reduction="sum")
    (g_ref,) = torch.autograd.grad(ref, h)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(g_ours, g_ref, rtol=1e-4, atol=1e-5)


def test_chunked_topk_equals_full_logits():
    W, head = _head()
    h = torch.randn(8, 16, generator=torch.Generator().manual_seed(1))
    idx, logp = topk_logprobs(head, h, 5)
    ref = torch.log_softmax(h @ W.T, -1).topk(5, -1)
    assert torch.equal(idx, ref.indices)
    torch.testing.assert_close(logp, ref.values, rtol=1e-5, atol=1e-5)
    lse, got = gather_lse(head, h, idx)
    torch.testing.assert_close(got - lse[:, None], ref.values, rtol=1e-5, atol=1e-5)


def test_runner_matches_the_model_in_every_placement(tokenizer):
    ids = torch.randint(0, len(tokenizer), (2, 16), generator=torch.Generator().manual_seed(0))
    ref_model = make_llama(len(tokenizer))
    with torch.no_grad():
        z = ref_model(input_ids=ids).logits[:, :-1]
    ref = torch.nn.functional.cross_entropy(z.reshape(-1, z.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum")
    for offload in ("none", "cpu", "disk"):
        with Runner(make_llama(len(tokenizer)), Placement(offload=offload)) as r:
            (h,) = r.forward(r.embed([ids]))
            hn = r.final(h)[:, :-1]
            nll = nll_sum(r.head, hn.reshape(-1, hn.shape[-1]), ids[:, 1:].reshape(-1))
            torch.testing.assert_close(nll, ref, rtol=1e-5, atol=1e-4)
            with r.streamed() as m, torch.no_grad():
                torch.testing.assert_close(m(input_ids=ids).logits[:, :-1], z, rtol=1e-5, atol=1e-5)


def test_offload_folder_is_removed_on_close(tokenizer, tmp_path):
    r = Runner(make_llama(len(tokenizer)), Placement(offload="disk", offload_dir=str(tmp_path)))
    assert len(list(Path(tmp_path).iterdir())) == 1
    r.close()
    assert list(Path(tmp_path).iterdir()) == []


def test_streamed_statistics_and_spectra_equal_in_memory(tokenizer, calib, tmp_path):
    """A budget of a few blocks makes `auto` stream; X·Xᵀ, G and the spectra are those of the in-memory path."""
    from svdpress.calibrate import gradient_stats, iter_block_stats
    from svdpress.factorize import FACTORIZERS, LayerStats

    def run(placement):
        model = make_llama(len(tokenizer), layers=3)
        with Runner(model, placement) as r:
            inputs = {n: s for bs in iter_block_stats(r, calib, batch_size=4, progress=False)
                      for n, s in bs.inputs.items()}
            grads = gradient_stats(r, calib, batch_size=4, progress=False)
            spectra = {n: FACTORIZERS["kfac"].fn(r.weight(n).double(), LayerStats(inputs[n], **grads[n]))
                       for n in inputs}
            return r.offload, inputs, grads, spectra

    block = sum(p.numel() for p in make_llama(len(tokenizer), layers=3).model.layers[0].parameters()) * 4
    streamed = run(Placement(offload="auto", max_memory={"cpu": 2 * block}, offload_dir=str(tmp_path)))
    resident = run(Placement(offload="none"))
    assert streamed[0] == "disk" and resident[0] == "none"
    for n in resident[1]:
        torch.testing.assert_close(streamed[1][n].xtx, resident[1][n].xtx, rtol=1e-6, atol=0)
        torch.testing.assert_close(streamed[2][n]["out_grad"], resident[2][n]["out_grad"], rtol=1e-6, atol=0)
        torch.testing.assert_close(streamed[3][n].weight(), resident[3][n].weight(), rtol=1e-6, atol=1e-9)
        torch.testing.assert_close(streamed[3][n].S, resident[3][n].S, rtol=1e-6, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_chunked_shard_equals_safetensors_save(tmp_path, dtype):
    """ShardWriter.add_chunked writes, slice by slice, a file safetensors reads back bit for bit."""
    from safetensors.torch import load_file

    from svdpress.export import ShardWriter

    t = torch.randn(1000, 24).to(dtype)
    w = ShardWriter(tmp_path / "out")
    path = w.add_chunked("model.embed_tokens.weight", tuple(t.shape), dtype, (t[a:a + 333] for a in range(0, 1000, 333)))
    got = load_file(path)["model.embed_tokens.weight"]
    assert got.dtype == dtype and torch.equal(got, t)
    assert w.total == t.numel() * t.element_size()
    w.abort()


def test_block_inputs_in_memory_and_on_disk(tmp_path):
    """Saved block inputs read back exactly from either place; the disk folder goes at close or collection."""
    import gc

    from svdpress.model.runner import BlockInputs

    xs = [torch.randn(2, 3, dtype=torch.bfloat16), torch.randn(1, 3)]
    for on_disk in (False, True):
        b = BlockInputs(on_disk, str(tmp_path))
        b.append(xs)
        b.append([x * 2 for x in xs])
        assert b.on_disk == on_disk and len(b) == 2
        assert all(torch.equal(a, 2 * x) and a.dtype == x.dtype for a, x in zip(b[1], xs))
        b.drop(0)
        b.close()
        assert list(tmp_path.iterdir()) == []
    b = BlockInputs(True, str(tmp_path))
    b.append(xs)
    del b
    gc.collect()
    assert list(tmp_path.iterdir()) == []


def test_read_tensors_equals_safetensors_load(tmp_path):
    """Plain reads (no memory map) give safetensors' own answer, whole or by rows, in every dtype we write."""
    from safetensors.torch import load_file, save_file

    from svdpress.model.weights import read_tensors

    g = torch.Generator().manual_seed(0)
    ts = {f"t{i}": torch.randn(7, 5, generator=g).to(dt) for i, dt in
          enumerate([torch.float64, torch.float32, torch.bfloat16, torch.float16])}
    ts["i"], ts["empty"], ts["vec"] = torch.arange(12).reshape(3, 4), torch.zeros(0, 3), torch.randn(6, generator=g)
    f = tmp_path / "x.safetensors"
    save_file(ts, str(f))
    ref, got = load_file(str(f)), read_tensors(f)
    assert set(got) == set(ref)
    for k in ref:
        assert got[k].dtype == ref[k].dtype and torch.equal(got[k], ref[k])
    part = read_tensors(f, ["t2", "vec"], rows=(2, 5))
    assert torch.equal(part["t2"], ref["t2"][2:5]) and torch.equal(part["vec"], ref["vec"][2:5])
    with pytest.raises(SvdpressError, match="no tensor"):
        read_tensors(f, ["nope"])
    f.write_bytes(f.read_bytes()[:-4])
    with pytest.raises(SvdpressError, match="truncated"):
        read_tensors(f)

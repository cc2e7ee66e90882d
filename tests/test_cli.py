"""Bad input ends in one clear message and exit code 2, never a traceback."""

from __future__ import annotations

import subprocess
import sys

import pytest

from svdpress.cli import main


@pytest.mark.parametrize("argv, needle", [
    (["compress", "--ratio", "0"], "--ratio must be in (0, 1]"),
    (["compress", "--ratio", "1.5"], "--ratio must be in (0, 1]"),
    (["compress", "--factorize", "nope"], "unknown factorization 'nope'"),
    (["compress", "--allocate", "nope"], "unknown allocation 'nope'"),
    (["compress", "--model", "/nonexistent/model/dir"], "does not exist"),
    (["eval", "/nonexistent/model/dir"], "does not exist"),
    (["compress", "--dtype", "float8"], "unknown dtype"),
    (["compress", "--opt", "novalue"], "KEY=VALUE"),
])
def test_bad_input_is_one_clear_error(argv, needle, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("svdpress: error:") and needle in err and "Traceback" not in err
    assert len(err.splitlines()) == 1


def test_unreachable_hub_is_refused_at_once(monkeypatch, tmp_path, capsys):
    """A hub id that is not cached, with a hub host that does not resolve: one message, no minute of retries."""
    import socket

    def no_dns(*a, **k):
        raise socket.gaierror(-2, "Name or service not known")

    for k in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setattr(socket, "getaddrinfo", no_dns)
    assert main(["compress", "--model", "nosuch-org/nosuch-model", "--out", str(tmp_path / "o"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "not in the Hugging Face cache" in err and "cannot be reached" in err and "Retry" not in err


def test_empty_calibration_text(tmp_path, tiny_model_dir, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("   \n\n ")
    assert main(["compress", "--model", tiny_model_dir, "--calib", str(empty), "--no-progress"]) == 2
    assert "is empty" in capsys.readouterr().err


def test_too_short_calibration_text(tmp_path, tiny_model_dir, capsys):
    short = tmp_path / "short.txt"
    short.write_text("a few words only\n\nand a second paragraph")
    assert main(["compress", "--model", tiny_model_dir, "--calib", str(short), "--no-progress"]) == 2
    assert "fewer than one sample" in capsys.readouterr().err


def test_corrupt_checkpoint_is_a_clear_error(tmp_path, capsys):
    d = tmp_path / "broken"
    d.mkdir()
    (d / "config.json").write_text("{ not json")
    (d / "svdpress.json").write_text("{}")
    assert main(["eval", str(d), "--no-progress"]) == 2
    assert "config.json is not readable JSON" in capsys.readouterr().err


def test_cli_end_to_end_on_a_local_model(tiny_model_dir, text_file, tmp_path):
    """The installed entry point, in a fresh process: compress a local model, then evaluate the output."""
    out = tmp_path / "out"
    run = lambda *a: subprocess.run([sys.executable, "-m", "svdpress", *a], capture_output=True, text=True)  # noqa
    r = run("compress", "--model", tiny_model_dir, "--calib", text_file, "--calib-samples", "4",
            "--calib-seqlen", "64", "--ratio", "0.5", "--out", str(out), "--no-progress",
            "--eval", f"ppl:{text_file}", "--seqlen", "128", "--limit", "1024")
    assert r.returncode == 0, r.stderr
    assert "linear params" in r.stdout and (out / "ranks.json").is_file() and (out / "ranks.png").is_file()
    r = run("eval", str(out), "--ppl", text_file, "--seqlen", "128", "--limit", "1024", "--no-progress",
            "--json", str(tmp_path / "e.json"))
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "e.json").is_file()
    r = run("compress", "--model", tiny_model_dir, "--calib", text_file, "--out", str(out), "--no-progress")
    assert r.returncode == 2 and "--overwrite" in r.stderr and "Traceback" not in r.stderr

"""Reliability: never a silent wrong number, never a traceback, nothing left behind.

A table of bad inputs and faults for every subcommand. Each row runs `svdpress.cli.main(argv)` in-process (a
fresh process only where one is needed: signals, concurrent runs) and checks, all at once:

* the exit code (2 for a user error, 130 for an interrupt) -- exit 0 is a *silent* wrong result;
* stderr is exactly one line starting ``svdpress: error:`` (or the interrupt line) and holds no traceback;
  warnings a user would see on stderr (not the Deprecation family) count as extra lines;
* nothing was left behind or changed: the output's parent folder is byte-for-byte as before (no new files,
  no ``.tmp-`` folders, an existing output untouched), the ``--offload-dir`` passed is as before (no
  ``svdpress-offload-*`` / ``svdpress-spectra-*`` / ``svdpress-stats-*``), the system temp folder (redirected
  per case) holds no new ``svdpress-*`` / ``*.tmp-*`` entries, and every input directory (the model, a
  damaged copy, a PivGa source) has the same checksum as before;
* ``guard="load"``: an argument error that does not need the model is reported in under 5 s and before the
  model is loaded (the loaders are replaced by a function raising AssertionError); ``guard="calib"``: a check
  that needs the model's structure is made before calibration (the calibration entry points are replaced the
  same way). When a guard fires, the case is run again without it and what happens then is added to the
  failure message.

Rows that fail today carry ``xfail(strict=True)`` with what is wrong, so the suite stays green and the fix of a
row shows up as an XPASS (a failure) until its marker is removed.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import pytest
import torch

from svdpress.cli import main

# Small settings so that the rows which get far (load, calibration, factorization) stay fast.
SMALL = ["--calib-samples", "4", "--calib-seqlen", "32", "--no-progress"]
EVAL_SMALL = ["--limit", "256", "--seqlen", "64", "--no-progress"]
QUIET_WARNINGS = (DeprecationWarning, PendingDeprecationWarning, ImportWarning, ResourceWarning)
NO_CUDA = not torch.cuda.is_available()


# ---- assets --------------------------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def compressed_dir(tmp_path_factory, tiny_model_dir, text_file):
    """A compressed copy of the tiny model (svd-llm, ratio 0.5), made once; rows copy it before damaging it."""
    d = tmp_path_factory.mktemp("compressed") / "c50"
    assert main(["compress", "--model", tiny_model_dir, "--calib", text_file, *SMALL, "--ratio", "0.5",
                 "--offload", "none", "--out", str(d)]) == 0
    return str(d)


@pytest.fixture(scope="session")
def pivga_dir(tmp_path_factory, compressed_dir):
    d = tmp_path_factory.mktemp("pivga") / "c50-pivga"
    assert main(["pivga", compressed_dir, "--out", str(d), "--no-progress"]) == 0
    return str(d)


@dataclass
class Env:
    tmp: Path
    model: str  # the dense input model (the session's tiny model: never to be changed)
    text: str  # a good calibration / evaluation text
    compressed: str  # a good compressed directory (session's: never to be changed)
    pivga: str  # a good PivGa directory (session's)
    work: Path  # the output's parent
    offload: Path  # the --offload-dir every compress / eval row passes
    systmp: Path  # tempfile's folder during the row
    watch: list[Path] = field(default_factory=list)  # more inputs that must stay unchanged

    @property
    def out(self) -> Path:
        return self.work / "out"

    @property
    def json(self) -> Path:
        return self.work / "result.json"

    def copy(self, src: str, name: str = "model") -> Path:
        """A private copy of a model directory (to damage); it is watched: the run must not change it."""
        dst = self.tmp / name
        shutil.copytree(src, dst)
        self.watch.append(dst)
        return dst

    def file(self, name: str, text: str = "") -> Path:
        p = self.tmp / "inputs" / name
        p.parent.mkdir(exist_ok=True)
        p.write_text(text)
        return p


@pytest.fixture
def env(tmp_path, tiny_model_dir, text_file, compressed_dir, pivga_dir, monkeypatch):
    systmp, work, offload = tmp_path / "systmp", tmp_path / "work", tmp_path / "offload"
    for d in (systmp, work, offload):
        d.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(systmp))
    return Env(tmp_path, tiny_model_dir, text_file, compressed_dir, pivga_dir, work, offload, systmp)


def compress(e: Env, *args: str) -> list[str]:
    """compress on the tiny model, streamed from disk (so temporary folders are made), writing e.out."""
    return ["compress", "--model", e.model, "--calib", e.text, *SMALL, "--offload", "disk",
            "--offload-dir", str(e.offload), "--out", str(e.out), *args]


def evaluate(e: Env, target: Union[str, Path], *args: str) -> list[str]:
    return ["eval", str(target), "--ppl", e.text, *EVAL_SMALL, "--offload-dir", str(e.offload),
            "--json", str(e.json), *args]


def pivga(e: Env, source: Union[str, Path], *args: str) -> list[str]:
    return ["pivga", str(source), "--out", str(e.out), "--no-progress", *args]


# ---- damage ----------------------------------------------------------------------------------------------------

def poison(folder: Path, value: float, pattern: str = r"model\.layers\.0\..*mlp\.down_proj.*weight$") -> str:
    """Write `value` (nan / inf) into one entry of the first matching 2-D tensor of a saved model."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), "pt") as h:
            names = [n for n in h.keys() if re.match(pattern, n)]
        if names:
            tensors = load_file(str(f))
            t = tensors[names[0]].clone()
            t.view(-1)[t.numel() // 2] = value
            tensors[names[0]] = t
            save_file(tensors, str(f), metadata={"format": "pt"})
            return names[0]
    raise AssertionError(f"no tensor matching {pattern} in {folder}")


def truncate_shard(folder: Path) -> None:
    f = sorted(folder.glob("*.safetensors"))[0]
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])


def remove_shard(folder: Path) -> None:
    sorted(folder.glob("*.safetensors"))[0].unlink()


def drop_svdpress_config(folder: Path) -> None:
    cfg = json.loads((folder / "config.json").read_text())
    del cfg["svdpress"]
    (folder / "config.json").write_text(json.dumps(cfg, indent=2))


def ranks_file(e: Env, edit: Callable[[dict], None]) -> Path:
    doc = json.loads((Path(e.compressed) / "ranks.json").read_text())
    edit(doc)
    return e.file("ranks.json", json.dumps(doc))


def rename_layer(doc: dict) -> None:
    name = next(iter(doc["layers"]))
    doc["layers"][name + "_typo"] = doc["layers"].pop(name)


def reshape_layer(doc: dict) -> None:
    doc["layers"][next(iter(doc["layers"]))]["shape"] = [3, 5]


def activations_message(e: Env, err: str) -> list[str]:
    """The activations' size is the tiny model's (200 × 32 tokens × 64 × 4 B), and the budget it asks for holds them
    twice over."""
    from svdpress.memory import parse_size

    m = re.search(r"= ([\d.]+ ?[KMGT]i?B)\).*at least ([\d.]+ ?[KMGT]i?B)", err)
    if not m:
        return [f"no sizes in {err!r}"]
    need, least = (parse_size(x.replace(" ", "")) for x in m.groups())
    return [] if abs(need - 200 * 32 * 64 * 4) <= 0.01 * need and least >= 2 * need else [f"sizes off: {err!r}"]


def budget_message(e: Env, err: str) -> list[str]:
    """The 'too small' message's suggested budget must be one that works (≥ 1.5 × one block's weights)."""
    from safetensors import safe_open

    from svdpress.memory import parse_size

    block = 0
    for f in Path(e.model).glob("*.safetensors"):
        with safe_open(str(f), "pt") as h:
            block += sum(torch.Size(h.get_slice(n).get_shape()).numel() for n in h.keys()
                         if n.startswith("model.layers.0."))
    need = int(block * 4 * 1.5)
    m = re.search(r"about\s+([0-9.]+\s*[KMGT]?i?B)", err)
    if not m:
        return [f"the message names no budget that works: {err!r}"]
    if parse_size(m.group(1)) < need:
        return [f"wrong number: suggests {m.group(1).strip()} as the smallest budget that works, but one block "
                f"needs about {need} bytes (the value rounds to zero at 2 decimals of GiB)"]
    return []


# ---- the table -------------------------------------------------------------------------------------------------

Argv = Callable[[Env], list[str]]


@dataclass
class Case:
    id: str
    argv: Argv
    needle: Sequence[str] = ()  # the error must mention one of these (case-insensitive); () = anything
    guard: Optional[str] = None  # "load": reported before the model loads (< 5 s); "calib": before calibration
    code: int = 2
    check: Optional[Callable[[Env, str], list[str]]] = None  # extra checks on the error line
    tasks: bool = False  # names lm-eval tasks: lm-eval's task index is built first (see `task_index`)
    skip: Optional[Callable[[Env], Optional[str]]] = None


def _readonly_parent(e: Env) -> Optional[str]:
    ro = e.work / "ro"
    ro.mkdir()
    os.chmod(ro, 0o500)
    if os.access(ro, os.W_OK):
        os.chmod(ro, 0o700)
        return "running as root: chmod 0o500 leaves the folder writable (the parent-is-a-file row covers this)"
    return None


def _plain_file(e: Env, name: str) -> Path:
    """A regular file in the output's parent, where a folder is expected."""
    p = e.work / name
    p.write_text("precious\n")
    return p


def _nonempty_out(e: Env) -> None:
    e.out.mkdir()
    (e.out / "keep.txt").write_text("precious\n")


def _file_out(e: Env) -> None:
    e.out.write_text("precious\n")


def _then(setup: Callable[[Env], object], argv: Argv) -> Argv:
    def fn(e: Env) -> list[str]:
        setup(e)
        return argv(e)
    return fn


def _guards(kind: str) -> list[tuple[str, str]]:
    if kind == "load":
        return [("svdpress.pipeline", "load_model"), ("svdpress.models", "load_model"), ("svdpress", "load")]
    return [("svdpress.calibrate", "iter_block_stats"), ("svdpress.stats_cache", "iter_block_stats"),
            ("svdpress.calibrate", "gradient_stats"), ("svdpress.stats_cache", "gradient_stats")]


CASES: list[Case] = [
    # ---- compress: values of its arguments (no model needed) ----
    Case("compress-ratio-0", lambda e: compress(e, "--ratio", "0"), ("ratio",), "load"),
    Case("compress-ratio-negative", lambda e: compress(e, "--ratio", "-1"), ("ratio",), "load"),
    Case("compress-ratio-1.5", lambda e: compress(e, "--ratio", "1.5"), ("ratio",), "load"),
    Case("compress-ratio-nan", lambda e: compress(e, "--ratio", "nan"), ("ratio",), "load"),
    Case("compress-ratio-inf", lambda e: compress(e, "--ratio", "inf"), ("ratio",), "load"),
    Case("compress-ratio-not-a-number", lambda e: compress(e, "--ratio", "abc"), ("ratio",), "load"),
    Case("compress-factorize-unknown", lambda e: compress(e, "--factorize", "nope"), ("nope",), "load"),
    Case("compress-allocate-unknown", lambda e: compress(e, "--allocate", "nope"), ("nope",), "load"),
    Case("compress-dtype-unknown", lambda e: compress(e, "--dtype", "float8"), ("float8",), "load"),
    Case("compress-device-cuda-without-cuda", lambda e: compress(e, "--device", "cuda"), ("cuda",), "load",
         skip=lambda e: None if NO_CUDA else "CUDA is available here"),
    Case("compress-device-unknown", lambda e: compress(e, "--device", "tpu7"), ("tpu7", "device"), "load"),
    Case("compress-offload-ssd", lambda e: compress(e, "--offload", "ssd"), ("ssd", "offload"), "load"),
    Case("compress-max-memory-garbage", lambda e: compress(e, "--max-memory", "lots"), ("max-memory",), "load"),
    Case("compress-max-memory-bad-size", lambda e: compress(e, "--max-memory", "cpu=8parsecs"), ("8parsecs",),
         "load"),
    Case("compress-max-memory-too-small", lambda e: compress(e, "--max-memory", "cpu=1KiB"), ("too small",),
         "calib", check=budget_message),
    Case("compress-calib-activations-exceed-memory",
         lambda e: compress(e, "--max-memory", "cpu=1MiB", "--calib-samples", "200"), ("activations",), "calib",
         check=activations_message),
    Case("compress-calib-missing-file", lambda e: compress(e, "--calib", str(e.tmp / "nope.txt")), ("nope.txt",),
         "load"),
    Case("compress-calib-empty-file", lambda e: compress(e, "--calib", str(e.file("empty.txt", " \n\n "))),
         ("empty",), "load"),
    Case("compress-calib-directory", lambda e: compress(e, "--calib", str(_mkdir(e, "textdir"))), ("textdir",),
         "load"),
    Case("compress-calib-too-short", lambda e: compress(e, "--calib", str(e.file("short.txt", "a few words\n\nmore"))),
         ("short.txt", "fewer"), "calib"),
    Case("compress-calib-samples-0", lambda e: compress(e, "--calib-samples", "0"), ("calib-samples",), "load"),
    Case("compress-calib-seqlen-1", lambda e: compress(e, "--calib-seqlen", "1"), ("calib-seqlen",), "load"),
    Case("compress-calib-batch-size-0", lambda e: compress(e, "--calib-batch-size", "0"), ("calib-batch-size",),
         "load"),
    Case("compress-rank-multiple-0", lambda e: compress(e, "--rank-multiple", "0"), ("rank-multiple",), "load"),
    Case("compress-opt-without-equals", lambda e: compress(e, "--opt", "steps"), ("key=value",), "load"),
    Case("compress-opt-unknown-key-fermigrad", lambda e: compress(e, "--allocate", "fermigrad", "--opt", "bogus=1"),
         ("bogus",), "load"),
    Case("compress-opt-unknown-key-lems", lambda e: compress(e, "--allocate", "lems", "--opt", "bogus=1"),
         ("bogus",), "load"),
    Case("compress-opt-unknown-key-uniform", lambda e: compress(e, "--allocate", "uniform", "--opt", "bogus=1"),
         ("bogus",), "load"),
    Case("compress-opt-wrong-type-fermigrad", lambda e: compress(e, "--allocate", "fermigrad", "--opt", "steps=abc"),
         ("steps",), "load"),
    Case("compress-opt-wrong-type-lems", lambda e: compress(e, "--allocate", "lems", "--opt", "gamma=abc"),
         ("gamma",), "load"),
    Case("compress-ranks-missing-file", lambda e: compress(e, "--ranks", str(e.tmp / "nope.json")), ("nope.json",),
         "load"),
    Case("compress-ranks-malformed-json", lambda e: compress(e, "--ranks", str(e.file("r.json", "{ not json"))),
         ("json",), "load"),
    Case("compress-ranks-with-other-allocate",
         lambda e: compress(e, "--ranks", str(ranks_file(e, lambda d: None)), "--allocate", "lems"),
         ("--ranks",), "load"),
    Case("compress-ranks-wrong-layer-names", lambda e: compress(e, "--ranks", str(ranks_file(e, rename_layer))),
         ("_typo",), "calib"),
    Case("compress-ranks-wrong-shapes", lambda e: compress(e, "--ranks", str(ranks_file(e, reshape_layer))),
         ("shape",), "calib"),
    Case("compress-targets-match-nothing", lambda e: compress(e, "--targets", "nonexistent_proj"),
         ("nonexistent_proj",), "calib"),
    Case("compress-ignore-match-nothing", lambda e: compress(e, "--ignore", "nonexistent_proj"),
         ("nonexistent_proj",), "calib"),
    Case("compress-ignore-everything", lambda e: compress(e, "--ignore", "re:.*"), ("matches no",), "calib"),
    Case("compress-targets-bad-regex", lambda e: compress(e, "--targets", "re:(unclosed"), ("regular expression",),
         "load"),
    Case("compress-out-is-a-file", _then(_file_out, lambda e: compress(e)), ("not a directory",), "load"),
    Case("compress-out-nonempty-without-overwrite", _then(_nonempty_out, lambda e: compress(e)), ("--overwrite",),
         "load"),
    Case("compress-out-under-readonly-dir", lambda e: compress(e, "--out", str(e.work / "ro" / "out")),
         ("writable", "permission"), "load", skip=_readonly_parent),
    Case("compress-out-parent-is-a-file", lambda e: compress(e, "--out", str(_plain_file(e, "afile") / "o")),
         ("afile",), "load"),
    Case("compress-json-in-missing-dir", lambda e: compress(e, "--json", str(e.work / "nodir" / "r.json")),
         ("json", "nodir"), "load"),
    Case("compress-stats-cache-is-a-file", lambda e: compress(e, "--stats-cache", str(_plain_file(e, "cache"))),
         ("stats-cache", "work/cache"), "load"),
    Case("compress-offload-dir-is-a-file", lambda e: compress(e, "--offload-dir", str(_plain_file(e, "off"))),
         ("offload-dir", "work/off"), "load"),
    Case("compress-eval-unknown-task", lambda e: compress(e, "--eval", "nosuchtask"), ("nosuchtask",), "load",
         tasks=True),
    Case("compress-eval-seqlen-0", lambda e: compress(e, "--eval", "ppl", "--seqlen", "0"), ("seqlen",), "load"),
    Case("compress-model-missing", lambda e: compress(e, "--model", str(e.tmp / "no-model")), ("does not exist",)),
    # ---- compress: faults in the dense model ----
    Case("compress-nan-in-dense-weights", lambda e: compress(e, "--model", str(_poisoned(e, e.model, float("nan")))),
         ("nan", "finite")),
    Case("compress-inf-in-dense-weights-in-memory",
         lambda e: compress(e, "--model", str(_poisoned(e, e.model, float("inf"))), "--offload", "none"),
         ("inf", "finite")),
    # ---- eval: the target ----
    Case("eval-missing-path", lambda e: evaluate(e, e.tmp / "no-model"), ("does not exist",)),
    Case("eval-empty-dir", lambda e: evaluate(e, _mkdir(e, "empty")), ("config.json",)),
    Case("eval-dir-without-config", lambda e: evaluate(e, _without(e, e.model, "config.json")), ("config.json",)),
    Case("eval-corrupt-config", lambda e: evaluate(e, _edited(e, e.compressed, "config.json", "{ not json")),
         ("config",)),
    Case("eval-config-lost-svdpress-entry", lambda e: evaluate(e, _damaged(e, drop_svdpress_config)), ("svdpress",)),
    Case("eval-config-lost-svdpress-entry-in-memory",
         lambda e: evaluate(e, _damaged(e, drop_svdpress_config), "--offload", "none"), ("svdpress",)),
    Case("eval-truncated-shard", lambda e: evaluate(e, _damaged(e, truncate_shard)), ("truncated",)),
    Case("eval-truncated-shard-in-memory", lambda e: evaluate(e, _damaged(e, truncate_shard), "--offload", "none"),
         ("truncated",)),
    Case("eval-missing-shard", lambda e: evaluate(e, _damaged(e, remove_shard)), ("missing",)),
    Case("eval-nan-weight", lambda e: evaluate(e, _poisoned(e, e.compressed, float("nan"))), ("nan", "finite")),
    Case("eval-nan-weight-streamed",
         lambda e: evaluate(e, _poisoned(e, e.compressed, float("nan")), "--offload", "disk"), ("nan", "finite")),
    Case("eval-nan-weight-in-memory",
         lambda e: evaluate(e, _poisoned(e, e.compressed, float("nan")), "--offload", "none"), ("nan", "finite")),
    # ---- eval: its arguments ----
    Case("eval-unknown-task", lambda e: evaluate(e, e.compressed, "--tasks", "nosuchtask"), ("nosuchtask",), "load",
         tasks=True),
    Case("eval-unknown-ppl-text", lambda e: evaluate(e, e.compressed, "--ppl", "nosuchtext"), ("nosuchtext",),
         "load"),
    Case("eval-ppl-empty-file", lambda e: evaluate(e, e.compressed, "--ppl", str(e.file("empty.txt", "\n\n"))),
         ("empty",), "load"),
    Case("eval-seqlen-0", lambda e: evaluate(e, e.compressed, "--seqlen", "0"), ("seqlen",), "load"),
    Case("eval-batch-size-0", lambda e: evaluate(e, e.compressed, "--batch-size", "0"), ("batch-size",), "load"),
    Case("eval-limit-0", lambda e: evaluate(e, e.compressed, "--limit", "0"), ("limit",), "load"),
    Case("eval-limit-negative", lambda e: evaluate(e, e.compressed, "--limit", "-5"), ("limit",), "load"),
    Case("eval-device-cuda-without-cuda", lambda e: evaluate(e, e.compressed, "--device", "cuda"), ("cuda",), "load",
         skip=lambda e: None if NO_CUDA else "CUDA is available here"),
    Case("eval-dtype-unknown", lambda e: evaluate(e, e.compressed, "--dtype", "float8"), ("float8",), "load"),
    Case("eval-max-memory-garbage", lambda e: evaluate(e, e.compressed, "--max-memory", "lots"), ("max-memory",),
         "load"),
    Case("eval-json-in-missing-dir", lambda e: evaluate(e, e.compressed, "--json", str(e.work / "nodir" / "e.json")),
         ("json", "nodir"), "load"),
    # ---- pivga ----
    Case("pivga-not-compressed", lambda e: pivga(e, e.model), ("svdpress",), "load"),
    Case("pivga-already-pivga", lambda e: pivga(e, e.pivga), ("pivga",), "load"),
    Case("pivga-out-equals-source", lambda e: ["pivga", str(_copy(e)), "--out", str(e.tmp / "model"),
                                               "--no-progress"], ("differ", "source"), "load"),
    Case("pivga-missing-source", lambda e: pivga(e, e.tmp / "no-model"), ("no-model",), "load"),
    Case("pivga-out-nonempty-without-overwrite", _then(_nonempty_out, lambda e: pivga(e, e.compressed)),
         ("--overwrite",), "load"),
    # ---- report ----
    Case("report-missing-file", lambda e: ["report", str(e.tmp / "missing.json"), "--out", str(e.work / "r.md")],
         ("missing.json",)),
    Case("report-malformed-json", lambda e: ["report", str(e.file("bad.json", "{ not json")), "--out",
                                             str(e.work / "r.md")], ("bad.json",)),
]


def _mkdir(e: Env, name: str) -> Path:
    d = e.tmp / name
    d.mkdir()
    e.watch.append(d)
    return d


def _copy(e: Env) -> Path:
    return e.copy(e.compressed)


def _without(e: Env, src: str, name: str) -> Path:
    d = e.copy(src)
    (d / name).unlink()  # the checksum of a watched input is taken after its damage, when the row starts
    return d


def _edited(e: Env, src: str, name: str, text: str) -> Path:
    d = e.copy(src)
    (d / name).write_text(text)
    return d


def _damaged(e: Env, fn: Callable[[Path], object]) -> Path:
    d = e.copy(e.compressed)
    fn(d)
    return d


def _poisoned(e: Env, src: str, value: float) -> Path:
    d = e.copy(src)
    poison(d, value)
    return d


# ---- the checks ------------------------------------------------------------------------------------------------

def tree(root: Path) -> dict[str, str]:
    """relative path → sha256 of the file ('dir' for folders); {} for a missing root."""
    out: dict[str, str] = {}
    if not root.exists():
        return out
    if root.is_file():
        return {".": hashlib.sha256(root.read_bytes()).hexdigest()}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        out[rel] = "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "other"
    return out


def diff(before: dict[str, str], after: dict[str, str]) -> str:
    new = sorted(set(after) - set(before))
    gone = sorted(set(before) - set(after))
    changed = sorted(k for k in set(before) & set(after) if before[k] != after[k])
    parts = [f"{what} {', '.join(xs[:4])}{' …' if len(xs) > 4 else ''}"
             for what, xs in (("new", new), ("removed", gone), ("changed", changed)) if xs]
    return "; ".join(parts)


@dataclass
class Outcome:
    code: Optional[int]
    err: str
    out: str
    exc: Optional[str]  # an exception that escaped main (= a traceback for the user)
    guard_fired: bool
    seconds: float


def _where(exc: BaseException) -> str:
    frames = traceback.extract_tb(exc.__traceback__)
    ours = [f for f in frames if "svdpress" in f.filename] or frames
    f = ours[-1]
    return f"{Path(f.filename).name}:{f.lineno}"


def invoke(argv: list[str], capfd) -> Outcome:
    """main(argv) as the console script runs it: exit code, stderr (plus the warnings a user would see)."""
    old = signal.getsignal(signal.SIGTERM)
    code, exc, fired = None, None, False
    t0 = time.perf_counter()
    with warnings.catch_warnings(record=True) as seen:  # the filters in force stay (as in the console script)
        try:
            code = main(argv)
        except SystemExit as e:  # argparse
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        except BaseException as e:  # noqa: BLE001 - whatever escapes main is a traceback for the user
            fired = isinstance(e, AssertionError) and "GUARD" in str(e)
            exc = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''} (at {_where(e)})"
        finally:
            signal.signal(signal.SIGTERM, old)  # main() installs its own SIGTERM handler
    seconds = time.perf_counter() - t0
    out, err = capfd.readouterr()
    shown = [w for w in seen if not issubclass(w.category, QUIET_WARNINGS)]
    err = err + "".join(f"{Path(w.filename).name}:{w.lineno}: {w.category.__name__}: {w.message}\n" for w in shown)
    return Outcome(code, err, out, exc, fired, seconds)


def judge(case: Case, o: Outcome, e: Env) -> list[str]:
    problems = []
    if o.exc is not None:
        problems.append(f"traceback: {o.exc}")
    elif o.code != case.code:
        first = (o.out.strip().splitlines() or [""])[-1][:80]
        problems.append(f"silent exit {o.code} (stdout ends {first!r})" if o.code == 0
                        else f"exit code {o.code}, expected {case.code}")
    lines = o.err.strip().splitlines()
    if "Traceback" in o.err:
        problems.append("stderr holds a Traceback")
    if o.exc is None and o.code != 0:
        if len(lines) != 1 or not lines[0].startswith("svdpress: error:"):
            problems.append(f"stderr is {len(lines)} line(s), not one 'svdpress: error:' line: "
                            f"{' | '.join(x[:120] for x in (lines[:1] + lines[-1:] if len(lines) > 1 else lines))!r}")
        elif case.needle and not any(n.lower() in lines[0].lower() for n in case.needle):
            problems.append(f"the error does not name {' / '.join(case.needle)}: {lines[0]!r}")
        elif case.check is not None:
            problems += case.check(e, lines[0])
    return problems


def snapshot(e: Env) -> dict[str, dict[str, str]]:
    snap = {"the output's parent": tree(e.work), "--offload-dir": tree(e.offload),
            "the input model": tree(Path(e.model)), "the compressed source": tree(Path(e.compressed)),
            "the PivGa source": tree(Path(e.pivga))}
    snap.update({f"input {p.name}": tree(p) for p in e.watch})
    return snap


def leftovers(e: Env, before: dict[str, dict[str, str]], temp_before: set[str]) -> list[str]:
    after = snapshot(e)
    problems = [f"{what} changed: {d}" for what in before if (d := diff(before[what], after[what]))]
    new_temp = sorted(p for p in set(os.listdir(e.systmp)) - temp_before
                      if p.startswith(("svdpress", ".")) or ".tmp" in p or "tmp-" in p)
    if new_temp:
        problems.append(f"left in the system temp folder: {', '.join(new_temp)}")
    return problems


def run_case(case: Case, e: Env, capfd, monkeypatch) -> list[str]:
    argv = case.argv(e)
    capfd.readouterr()
    before, temp_before = snapshot(e), set(os.listdir(e.systmp))
    with monkeypatch.context() as m:
        if case.guard:
            def boom(*_a, **_k):
                raise AssertionError(f"GUARD: {case.guard} reached")
            for mod, name in _guards(case.guard):
                m.setattr(f"{mod}.{name}", boom)
        o = invoke(argv, capfd)
    problems = []
    if o.guard_fired:
        problems.append({"load": "checked after load (the model loaded before the error)",
                         "calib": "checked after calibration started"}[case.guard])
        problems += leftovers(e, before, temp_before)
        # what the user gets then: run it again without the guard
        before, temp_before = snapshot(e), set(os.listdir(e.systmp))
        o = invoke(argv, capfd)
        then = judge(case, o, e) + leftovers(e, before, temp_before)
        line = (o.err.strip().splitlines() or [""])[0][:160]
        problems.append("without the guard: " + ("; ".join(then) if then else f"exit {o.code}, {line!r}"))
        return problems
    problems += judge(case, o, e)
    if case.guard == "load" and o.seconds > 5:
        problems.append(f"took {o.seconds:.1f} s (> 5 s) to report an argument error")
    problems += leftovers(e, before, temp_before)
    return problems


# Rows that fail today: what is wrong (from running the table against the current tree).
XFAIL: dict[str, str] = {
}


def _param(c: Case):
    marks = []
    reason = XFAIL.get(c.id)
    if reason:
        marks.append(pytest.mark.xfail(strict=True, reason=reason))
    return pytest.param(c, id=c.id, marks=marks)


@pytest.fixture(scope="session")
def task_index():
    """lm-eval's task index, built once per process (importing lm-eval and indexing its YAML files takes 5-10 s on
    2 cores). Rows naming a task build it first, so that their 5-s limit times svdpress's check and not that
    one-off cost, whichever row comes first."""
    pytest.importorskip("lm_eval")
    try:
        from svdpress.evaluate.zeroshot import task_manager
    except ImportError:
        import importlib

        importlib.import_module("lm_eval.tasks")
    else:
        task_manager()


@pytest.mark.parametrize("case", [_param(c) for c in CASES])
def test_bad_input(case: Case, env: Env, capfd, monkeypatch, request):
    if case.skip is not None and (why := case.skip(env)):
        pytest.skip(why)
    if case.tasks:
        request.getfixturevalue("task_index")
    problems = run_case(case, env, capfd, monkeypatch)
    assert not problems, f"{case.id}: " + " || ".join(problems)


def test_table_is_consistent():
    ids = [c.id for c in CASES]
    assert len(ids) + 4 >= 40 and len(set(ids)) == len(ids)
    assert set(XFAIL) <= set(ids), f"XFAIL names unknown rows: {set(XFAIL) - set(ids)}"


# ---- faults that need a process of their own ------------------------------------------------------------------
# Signals and concurrent runs need real processes (`python -m svdpress`, as a user runs it). They are all started
# at once by one fixture (each pays ~5 s of imports on 2 cores; in parallel that cost is shared).

def _default_sigint() -> None:  # a background shell starts children with SIGINT ignored; Python keeps that
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _spawn(argv: list[str], systmp: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "svdpress", *argv], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "TMPDIR": str(systmp)},
                            preexec_fn=_default_sigint)


def _finish(p: subprocess.Popen, timeout: float) -> tuple[int, str, str]:
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        p.kill()
        out, err = p.communicate()
        err += f"\n<killed: still running after {timeout:.0f} s>"
    return p.returncode, out, err


def _svdpress_temp(folder: Path) -> list[str]:
    return sorted(p for p in os.listdir(folder) if p.startswith(("svdpress", ".")) or ".tmp" in p or "tmp-" in p)


@dataclass
class Run:
    proc: subprocess.Popen
    work: Path  # the output's parent
    systmp: Path  # TMPDIR of the process
    offload: Optional[Path] = None
    sent: Optional[float] = None  # when the signal was sent
    calibrating: bool = False  # it was sent after calibration began (the spectra folder had appeared)
    code: Optional[int] = None
    out: str = ""
    err: str = ""


@pytest.fixture(scope="module")
def processes(tmp_path_factory, tiny_model_dir, text_file) -> dict[str, Run]:
    """All the process rows, started together:
    sigint / sigterm: `compress --offload disk --offload-dir D` on 512 x 128 calibration tokens (tens of seconds
        of calibration), sent the signal 0.5 s after its spectra folder appeared in D (calibration has begun);
    same-out-1/2: two identical `compress` runs writing the same --out;
    cache-1/2: two `compress` runs (svd-llm, svd-llm-v2: the same input statistics) sharing one --stats-cache."""
    base = tmp_path_factory.mktemp("processes")
    small = ["--model", tiny_model_dir, "--calib", text_file, "--calib-samples", "16", "--calib-seqlen", "64",
             "--no-progress"]
    runs: dict[str, Run] = {}

    def start(name: str, argv: Callable[[Path], list[str]], work: Optional[Path] = None) -> None:
        folder = base / name
        systmp = folder / "systmp"
        systmp.mkdir(parents=True)
        work = work or folder / "work"
        work.mkdir(exist_ok=True)
        offload = folder / "offload"
        offload.mkdir()
        runs[name] = Run(_spawn(["compress", *argv(offload)], systmp), work, systmp, offload)

    for name in ("sigint", "sigterm"):
        work = base / name / "work"
        start(name, lambda d, w=work: ["--model", tiny_model_dir, "--calib", text_file, "--calib-samples", "512",
                                       "--calib-seqlen", "128", "--offload", "disk", "--offload-dir", str(d),
                                       "--out", str(w / "out"), "--no-progress"], work)
    same = base / "same-out"
    same.mkdir()
    for name in ("same-out-1", "same-out-2"):
        start(name, lambda d: [*small, "--out", str(same / "out")], same)
    cache = base / "cache"
    for name, fac in (("cache-1", "svd-llm"), ("cache-2", "svd-llm-v2")):
        start(name, lambda d, f=fac: [*small, "--factorize", f, "--stats-cache", str(cache), "--out",
                                      str(base / "cache-outs" / f)], base / "cache-outs")
    runs["cache-1"].offload = runs["cache-2"].offload = cache  # (where the cache is, for the test)

    try:
        _signal_when_calibrating(runs)
        for r in runs.values():
            r.code, r.out, r.err = _finish(r.proc, 120)
    finally:  # (the test run itself interrupted: stop what this fixture started)
        for r in runs.values():
            if r.proc.poll() is None:
                r.proc.kill()
                r.proc.wait()
    return runs


def _signal_when_calibrating(runs: dict[str, Run]) -> None:
    signals = {"sigint": signal.SIGINT, "sigterm": signal.SIGTERM}
    started = time.monotonic()
    while True:
        waiting = [n for n in signals if runs[n].sent is None and runs[n].proc.poll() is None]
        if not waiting:
            break
        for n in waiting:
            seen = any(runs[n].offload.glob("svdpress-spectra-*"))
            if seen or time.monotonic() - started > 60:  # (no folder after 60 s: signal it anyway)
                if seen:
                    time.sleep(0.5)  # well inside calibration
                runs[n].proc.send_signal(signals[n])
                runs[n].sent, runs[n].calibrating = time.monotonic(), seen
        time.sleep(0.05)


def _one_line(err: str, start: str, word: str = "") -> bool:
    lines = err.strip().splitlines()
    return "Traceback" not in err and len(lines) == 1 and lines[0].startswith(start) and word in lines[0]


@pytest.mark.parametrize("name", ["sigint", "sigterm"])
def test_interrupt_while_calibrating(name, processes):
    """Exit 130, one line, and nothing left: not in the output's parent, not in --offload-dir, not in TMPDIR."""
    r = processes[name]
    assert r.sent is not None, f"calibration never started (exit {r.code}): {r.err[-500:]}"
    problems = [] if r.calibrating else ["(its spectra folder never appeared in --offload-dir: signalled after 60 s)"]
    if r.code != 130:
        problems.append(f"exit code {r.code}, expected 130")
    if not _one_line(r.err, "svdpress:", "interrupt"):
        problems.append(f"stderr is not one interrupt line: {' | '.join(r.err.strip().splitlines()[-3:])!r}")
    for what, folder in (("the output's parent", r.work), ("--offload-dir", r.offload)):
        if left := sorted(os.listdir(folder)):
            problems.append(f"left in {what}: {', '.join(left)}")
    if left := _svdpress_temp(r.systmp):
        problems.append(f"left in the system temp folder: {', '.join(left)}")
    assert not problems, " || ".join(problems)


def _valid_output(out: Path) -> list[str]:
    """Loadable, manifest and index valid JSON, every shard present, finite logits."""
    import svdpress

    problems = []
    try:
        manifest = json.loads((out / "svdpress.json").read_text())
        assert isinstance(manifest, dict) and "params" in manifest, "the manifest has no params"
        index = json.loads((out / "model.safetensors.index.json").read_text())
        missing = [f for f in set(index["weight_map"].values()) if not (out / f).is_file()]
        if missing:
            problems.append(f"shards named in the index are missing: {missing}")
        model, _ = svdpress.load(str(out))
        with torch.no_grad():
            logits = model(torch.arange(8)[None]).logits
        if not torch.isfinite(logits).all():
            problems.append("the loaded model gives non-finite logits")
    except Exception as e:  # noqa: BLE001
        problems.append(f"{out} is corrupt: {type(e).__name__}: {e}")
    return problems


def test_two_compress_processes_same_out(processes):
    """Both start before either has written --out: exactly one succeeds (the other says so in one line) or both
    do; the directory is never corrupt and no temporary sibling stays."""
    runs = [processes["same-out-1"], processes["same-out-2"]]
    work = runs[0].work
    problems = []
    codes = [r.code for r in runs]
    if 0 not in codes or not set(codes) <= {0, 2}:
        problems.append(f"exit codes {codes}")
    for r in runs:
        if "Traceback" in r.err:
            problems.append(f"a traceback: {' | '.join(r.err.strip().splitlines()[-2:])!r}")
        elif r.code == 2 and not _one_line(r.err, "svdpress: error:"):
            problems.append(f"the refused run's stderr is not one error line: {r.err.strip().splitlines()[-3:]!r}")
    if (work / "out").exists():
        problems += _valid_output(work / "out")
    else:
        problems.append("no output directory")
    if left := [p for p in os.listdir(work) if p != "out"]:
        problems.append(f"left next to the output: {left}")
    for r in runs:
        if left := _svdpress_temp(r.systmp) + sorted(os.listdir(r.offload)):
            problems.append(f"left in a temp folder: {left}")
    assert not problems, " || ".join(problems)


def test_two_compress_processes_share_a_stats_cache(processes):
    """Two processes filling one --stats-cache at the same time: both succeed and the cache stays valid."""
    runs = [processes["cache-1"], processes["cache-2"]]
    cache = runs[0].offload
    problems = [f"exit {r.code}: {' | '.join(r.err.strip().splitlines()[-2:])!r}" for r in runs if r.code != 0]
    problems += [f"stderr not empty: {r.err.strip().splitlines()[:2]!r}" for r in runs if r.code == 0 and r.err.strip()]
    entries = sorted(cache.iterdir()) if cache.is_dir() else []
    if not [p for p in entries if not p.name.startswith(".")]:
        problems.append("the cache is empty")
    for p in entries:
        if p.name.startswith(".") or not p.is_dir():
            problems.append(f"left in the cache: {p.name}")
            continue
        try:
            manifest = json.loads((p / "manifest.json").read_text())
            for name, digest in manifest["files"].items():
                if hashlib.sha256((p / name).read_bytes()).hexdigest() != digest:
                    problems.append(f"{p.name}/{name}: checksum mismatch")
        except Exception as e:  # noqa: BLE001
            problems.append(f"cache entry {p.name} is corrupt: {type(e).__name__}: {e}")
    for r in runs:
        problems += _valid_output(r.work / Path(r.proc.args[r.proc.args.index("--out") + 1]).name)
        if left := _svdpress_temp(r.systmp):
            problems.append(f"left in the system temp folder: {left}")
    if left := [p for p in os.listdir(runs[0].work) if p not in ("svd-llm", "svd-llm-v2")]:
        problems.append(f"left next to the outputs: {left}")
    assert not problems, " || ".join(problems)

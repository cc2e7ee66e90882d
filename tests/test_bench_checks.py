"""The verdicts the benches print must not claim more than the runs behind them.

A partial calibration study (some sources not run yet) or a partial method matrix must say so: second of two
sources is always "≤ 2nd", and the best of three cells is not the best of the matrix."""

import importlib.util
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "bench"


def _bench(name):
    """bench/NAME.py as a module, imported as it is run (bench/ on the path: benches share protocol code)."""
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


def _run(allocate, calib, **ppl):
    return {"allocate": allocate, "calib": calib, "ppl": ppl}


def test_calibration_verdict_waits_for_every_source():
    cd = _bench("calibration_data")
    doc = {"allocators": ["fermigrad"], "sources": ["wiki", "code", "c4"], "texts": ["wiki", "code", "c4"],
           "runs": {"a": _run("fermigrad", "wiki", wiki=10.0, code=9.0, c4=30.0),
                    "b": _run("fermigrad", "code", wiki=50.0, code=3.0, c4=60.0)}}
    h = {x["text"]: x for x in cd.holds(doc)}
    assert set(h) == {"wiki", "code"}  # c4 not run: no row
    assert cd.verdict(h["wiki"]) == "partial (2 sources run)" and cd.verdict(h["code"]).startswith("partial")
    doc["runs"]["c"] = _run("fermigrad", "c4", wiki=11.0, code=2.0, c4=20.0)
    h = {x["text"]: x for x in cd.holds(doc)}
    assert [cd.verdict(h[t]) for t in ("wiki", "code", "c4")] == ["holds", "holds", "holds"]
    # a third place among the sources run so far can only get worse: FAILS at once
    doc["sources"].append("technical")
    doc["runs"]["d"] = _run("fermigrad", "x", wiki=1.0, code=1.0, c4=1.0)
    doc["runs"]["e"] = _run("fermigrad", "y", wiki=2.0, code=2.5, c4=2.0)
    h = {x["text"]: x for x in cd.holds(doc)}
    assert h["wiki"]["rank"] == 3 and cd.verdict(h["wiki"]) == "FAILS"


def test_matrix_check_says_when_cells_are_missing():
    mx = _bench("matrix")
    cell = lambda w: {"ppl": {"wiki": w, "c4": 2 * w}}  # noqa: E731
    doc = {"cells": {mx.key("kfac", "lems", 0.8): cell(37.0), mx.key("svd-llm", "lems", 0.8): cell(38.6)}}
    out = mx.checks(doc, ["kfac", "svd-llm"], ["uniform", "lems"], [0.8])
    assert "best of the 2 cells measured at 0.8 (of 4)" in out and "met so far" in out
    doc["cells"].update({mx.key("kfac", "uniform", 0.8): cell(73.4), mx.key("svd-llm", "uniform", 0.8): cell(88.0)})
    assert "-> MET" in mx.checks(doc, ["kfac", "svd-llm"], ["uniform", "lems"], [0.8])
    doc["cells"][mx.key("svd-llm", "uniform", 0.8)] = cell(30.0)  # kfac+lems 23% behind the best
    assert "-> MISSED" in mx.checks(doc, ["kfac", "svd-llm"], ["uniform", "lems"], [0.8])


def test_matrix_dobi_place():
    mx = _bench("matrix")
    assert mx._place(87.9901, 87.99, 73.38) == "= svd-llm"
    assert mx._place(80.0, 87.99, 73.38) == "between"
    assert mx._place(62.0, 87.99, 73.38) == "better than both"
    assert mx._place(95.0, 87.99, 73.38) == "worse than both"


def test_matrix_merge_shards(tmp_path):
    """Shards of one protocol merge cell by cell; a measured cell beats an error; a disagreement or another
    protocol is refused."""
    import json

    import pytest

    from svdpress.errors import SvdpressError

    mx = _bench("matrix")
    proto = {"model": "m"}
    cell = lambda w: {"ppl": {"wiki": w, "c4": 2 * w}}  # noqa: E731
    a = {"protocol": proto, "cells": {mx.key("kfac", "lems", 0.8): cell(37.0),
                                      mx.key("svd", "lems", 0.8): {"error": "x"}}, "factorize_s": {"kfac": 1.0}}
    b = {"protocol": proto, "cells": {mx.key("svd", "lems", 0.8): cell(90.0), mx.key("kfac", "lems", 0.8): cell(37.0)},
         "factorize_s": {"svd": 2.0}, "dense": {"wiki": 22.0, "c4": 30.0}}
    (tmp_path / "b.json").write_text(json.dumps(b))
    said = mx.merge(a, [tmp_path / "b.json"])
    assert said == [f"{tmp_path / 'b.json'}: 1 cells added"]
    assert a["cells"][mx.key("svd", "lems", 0.8)] == cell(90.0) and a["factorize_s"] == {"kfac": 1.0, "svd": 2.0}
    assert a["dense"]["wiki"] == 22.0
    b["cells"][mx.key("kfac", "lems", 0.8)] = cell(38.0)
    (tmp_path / "b.json").write_text(json.dumps(b))
    with pytest.raises(SvdpressError, match="differs"):
        mx.merge(a, [tmp_path / "b.json"])
    b["protocol"] = {"model": "other"}
    (tmp_path / "b.json").write_text(json.dumps(b))
    with pytest.raises(SvdpressError, match="another protocol"):
        mx.merge(a, [tmp_path / "b.json"])
    (tmp_path / "d.json").write_text("not json")
    with pytest.raises(SvdpressError, match="not a matrix JSON"):
        mx.merge(a, [tmp_path / "d.json"])
    with pytest.raises(SvdpressError, match="no file"):
        mx.merge(a, [tmp_path / "c.json"])


def test_matrix_covers_every_registered_method():
    """The matrix's rows and columns are the registries (a newly registered method is not silently left out);
    `load` only reads ranks from a file."""
    from svdpress.allocate import ALLOCATORS
    from svdpress.factorize import FACTORIZERS

    mx = _bench("matrix")
    assert set(mx.FACTORIZERS_ALL) == set(FACTORIZERS.names())
    assert set(mx.ALLOCATORS_ALL) == set(ALLOCATORS.names()) - {"load"}


def test_matrix_protocol_holds_options_and_a_stored_matrix_is_never_overwritten(tmp_path):
    """Cells made with method options are another protocol (no reuse or merge with default-option cells); without
    options the protocol is the one stored matrices were made under; a file of another protocol, or not a matrix,
    is refused with one line instead of being replaced by a new matrix."""
    import json

    import pytest

    from svdpress.errors import SvdpressError

    mx = _bench("matrix")
    a = mx.parse_args([])
    plain = mx.protocol(a, {})
    assert "options" not in plain and plain["rank_multiple"] == 1
    with_opts = mx.protocol(a, {"fermigrad": {"steps": 100}})
    assert with_opts["options"] == {"fermigrad": {"steps": 100}} and with_opts != plain
    path = tmp_path / "m.json"
    assert mx.load_doc(path, plain)["cells"] == {}  # no file: a new matrix
    stored = {"protocol": plain, "cells": {mx.key("kfac", "lems", 0.8): {"ppl": {"wiki": 37.0, "c4": 62.0}}},
              "factorize_s": {}}
    mx.save_doc(path, stored)
    assert mx.load_doc(path, json.loads(json.dumps(plain))) == stored
    with pytest.raises(SvdpressError, match="another protocol.*options"):
        mx.load_doc(path, with_opts)
    assert json.loads(path.read_text()) == stored  # untouched
    (tmp_path / "x.json").write_text("[1]")
    with pytest.raises(SvdpressError, match="not a matrix JSON"):
        mx.load_doc(tmp_path / "x.json", plain)


def test_calibration_study_resumes_only_its_own_setup_and_measures_missing_columns(tmp_path):
    """A resumed study reuses a run only when it holds every text and every asked task at this --task-limit (a
    rerun with --tasks measures the zero-shot it lacks instead of printing an empty column); a file made under
    another setup (ratio, protocol, options) is refused, not mixed with this run's."""
    import json

    import pytest

    from svdpress.errors import SvdpressError

    cd = _bench("calibration_data")
    setup = {"model": "default", "factorize": "svd-llm", "ratio": 0.8, "protocol": "p"}
    run = {"allocate": "uniform", "calib": "wiki", "ppl": {"wiki": 88.0, "c4": 194.0}}
    path = tmp_path / "c.json"
    assert cd.resume(path, setup) == {}
    path.write_text(json.dumps({**setup, "runs": {"uniform|wiki": run}}))
    assert cd.resume(path, setup)["runs"]["uniform|wiki"] == run
    assert cd.covers(run, ["wiki", "c4"], (), 200)
    assert not cd.covers(run, ["wiki", "code"], (), 200)  # a text it was never scored on
    assert not cd.covers(run, ["wiki"], ("piqa",), 200)  # zero-shot asked, none stored
    scored = {**run, "tasks": {"piqa": 0.6}, "task_limit": 200}
    assert cd.covers(scored, ["wiki"], ("piqa",), 200) and not cd.covers(scored, ["wiki"], ("piqa",), 100)
    for other in ({**setup, "ratio": 0.7}, {**setup, "options": {"fermigrad": {"steps": 100}}}):
        with pytest.raises(SvdpressError, match="another setup"):
            cd.resume(path, other)
    path.write_text("[]")
    with pytest.raises(SvdpressError, match="not this bench's JSON"):
        cd.resume(path, setup)


def test_lems_surrogate_bench_compares_prediction_with_measurement():
    """bench/lems_surrogate.py's comparison, against losses made to be exactly LEMS's prediction (ratio 1) and
    against losses a kind of layer underpredicts by 10× (ratio 0.1 for that kind, the order kept)."""
    import types

    import numpy as np
    import torch

    from svdpress.allocate.common import rank_at
    from svdpress.params import Counting, LayerShape

    ls = _bench("lems_surrogate")
    shapes = {f"b{i}.{k}": LayerShape(64, 96) for i in range(4) for k in ("q_proj", "up_proj")}
    gen = torch.Generator().manual_seed(0)
    spectra = {n: types.SimpleNamespace(S=torch.sort(torch.rand(64, generator=gen), descending=True).values)
               for n in shapes}
    counting = Counting()

    def tail(name, f):
        S2 = spectra[name].S.double() ** 2
        return float(S2[rank_at(shapes[name], f, 1, counting):].sum() / S2.sum())

    G = {n: 1.0 + i for i, n in enumerate(shapes)}
    exact = {n: {f: G[n] * tail(n, f) / tail(n, 0.1) for f in (0.1, *ls.FRACTIONS)} for n in shapes}
    res = ls.compare(shapes, spectra, exact, 0.1, counting)
    assert all(np.isclose(v, 1.0) for kind in ("q_proj", "up_proj", "all layers") for v in res[kind].values())
    under = {n: {f: v * (10.0 if n.endswith("q_proj") and f != 0.1 else 1.0) for f, v in d.items()}
             for n, d in exact.items()}
    res = ls.compare(shapes, spectra, under, 0.1, counting)
    assert all(np.isclose(v, 0.1) for v in res["q_proj"].values())
    assert all(np.isclose(v, 1.0) for v in res["up_proj"].values())
    flat = {n: types.SimpleNamespace(S=torch.ones(64)) for n in shapes}  # equal energies: k of 64 directions
    assert ls.head_energy(shapes, flat, 16) == {"q_proj": 0.25, "up_proj": 0.25}


def test_matrix_probes_are_reused_only_for_the_spectra_they_were_measured_on(tmp_path):
    """Stored sensitivities (committed in bench/reference/matrix-probes, 6–38 min each to measure) round-trip
    through JSON into the problem cache, and are ignored for other spectra or another protocol."""
    import torch

    from svdpress.allocate.sensitivity import ProbeConfig
    from svdpress.factorize import LayerSpectrum

    mx = _bench("matrix")
    proto = mx.protocol(mx.parse_args([]), {})

    def spectra(s):
        return {"l.q": LayerSpectrum(torch.eye(2), torch.tensor(s, dtype=torch.float64), torch.eye(2))}

    sid = mx.spectra_id(spectra([2.0, 1.0]))
    assert sid == mx.spectra_id(spectra([2.0, 1.0 + 1e-9]))  # last-bit rounding: the same spectra
    assert sid != mx.spectra_id(spectra([2.0, 0.9]))
    cache = {("sensitivity", ProbeConfig(), 0.4, "classical"): ({"l.q": {"kl": 0.1, "nll": 3.2, "dnll": 0.01}}, 2.5, 1),
             ("probe", ProbeConfig()): object()}  # the live probe is not stored
    path = tmp_path / "f.json"
    mx.save_probes(path, proto, sid, cache)
    back = mx.load_probes(path, proto, sid)
    assert back == {k: v for k, v in cache.items() if k[0] == "sensitivity"}
    assert mx.load_probes(path, proto, mx.spectra_id(spectra([2.0, 0.9]))) == {}
    assert mx.load_probes(path, {**proto, "rank_multiple": 8}, sid) == {}
    assert mx.load_probes(tmp_path / "absent.json", proto, sid) == {}


def test_matrix_runs_cells_and_a_rerun_reuses_its_probes(tiny_model_dir, tmp_path, monkeypatch):
    """End to end on a tiny model: cells are measured, the sensitivities land in the probe file, and a run for
    another ratio takes them from there instead of probing the model again."""
    import json

    from svdpress.allocate import sensitivity

    mx = _bench("matrix")
    out = tmp_path / "m.json"
    argv = ["--model", str(tiny_model_dir), "--factorizers", "svd-llm", "--allocators", "lems", "--calib-samples",
            "4", "--calib-seqlen", "64", "--limit", "256", "--seqlen", "64", "--out", str(out), "--stats-cache",
            str(tmp_path / "stats"), "--device", "cpu", "--no-progress"]
    assert mx.main(argv + ["--ratios", "0.8"]) == 0
    cells = json.loads(out.read_text())["cells"]
    assert set(cells) == {"svd-llm|lems|0.8"} and cells["svd-llm|lems|0.8"]["achieved"] <= 0.8
    assert json.loads((tmp_path / "matrix-probes" / "svd-llm.json").read_text())["entries"]

    def no_probe(*a, **k):
        raise AssertionError("probed again")

    monkeypatch.setattr(sensitivity, "Probe", no_probe)
    assert mx.main(argv + ["--ratios", "0.6"]) == 0
    assert "ppl" in json.loads(out.read_text())["cells"]["svd-llm|lems|0.6"]


def test_bench_arguments_are_checked_before_any_work(capsys):
    """A typo in a method name, a ratio outside (0, 1] or a count below 1 ends the bench at once with one line
    naming the argument (argparse's exit 2), never a bench that silently leaves the method out or a traceback
    after the model is loaded."""
    import pytest

    mx, al, q, h, sp = _bench("matrix"), _bench("allocation"), _bench("quality"), _bench("heal"), _bench("speed")
    ar, cd, sc, vo = _bench("architectures"), _bench("calibration_data"), _bench("scale"), _bench("vocab")
    bad = [(ar.parse_args, ["--method", "svdd+uniform"], "unknown factorizer: svdd"),
           (ar.parse_args, ["--method", "svd-llm"], "FACTORIZE+ALLOCATE, e.g. svd-llm+uniform; got 'svd-llm'"),
           (ar.parse_args, ["--ratio", "nan"], "--ratio: a number in (0, 1], got 'nan'"),
           (q.parse, ["--methods", "svd-llm,kfca"], "unknown factorizer: kfca"),
           (q.parse, ["--ratios", "0.8,2"], "--ratios: comma-separated numbers in (0, 1]"),
           (h.parse_args, ["--starts", "uniform,fermi"], "unknown allocator: fermi"),
           (h.parse_args, ["--ratios", "x"], "--ratios"),
           (sp.parse_args, ["--ratios", "3"], "--ratios"),
           (sp.parse_args, ["--repeats", "0"], "--repeats: an integer ≥ 1"),
           (mx.parse_args, ["--factorizers", "svd,kfc"], "unknown factorizer: kfc; registered: asvd"),
           (mx.parse_args, ["--allocators", "lems,nope"], "unknown allocator: nope"),
           (mx.parse_args, ["--ratios", "0.8,x"], "--ratios: comma-separated numbers in (0, 1]"),
           (mx.parse_args, ["--ratios", "1.5"], "got '1.5'"),
           (mx.parse_args, ["--ratios", ","], "got ','"),
           (mx.parse_args, ["--limit", "-3"], "--limit: an integer ≥ 1"),
           (mx.parse_args, ["--calib-samples", "0"], "--calib-samples: an integer ≥ 1"),
           (al.parse_args, ["--methods", "uniform,fermigard"], "unknown allocator: fermigard"),
           (al.parse_args, ["--ratios", "0"], "--ratios: comma-separated numbers in (0, 1]"),
           (q.parse, ["--seed", "-1"], "--seed: an integer in [0, 2^32)"),
           (sp.parse_args, ["--prefill", "32"], "--prefill: BATCHxSEQLEN,... with both ≥ 1"),
           (sp.parse_args, ["--decode-batches", "1,-2"], "--decode-batches: an integer ≥ 1, got '-2'"),
           (sp.parse_args, ["--new-tokens", "-1"], "--new-tokens: an integer ≥ 0"),
           (h.parse_args, ["--target-ppl", "-3"], "--target-ppl: a number > 0"),
           (h.parse_args, ["--ppl-every", "0"], "--ppl-every: an integer ≥ 1"),
           (cd.parse_args, ["--calib-samples", "0"], "--calib-samples: an integer ≥ 1"),
           (sc.main, ["--timeout", "-1"], "--timeout: a number > 0"),
           (vo.main, ["--kill-above", "nan"], "--kill-above: a number > 0")]
    for parse, argv, msg in bad:
        with pytest.raises(SystemExit) as e:
            parse(argv)
        assert e.value.code == 2 and msg in capsys.readouterr().err, argv
    a = mx.parse_args(["--factorizers", "kfac, svd", "--ratios", "0.9,1", "--limit", "16"])
    assert (a.factorizers, a.allocators[:2], a.ratios, a.limit) == (["kfac", "svd"], ["uniform", "svd-llm-v2"],
                                                                    [0.9, 1.0], 16)


def test_heal_bench_refuses_a_file_of_other_settings(tmp_path):
    """A rerun of the heal sweep with one flag changed must not overwrite hours of stored runs."""
    import pytest

    from svdpress.errors import SvdpressError

    h = _bench("heal")
    fresh = {k: None for k in h.RESUME_KEYS} | {"results": []}
    out = tmp_path / "heal.json"
    assert h.resume(out, fresh) is fresh  # no file: a fresh document
    out.write_text('{"results": [{"mode": "factors"}], ' + ", ".join(f'"{k}": null' for k in h.RESUME_KEYS) + "}")
    assert h.resume(out, fresh)["results"] == [{"mode": "factors"}]  # same settings: resumed
    with pytest.raises(SvdpressError, match="other settings.*'model': \\(None, 'x'\\).*--fresh"):
        h.resume(out, fresh | {"model": "x"})
    out.write_text("not json")
    with pytest.raises(SvdpressError, match="not this bench's JSON"):
        h.resume(out, fresh)


def test_benches_read_their_stored_results_with_one_line_errors(tmp_path, capsys):
    """A damaged results file, or one of other settings, ends a resumed bench before any model is loaded (was: a
    JSONDecodeError traceback, or pivga_budget's rows of another model mixed into this one's after calibrating)."""
    import pytest

    pb, vo, sc = _bench("pivga_budget"), _bench("vocab"), _bench("scale")
    bad = tmp_path / "bad.json"
    bad.write_text("{bad")
    other = tmp_path / "other.json"
    other.write_text('{"model": "other", "results": []}')
    for main, argv, msg in [(pb.main, ["--out", str(bad), "--resume"], "is not this bench's JSON"),
                            (pb.main, ["--out", str(other), "--resume"], "other settings (model, "),
                            (vo.main, ["--out", str(bad), "--report"], "is not this bench's JSON"),
                            (sc.main, ["--nproc", "2", "--nproc-out", str(bad), "--report"],
                             "is not this bench's --nproc JSON")]:
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert str(e.value).startswith("error: ") and msg in str(e.value), argv


def test_a_stopped_bench_leaves_no_measured_run_behind(tmp_path):
    """scale/vocab run each measurement under /usr/bin/time or torchrun; stopping the bench (Ctrl-C, SIGTERM,
    --timeout) must kill the whole group, grandchildren included (was: the compress processes kept running)."""
    import os
    import time

    import pytest

    sc = _bench("scale")
    pidfile = tmp_path / "grandchild.pid"
    cmd = ["sh", "-c", f"sleep 60 & echo $! > {pidfile}; wait"]

    def alive(pid: int) -> bool:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"

    with pytest.raises(KeyboardInterrupt):
        with sc.child_group(cmd) as proc:
            while not pidfile.is_file() or not pidfile.read_text().strip():
                time.sleep(0.02)
            raise KeyboardInterrupt
    grandchild = int(pidfile.read_text())
    time.sleep(0.2)
    assert proc.returncode is not None and not alive(grandchild)
    pidfile.unlink()
    with sc.child_group(cmd) as proc:  # --timeout: the group is killed, rc -9
        assert sc.wait_for(proc, timeout=0.5) == -9
    assert not alive(int(pidfile.read_text()))


def test_heal_bench_measures_a_damaged_zero_shot_cache_again(tmp_path, monkeypatch, capsys):
    """The zero-shot figures of a start are a cache: a damaged file is measured again with a note, not a traceback."""
    import argparse

    h = _bench("heal")
    calls = []

    def fake_evaluate(path, cfg, device):
        calls.append(cfg.tasks)
        return {"tasks": {t: {"acc": 0.5} for t in cfg.tasks}}

    monkeypatch.setattr(h.svdpress, "evaluate", fake_evaluate)
    a = argparse.Namespace(tasks="piqa,arc_easy", task_limit=20)
    (tmp_path / "bench_tasks_before.json").write_text("{damaged")
    assert h.tasks_before(a, str(tmp_path), "cpu") == {"piqa": {"acc": 0.5}, "arc_easy": {"acc": 0.5}}
    assert "measuring again" in capsys.readouterr().err and len(calls) == 1
    assert h.tasks_before(a, str(tmp_path), "cpu")["piqa"] == {"acc": 0.5} and len(calls) == 1  # now cached
    a.task_limit = 40  # another limit: measured again
    h.tasks_before(a, str(tmp_path), "cpu")
    assert len(calls) == 2


def test_every_bench_refuses_a_directory_as_its_results_file(tmp_path, capsys, monkeypatch):
    """--out /tmp (a directory) used to load the model, measure a cell, and die in a traceback at the first save.
    Every bench's results flag is typed (cli.results_file): exit 2 at parse time, naming the flag."""
    import pytest

    flags = {"allocation": "--out", "architectures": "--out", "calibration_data": "--out", "heal": "--out",
             "lems_surrogate": "--out", "matrix": "--out", "pivga_budget": "--out", "quality": "--json",
             "scale": "--out", "speed": "--json", "vocab": "--out", "zeroshot": "--out"}
    for name, flag in [*flags.items(), ("scale", "--nproc-out")]:
        mod = _bench(name)
        parse = getattr(mod, "parse_args", None) or getattr(mod, "parse", None) or mod.main
        argv = [flag, str(tmp_path)]
        monkeypatch.setattr(sys, "argv", [f"{name}.py", *argv])  # zeroshot parses sys.argv
        with pytest.raises(SystemExit) as e:
            parse() if name == "zeroshot" else parse(argv)
        err = capsys.readouterr().err
        assert e.value.code == 2 and f"{flag}: a file path, not a directory" in err, (name, err)
    (tmp_path / "a-file").write_text("")
    for path in (tmp_path / "a-file" / "r.json", tmp_path / "a-file" / "sub" / "r.json"):  # a folder can't be made
        with pytest.raises(SystemExit) as e:
            _bench("matrix").parse_args(["--out", str(path)])
        assert e.value.code == 2 and "in a folder that can be written" in capsys.readouterr().err, path
    assert _bench("matrix").parse_args(["--out", str(tmp_path / "new" / "m.json")]).out == tmp_path / "new" / "m.json"


def test_a_bench_ends_a_user_error_found_after_parsing_with_one_line(capsys, monkeypatch):
    """--device cuda on a machine without CUDA is found after parsing: one line and exit 2, not a traceback."""
    import pytest

    from svdpress.cli import bench_main
    from svdpress.errors import SvdpressError

    def main():
        raise SvdpressError("device 'cuda' requested but CUDA is not available")

    monkeypatch.setattr(sys, "argv", ["matrix.py"])
    with pytest.raises(SystemExit) as e:
        bench_main(main)
    assert e.value.code == 2
    assert capsys.readouterr().err == "matrix.py: error: device 'cuda' requested but CUDA is not available\n"

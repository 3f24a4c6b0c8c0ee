"""The ``fastdpo`` command line end to end: bench (table, rows, plot, failures), check, kernels,
and argument errors.  Everything runs on the tiny preset with one repeat."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import textwrap

import pytest

from fastdpo import bench, cli

FAST = ["--size", "tiny", "--repeats", "1", "--no-progress", "--threads", "1"]


@pytest.fixture(autouse=True)
def _restore_threads(tmp_path, monkeypatch):
    import torch

    monkeypatch.chdir(tmp_path)  # the bench writes results/ under the working directory
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)  # `--threads` sets it for the whole process


def test_bench_writes_rows_and_plot_under_results_and_summarizes(tmp_path, capsys):
    rc = cli.main(["bench", *FAST, "--workload", "head", "--providers", "torch,fastdpo-torch", "--no-memory"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "summary, B=1 L=32 V=512" in text
    assert "loss head alone, forward+backward: fastdpo" in text and "x-transformers (" in text
    assert "the fastest peer, torch" in text
    (csv_path,) = (tmp_path / "results").glob("bench-tiny-*.csv")
    (png_path,) = (tmp_path / "results").glob("bench-tiny-*.png")
    assert f"rows: results/{csv_path.name}" in text and f"plot: results/{png_path.name}" in text
    assert png_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rc = cli.main(["bench", *FAST, "--workload", "head", "--providers", "torch", "--no-memory", "--no-files"])
    assert rc == 0 and len(list((tmp_path / "results").iterdir())) == 2

# Test-only providers, in a file so that the worker processes import them too
# (--provider-module).  A worker is a process forked from the worker server, which imported
# the file: a pid other than the importer's means "in a worker" (timing or memory).
PLUGIN = textwrap.dedent(
    """
    import os, signal, time
    from fastdpo import bench

    _IMPORTER = os.getpid()

    def _in_worker():
        return os.getpid() != _IMPORTER

    @bench.register("boom-build", workloads=("head",))
    def _boom_build(workload, mode, cfg):
        raise RuntimeError("cannot build\\nsecond line")

    @bench.register("boom-step", workloads=("head",))
    def _boom_step(workload, mode, cfg):
        def step():
            raise ValueError("step failed")
        return step

    @bench.register("killed", workloads=("head",))
    def _killed(workload, mode, cfg):
        def step():
            if _in_worker():
                os.kill(os.getpid(), signal.SIGKILL)  # what the kernel's OOM killer does
        return step

    @bench.register("slow", workloads=("head",))
    def _slow(workload, mode, cfg):
        def step():
            if _in_worker():
                time.sleep(60)
        return step
    """
)


@pytest.fixture
def plugin(tmp_path):
    path = tmp_path / "bench_test_providers.py"
    path.write_text(PLUGIN)
    before = dict(bench.PROVIDERS)
    yield str(path)
    bench.PROVIDERS.clear()
    bench.PROVIDERS.update(before)


def test_bench_tiny_end_to_end(tmp_path, capsys):
    out, png = tmp_path / "rows.json", tmp_path / "plot.png"
    rc = cli.main(["bench", *FAST, "--providers", "fastdpo-torch", "--out", str(out), "--plot", str(png)])
    assert rc == 0
    text = capsys.readouterr().out

    header = "provider            workload mode              median ms  vs x-t vs floor  peak MiB  head MiB mem vs x-t"
    assert header in text
    rows = json.loads(out.read_text())
    assert all(list(r) == list(bench.COLUMNS) for r in rows)
    got = {(r["provider"], r["workload"], r["mode"]) for r in rows}
    step = {"floor", "body", "x-transformers", "fastdpo-torch"}  # floor, x-t, body: always measured
    head = {"floor", "x-transformers", "fastdpo-torch"}
    want = {(p, "step", m) for p in step for m in bench.MODES} | {(p, "head", m) for p in head for m in bench.MODES}
    assert got == want
    for r in rows:
        assert r["status"] == "ok", r
        assert r["median_ms"] > 0 and r["peak_mib"] is not None
        assert r["vocab"] == 512 and r["dtype"] == "float32" and r["device"] == "cpu"
        assert r["torch"] and r["x_transformers"] and r["date"] and r["threads"] == 1
        assert f"{r['provider']:19} {r['workload']:8} {r['mode']:16}" in text
    # each (provider, workload, mode) timed in a fresh process of its own (the CPU default)
    assert all(r["isolation"] == "process" for r in rows)
    assert len({r["pid"] for r in rows}) == len(rows) and os.getpid() not in {r["pid"] for r in rows}
    xt = [r for r in rows if r["provider"] == "x-transformers"]
    assert all(r["vs_xt"] == 1.0 and r["mem_vs_xt"] == 1.0 for r in xt)
    assert all(r["vs_floor"] == 1.0 for r in rows if r["provider"] == "floor")
    for r in rows:
        if r["workload"] == "step":
            body = next(b for b in rows if b["provider"] == "body" and b["mode"] == r["mode"])
            assert r["head_mib"] == pytest.approx(r["peak_mib"] - body["peak_mib"])
        else:
            assert r["body_mib"] is None and r["head_mib"] == r["peak_mib"]

    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(data) > 20_000  # 3 x 4 panels with lines, not an empty canvas


def test_bench_csv_and_sweep(tmp_path, capsys):
    out, png = tmp_path / "rows.csv", tmp_path / "sweep.png"
    rc = cli.main(["bench", *FAST, "--workload", "head", "--mode", "forward", "--providers", "trl", "--no-memory",
                   "--sweep", "vocab=256,512", "--out", str(out), "--plot", str(png)])  # fmt: skip
    assert rc == 0
    text = capsys.readouterr().out
    assert "V=256" in text and "V=512" in text
    with open(out, newline="") as f:
        reader = csv.DictReader(f)
        assert tuple(reader.fieldnames) == bench.COLUMNS
        rows = list(reader)
    assert sorted((r["provider"], int(r["vocab"])) for r in rows) == sorted(
        (p, v) for p in ("floor", "x-transformers", "trl") for v in (256, 512)
    )
    assert all(r["peak_mib"] == "" and float(r["median_ms"]) > 0 for r in rows)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# fastdpo's own route, broken on purpose: registered again under its name, its step raises in the
# worker processes as well as here.
BROKEN_OWN = textwrap.dedent(
    """
    from fastdpo import bench

    @bench.register("fastdpo-torch", workloads=("head", "step"))
    def _broken(workload, mode, cfg):
        def step():
            raise ImportError("cannot import name 'CUDAProperties' from 'kernels'")
        return step
    """
)


@pytest.mark.parametrize("isolation", ["process", "shuffle"])
def test_a_failing_fastdpo_provider_heads_the_summary_and_fails_the_run(isolation, tmp_path, capsys):
    """A peer that fails is a row (above: exit 0); one of fastdpo's own providers that fails
    opens the summary, named with its error, and the command exits non-zero."""
    path = tmp_path / "broken_own.py"
    path.write_text(BROKEN_OWN)
    before = dict(bench.PROVIDERS)
    try:
        rc = cli.main(["bench", *FAST, "--workload", "head", "--mode", "forward", "--provider-module", str(path),
                       "--providers", "fastdpo-torch,trl", "--no-memory", "--no-files", "--isolation", isolation])
    finally:
        bench.PROVIDERS.clear()
        bench.PROVIDERS.update(before)
    assert rc == 1
    captured = capsys.readouterr()
    lines = captured.out.splitlines()
    summary = lines[lines.index("") + 1:]  # the summary follows the table's blank line
    assert summary[0] == "FAILED: 1 of fastdpo's own measurements failed (fastdpo bench exits 1):", summary
    assert summary[1].startswith("  fastdpo-torch (head forward B=")
    assert summary[1].endswith("ImportError: cannot import name 'CUDAProperties' from 'kernels'")
    assert summary[2].startswith("summary, ")
    assert "fastdpo bench: 1 of fastdpo's own measurements failed, first: fastdpo-torch" in captured.err
    # the peer and the references still ran
    for name in ("trl", "x-transformers", "floor"):
        assert "failed" not in next(ln for ln in lines if ln.startswith(name + " "))


def test_own_providers_are_fastdpos_routes_and_the_baselines():
    from fastdpo.bench.registry import is_own

    ours = {n for n in bench.PROVIDERS if is_own(n)}
    assert {"floor", "body", "fastdpo-torch", "fastdpo-packed", "fastdpo-orpo", "fastdpo-kto"} <= ours
    assert not ours & {"x-transformers", "torch", "trl", "trl-fused", "cce", "liger", "liger-kto", "torch-lce"}


@pytest.mark.parametrize("isolation", ["process", "shuffle"])
def test_failing_providers_are_reported_and_the_rest_runs(isolation, plugin, tmp_path, capsys):
    out = tmp_path / "rows.json"
    rc = cli.main(["bench", *FAST, "--workload", "head", "--mode", "forward", "--provider-module", plugin,
                   "--providers", "boom-build,boom-step,killed,slow", "--timeout", "8", "--out", str(out),
                   "--isolation", isolation, "--seed", "7"])  # fmt: skip
    assert rc == 0
    text = capsys.readouterr().out
    assert f"--isolation {isolation} --seed 7" in text.splitlines()[0]
    assert f"(seed 7; --isolation {isolation})" in text
    rows = {r["provider"]: r for r in json.loads(out.read_text())}
    assert all(r["isolation"] == isolation and r["seed"] == 7 for r in rows.values())
    assert rows["boom-build"]["status"] == "failed"
    assert rows["boom-build"]["reason"] == "RuntimeError: cannot build"
    assert rows["boom-step"]["status"] == "failed"
    assert rows["boom-step"]["reason"] == "ValueError: step failed"
    assert rows["killed"]["status"] == "failed"
    assert "killed by SIGKILL" in rows["killed"]["reason"]
    if isolation == "process":  # killed while timed in its own process
        assert rows["killed"]["median_ms"] is None
        assert rows["slow"]["reason"] == "worker timed out after 8 s"
    else:  # timed fine here; its memory worker died
        assert rows["killed"]["median_ms"] is not None and rows["killed"]["reason"].startswith("peak memory: ")
        assert rows["slow"]["reason"] == "peak memory: worker timed out after 8 s"
    for name in ("x-transformers", "floor"):
        assert rows[name]["status"] == "ok" and rows[name]["peak_mib"] is not None, rows[name]
    for name in ("boom-build", "boom-step", "killed"):
        line = next(ln for ln in text.splitlines() if ln.startswith(name))
        assert f"failed: {rows[name]['reason']}" in line
    assert rows["slow"]["status"] == "failed"


def test_unavailable_provider_is_a_row():
    rows = bench.run([bench.Config(4, 8, 64, 16, 1, 2)], workloads=["head"], modes=["forward"],
                     providers=["fastdpo-triton"], repeats=1, memory=False, progress=False)  # fmt: skip
    (row,) = [r for r in rows if r["provider"] == "fastdpo-triton"]
    assert row["status"] == "unavailable" and "CUDA" in row["reason"] and row["median_ms"] is None


def _bad(args: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as exc:
        cli.main(args)
    assert exc.value.code != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert err, "no message"
    return err[-1]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--batch", "-1"], "argument --batch: must be >= 1, got -1"),
        (["--vocab", "0"], "argument --vocab: must be >= 1, got 0"),
        (["--seq-len", "1"], "--seq-len must be >= 2"),
        (["--dim", "abc"], "argument --dim: expected a positive integer, got 'abc'"),
        (["--providers", "torch,nope"], "argument --providers: unknown provider 'nope'"),
        (["--dtype", "float8"], "argument --dtype: invalid choice: 'float8'"),
        (["--sweep", "depth=1,2"], "argument --sweep: expected vocab=V1,V2,..., seq-len=L1,L2,... or prompt-pct=P1,P2,..."),
        (["--sweep", "vocab=8,-2"], "argument --sweep: vocab values: must be >= 1, got -2"),
        (["--prompt-pct", "96"], "argument --prompt-pct: must be <= 95 (a prompt leaves a completion), got 96"),
        (["--sweep", "prompt-pct=20,-1"], "argument --sweep: prompt-pct values: must be >= 0, got -1"),
        (["--out", "rows.txt"], "--out must end in .csv or .json"),
        (["--mode", "backward"], "argument --mode: expected 'all' or some of forward, forward+backward"),
        (["--size", "huge"], "argument --size: invalid choice: 'huge'"),
    ],
)
def test_bad_bench_arguments_exit_nonzero_with_one_line(args, message, capsys):
    line = _bad(["bench", *args], capsys)
    assert line.startswith("fastdpo bench: error: ") and message in line, line


def test_unknown_command_and_stray_arguments(capsys):
    assert "invalid choice: 'bogus'" in _bad(["bogus"], capsys)
    assert "unrecognized arguments: --bogus" in _bad(["check", "--bogus"], capsys)


def test_check_passes_on_this_device(capsys):
    assert cli.main(["check"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert any(ln.startswith("PASS  impl=torch") for ln in lines), lines
    assert not any(ln.startswith("FAIL") for ln in lines), lines
    # conftest.py runs the kernels on the CPU interpreter when there is no GPU.
    import torch
    import triton

    if torch.cuda.is_available() or triton.knobs.runtime.interpret:
        assert any(ln.startswith("PASS  impl=triton") for ln in lines), lines
    else:
        assert any(ln.startswith("SKIP  impl=triton: needs CUDA") for ln in lines), lines


def test_check_reports_a_failure(monkeypatch, capsys):
    import fastdpo

    class Broken(fastdpo.DPO):
        def forward(self, *args, **kwargs):
            return super().forward(*args, **kwargs) * 1.001

    monkeypatch.setattr(fastdpo, "DPO", Broken)
    assert cli.main(["check"]) == 1
    assert any(ln.startswith("FAIL  impl=torch") for ln in capsys.readouterr().out.splitlines())


def test_kernels_passes_its_arguments_through(monkeypatch):
    from fastdpo import kernel_report

    seen = []
    monkeypatch.setattr(kernel_report, "main", lambda argv: seen.append(argv) or 7)
    assert cli.main(["kernels", "--json", "--vocab", "128", "--help"]) == 7
    assert seen == [["--json", "--vocab", "128", "--help"]]


def test_console_script_help():
    proc = subprocess.run([sys.executable, "-m", "fastdpo.cli", "--help"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0
    assert all(c in proc.stdout for c in ("bench", "check", "kernels"))

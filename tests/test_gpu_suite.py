"""benchmarks/gpu_suite.py: the dry run (every step at tiny sizes, CPU tensors, Triton
interpreted) passes and writes both files with the real run's columns; missing modules stop
it at once, all of them named."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SUITE = ROOT / "benchmarks" / "gpu_suite.py"
SECTIONS = ("roofline", "correctness", "kernels", "head", "step", "sequence_parallel")


def run_suite(*args, env=None, timeout=600):
    return subprocess.run([sys.executable, str(SUITE), *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})}, cwd=ROOT)


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu")
    start = time.perf_counter()
    proc = run_suite("--dry-run", "--out", str(out))
    return proc, out, time.perf_counter() - start


def test_dry_run_passes_every_step(dry_run):
    proc, out, seconds = dry_run
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert seconds < 300, f"the dry run took {seconds:.0f} s (budget: 5 minutes on 2 cores)"
    report = json.loads((out / "gpu.json").read_text())
    rows = report["rows"]
    assert report["dry_run"] is True
    for section in SECTIONS:
        assert any(r["section"] == section for r in rows), section
    assert all(set(r) == set(report["columns"]) for r in rows)
    bad = [(r["section"], r["name"], r["status"], r["detail"]) for r in rows if r["status"] not in ("ok", "pass")]
    assert not bad, bad
    checks = [r for r in rows if r["section"] == "correctness"]
    assert len(checks) >= 40
    # every DPO route was checked against x-transformers
    assert sum(r["name"].startswith("DPO vs x-transformers") for r in checks) == 5
    md = (out / "gpu.md").read_text()
    for section in SECTIONS:
        assert f"## {section}" in md
    assert "correctness:" in proc.stdout and "passed" in proc.stdout


def test_missing_modules_stop_the_suite_naming_each(tmp_path):
    """Modules that do not import (here: x_transformers and trl shadowed by failing stubs)
    stop the suite within seconds, each one named, with the way to carry them."""
    for name in ("x_transformers", "trl"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "__init__.py").write_text(f"raise ImportError('{name} is not installed here')\n")
    start = time.perf_counter()
    proc = run_suite("--out", str(tmp_path / "out"), env={"PYTHONPATH": str(tmp_path), "TRITON_INTERPRET": ""}, timeout=120)
    assert proc.returncode == 2
    assert time.perf_counter() - start < 60
    assert "x_transformers" in proc.stderr and "trl" in proc.stderr, proc.stderr
    assert "gpu_wheels.sh" in proc.stderr
    assert not (tmp_path / "out").exists()

"""How fastdpo's kernels are found, and that they never stand in for someone else's package.

The Triton sources live in the top-level ``kernels/`` folder, which has no ``__init__.py``:
with the repository root first on ``sys.path`` (``python -m pytest``, ``torchrun -m ...``,
``python -c``, a REPL in the checkout) it is only a namespace portion, which any installed
regular package named ``kernels`` outranks (Hugging Face's ``kernels``, which transformers
>= 5.25 imports when a model module loads).  ``fastdpo/kernels`` is a symbolic link to it, so
``fastdpo.kernels`` is found the same way from a checkout, an editable install and a wheel.
"""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

PROBE = """
import importlib.metadata, sys
import kernels
print("kernels:", kernels.__file__, getattr(kernels, "STAND_IN", False), importlib.metadata.version("kernels"))
import fastdpo.kernels.sequence_logprobs as k
print("fastdpo.kernels:", k.__name__, k.row_logprobs.__name__)
"""


def _stand_in(site: Path) -> None:
    """A regular package ``kernels`` with distribution metadata, as pip installs one."""
    pkg = site / "kernels"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("STAND_IN = True\n")
    info = site / "kernels-99.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: kernels\nVersion: 99.0\n")
    (info / "RECORD").write_text("")


def _run_from_root(args: list[str], site: Path) -> str:
    env = {**os.environ, "PYTHONPATH": str(site)}
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_installed_kernels_package_is_not_shadowed(tmp_path):
    """From the repository root, with ``-m`` and with ``-c`` (both put the root first on the
    path), ``import kernels`` gives the installed distribution, and fastdpo's kernels still load."""
    site = tmp_path / "site"
    _stand_in(site)
    (site / "kernels_probe.py").write_text(PROBE)
    for args in (["-m", "kernels_probe"], ["-c", PROBE]):
        out = _run_from_root(args, site)
        assert f"kernels: {site / 'kernels' / '__init__.py'} True 99.0" in out, (args, out)
        assert "fastdpo.kernels: fastdpo.kernels.sequence_logprobs row_logprobs" in out, (args, out)


def test_kernels_folder_is_a_namespace_portion_only():
    """The reason the test above passes, stated where a contributor adding the file would look."""
    assert not (ROOT / "kernels" / "__init__.py").exists(), (
        "kernels/__init__.py makes the folder a regular package, which shadows Hugging Face's "
        "`kernels` whenever the repository root is first on sys.path"
    )
    link = ROOT / "fastdpo" / "kernels"
    assert link.is_symlink() and link.resolve() == (ROOT / "kernels").resolve()


def test_wheel_carries_the_kernels(tmp_path):
    """A regular (non-editable) install has the kernels as ``fastdpo/kernels/*.py``."""
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(tmp_path), str(ROOT)],
        capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    (wheel,) = tmp_path.glob("fastdpo-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    sources = {f"fastdpo/kernels/{p.name}" for p in (ROOT / "kernels").glob("*.py")}
    assert sources and sources <= names, sorted(sources - names)
    assert not any(n.startswith("kernels/") for n in names), "the wheel must not install a top-level `kernels`"

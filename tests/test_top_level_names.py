"""The import names `core`, `streams` and `recsys` are generic, so installing gplr-stream beside
another distribution that ships one of them must not silently run the other's code.

What the wheel installs is measured (its top-level names are exactly the three packages plus the
uniquely named `gplr_stream` module that holds the console script), and the console script's guard
is exercised against a foreign `core` that shadows ours: it refuses with one line and exit status
2 before anything of the foreign package runs."""
from __future__ import annotations

import configparser
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import gplr_stream

REPO = Path(__file__).resolve().parents[1]


def _run(code: str, *path: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(str(p) for p in (*path, REPO)), "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120,
                          cwd=path[0] if path else REPO)


def test_the_wheel_installs_only_our_names(tmp_path: Path) -> None:
    src = tmp_path / "src"  # a copy, so the build leaves nothing behind in the checkout
    src.mkdir()
    for name in ("pyproject.toml", "README.md", "gplr_stream.py"):
        shutil.copy(REPO / name, src / name)
    for name in gplr_stream.PACKAGES:
        shutil.copytree(REPO / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    out = tmp_path / "wheel"
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "--no-build-isolation",
                            "-q", "-w", str(out)], capture_output=True, text=True, timeout=300)
    if build.returncode != 0 and "No module named pip" in build.stderr:
        pytest.skip("pip is not installed in this interpreter")
    assert build.returncode == 0, build.stderr
    (wheel,) = out.glob("gplr_stream-*.whl")
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        info = next(n.split("/")[0] for n in names if n.endswith(".dist-info/RECORD"))
        top = {n.split("/")[0] for n in names} - {info}
        entry = configparser.ConfigParser()
        entry.read_string(z.read(f"{info}/entry_points.txt").decode())
    assert top == {"core", "streams", "recsys", "gplr_stream.py"}
    assert entry["console_scripts"]["gplr"] == "gplr_stream:main"


def test_our_packages_pass_the_guard() -> None:
    assert gplr_stream.foreign_packages() == {}
    done = _run("import gplr_stream, sys; sys.argv = ['gplr']; sys.exit(gplr_stream.main(['--help']))")
    assert done.returncode == 0 and "usage: gplr" in done.stdout


def test_a_foreign_core_is_refused_before_it_runs(tmp_path: Path) -> None:
    ran = tmp_path / "foreign-core-ran"
    (tmp_path / "core").mkdir()
    (tmp_path / "core" / "__init__.py").write_text(f"open({str(ran)!r}, 'w').close()\n")
    done = _run("import gplr_stream, sys; sys.exit(gplr_stream.main(['--help']))", tmp_path)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and f"core from {tmp_path / 'core' / '__init__.py'}" in lines[0]
    assert "streams" not in lines[0].split(";")[0].replace("gplr-stream", "")  # only core is foreign
    assert not ran.exists()


def test_a_missing_package_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gplr_stream, "PACKAGES", ("core", "no_such_gplr_package"))
    assert gplr_stream.foreign_packages() == {"no_such_gplr_package": "(not importable)"}

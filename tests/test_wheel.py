"""The wheel a user installs works on its own: built from this tree, installed into a fresh
environment where the source tree is not importable, it runs `clipsql demo` and a score query.

The fresh environment reuses the test environment's third-party packages (torch alone is 6 GB,
and no network is needed) through a path entry, but not its editable install of clipsql: the
only `clipsql` it can import is the installed wheel's."""
from __future__ import annotations

import importlib.metadata
import os
import subprocess
import sys
import sysconfig
import venv
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    build = tmp_path_factory.mktemp("build")
    # Build from a copy of the tracked tree so the build leaves nothing in the checkout.
    files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    src = build / "src"
    for name in files.decode().split("\0"):
        if not name:
            continue
        dst = src / name
        dst.parent.mkdir(parents=True, exist_ok=True)
        dst.write_bytes((ROOT / name).read_bytes())
    # the environment's own setuptools when it is new enough (no download), else pip's isolated build
    new_enough = int(importlib.metadata.version("setuptools").split(".")[0]) >= 68
    isolation = ["--no-build-isolation"] if new_enough else []
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", *isolation,
                    "-w", str(out), str(src)], check=True, capture_output=True)
    (whl,) = out.glob("clipsql-*.whl")
    return whl


def test_wheel_holds_one_namespace(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names}
    assert tops == {"clipsql", wheel.name.split("-")[0] + "-" + wheel.name.split("-")[1] + ".dist-info"}, tops
    for must in ("clipsql/__init__.py", "clipsql/cli.py", "clipsql/store/store.py", "clipsql/queries/sql/db.py",
                 "clipsql/queries/sql/nearest.py", "clipsql/models/fixture_models/demo-clip/open_clip_config.json",
                 "clipsql/serve/flight.py", "clipsql/serve/flightsql_proto.py",
                 "clipsql/serve/app.py", "clipsql/serve/static/index.html", "clipsql/serve/static/app.js",
                 "clipsql/serve/static/app.css"):
        assert must in names, must
    assert not [n for n in names if n.startswith(("clipsql/tests/", "clipsql/bench/", "clipsql/training/"))]
    entry = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    assert "clipsql = clipsql.__main__:main" in entry


def test_installed_wheel_runs_the_demo_and_a_score_query(wheel, tmp_path):
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=False, symlinks=True).create(env_dir)
    py = env_dir / "bin" / "python"
    site = Path(subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    # Third-party packages from the test environment (a plain path entry: its .pth files, and so
    # its editable clipsql finder, are not processed).
    (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site), str(wheel)],
                   check=True, capture_output=True)
    work = tmp_path / "elsewhere"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    where = subprocess.run([str(py), "-c", "import clipsql; print(clipsql.__file__)"], cwd=work, env=env,
                           capture_output=True, text=True, check=True).stdout.strip()
    assert Path(where).is_relative_to(site), where
    cli = [str(py), "-m", "clipsql"]
    version = subprocess.run([*cli, "--version"], cwd=work, env=env, capture_output=True, text=True)
    assert version.returncode == 0 and version.stdout.strip().endswith(wheel.name.split("-")[1]), version
    demo = subprocess.run([*cli, "demo", "store", "--rows", "120", "--no-progress"], cwd=work, env=env,
                          capture_output=True, text=True, timeout=900)
    assert demo.returncode == 0, demo.stderr[-2000:]
    assert "Lowest image Information Gain" in demo.stdout
    q = subprocess.run([*cli, "query", "store", "SELECT count(*) AS n, count(image_info_gain) AS scored, "
                        "min(text_info_gain) >= 0 AS nonneg FROM scores", "--format", "json"],
                       cwd=work, env=env, capture_output=True, text=True, timeout=300)
    assert q.returncode == 0, q.stderr[-2000:]
    assert '"n": 120' in q.stdout and '"scored": 120' in q.stdout and '"nonneg": true' in q.stdout, q.stdout
    near = subprocess.run([*cli, "query", "store", "SELECT count(*) AS k FROM nearest(text_embedding('a red "
                           "circle'), 5)", "--format", "json"], cwd=work, env=env, capture_output=True, text=True,
                          timeout=300)
    assert near.returncode == 0 and '"k": 5' in near.stdout, (near.stdout, near.stderr[-2000:])

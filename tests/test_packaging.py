"""A non-editable install works outside the source tree: build a wheel, install it into a fresh virtualenv
(over this interpreter's site-packages, so torch & co. are not downloaded again) and run it from elsewhere.

Data files must come from the package (importlib.resources), never from the checkout: the platform matrix,
and the validation images' build context (make/context.py), whose fingerprint must match the checkout's."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from edgellm_export import __version__
from edgellm_export.published_schemas import schema_text

ROOT = Path(__file__).resolve().parents[1]
# What an sdist holds (MANIFEST.in) and a wheel is built from.
SOURCES = ("pyproject.toml", "setup.py", "MANIFEST.in", "README.md", "Dockerfile", ".dockerignore", "containers",
           "schemas", "edgellm_export", "edgellm_validate")
BIN = "Scripts" if os.name == "nt" else "bin"


def _run(cmd, **kw) -> str:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "EDGELLM_PLATFORMS")}
    r = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=180, env=env, **kw)
    assert r.returncode == 0, f"{cmd} exited {r.returncode}:\n{r.stdout}\n{r.stderr}"
    return r.stdout


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(virtualenv, wheel) with the wheel installed into the virtualenv."""
    pytest.importorskip("setuptools")
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"  # build from a copy: an in-tree build would leave build/ and *.egg-info in the checkout
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info", "build", ".edgellm-ca-bundle.crt")
    src.mkdir()
    for name in SOURCES:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, src / name, ignore=ignore)
        else:
            shutil.copy2(ROOT / name, src / name)
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", str(src), "-w",
          str(tmp / "dist")])
    (wheel,) = (tmp / "dist").glob("edgellm_export-*.whl")
    venv = tmp / "venv"
    _run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(venv)])
    py = venv / BIN / "python"
    # this interpreter's pip (seen through the system site-packages) installs into the virtualenv
    _run([py, "-m", "pip", "install", "--no-deps", "--ignore-installed", "--no-index", "-q", str(wheel)])
    return venv, wheel


def test_wheel_holds_the_data_files(installed):
    _, wheel = installed
    names = set(zipfile.ZipFile(wheel).namelist())
    assert "edgellm_validate/data/platforms.json" in names
    context = "edgellm_export/_image_context/"
    for rel in ("Dockerfile", ".dockerignore", "pyproject.toml", "README.md", "containers/Dockerfile.tensorrt",
                "containers/install_validate.sh", "containers/build_edgellm_plugin.sh",
                "containers/requirements-validate.txt"):
        assert context + rel in names, rel
    assert not any(n.startswith(context + "containers/suites/") for n in names)
    assert not any(n.startswith(("tests/", "benchmarks/", "schemas/")) or "__pycache__" in n for n in names)


def test_installed_wheel_runs_outside_the_source_tree(installed, tmp_path):
    venv, _ = installed
    edgellm, py = venv / BIN / "edgellm", venv / BIN / "python"
    assert _run([edgellm, "--version"], cwd=tmp_path).strip() == f"edgellm-export {__version__}"
    assert _run([edgellm, "schema", "platforms"], cwd=tmp_path) == schema_text("platforms")
    code = ("import json, edgellm_export, edgellm_validate\n"
            "from edgellm_validate.targets import DEFAULT_PLATFORMS, load_platforms\n"
            "print(json.dumps({'export': edgellm_export.__file__, 'validate': edgellm_validate.__file__,\n"
            "                  'platforms': str(DEFAULT_PLATFORMS), 'targets': list(load_platforms())}))\n")
    out = json.loads(_run([py, "-c", code], cwd=tmp_path))
    for key in ("export", "validate", "platforms"):  # the installed copy, not the checkout
        assert Path(out[key]).resolve().is_relative_to(venv.resolve()), (key, out[key])
    shipped = json.loads((ROOT / "edgellm_validate" / "data" / "platforms.json").read_text())
    assert out["targets"] == list(shipped["targets"])


def test_installed_wheel_builds_the_same_image_context(installed, tmp_path):
    """`edgellm make` / `container build` from a wheel: the context assembled from package data has the
    same files and contents as the checkout's, so image fingerprints do not depend on how it was installed."""
    pytest.importorskip("yaml")
    from edgellm_export.make.pipeline import image_inputs

    venv, _ = installed
    code = ("import hashlib, json\n"
            "from edgellm_export.make.context import build_root, checkout_root\n"
            "from edgellm_export.make.pipeline import image_inputs\n"
            "assert checkout_root() is None\n"
            "print(json.dumps({'root': str(build_root()), 'files': {k: hashlib.sha256(p.read_bytes()).hexdigest()\n"
            "                  for k, p in image_inputs().items()}}))\n")
    out = json.loads(_run([venv / BIN / "python", "-c", code], cwd=tmp_path))
    assert not Path(out["root"]).resolve().is_relative_to(ROOT)
    here = {k: hashlib.sha256(p.read_bytes()).hexdigest() for k, p in image_inputs().items()}
    assert out["files"] == here

"""Where the validation images' build context comes from, in a source checkout and in an installed wheel.

The images are built from the root `Dockerfile` / `containers/Dockerfile.tensorrt` with a context laid out
like the checkout (what .dockerignore lets through): the Dockerfiles and container scripts, pyproject.toml
and README.md (the image installs the package from them), and the two packages.

- Running from a checkout (editable install, or the tree on sys.path): the checkout itself.
- Installed from a wheel: the wheel carries the files that are not in the packages as package data under
  `edgellm_export/_image_context/` (setup.py's build_py copies them there), and `build_root()` assembles a
  checkout-shaped directory from them and the installed packages, once per process, in a temporary
  directory removed at exit. Image fingerprints (make/pipeline.py) hash relative paths and contents only, so
  both ways give the same fingerprint for the same sources.
"""

from __future__ import annotations

import atexit
import shutil
import tempfile
from pathlib import Path

from edgellm_core.errors import EnvironmentProblem

CONTEXT_PACKAGE_DIR = "_image_context"  # inside edgellm_export, in a wheel
PACKAGES = ("edgellm_core", "edgellm_export", "edgellm_validate")
# Without these a context cannot build anything (the rest is checked by `docker build` itself).
REQUIRED = ("Dockerfile", ".dockerignore", "pyproject.toml", "containers/Dockerfile.tensorrt",
            "containers/install_validate.sh")

_PACKAGE_ROOT = Path(__file__).resolve().parents[1]  # the installed (or checked-out) edgellm_export
_built: Path | None = None


def checkout_root() -> Path | None:
    """The source checkout this code runs from, if it does (the directory holding pyproject.toml, the
    Dockerfile and both packages)."""
    root = _PACKAGE_ROOT.parent
    if all((root / rel).is_file() for rel in REQUIRED) and all((root / p).is_dir() for p in PACKAGES):
        return root
    return None


def bundled_context() -> Path:
    """The packaged copy of the context's non-package files (a wheel install)."""
    return _PACKAGE_ROOT / CONTEXT_PACKAGE_DIR


def build_root() -> Path:
    """A directory laid out like the checkout, to build the validation images from."""
    global _built
    root = checkout_root()
    if root is not None:
        return root
    if _built is not None and _built.is_dir():
        return _built
    bundled = bundled_context()
    missing = [rel for rel in REQUIRED if not (bundled / rel).is_file()]
    if missing:
        raise EnvironmentProblem(f"this installation of edgellm-export has no container build files "
                                 f"({', '.join(missing)} missing from its package data); build the validation images "
                                 "from a source checkout of edgellm-export, or install a wheel built by its setup.py",
                                 bundled)
    import edgellm_core
    import edgellm_validate

    tmp = Path(tempfile.mkdtemp(prefix="edgellm-image-context-"))
    atexit.register(shutil.rmtree, tmp, ignore_errors=True)
    shutil.copytree(bundled, tmp, dirs_exist_ok=True)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", CONTEXT_PACKAGE_DIR)
    shutil.copytree(_PACKAGE_ROOT, tmp / "edgellm_export", ignore=ignore)
    shutil.copytree(Path(edgellm_validate.__file__).resolve().parent, tmp / "edgellm_validate", ignore=ignore)
    shutil.copytree(Path(edgellm_core.__file__).resolve().parent, tmp / "edgellm_core", ignore=ignore)
    _built = tmp
    return tmp

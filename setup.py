"""Packaging hook (the rest of the configuration is in pyproject.toml): a wheel also carries the validation
images' build context, the Dockerfiles, container scripts, pyproject.toml and README.md, as package data
under edgellm_export/_image_context/, so that `edgellm make` / `edgellm container build` work from an
installed wheel too (edgellm_export/make/context.py assembles the context from it and the packages).

All or nothing: from a tree without the root Dockerfile (e.g. the copy inside a validation image, which never
builds images) nothing is bundled, rather than a context that cannot build.
"""

from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
CONTEXT = Path("edgellm_export", "_image_context")
ROOT_FILES = ("Dockerfile", ".dockerignore", "pyproject.toml", "README.md")


def context_files() -> list[str]:
    """The context's files outside the packages (what .dockerignore lets through, less the example suites)."""
    if not (ROOT / "Dockerfile").is_file():
        return []
    files = [name for name in ROOT_FILES if (ROOT / name).is_file()]
    for f in sorted((ROOT / "containers").rglob("*")):
        rel = f.relative_to(ROOT)
        if (f.is_file() and rel.parts[1] != "suites" and "__pycache__" not in rel.parts
                and not any(part.startswith(".") for part in rel.parts)):  # never a CA bundle left there
            files.append(rel.as_posix())
    return files


class BuildPyWithImageContext(build_py):
    def run(self):
        super().run()
        if getattr(self, "editable_mode", False):  # an editable install runs from the checkout itself
            return
        for rel in context_files():
            target = Path(self.build_lib) / CONTEXT / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            self.copy_file(str(ROOT / rel), str(target))


setup(cmdclass={"build_py": BuildPyWithImageContext})

"""A stand-in for edgellm_export.make.containers without docker: same functions and signatures; the
"container" runs the real CPU validation on this host and writes what run_validate writes (the result
file and its log beside it). Calls are recorded; `fail_next` makes the next validations fail like a
device would."""

from __future__ import annotations

import json
from pathlib import Path

from edgellm_core.errors import EnvironmentProblem


class ImageGone(EnvironmentProblem):
    pass


def install(monkeypatch, tmp_path: Path) -> FakeContainers:
    """The fake as edgellm_export.make.containers, for the CLI too; the image stage's inputs pinned to a
    file of the test's own (the real ones are this checkout's sources, which may be edited while tests run)."""
    import edgellm_export.make
    import edgellm_export.make.pipeline as pipeline

    dockerfile = tmp_path / "Dockerfile.test"
    dockerfile.write_text("FROM scratch\n")
    real = pipeline.image_inputs
    monkeypatch.setattr(pipeline, "image_inputs", lambda ca_bundle=None: {
        "Dockerfile": dockerfile, **{k: v for k, v in real(ca_bundle).items() if k == "ca_bundle"}})
    fake = FakeContainers()
    monkeypatch.setattr(edgellm_export.make, "containers", fake, raising=False)
    return fake


class FakeContainers:
    def __init__(self):
        self.calls: list[tuple] = []
        self.builds = 0
        self.removed: set[str] = set()  # image ids "pruned" from the fake docker host
        self.fail_next: list = []  # per validation: an exception to raise, or a function(result) -> result

    def count(self, name: str) -> int:
        return sum(1 for c in self.calls if c[0] == name)

    def build_image(self, target, *, base_image=None, ca_bundle=None, tag=None, client=None, progress=None):
        self.builds += 1
        self.calls.append(("build_image", target, base_image))
        if progress:
            progress("Step 1/1 : FROM " + str(base_image))
        tag = tag or f"edgellm-validate:test-{target}"
        return {"tag": tag, "id": f"sha256:{self.builds:064x}", "labels": {"io.edgellm.target": target},
                "dockerfile": "Dockerfile", "build_args": {"BASE_IMAGE": base_image}, "seconds": 0.1}

    def smoke(self, target, image, *, client=None, timeout=300):
        self.calls.append(("smoke", target, image))
        if image in self.removed:
            raise ImageGone(f"image {image} is not on this docker host; build it first (build_image)")
        return {"image": image, "problems": [], "versions": {"python": "3.11"}}

    def run_validate(self, target, image, export_dir, result_path, *, backend, ca_bundle=None, client=None,
                     timeout=None, extra_args=()):
        from edgellm_validate.validate import validate_export

        self.calls.append(("run_validate", target, image, backend))
        if image in self.removed:
            raise ImageGone(f"image {image} is not on this docker host")
        result_path = Path(result_path)
        result_path.unlink(missing_ok=True)
        action = self.fail_next.pop(0) if self.fail_next else None
        if isinstance(action, BaseException):
            raise action
        result = validate_export(export_dir, backend=backend, result_path=result_path)
        if action is not None:
            result = action(result)
            result_path.write_text(json.dumps(result, indent=2) + "\n")
        result_path.with_suffix(".log").write_text("Validation " + ("PASSED" if result["passed"] else "FAILED") + "\n")
        result["container"] = {"image": image, "target": target, "exit_code": 0 if result["passed"] else 1}
        return result

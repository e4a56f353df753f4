"""`edgellm make`: checkpoint -> export -> image -> validate -> report, each stage redone only when stale.

One pipeline directory DIR per (checkpoint, target):

    DIR/.stamps/               stage stamps (stamps.py): export.json, image-<target>.json, validate.json
    DIR/.export.lock           the export's lock file while an export runs (output_dir.py)
    DIR/export/                the `edgellm export` output (manifest.json + llm/) and nothing else
    DIR/images/<target>.json   the image validation runs in: tag, id, labels, CA bundle, smoke report (container mode)
    DIR/validation/            validation.json, the container's validation.log; engine/ on TensorRT targets
    DIR/report/                qualification.json, junit.xml, summary.md: the only files every run rewrites

Stages, and what each one's fingerprint covers (besides the tool version):
- export: the checkpoint's content and the export options.
- image (container mode, the default): the image's build context (Dockerfiles, containers/ but not its
  suites, packaging, the tool's sources), the CA bundle (--ca-bundle, else the host's: trust.py), the resolved
  base image, the target. Built with containers.build_image, then smoke-tested; a suite (qualify) shares one
  image stage per target.
- validate: the export stage's stamp and outputs, target, backend, and the image's id (container mode) or
  the plugin library (TensorRT on the host). On TensorRT targets the engine is built inside this stage
  by the TensorRT backend, which keeps an engine whose inputs are unchanged (trt/build.py), so a retried
  validation does not rebuild it. Before validating in an image built by an earlier run, the image is
  smoke-tested again and rebuilt if it is gone.
A stage that fails, or a validation whose verdict is not what the case expects, is not stamped: the next
run retries it without redoing the stages before it. The capability gate (targets.check_target_can_run)
runs after the export, before any image build or validation.

Stamps hold digests of just-written outputs as "racy" (see stamps.py): the next check re-reads those files
once and writes the stamp back. So that a second run with nothing changed writes nothing outside
DIR/report/, a run that stamped something settles its stamps before it ends: once the newest output is
older than the racy window it re-checks them, the re-read the next run would otherwise do.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
import traceback
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from edgellm_core.errors import ExportError

from .. import interrupts
from ..checkpoint.hub import CheckpointRef, HubId, resolve_checkpoint
from .stamps import RACY_WINDOW_NS, Fingerprint, StampStore, input_files
from .suite import SuiteCase
from .trust import resolve_ca_bundle

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[2]  # the source checkout: containers/, the packages
EXPORT, VALIDATE = "export", "validate"
EXPORT_DIR, VALIDATION_DIR, IMAGES_DIR, ENGINE_DIR, REPORT_DIR = "export", "validation", "images", "engine", "report"
RESULT_FILE = "validation.json"


def _silent(msg: str, done=None, total=None) -> None:
    pass


@dataclass
class MakeSettings:
    """How cases are run (shared by every case of a suite)."""

    force: bool = False
    container: bool = True  # validate inside the target's image; False: on this host (development)
    base_images: Mapping[str | None, str] = field(default_factory=dict)  # target (None: any) -> base image
    ca_bundle: Path | None = None
    plugin: str | None = None  # host TensorRT mode: the Edge-LLM plugin library (else $EDGELLM_PLUGIN_PATH)
    platforms_path: Path | None = None
    timeout: float | None = None  # for one containerised validation
    containers: object = None  # build_image / smoke / run_validate; default edgellm_export.make.containers
    progress: Callable = _silent
    images: dict = field(default_factory=dict)  # target -> image record, decided once per run

    def containers_api(self):
        if self.containers is None:
            from . import containers  # noqa: PLC0415  (needs the docker SDK; only in container mode)

            self.containers = containers
        return self.containers

    def base_image(self, target: str) -> str | None:
        return self.base_images.get(target) or self.base_images.get(None)


@dataclass
class CaseRun:
    case: dict  # the report's case object
    exit_code: int
    stamped: list = field(default_factory=list)  # (store, stage, fingerprint) stamped by this run
    image: dict | None = None


def exit_code(verdict: str, error_codes: list[int] = ()) -> int:
    """0 pass, 1 fail; for an error verdict the errors' own code (2 bad input, 3 environment; 1 unknown)."""
    if verdict == "pass":
        return 0
    if verdict == "fail":
        return 1
    return max(error_codes, default=1)


# ---------------------------------------------------------------- one case


def make_case(case: SuiteCase, out: Path, settings: MakeSettings, *, image_root: Path | None = None,
              source: CheckpointRef | None = None) -> CaseRun:
    """Run one case's stages in `out` (a pipeline directory); never raises for a case's own failure: the
    case object says what happened (errors included) and `exit_code` what the CLI should return.
    `source`: the case's checkpoint already resolved (a hub id: make and qualify resolve them before any
    work); else it is resolved here."""
    from edgellm_validate.report import case_error, case_from_validation

    out = Path(out).absolute()
    run = CaseRun(case={}, exit_code=0)
    ident = dict(target=case.target, backend=case.backend, release=case.release, checkpoint=str(case.checkpoint),
                 precision=case.precision, expect=case.expect)
    stage, t0 = "checkpoint", time.perf_counter()

    def error(message: str, code: int) -> CaseRun:
        run.case = case_error(case.name, message, stage=stage, seconds=time.perf_counter() - t0, **ident)
        run.exit_code = 0 if run.case["verdict"] == "pass" else code  # expect: error
        return run

    try:
        source = source or resolve_checkpoint(case.checkpoint, progress=settings.progress)
        ident["checkpoint_hub"] = source.record()  # repository, revision and commit of a hub checkpoint
        stage = EXPORT
        target = resolve_target(case.target, settings)
        ident["backend"] = target.backend
        _check_export_form(case, target)
        export_dir = _export_stage(case, source, out, settings, run)
        stage = "gate"
        from edgellm_validate.targets import check_target_can_run

        check_target_can_run(target, export_dir, platforms_path=settings.platforms_path)
        if settings.container:
            stage = "image"
            run.image = _image_stage(target, settings, Path(image_root or out), run)
        stage = VALIDATE
        validation, fp = _validate_stage(case, target, out, export_dir, settings, run)
    except ExportError as e:
        return error(e.paragraph(), e.exit_code)
    except OSError as e:
        return error((f"{e.filename}: " if e.filename else "") + str(e.strerror or e), 3)
    except Exception as e:  # a bug: keep the suite going, keep the traceback visible
        log.error("case %s, stage %s: internal error\n%s", case.name, stage, traceback.format_exc())
        return error(f"internal error: {type(e).__name__}: {e}", 1)
    run.case = case_from_validation(case.name, validation, target=case.target, release=case.release,
                                    export_dir=export_dir, checkpoint=case.checkpoint, expect=case.expect,
                                    thresholds=case.thresholds or None, precision=case.precision,
                                    checkpoint_hub=ident["checkpoint_hub"])
    run.exit_code = exit_code(run.case["verdict"])
    if fp is not None and run.case["verdict"] == "pass":  # freshly validated and as expected: stamp it
        store = StampStore(out)
        result = out / VALIDATION_DIR / RESULT_FILE
        logged = result.with_suffix(".log")  # the container's log (containers.run_validate)
        store.record(VALIDATE, fp, [result, *([logged] if logged.is_file() else [])])
        run.stamped.append((store, VALIDATE, fp))
    return run


def _check_export_form(case: SuiteCase, target) -> None:
    """Refuse, before anything is exported, a plugin export for a target without the plugin library (the gate
    after the export would refuse it too, but only after the export's minutes)."""
    from edgellm_validate.targets import TargetRefusal, export_form_problems

    problems = export_form_problems(target, case.export_options().get("attention") == "native")
    if problems:
        raise TargetRefusal(f"case {case.name}: " + "; ".join(problems))


def resolve_target(name: str, settings: MakeSettings):
    from edgellm_validate.targets import get_target

    return get_target(name, platforms_path=settings.platforms_path, base_image=settings.base_image(name))


def _stage(store: StampStore, stage: str, fp: Fingerprint, settings: MakeSettings, what: str = "") -> bool:
    """True when the stage must run (and its old stamp is gone), with a progress line either way."""
    interrupts.check()
    why = store.why_stale(stage, fp, force=settings.force)
    label = f"{stage}{f' ({what})' if what else ''}"
    if why is None:
        settings.progress(f"{label}: up to date")
        return False
    settings.progress(f"{label}: running: {why}")
    store.invalidate(stage)
    return True


def _export_stage(case: SuiteCase, source: CheckpointRef, out: Path, settings: MakeSettings, run: CaseRun) -> Path:
    from ..export import ExportOptions  # noqa: PLC0415  (torch is needed here only)

    opts = ExportOptions(**case.export_options())
    store = StampStore(out)
    options = dataclasses.asdict(opts)
    if source.identity() is not None:  # a hub snapshot: a new commit re-exports (manifest.json records it)
        options["hub_checkpoint"] = source.identity()
    fp = store.fingerprint(EXPORT, inputs={"checkpoint": source.path}, options=options)
    export_dir = out / EXPORT_DIR
    if _stage(store, EXPORT, fp, settings, case.name):
        from ..export import export_checkpoint  # noqa: PLC0415

        export_checkpoint(source, export_dir, opts, settings.progress)
        files = json.loads((export_dir / "manifest.json").read_text())["files"]
        known = {f"{EXPORT_DIR}/{rel}": m["sha256"] for rel, m in files.items()}
        store.record(EXPORT, fp, [EXPORT_DIR], known_digests=known)
        run.stamped.append((store, EXPORT, fp))
    return export_dir


def image_inputs(ca_bundle: Path | None = None) -> dict[str, Path]:
    """What an image is built from (the build context of Dockerfile and containers/Dockerfile.tensorrt, as
    .dockerignore selects it): the Dockerfiles and containers/ (not suites/), packaging, the tool's
    sources; and the CA bundle. README.md is left out: it changes nothing the image does. From the checkout,
    or from an installed wheel's copy of them (context.build_root)."""
    from .context import build_root

    root = build_root()
    files = {}
    for name in ("Dockerfile", ".dockerignore", "pyproject.toml"):
        if (root / name).is_file():
            files[name] = root / name
    for top in ("containers", "edgellm_export", "edgellm_validate"):
        files |= {f"{top}/{rel}": f for rel, f in input_files(root / top).items()
                  if not rel.startswith("suites/") and "__pycache__" not in rel and not rel.endswith(".pyc")}
    if ca_bundle is not None:
        files["ca_bundle"] = Path(ca_bundle)
    return files


def _image_stage(target, settings: MakeSettings, root: Path, run: CaseRun) -> dict:
    """The target's image record, built (and smoke-tested) when stale; decided once per target per run."""
    if target.name in settings.images:
        return settings.images[target.name]
    base = target.image()  # an explicit --base-image, else the matrix's; refuses drive-thor without one
    ca = resolve_ca_bundle(settings.ca_bundle)  # --ca-bundle, else the host's trust variables (trust.py)
    stage = f"image-{target.name}"
    store = StampStore(root)
    fp = store.fingerprint(stage, inputs=image_inputs(ca), options={"target": target.name, "base_image": base})
    path = root / IMAGES_DIR / f"{target.name}.json"
    built = _stage(store, stage, fp, settings)
    if built:
        api = settings.containers_api()
        image = api.build_image(target.name, base_image=base, ca_bundle=ca, progress=settings.progress)
        smoke = api.smoke(target.name, _ref(image))
        record = {"target": target.name, "base_image": base, "tag": image.get("tag"), "id": image.get("id"),
                  "labels": image.get("labels") or {}, "ca_bundle": ca.record() if ca else None, "smoke": smoke}
        from edgellm_validate.report import atomic_write_text

        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(record, indent=1, sort_keys=True, default=str) + "\n")
        store.record(stage, fp, [path])
        run.stamped.append((store, stage, fp))
    record = json.loads(path.read_text())
    record.update(stage=stage, store=str(root), smoked=built)  # bookkeeping for this run, not stored
    settings.images[target.name] = record
    return record


def _ref(image: dict) -> str:
    """How containers are started from an image: its id (exactly what was smoke-tested), else its tag."""
    return image.get("id") or image["tag"]


def _image_still_works(target, settings: MakeSettings, run: CaseRun) -> bool:
    """Before validating in an image built by an earlier run: smoke it again, once per run (it may have been
    pruned since); if that fails, rebuild it. Returns True when the image was rebuilt."""
    if run.image["smoked"]:
        return False
    try:
        settings.containers_api().smoke(target.name, _ref(run.image))
        run.image["smoked"] = True  # the record is shared by the suite's other cases on this target
        return False
    except Exception as e:  # noqa: BLE001  (whatever docker says: rebuilding answers it, or fails clearly)
        settings.progress(f"image {run.image.get('tag')} no longer works ({e}); rebuilding it")
    root = Path(run.image["store"])
    StampStore(root).invalidate(run.image["stage"])
    del settings.images[target.name]
    run.image = _image_stage(target, settings, root, run)
    return True


def _validate_fingerprint(store: StampStore, target, settings: MakeSettings, run: CaseRun) -> Fingerprint:
    """Over the export's stamp, the image's id (a rebuild that docker answers from its cache changes nothing),
    or on the host the plugin library."""
    options = {"target": target.name, "backend": target.backend, "image": None}
    inputs = {}
    if run.image is not None:
        options["image"] = _ref(run.image)
    elif target.backend == "trt":
        from edgellm_validate.trt.plugin import resolve_plugin_path

        inputs["plugin"] = resolve_plugin_path(settings.plugin)[0]
    return store.fingerprint(VALIDATE, inputs=inputs, options=options, upstream=store.upstream(EXPORT))


def _validate_stage(case: SuiteCase, target, out: Path, export_dir: Path, settings: MakeSettings,
                    run: CaseRun) -> tuple[dict, Fingerprint | None]:
    """(validation result, fingerprint to stamp on success; None when the stage was up to date)."""
    store = StampStore(out)
    fp = _validate_fingerprint(store, target, settings, run)
    result = out / VALIDATION_DIR / RESULT_FILE
    if not _stage(store, VALIDATE, fp, settings, case.name):
        return json.loads(result.read_text()), None
    result.parent.mkdir(parents=True, exist_ok=True)
    if run.image is not None:
        if _image_still_works(target, settings, run):
            fp = _validate_fingerprint(store, target, settings, run)
        validation = settings.containers_api().run_validate(
            target.name, _ref(run.image), export_dir, result, backend=target.backend,
            ca_bundle=resolve_ca_bundle(settings.ca_bundle), timeout=settings.timeout)
    else:
        from edgellm_validate.validate import validate_export

        options = None
        if target.backend == "trt":
            options = {"target": target.name, "engine_dir": result.parent / ENGINE_DIR,
                       "plugin_path": settings.plugin, "platforms_path": settings.platforms_path}
        validation = validate_export(export_dir, backend=target.backend, result_path=result,
                                     backend_options=options)
    return validation, fp


def settle(stamped: list) -> None:
    """Re-check what this run stamped once its outputs are older than the racy window (at most that long a
    wait), so the stamps hold trusted digests and the next run has nothing to re-read or write back."""
    if not stamped:
        return
    newest = 0
    for store, stage, _ in stamped:
        files = ((store.load(stage) or {}).get("outputs") or {}).get("files") or {}
        newest = max([newest, *(max(e["mtime_ns"], e["ctime_ns"]) for e in files.values())])
    wait_ns = newest + RACY_WINDOW_NS - time.time_ns()
    if wait_ns > 0:
        time.sleep(min(wait_ns, RACY_WINDOW_NS) / 1e9 + 0.01)
    for store, stage, fp in stamped:
        why = store.why_stale(stage, fp)
        if why is not None:
            log.warning("%s: stage %s is stale again right after it ran (%s)", store.root, stage, why)


# ---------------------------------------------------------------- reports


def load_previous(report_dir: Path, explicit: Path | None = None) -> dict | None:
    """The qualification to compare with: `explicit` (must be valid), else report_dir's own if readable."""
    from edgellm_validate.report import REPORT_FILE, ReportError, load_qualification

    if explicit is not None:
        return load_qualification(explicit)
    path = Path(report_dir) / REPORT_FILE
    if not path.is_file():
        return None
    try:
        return load_qualification(path)
    except ReportError as e:
        log.warning("%s; it is not compared with", e.paragraph())
        return None


def environment(settings: MakeSettings | None, images: Mapping | None = None, *, device: str | None = None) -> dict:
    from edgellm_validate.report import collect_environment

    extra = {}
    if settings is not None:
        extra["validated_in"] = "target container" if settings.container else "this host"
    for name, rec in sorted((images or {}).items()):
        extra[f"image {name}"] = f"{rec.get('tag')} ({rec.get('id')}, base {rec.get('base_image')})"
    return collect_environment(device=device, extra=extra)


@dataclass
class Outcome:
    report: dict
    written: object  # report.write.WrittenReports
    exit_code: int
    cases: list[CaseRun] = field(default_factory=list)

    @property
    def regressed(self) -> bool:
        return self.written.regressed


def finish(report_dir: Path, q: dict, codes: list[int], *, previous: dict | None, fail_on_regression: bool,
           cases: list[CaseRun] = ()) -> Outcome:
    from edgellm_validate.report import write_reports

    written = write_reports(report_dir, q, previous=previous)
    code = exit_code(q["verdict"], codes)
    if code == 0 and fail_on_regression and written.regressed:
        code = 1
    return Outcome(q, written, code, list(cases))


def make(case: SuiteCase, out: Path, settings: MakeSettings, *, previous: Path | None = None,
         fail_on_regression: bool = False) -> Outcome:
    """The whole pipeline for one case in DIR=`out`, reports in DIR/report/."""
    from edgellm_validate.report import new_report

    out = Path(out).absolute()
    _check_pipeline_dir(out, case.checkpoint)
    target = resolve_target(case.target, settings)  # an unknown target, or one without a base image: before any work
    _check_export_form(case, target)  # a plugin export for a plugin-free target: before any work too
    if settings.container:
        target.image()
        resolve_ca_bundle(settings.ca_bundle)  # a CA variable naming a missing file: before any work too
    prev = load_previous(out / REPORT_DIR, previous)  # before any work: a bad --previous fails at once
    # A hub id: from the cache, else the hub; one that cannot be had is exit 2 with nothing written.
    source = resolve_checkpoint(case.checkpoint, progress=settings.progress)
    _check_pipeline_dir(out, source.path)
    run = make_case(case, out, settings, source=source)
    settle(run.stamped)
    q = new_report([run.case], environment=environment(settings, settings.images, device=case.target))
    return finish(out / REPORT_DIR, q, [run.exit_code], previous=prev, fail_on_regression=fail_on_regression,
                  cases=[run])


def _check_pipeline_dir(out: Path, checkpoint: Path | HubId) -> None:
    ck = Path(checkpoint).absolute() if not isinstance(checkpoint, HubId) else None  # a hub id: once resolved
    if ck is not None and (out == ck or out in ck.parents or ck in out.parents):
        raise ExportError("the pipeline directory and the checkpoint must not contain one another", out)
    if (out / "manifest.json").is_file() or (out / "llm").is_dir():
        raise ExportError("is an export directory; `edgellm make` needs a directory of its own (it keeps the "
                          f"export in {EXPORT_DIR}/ inside it)", out)


# ---------------------------------------------------------------- `edgellm validate --report`


def validate_and_report(out: Path, *, backend: str | None = None, target: str | None = None,
                     engine_dir: Path | None = None, plugin: str | None = None, result: Path | None = None,
                     report_dir: Path | None = None, previous: Path | None = None,
                     fail_on_regression: bool = False, platforms_path: Path | None = None,
                     verify: bool = True) -> tuple[dict, Outcome | None]:
    """`edgellm validate`: gate on the target first, validate, optionally write a one-case report.
    Returns (validation result, report outcome or None). Stays importable without torch."""
    from edgellm_validate.report import case_error, case_from_validation, new_report
    from edgellm_validate.targets import check_target_can_run, get_target
    from edgellm_validate.validate import validate_export

    tgt = get_target(target, platforms_path=platforms_path) if target else None
    backend = backend or (tgt.backend if tgt else "cpu")
    if tgt is not None and tgt.backend == "cpu" and backend == "trt":
        raise ExportError(f"target {tgt.name} has no TensorRT ({tgt.description}); use --backend cpu")
    if backend != "trt" and (engine_dir or plugin):
        raise ExportError("--engine-dir and --plugin apply to --backend trt only")
    prev = load_previous(report_dir, previous) if report_dir is not None else None
    name = Path(out).absolute().name
    ident = dict(target=target, release=None, checkpoint=None)
    options = None
    if backend == "trt":
        options = {"target": target, "engine_dir": engine_dir, "plugin_path": plugin, "platforms_path": platforms_path}
    try:
        if tgt is not None:
            check_target_can_run(tgt, out, platforms_path=platforms_path)
        res = validate_export(out, backend=backend, result_path=result, backend_options=options, verify=verify)
    except ExportError as e:
        if report_dir is not None:
            q = new_report([case_error(name, e.paragraph(), stage="validate", backend=backend, **ident)],
                           environment=environment(None, device=target))
            finish(report_dir, q, [e.exit_code], previous=prev, fail_on_regression=False)
        raise
    if report_dir is None:
        return res, None
    case = case_from_validation(name, res, export_dir=out, **ident)
    q = new_report([case], environment=environment(None, device=target))
    return res, finish(report_dir, q, [1], previous=prev, fail_on_regression=fail_on_regression)

"""`python -m edgellm_validate OUT`: validate an export directory, the command run inside validation containers.

A stable, torch-free entry point with the options a container run needs (backend, target, plugin library,
engine directory), independent of the `edgellm` CLI's evolution. It calls the same `validate_export` as
`edgellm validate` and uses the same exit codes: 0 passed, 1 validation failed (the result file is
written either way), 2 bad input, 3 environment problem (missing backend, plugin or GPU).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from edgellm_core.errors import ExportError

EXIT_OK, EXIT_FAILED = 0, 1


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m edgellm_validate",
                                description="Check an export directory against its golden bundle.")
    p.add_argument("out", type=Path, help="export directory (the OUT given to `edgellm export`)")
    p.add_argument("--backend", default="cpu", choices=["cpu", "trt"],
                   help="cpu: onnxruntime with lowered custom ops; trt: TensorRT + the Edge-LLM plugin")
    p.add_argument("--result", type=Path, help="where to write the JSON result (default OUT/validation.json)")
    p.add_argument("--target", help="platform-matrix target: the export is checked against it first")
    p.add_argument("--plugin", help="trt: the plugin library (default: $EDGELLM_PLUGIN_PATH)")
    p.add_argument("--engine-dir", type=Path, help="trt: where engines are built and reused")
    p.add_argument("--rebuild", action="store_true", help="trt: build the engine even when one is up to date")
    p.add_argument("--no-verify", dest="verify", action="store_false",
                   help="skip checking the export's files against its manifest.json")
    p.add_argument("-q", "--quiet", action="store_true", help="print only failures")
    return p


def run(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from .validate import validate_export

    options = None
    if args.backend == "trt":
        options = {"target": args.target, "plugin_path": args.plugin, "rebuild": args.rebuild}
        if args.engine_dir is not None:
            options["engine_dir"] = args.engine_dir
    elif args.target:
        from .targets import check_target_can_run

        check_target_can_run(args.target, args.out)
    res = validate_export(args.out, backend=args.backend, result_path=args.result, backend_options=options,
                          verify=args.verify)
    if not (args.quiet and res["passed"]):
        summary = {k: res[k] for k in ("passed", "backend", "worst_cosine", "top1_agreement", "max_abs", "seconds")
                   if k in res}
        print("Validation " + ("PASSED" if res["passed"] else "FAILED") + " " + json.dumps(summary))
        for f in res["failures"]:
            print(f"  - {f}")
        for note in res.get("runtime_limits", []):
            print(f"  known runtime limit (not a failure): {note}")
        print(f"Result written to {res['result_file']}")
    return EXIT_OK if res["passed"] else EXIT_FAILED


def main(argv: list[str] | None = None) -> int:
    try:
        return run(argv)
    except ExportError as e:  # EnvironmentProblem (exit 3) is one
        print(f"edgellm_validate: error: {e.paragraph()}", file=sys.stderr)
        return e.exit_code
    except OSError as e:
        where = f"{e.filename}: " if e.filename else ""
        print(f"edgellm_validate: error: {where}{e.strerror or e}", file=sys.stderr)
        return 3
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())

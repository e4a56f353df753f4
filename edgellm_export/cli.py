"""`edgellm`: export, validate, make, qualify, container, demo, run and merge-lora commands."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

from edgellm_core.errors import ExportError

from . import __version__, interrupts

log = logging.getLogger("edgellm")
EXIT_OK, EXIT_VALIDATION_FAILED, EXIT_BAD_INPUT, EXIT_ENVIRONMENT = 0, 1, 2, 3
EXIT_CODES = """exit codes:
  0  success (make, qualify: every case came out as expected)
  1  validation ran and failed (logits outside the thresholds); with --fail-on-regression, a regression
  2  bad input or usage: the checkpoint, the export directory, a suite, a target or an option is wrong
  3  environment problem: disk full, read-only or locked output, missing backend, plugin, GPU or docker
  130 / 143  interrupted (SIGINT / SIGTERM); no output was changed (qualify still writes its report)"""


class Progress:
    """Progress lines on stderr for long steps, throttled; silent with --quiet."""

    def __init__(self, quiet: bool):
        self.quiet = quiet
        self._last = 0.0

    def __call__(self, msg: str, done: int | None = None, total: int | None = None) -> None:
        if self.quiet:
            return
        now = time.monotonic()
        if done is not None and total:
            if done < total and now - self._last < 0.5:
                return
            msg = f"{msg}: {done / 2**20:,.1f} / {total / 2**20:,.1f} MiB ({100 * done / total:.0f}%)"
        self._last = now
        print(f"[edgellm] {msg}", file=sys.stderr, flush=True)


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1024
    return str(n)


def _print_summary(result, quiet: bool) -> None:
    if quiet:
        return
    print(f"Exported to {result.out_dir} in {result.seconds:.1f} s (CPU {result.cpu_seconds:.1f} s):")
    for name, size in result.files.items():
        print(f"  {name:<40} {_size(size):>12}")
    print(f"  {'total':<40} {_size(sum(result.files.values())):>12}")


def _print_validation(res: dict, quiet: bool) -> None:
    if quiet and res["passed"]:
        return
    status = "PASSED" if res["passed"] else "FAILED"
    if "worst_cosine" in res:
        print(f"Validation {status} ({res['backend']}, {len(res['steps'])} steps, {res['seconds']:.1f} s): "
              f"worst cosine {res['worst_cosine']:.6f}, top-1 agreement {res['top1_agreement']:.3f}, "
              f"max |diff| {res['max_abs']:.4g}")
    else:
        print(f"Validation {status}")
    for name, comp in res.get("components", {}).items():
        for out, r in comp.get("outputs", {}).items():
            if "worst_cosine" in r:
                print(f"  {name}: {out} {r['tokens']} tokens, worst cosine {r['worst_cosine']:.6f}, "
                      f"max |diff| {r['max_abs_diff']:.4g}")
    for f in res["failures"]:
        print(f"  - {f}")
    print(f"Result written to {res['result_file']}")


def _export_args(p: argparse.ArgumentParser, *, release_flag: str = "--target", golden: bool = True,
                 attention: bool = True) -> None:
    p.add_argument(release_flag, dest="release", default="0.7",
                   help="Edge-LLM release to target (default: 0.7, i.e. 0.7.x)")
    p.add_argument("--fp8-embedding", "--fp8_embedding", action="store_true",
                   help="write embedding.safetensors as FP8 E4M3 with per-row scales over blocks of 128")
    p.add_argument("--clamp-fp16", action="store_true",
                   help="clamp bf16/fp32 weights beyond fp16's range (with a warning) instead of refusing")
    p.add_argument("--convert-pickle", action="store_true",
                   help="accept pickled .bin/.pt weights, loaded only with torch's weights-only unpickler")
    if golden:
        p.add_argument("--no-golden", action="store_true",
                       help="skip the golden bundle (validation will then be impossible)")
    if attention:
        p.add_argument("--attention", choices=["plugin", "native"], default="plugin",
                       help="plugin (default): Edge-LLM's AttentionPlugin; native: the plugin-free trt_native_ops "
                            "form (standard ONNX RotaryEmbedding / TensorScatter / Attention, K/V caches of static "
                            "capacity 4096; TensorRT >= 10.15 builds it without the plugin library; dense models, "
                            "FP16 / FP8 / INT8 SQ / NVFP4 / MXFP8 linears, no FP8 KV cache)")
    p.add_argument("--components", type=_components, metavar="LIST",
                   help="comma-separated components to export (llm, visual, audio); default: every component the "
                        "checkpoint has, and a multimodal checkpoint's encoder this version cannot export is an "
                        "error rather than dropped (`--components llm` exports the language model alone)")
    p.add_argument("--unsafe-rope-passthrough", action="store_true", help=argparse.SUPPRESS)


def _components(text: str) -> tuple[str, ...]:
    parts = tuple(x.strip() for x in text.split(",") if x.strip())
    if not parts:
        raise argparse.ArgumentTypeError("name at least one component (llm, visual, audio)")
    return parts


def _checkpoint_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", help="checkpoint directory (an HF cache snapshot works too), or a hub id such as "
                                      "Qwen/Qwen3-0.6B, looked up in the HF cache first (HF_HOME, HF_HUB_CACHE) and "
                                      "fetched only when absent and HF_HUB_OFFLINE is unset; an existing local "
                                      "path always wins")
    p.add_argument("--revision", metavar="REV", help="hub id only: branch, tag or full commit hash (default main)")


def _report_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--previous", type=Path, metavar="PREV.json",
                   help="qualification.json to compare with (default: the one the report directory holds)")
    p.add_argument("--fail-on-regression", action="store_true",
                   help="exit 1 when the comparison finds a regression, even if every case passed")


def _pipeline_args(p: argparse.ArgumentParser, *, per_target: bool) -> None:
    p.add_argument("--force", action="store_true", help="redo every stage, up to date or not")
    p.add_argument("--no-container", "--on-host", dest="container", action="store_false",
                   help="validate on this host instead of in the target's container (development)")
    p.add_argument("--base-image", action="append", default=[],
                   metavar="[TARGET=]IMAGE" if per_target else "IMAGE",
                   help="base image of the validation image (required for drive-thor)"
                        + ("; TARGET= limits it to one target; repeatable" if per_target else ""))
    p.add_argument("--ca-bundle", type=Path, metavar="FILE",
                   help="PEM CA bundle for image builds behind a TLS-intercepting proxy (default: the first set of "
                        "$EDGELLM_CA_BUNDLE, $PIP_CERT, $SSL_CERT_FILE, $REQUESTS_CA_BUNDLE)")
    p.add_argument("--plugin", metavar="PATH", help="--no-container on TensorRT: the Edge-LLM plugin library "
                                                    "(default $EDGELLM_PLUGIN_PATH)")
    p.add_argument("--timeout", type=float, metavar="SECONDS", help="limit for one containerised validation")
    _report_args(p)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="edgellm",
        description="Export HuggingFace checkpoints to TensorRT Edge-LLM ONNX + sidecars, and validate them.",
        epilog=EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--version", action="version", version=f"edgellm-export {__version__}")
    verbosity = p.add_mutually_exclusive_group()
    verbosity.add_argument("-q", "--quiet", action="store_true", help="print only errors and failures")
    verbosity.add_argument("-v", "--verbose", action="store_true", help="print debug logging")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    e = sub.add_parser("export", help="export a checkpoint directory to OUT/llm/",
                       description="Export a HuggingFace checkpoint directory (config.json + safetensors) "
                                   "to OUT/llm/: model.onnx, model.onnx.data, config.json, "
                                   "embedding.safetensors, tokenizer files, processed_chat_template.json "
                                   "and a golden bundle for `edgellm validate`.")
    _checkpoint_args(e)
    e.add_argument("out", type=Path, help="output directory (replaced atomically)")
    _export_args(e)

    v = sub.add_parser("validate", help="check an export against its golden bundle",
                       description="Run the exported graph through the runtime twin and compare its logits "
                                   "with the golden bundle stored at export time. Exit code 1 on failure.")
    v.add_argument("out", type=Path, help="export directory (the OUT given to `edgellm export`)")
    v.add_argument("--backend", choices=["cpu", "trt"],
                   help="cpu: onnxruntime with lowered custom ops; trt: TensorRT with the Edge-LLM plugin "
                        "(default: the target's backend, else cpu)")
    v.add_argument("--result", type=Path, help="where to write the JSON result (default OUT/validation.json)")
    v.add_argument("--target", help="platform-matrix target (edgellm_validate/data/platforms.json); an export it "
                                    "cannot run is refused before any work")
    v.add_argument("--engine-dir", type=Path, help="trt: where the engine is built and reused (default OUT.engine/)")
    v.add_argument("--plugin", metavar="PATH", help="trt: the Edge-LLM plugin library (default $EDGELLM_PLUGIN_PATH)")
    v.add_argument("--report", type=Path, metavar="DIR", help="also write qualification.json, junit.xml and "
                                                              "summary.md into DIR")
    v.add_argument("--no-verify", dest="verify", action="store_false",
                   help="skip checking OUT's files against manifest.json (by default only files whose size, "
                        "times or inode changed since they last matched are hashed again)")
    _report_args(v)

    m = sub.add_parser("make", help="export, validate and report, redoing only what is stale",
                       description="Export CHECKPOINT, validate it for TARGET (in the target's container unless "
                                   "--no-container) and write DIR/report/. Each stage is skipped while its "
                                   "inputs are unchanged.")
    _checkpoint_args(m)
    m.add_argument("--target", required=True, help="platform-matrix target, e.g. x86-cpu or orin-jp6")
    m.add_argument("--out", required=True, type=Path, metavar="DIR", help="pipeline directory")
    m.add_argument("--name", help="case name in the report (default: CHECKPOINT's name @ TARGET)")
    _export_args(m, release_flag="--release", golden=False)
    _pipeline_args(m, per_target=False)

    q = sub.add_parser("qualify", help="run a SUITE.yaml's cases through make; one aggregated report",
                       description="Run every case of SUITE.yaml through the make pipeline in WORK/cases/ and "
                                   "write one report in WORK/report/.")
    q.add_argument("suite", type=Path, help="suite file (see edgellm_export/make/suite.py for the format)")
    q.add_argument("--out", type=Path, metavar="WORK", help="work directory (default ./qualify-SUITE)")
    q.add_argument("--target", action="append", default=[], dest="targets",
                   help="run only the cases for this target (repeatable)")
    _pipeline_args(q, per_target=True)

    c = sub.add_parser("container", help="validation images").add_subparsers(dest="action", required=True)
    cb = c.add_parser("build", help="build and smoke-test a target's validation image",
                      description="Build TARGET's validation image with docker and smoke-test it.")
    cb.add_argument("target", help="platform-matrix target")
    cb.add_argument("--base-image", metavar="IMAGE", help="base image (required for drive-thor)")
    cb.add_argument("--ca-bundle", type=Path, metavar="FILE", help="PEM CA bundle for builds behind a TLS proxy "
                    "(default: the first set of $EDGELLM_CA_BUNDLE, $PIP_CERT, $SSL_CERT_FILE, $REQUESTS_CA_BUNDLE)")
    cb.add_argument("--tag", help="image tag (default edgellm-validate:VERSION-TARGET)")

    s = sub.add_parser("schema", help="print the JSON Schema of a suite, report or platform matrix",
                       description="Print the JSON Schema (Draft 2020-12) of SUITE.yaml (suite), qualification.json "
                                   "(report) or the platform matrix (platforms) to stdout; copies are in schemas/.")
    s.add_argument("name", choices=["suite", "report", "platforms"], help="which file format")

    d = sub.add_parser("demo", help="export + validate the built-in demo checkpoint",
                       description="Generate a small deterministic Llama checkpoint (with tokenizer and chat "
                                   "template), export it and validate the export on the CPU.")
    d.add_argument("out", type=Path, nargs="?", default=Path("edgellm-demo"),
                   help="output directory (default: ./edgellm-demo)")
    _export_args(d)

    lm = sub.add_parser("merge-lora", help="merge LoRA adapters into a checkpoint (a new checkpoint directory)",
                        description="Write OUT, a new HuggingFace checkpoint directory: CHECKPOINT with LoRA deltas "
                                    "merged into its weights (W + scale * B @ A, in fp32, cast back to W's dtype), as "
                                    "PEFT's merge_and_unload would, streamed tensor by tensor. Untouched tensors and "
                                    "the other files (tokenizer, chat template, processor configs) are copied as "
                                    "they are. Sources: a PEFT adapter (--adapter), and adapters the checkpoint "
                                    "carries itself, as Phi-4-multimodal does (--builtin / --drop-builtin); merge "
                                    "these before `edgellm export`, which does not apply LoRA deltas.")
    lm.add_argument("checkpoint", type=Path, help="checkpoint directory (config.json + safetensors)")
    lm.add_argument("out", type=Path, help="output directory: new or empty; written atomically")
    lm.add_argument("--adapter", type=Path, metavar="DIR",
                    help="PEFT LoRA adapter directory (adapter_config.json + adapter_model.safetensors)")
    lm.add_argument("--builtin", metavar="NAME",
                    help="merge the checkpoint's builtin adapter NAME (e.g. vision for Phi-4-multimodal's "
                         "vision_lora); its other builtin adapters are dropped")
    lm.add_argument("--drop-builtin", action="store_true",
                    help="drop the checkpoint's builtin adapters (all but --builtin's) and keep the base weights")

    r = sub.add_parser("run", help="generate text from an export on the CPU twin",
                       description="Generate text from an export on the CPU runtime twin, streamed as it is decoded: "
                                   "the export's tokenizer (and, with --chat, its processed chat template), prefill, "
                                   "then decode with the cache fed back in place, until an end-of-sequence token, "
                                   "--max-new-tokens or a full KV cache. A last line gives prompt and decode "
                                   "tokens/s. Greedy by default.")
    r.add_argument("out", type=Path, help="export directory (the OUT given to `edgellm export`)")
    r.add_argument("--prompt", required=True, help="the prompt text")
    r.add_argument("--max-new-tokens", type=int, default=128, metavar="N", help="stop after N tokens (default 128)")
    r.add_argument("--chat", action="store_true",
                   help="format the prompt as a user message with OUT/llm/processed_chat_template.json, as the "
                        "runtime does (default system prompt included)")
    r.add_argument("--system", metavar="TEXT", help="--chat: a system message (replaces the default system prompt)")
    r.add_argument("--temperature", type=float, default=0.0, metavar="T",
                   help="0 (default): greedy; above 0: sample with temperature T and top-p")
    r.add_argument("--top-p", type=float, default=1.0, metavar="P", help="nucleus sampling mass (default 1.0)")
    r.add_argument("--seed", type=int, metavar="S", help="sampling seed: the same seed gives the same text "
                                                        "(default: random, printed at the end)")
    r.add_argument("--kv-capacity", type=int, metavar="N",
                   help="KV cache capacity in tokens (default: min(4096, max_position_embeddings))")
    return p


def _options(args):
    from .export import ExportOptions

    return ExportOptions(target=args.release, fp8_embedding=args.fp8_embedding, golden=not args.no_golden,
                         clamp_fp16=args.clamp_fp16, convert_pickle=args.convert_pickle,
                         unsafe_rope_passthrough=args.unsafe_rope_passthrough, attention=args.attention,
                         components=args.components)


def run(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    level = logging.DEBUG if args.verbose else logging.ERROR if args.quiet else logging.WARNING
    logging.basicConfig(level=level, format="[edgellm] %(levelname)s: %(message)s", stream=sys.stderr)
    progress = Progress(args.quiet)
    if args.command == "export":
        from .checkpoint.hub import parse_checkpoint, resolve_checkpoint

        # a hub id: from the cache, else the hub (before torch is imported: a missing id fails at once)
        source = resolve_checkpoint(parse_checkpoint(args.checkpoint, args.revision), progress=progress)
        from .export import export_checkpoint

        _print_summary(export_checkpoint(source, args.out, _options(args), progress), args.quiet)
        return EXIT_OK
    if args.command == "validate":
        from .make.pipeline import validate_and_report

        if not args.report and (args.previous or args.fail_on_regression):
            raise ExportError("--previous and --fail-on-regression need --report DIR")
        res, outcome = validate_and_report(args.out, backend=args.backend, target=args.target,
                                           engine_dir=args.engine_dir, plugin=args.plugin, result=args.result,
                                           report_dir=args.report, previous=args.previous,
                                           fail_on_regression=args.fail_on_regression, verify=args.verify)
        _print_validation(res, args.quiet)
        if outcome is None:
            return EXIT_OK if res["passed"] else EXIT_VALIDATION_FAILED
        _print_outcome(outcome, True)
        return outcome.exit_code
    if args.command in ("make", "qualify"):
        return _make_or_qualify(args, progress)
    if args.command == "container":
        from .make import containers

        info = containers.build_image(args.target, base_image=args.base_image, ca_bundle=args.ca_bundle, tag=args.tag,
                                      progress=progress)
        containers.smoke(args.target, info["tag"])
        print(f"Built {info['tag']} ({info['id']}); smoke check passed")
        return EXIT_OK
    if args.command == "schema":
        from .published_schemas import schema_text

        sys.stdout.write(schema_text(args.name))
        return EXIT_OK
    if args.command == "demo":
        return _demo(args, progress)
    if args.command == "merge-lora":
        from .lora_merge import merge_lora

        result = merge_lora(args.checkpoint, args.out, adapter=args.adapter, builtin=args.builtin,
                            drop_builtin=args.drop_builtin, note=progress)
        if not args.quiet:
            print(result.summary())
        return EXIT_OK
    if args.command == "run":
        from edgellm_validate.generate import run_command

        try:
            run_command(args.out, args.prompt, max_new_tokens=args.max_new_tokens, chat=args.chat, system=args.system,
                        temperature=args.temperature, top_p=args.top_p, seed=args.seed, kv_capacity=args.kv_capacity,
                        quiet=args.quiet, between_steps=interrupts.check)
        except KeyboardInterrupt:
            interrupts.ignore_further()
            print("edgellm: generation interrupted", file=sys.stderr)
            return 130
        return EXIT_OK
    return EXIT_BAD_INPUT


def _make_or_qualify(args, progress) -> int:
    from .make.pipeline import MakeSettings

    images = {}
    for value in args.base_image:
        name, sep, image = value.partition("=")
        per_target = args.command == "qualify" and sep and name and not any(ch in name for ch in "/:@")
        images[name if per_target else None] = image if per_target else value
    settings = MakeSettings(force=args.force, container=args.container, base_images=images,
                            ca_bundle=args.ca_bundle, plugin=args.plugin, timeout=args.timeout, progress=progress)
    if args.command == "qualify":
        from .make.qualify import qualify

        work = args.out or Path(f"qualify-{args.suite.stem}")
        outcome = qualify(args.suite, work, settings, targets=args.targets, previous=args.previous,
                          fail_on_regression=args.fail_on_regression)
    else:
        from .make.pipeline import make
        from .make.suite import SuiteCase

        options = {"fp8_embedding": args.fp8_embedding, "clamp_fp16": args.clamp_fp16,
                   "convert_pickle": args.convert_pickle, "unsafe_rope_passthrough": args.unsafe_rope_passthrough}
        if args.components is not None:
            options["components"] = list(args.components)
        if args.attention != "plugin":
            options["attention"] = args.attention
        from .checkpoint.hub import parse_checkpoint

        checkpoint = parse_checkpoint(args.checkpoint, args.revision)  # a local Path, or a HubId make resolves
        default_name = checkpoint.absolute().name if isinstance(checkpoint, Path) else checkpoint.name
        case = SuiteCase(name=args.name or f"{default_name}@{args.target}",
                         checkpoint=checkpoint, target=args.target, backend=None, release=args.release,
                         options=options)
        outcome = make(case, args.out, settings, previous=args.previous, fail_on_regression=args.fail_on_regression)
    _print_outcome(outcome, args.quiet)
    return outcome.exit_code


def _print_outcome(outcome, quiet: bool) -> None:
    """One line per case (failures and errors only with --quiet), regressions, where the report is."""
    from edgellm_validate.report.qualification import fmt_metric

    q = outcome.report
    for c in q["cases"]:
        if quiet and c["verdict"] in ("pass", "skipped"):
            continue
        m = c.get("metrics") or {}
        nums = ", ".join(f"{k} {fmt_metric(m[k], k)}" for k in ("worst_cosine", "top1_agreement") if k in m)
        reason = f": {c['reason']}" if c["reason"] else ""
        print(f"{c['name']}: {c['verdict'].upper()}" + (f" ({nums})" if nums else "") + reason)
    for f in outcome.written.comparison.regressions if outcome.written.comparison else []:
        print(f"REGRESSION {f.case} ({f.kind}): {f.message}")
    if not quiet or q["verdict"] != "pass":
        print(f"Qualification {q['verdict'].upper()}: {q['verdict_reason']}; report in "
              f"{outcome.written.qualification.parent}")


def _demo(args, progress) -> int:
    from edgellm_validate.validate import validate_export

    from .demo_checkpoint import write_demo_checkpoint
    from .export import export_checkpoint

    with tempfile.TemporaryDirectory(prefix="edgellm-demo-") as scratch:
        out = args.out
        ckpt = write_demo_checkpoint(Path(scratch) / "demo-checkpoint")
        progress(f"demo checkpoint written to {ckpt}")
        if args.no_golden:
            raise ExportError("the demo validates its export, so it cannot run with --no-golden")
        _print_summary(export_checkpoint(ckpt, out, _options(args), progress), args.quiet)
        res = validate_export(out)
        _print_validation(res, args.quiet)
        return 0 if res["passed"] else 1


def main(argv: list[str] | None = None) -> int:
    previous = interrupts.install()
    try:
        return run(argv)
    except ExportError as e:
        print(f"edgellm: error: {e.paragraph()}", file=sys.stderr)
        return e.exit_code
    except OSError as e:  # disk full, read-only, I/O errors: no traceback, no partial output
        where = f"{e.filename}: " if e.filename else ""
        print(f"edgellm: error: {where}{e.strerror or e}", file=sys.stderr)
        return EXIT_ENVIRONMENT
    except (KeyboardInterrupt, interrupts.Terminated) as e:
        interrupts.ignore_further()
        what = "interrupted" if isinstance(e, KeyboardInterrupt) else "terminated"
        print(f"edgellm: {what}; no partial output was left (OUT holds the previous or the complete "
              "new export)", file=sys.stderr)
        return 130 if isinstance(e, KeyboardInterrupt) else 143
    finally:
        interrupts.restore(previous)


def entry() -> None:
    """Console entry point (`edgellm`, `python -m edgellm_export`).

    Signals are recorded from here on and never handed back to Python's
    defaults: once main() has returned, the work is over (published or cleaned
    up), so a late SIGINT/SIGTERM is ignored instead of turning the documented
    exit code into a kill by signal during interpreter shutdown."""
    interrupts.install_for_process()
    code = main()
    interrupts.ignore_further()
    sys.stdout.flush()
    sys.stderr.flush()
    if code in (130, 143):
        os._exit(code)  # everything is cleaned up; skip teardown of torch/onnxruntime threads
    sys.exit(code)


if __name__ == "__main__":
    entry()

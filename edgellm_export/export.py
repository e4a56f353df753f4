"""The export pipeline: checkpoint directory -> `OUT/llm/` for one Edge-LLM release."""

from __future__ import annotations

import contextlib
import json
import logging
import resource
import time
from dataclasses import dataclass, field
from pathlib import Path

from edgellm_core.errors import ExportError, UnsupportedError
from edgellm_core.manifest import write_manifest
from edgellm_core.onnx_graph.builder import GraphBuilder
from edgellm_core.ops.schemas import ONNX_OPSET

from . import __version__, encoders, interrupts
from . import audio as audio_mod
from . import golden as golden_mod
from . import visual as visual_mod
from .checkpoint import open_checkpoint
from .checkpoint.hub import CheckpointRef
from .checkpoint.reader import TensorRef
from .config import ModelConfig, build_model_config, check_components
from .contract import DEFAULT_TARGET, get_contract
from .models import family_for
from .models.registry import Family
from .models.weights import WeightSource
from .output_dir import atomic_output_dir
from .quant.plan import FP8, QuantDecisions, parse_quant_plan, resolve
from .sidecars.chat_template import write_processed_chat_template
from .sidecars.embedding import write_embedding
from .sidecars.tokenizer_files import copy_tokenizer_files
from .stream_writer import StreamWriter

log = logging.getLogger(__name__)


@dataclass
class ExportOptions:
    target: str = DEFAULT_TARGET
    fp8_embedding: bool = False
    golden: bool = True
    # Clamp bf16/fp32 weights beyond fp16's range (with a warning) instead of refusing.
    clamp_fp16: bool = False
    # Convert pickled .bin/.pt weights with torch's weights-only unpickler.
    convert_pickle: bool = False
    # Write rope_scaling verbatim, as the reference exporter does. Only for
    # demonstrating what the runtime would compute; never a user-facing default.
    unsafe_rope_passthrough: bool = False
    # "plugin": the Edge-LLM AttentionPlugin (the default); "native": the plugin-free `trt_native_ops` form
    # (contract/native_v0_7.py), standard ONNX attention that TensorRT >= 10.15 builds without the plugin library.
    attention: str = "plugin"
    # Which components to write (config.COMPONENTS); None: all the checkpoint has, and an encoder this version
    # cannot export is then an error rather than silently dropped.
    components: tuple[str, ...] | None = None


ATTENTION_MODES = ("plugin", "native")


def contract_for(opts: ExportOptions):
    """The contract module an export follows: the release's plugin contract, or its plugin-free variant."""
    contract = get_contract(opts.target)
    if opts.attention not in ATTENTION_MODES:
        raise ExportError(f"unknown attention form {opts.attention!r}; choose {' or '.join(ATTENTION_MODES)}")
    if opts.attention == "native":
        from .contract import native_v0_7

        if contract is not native_v0_7.PLUGIN:
            raise ExportError(f"--attention native is written for Edge-LLM 0.7.x, not {opts.target}")
        contract = native_v0_7
    return contract


@dataclass
class ExportResult:
    out_dir: Path
    files: dict[str, int] = field(default_factory=dict)  # relative path -> bytes
    seconds: float = 0.0
    cpu_seconds: float = 0.0  # user + system, all threads of this process


def _cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


@contextlib.contextmanager
def _one_torch_thread():
    """The conversion and the golden pass run on one intra-op thread. Their ops are small (a
    cache-sized block at a time), so a second OpenMP thread mostly spins at barriers: measured on
    the 1B shape it added ~40% CPU for no wall-time gain, and on a machine whose other core is
    busy those spinning barriers multiplied the export's time. The second core goes to the
    writer thread (stream_writer.py), which writes and hashes, instead. Results are bit-identical either way
    (tests pin the golden)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n")


def export_checkpoint(checkpoint: str | Path | CheckpointRef, out_dir: str | Path,
                      options: ExportOptions | None = None, progress=None) -> ExportResult:
    """Export a checkpoint directory; a CheckpointRef (checkpoint/hub.py: a hub id resolved to a cached
    snapshot) also has its repository and commit recorded in manifest.json."""
    opts = options or ExportOptions()
    t0, cpu0 = time.perf_counter(), _cpu_seconds()
    report = progress or (lambda msg, done=None, total=None: None)
    contract = contract_for(opts)
    source = checkpoint if isinstance(checkpoint, CheckpointRef) else CheckpointRef(Path(checkpoint))
    ckpt_path = source.path
    out_path = Path(out_dir).resolve()
    if out_path == ckpt_path.resolve() or out_path in ckpt_path.resolve().parents:
        raise ExportError("the output directory would replace the checkpoint itself; choose another OUT", out_dir)
    with open_checkpoint(ckpt_path, allow_pickle=opts.convert_pickle) as ckpt, _one_torch_thread():
        planned = plan_export(ckpt, contract, opts)
        cfg, family, g, embed_ref = planned.cfg, planned.family, planned.graph, planned.embed_ref
        report(f"{cfg.model_type}: {cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}, "
               f"vocab {cfg.vocab_size}")
        data_size = g.layout_weights()
        model = g.to_model(contract.DATA_FILE, contract.opsets(g), contract.IR_VERSION,
                           producer=("edgellm-export", __version__))

        with atomic_output_dir(Path(out_dir)) as tmp:
            llm = tmp / contract.SUBDIR
            llm.mkdir()
            (llm / contract.GRAPH_FILE).write_bytes(model.SerializeToString())
            # Small sidecars first: a broken tokenizer config fails in milliseconds.
            _write_json(llm / "config.json", planned.runtime_config)
            copy_tokenizer_files(ckpt.path, llm)
            write_processed_chat_template(ckpt.path, llm, str(ckpt_path))
            native = getattr(contract, "NATIVE", False)
            capacity = contract.KV_CAPACITY if native else golden_mod.KV_CAPACITY
            scenarios = golden_mod.make_scenarios(cfg.vocab_size, native=native) if opts.golden else []
            digests = {}
            for enc in planned.encoders:  # first: the LLM's image / audio scenario starts from the encoder's output
                enc_digests, features = _write_encoder(enc, tmp / enc.component, ckpt, opts, report, contract)
                digests.update(enc_digests)
                # the plugin-free form: plain RoPE only (its rope input is one shared table, no MRoPE)
                if features is not None and not (native and "mrope_section" in cfg.rope.params):
                    scenario = _encoder_scenario(cfg, enc, embed_ref, features, tmp / enc.component, native)
                    needed = len(scenario.steps[0].token_ids[0]) + golden_mod.DECODE_STEPS
                    if not native:  # the native form's cache capacity is static (KV_CAPACITY)
                        capacity = max(capacity, -(-needed // 64) * 64)  # the whole bundle's: one engine replays it
                    scenarios.append(scenario)
            for scenario in scenarios:  # MRoPE tables once the capacity is known
                if scenario.image is not None and scenario.image.get("positions") is not None:
                    scenario.rope = _image_rope(cfg, scenario.image["positions"], capacity)
            run = golden_mod.GoldenRun(cfg, family, embed_ref, scenarios, planned.quant, native=native,
                                       kv_capacity=capacity) if opts.golden else None
            report("writing embedding.safetensors")
            writer = StreamWriter()
            try:
                write_embedding(embed_ref, llm / "embedding.safetensors", fp8=opts.fp8_embedding,
                                clamp=opts.clamp_fp16, writer=writer)
                _write_weights(g, writer, llm / contract.DATA_FILE, data_size, run, report)
            except BaseException:
                with contextlib.suppress(BaseException):
                    writer.finish()  # stop the thread; the error that got here first is the one to report
                raise
            writer.finish()
            if run is not None:
                run.finish()
                golden_mod.write_bundle(llm, scenarios, precision=_precision(planned.quant, opts), kv_capacity=capacity)
            digests.update(writer.digests)
            ckpt.check_unchanged()
            interrupts.check()
            known = {Path(p).relative_to(tmp).as_posix(): d for p, d in digests.items()}
            write_manifest(tmp, known, source.identity())
            files = {str(p.relative_to(tmp)): p.stat().st_size for p in sorted(tmp.rglob("*")) if p.is_file()}
    return ExportResult(Path(out_dir), files, time.perf_counter() - t0, _cpu_seconds() - cpu0)


def _write_encoder(planned: encoders.PlannedEncoder, out: Path, ckpt, opts: ExportOptions, report,
                   contract) -> tuple[dict, dict | None]:
    """OUT/<component>/: graph, weights, config.json, the preprocessor's config, sidecars and the golden inputs;
    returns the digests the writer computed (path -> sha256) for the manifest, and the golden outputs (None
    without)."""
    g = planned.graph
    data_size = g.layout_weights()
    domains = sorted({node.domain for node in g.nodes if node.domain})  # ViTAttentionPlugin's, quantized linears'
    model = g.to_model(contract.DATA_FILE, {"": ONNX_OPSET, **{d: 1 for d in domains}}, contract.IR_VERSION,
                       producer=("edgellm-export", __version__))
    out.mkdir()
    (out / contract.GRAPH_FILE).write_bytes(model.SerializeToString())
    _write_json(out / "config.json", planned.runtime_config)
    encoders.copy_preprocessor(ckpt.path, planned.preprocessor, out)
    writer = StreamWriter()
    try:
        _write_weights(g, writer, out / contract.DATA_FILE, data_size, None, report)
    except BaseException:
        with contextlib.suppress(BaseException):
            writer.finish()
        raise
    writer.finish()
    encoders.write_sidecars(out, planned, ckpt, out / contract.DATA_FILE)
    features = encoders.write_golden(out, planned, out / contract.DATA_FILE) if opts.golden else None
    return writer.digests, features


def _encoder_scenario(cfg: ModelConfig, planned: encoders.PlannedEncoder, embed_ref, outputs: dict, out_dir: Path,
                      native: bool = False):
    """The golden bundle's image or audio scenario: the encoder golden's images (the family's `golden_image`
    says which rows, and how the runtime lays them out) or its clip in a prompt (config.json's token ids), MRoPE
    positions where the language model has them (the table is made once the capacity is known)."""
    from edgellm_core.multimodal import qwen_positions

    layout = planned.module.golden_image(planned.spec)
    rc = planned.runtime_config
    token = rc["audio_token_id" if planned.component == "audio" else "image_token_id"]
    ends = ("audio_start_token_id", "audio_end_token_id") if planned.component == "audio" else (
        "vision_start_token_id", "vision_end_token_id")
    extra = {k: rc[k] for k in ends if isinstance(rc.get(k), int)}
    # An audio clip's tokens count up by one on all three MRoPE axes, as text does (transformers' Qwen3-Omni
    # get_rope_index; the runtime's sequential table): the plain positions, no table of its own.
    mrope = "mrope_section" in cfg.rope.params and planned.component != "audio"

    def positions(prompt):
        if not mrope:
            return None
        return qwen_positions(prompt, layout["grids"] or [], token, layout["merge"] or 1)

    table = embed_ref.view()

    def lookup(ids):
        import torch

        return table[torch.as_tensor(ids)].float().half().numpy()

    deepstack = {f"deepstack_features_{k}": outputs[f"deepstack_features_{k}"]
                 for k in range(cfg.num_deepstack_features)} if planned.component == "visual" else {}
    features, assemble = outputs[planned.module.OUTPUT], layout.get("assemble")
    if assemble is not None:  # Phi-4-MM: the crops' rows laid out with separators, as the runtime does
        features = visual_mod.assemble(assemble, features, out_dir)
    return golden_mod.image_scenario(cfg, lookup, features, layout["counts"], token, extra, positions, deepstack,
                                     assemble=assemble, component=planned.component,
                                     output=planned.module.OUTPUT, start=extra.get(ends[0]), end=extra.get(ends[1]),
                                     native=native)


def _image_rope(cfg: ModelConfig, positions, capacity: int):
    import numpy as np

    from edgellm_core.multimodal import mrope_table

    p = cfg.rope.params
    return mrope_table(np.asarray(positions), capacity, theta=cfg.rope.theta, rotary_dim=cfg.rotary_dim,
                       section=p["mrope_section"], interleaved=bool(p.get("mrope_interleaved", False)))


def _precision(quant: QuantDecisions, opts: ExportOptions) -> str:
    """`+`-joined precision parts (fp16 only when alone); validation thresholds come from them."""
    parts = quant.formats() + (["fp8_kv"] if quant.kv_scales is not None else [])
    parts += ["fp8_embedding"] if opts.fp8_embedding else []
    return "+".join(parts) or "fp16"


@dataclass
class PlannedExport:
    cfg: ModelConfig
    family: Family
    graph: GraphBuilder
    embed_ref: TensorRef
    runtime_config: dict
    quant: QuantDecisions = field(default_factory=QuantDecisions)
    encoders: list[encoders.PlannedEncoder] = field(default_factory=list)  # OUT/visual/, OUT/audio/


def plan_export(ckpt, contract, opts: ExportOptions) -> PlannedExport:
    """Everything decided before a byte is written: config, family, runtime config, and the
    graph with every weight declared. Reads metadata and safetensors headers, plus the few
    tensors that decide a graph's shape: GPTQ `g_idx` (act order) and INT4 zero points
    (`qzeros`, and `qweight` where a zero is not 8), which choose whether a layer needs a
    zero-point correction."""
    has_lm_head = ckpt.has("lm_head.weight")
    _refuse_unmerged_lora(ckpt)
    try:
        plan = parse_quant_plan(ckpt.path, ckpt.config)
        cfg = build_model_config(ckpt.config, ckpt.has_layer_tensor, ckpt.config_path)
        family = family_for(cfg, ckpt.config_path)  # first: the language model is always exported
        components = check_components(ckpt.config, opts.components, ckpt.config_path)
        contract.check_supported(cfg)
        family.prepare(ckpt, cfg)
        quant = QuantDecisions()
        if plan is not None:
            quant.linears = resolve(plan, ckpt, family.linear_names(cfg, has_lm_head))
            if plan.kv_cache == FP8:
                quant.kv_scales = _kv_scales(ckpt, cfg, plan.source)
        check_quant = getattr(contract, "check_quant", None)  # the plugin-free form refuses plugin-only formats
        if check_quant is not None:
            check_quant(quant, plan.source if plan is not None else None)
        runtime_cfg = contract.runtime_config(cfg, allow_rope_passthrough=opts.unsafe_rope_passthrough)
    except ExportError as e:
        if e.path is None:  # a refusal about the config: say which file
            raise type(e)(e.message, ckpt.config_path) from None
        raise
    # Every tensor's name and shape is checked here, from headers.
    g = GraphBuilder("edgellm_decoder")
    weights = WeightSource(ckpt, g, clamp=opts.clamp_fp16)
    family.emit_graph(g, weights, cfg, contract, has_lm_head, quant)
    _refuse_unread_tensors(ckpt, family.linear_names(cfg, has_lm_head), weights.used, quant)
    embed_ref = weights.ref("embed_tokens.weight", (cfg.vocab_size, cfg.hidden_size))
    planned_encoders = [mod.plan(ckpt, cfg.hidden_size, cfg.vocab_size, opts.clamp_fp16)
                        for name, mod in (("visual", visual_mod), ("audio", audio_mod)) if name in components]
    if "audio" in components or ckpt.config.get("model_type") in audio_mod.FAMILIES:
        runtime_cfg.update(audio_mod.llm_config_fields(ckpt.config, ckpt.path))
    return PlannedExport(cfg, family, g, embed_ref, runtime_cfg, quant, planned_encoders)


def _refuse_unmerged_lora(ckpt) -> None:
    """LoRA adapters stored in the checkpoint (Phi-4-MM's builtin vision / speech LoRA) are deltas on the base
    weights: exporting the base alone computes another model. They are merged first, by choice of adapter."""
    lora = [n.split(".lora_", 1)[1] for n in ckpt.names() if ".lora_A." in n or ".lora_B." in n]
    if lora:  # "A.vision.weight" -> vision; a PEFT-style "A.weight" names none
        named = ", ".join(sorted({p.split(".")[1] for p in lora if p.count(".") >= 2})) or "unnamed"
        raise UnsupportedError(
            f"the checkpoint holds unmerged LoRA adapters ({named}) next to its base weights; exporting the base "
            "weights alone would compute another model. Merge the one you want first: edgellm merge-lora CKPT "
            "MERGED --builtin NAME, then export MERGED", ckpt.path)


def _refuse_unread_tensors(ckpt, linears: list[str], used: set[str], quant: QuantDecisions) -> None:
    """A tensor under a linear that the export does not read would change the checkpoint's meaning
    if honoured (a smoothing scale, a stray KV scale without KV metadata): refuse, naming it."""
    kv = {"k_scale", "v_scale"} if quant.kv_scales is not None else set()
    prefixes = tuple(f"{name}." for name in linears)
    stray = sorted(n for n in ckpt.names()
                   if n.startswith(prefixes) and n not in used and n.rsplit(".", 1)[1] not in kv)
    if stray:
        shown = ", ".join(stray[:4]) + (f" and {len(stray) - 4} more" if len(stray) > 4 else "")
        raise ExportError(f"the checkpoint has tensors its quantization metadata does not account for ({shown}); "
                          "exporting without them would compute something else", ckpt.path)


def _kv_scales(ckpt, cfg: ModelConfig, source: Path) -> list[tuple[float, float]]:
    """Per-layer FP8 KV cache scales. Missing ones are an error: the reference exporter's default
    of 1.0 would quietly compute a different cache (quant.md §9.14)."""
    out = []
    for i in range(cfg.num_hidden_layers):
        pair = []
        for proj, kind in (("k_proj", "k_scale"), ("v_proj", "v_scale")):
            names = [f"layers.{i}.self_attn.{proj}.{kind}", f"layers.{i}.self_attn.{kind}"]
            name = next((n for n in names if ckpt.has(n)), None)
            if name is None:
                raise ExportError(f"the metadata asks for an FP8 KV cache but layer {i} has no {kind} tensor "
                                  f"(looked for {' and '.join(names)})", source)
            ref = ckpt.ref(name)
            if ref.dtype not in ("F32", "F16", "BF16") or tuple(ref.shape) not in ((), (1,)):
                raise ExportError(f"KV cache scale {ref.key!r} must be one float, not {ref.dtype} "
                                  f"{list(ref.shape)}", ref.file.path)
            value = float(ref.view().float().reshape(-1)[0])
            if not (value > 0 and value < float("inf")):
                raise ExportError(f"KV cache scale {ref.key!r} is {value}; it must be positive and finite",
                                  ref.file.path)
            pair.append(value)
        out.append((pair[0], pair[1]))
    return out


def _nbytes(t) -> int:
    return t.numel() * t.element_size()


def _raw_bytes(t):
    """The tensor's bytes as a flat uint8 array (fp8 and other dtypes numpy lacks included)."""
    import torch

    return t.contiguous().reshape(-1).view(torch.uint8).numpy()


def _write_weights(g: GraphBuilder, writer: StreamWriter, path: Path, total: int, golden_run, report) -> None:
    """Stream every external initializer into one data file, in graph order.

    Conversion and the golden pass run here while `writer`'s threads write and hash the
    previous tensors (its digest lands in `writer.digests`); its queues hold at most two
    tensors each, so memory stays at the largest tensor plus a few more.
    """
    fd = writer.open(path)
    for i, w in enumerate(g.weights):
        interrupts.check()
        t = w.produce()
        if _nbytes(t) != w.nbytes:
            raise ExportError(f"internal: produced {_nbytes(t)} bytes ({tuple(t.shape)}) for {w.name}, "
                              f"expected {w.nbytes} ({w.shape})")
        writer.write(fd, w.offset, _raw_bytes(t))
        if golden_run is not None:
            golden_run.consume(w.name, t)
        del t
        if i % 16 == 0 or i == len(g.weights) - 1:
            report("writing model.onnx.data", w.offset + w.nbytes, total)
    writer.close(fd, total)

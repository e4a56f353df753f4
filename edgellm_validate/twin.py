"""The runtime twin: drives a backend the way llm_inference drives the engine.

Per step it embeds tokens from embedding.safetensors, builds the RoPE table from
config.json by the runtime's rules, feeds context_lengths / kvcache_start_index /
last_token_ids with their per-phase meanings, and feeds the full-capacity state
buffers (KV caches, and recurrent states where a graph has them) returned by the
previous step back in (the runtime binds them in place).

`Twin` is the stepping API (one forward step at a time, used by `edgellm run`);
`drive` replays golden-bundle scenarios through it (used by `edgellm validate`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edgellm_core.bindings import Bindings, bindings_for

from .runtime_rules import EmbeddingTable, read_safetensors, rope_table

BUNDLE = Path("golden") / "bundle.json"
LOGITS = Path("golden") / "logits.safetensors"


@dataclass
class StepResult:
    scenario: str
    index: int
    phase: str
    logits: np.ndarray  # [B, V] from the backend
    expected: np.ndarray  # [B, V] from the bundle


@dataclass
class TwinRun:
    steps: list[StepResult] = field(default_factory=list)


@dataclass(frozen=True)
class StateSpec:
    """A graph input carried from step to step: fed as `past`, returned as `present`.

    `shape` holds None for the batch dim (the first) and for the capacity dim (any
    other dim the graph leaves symbolic, e.g. a KV cache's sequence dim); recurrent
    states have fixed dims after the batch."""

    past: str
    present: str
    shape: tuple[int | None, ...]
    dtype: np.dtype

    def zeros(self, batch: int, capacity: int) -> np.ndarray:
        dims = [batch] + [capacity if d is None else d for d in self.shape[1:]]
        # Zero bytes are +0.0 in fp16, fp32 and fp8 alike.
        return np.zeros(dims, self.dtype)


def _numpy_dtype(elem_type: int) -> np.dtype:
    import onnx

    if elem_type in (onnx.TensorProto.FLOAT8E4M3FN, onnx.TensorProto.UINT8):
        return np.dtype(np.uint8)  # numpy has no float8: FP8 buffers travel as raw bytes, as backends expect
    if elem_type == onnx.TensorProto.BFLOAT16:
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(elem_type))


def state_specs(llm_dir: Path, bindings: Bindings) -> list[StateSpec]:
    """The graph's carried state, read from model.onnx's inputs and outputs (no weights are loaded):
    every input that is not a per-step input and has an output that carries it (`Bindings.presents_of`)."""
    import onnx

    model = onnx.load(str(llm_dir / "model.onnx"), load_external_data=False)
    outputs = {o.name for o in model.graph.output}
    specs = []
    for inp in model.graph.input:
        if inp.name in bindings.step_inputs:
            continue
        present = next((c for c in bindings.presents_of(inp.name) if c in outputs), None)
        if present is None:
            continue
        tt = inp.type.tensor_type
        shape = tuple(None if (k == 0 or not d.HasField("dim_value")) else int(d.dim_value)
                      for k, d in enumerate(tt.shape.dim))
        specs.append(StateSpec(inp.name, present, shape, _numpy_dtype(tt.elem_type)))
    return specs


class Twin:
    """One export driven step by step like llm_inference, with a fixed KV capacity.

        twin = Twin(llm_dir, backend, capacity)
        state = twin.new_state(batch)
        logits, state = twin.step(state, token_ids, context_lengths, kvcache_start_index, last_token_ids)
    """

    def __init__(self, llm_dir: Path, backend, capacity: int):
        self.llm_dir = Path(llm_dir)
        self.backend = backend
        self.capacity = int(capacity)
        self.config = json.loads((self.llm_dir / "config.json").read_text())
        self.bindings = bindings_for(self.config.get("edgellm_version"))
        self.rope = rope_table(self.config, self.capacity)
        self.embedding = EmbeddingTable(self.llm_dir / "embedding.safetensors")
        self.states = state_specs(self.llm_dir, self.bindings)
        self.deepstack = [self.bindings.deepstack(i) for i in range(int(self.config.get("num_deepstack_features")
                                                                         or 0))]
        # A plugin-free export (native.md): per-step inputs as LLMEngineRunner's trt_native_ops path feeds them,
        # and caches of the graph's static capacity, which the positions must stay within.
        self.native = bool(self.config.get("trt_native_ops"))
        static = {d for spec in self.states for d in spec.shape[1:] if d is not None} if self.native else set()
        cap = max(static, default=None)
        if cap is not None and self.capacity > cap:
            from edgellm_core.errors import ExportError

            raise ExportError(f"a KV capacity of {self.capacity} exceeds the native export's static cache capacity "
                              f"{cap}", self.llm_dir / "model.onnx")

    def new_state(self, batch: int) -> dict[str, np.ndarray]:
        """Zeroed full-capacity buffers for a fresh sequence batch, keyed by input name."""
        return {s.past: s.zeros(batch, self.capacity) for s in self.states}

    def step(self, state: dict, token_ids, context_lengths, kvcache_start_index, last_token_ids, deepstack=None,
             *, inputs_embeds=None, rope=None):
        """One forward step; returns (logits [B, V] fp32, the state to feed to the next step).

        token_ids [B, S]; context_lengths [B] (new tokens of a prefill, the cached length + 1 in decode);
        kvcache_start_index [B], or empty for a plain prefill; last_token_ids [B] or [B, 1].
        A native export is fed what the trt_native_ops runtime feeds (`native_step_inputs`); its own inputs
        (start index [B] on every step, context_lengths 1 in decode) pass through unchanged.
        A Qwen3-VL export's deepstack inputs are `deepstack` (one `[B, S, H]` array each) or, as the runtime
        binds them for text, zeros. `inputs_embeds` (encoder outputs scattered in) and `rope` (a per-sequence
        MRoPE table) replace the token lookup and the config's table, as the multimodal runner does."""
        tokens = np.asarray(token_ids, dtype=np.int64)
        batch = tokens.shape[0]
        b = self.bindings
        ctx = np.asarray(context_lengths, np.int32).reshape(-1)
        start = np.asarray(kvcache_start_index, np.int32).reshape(-1)
        if self.native:
            ctx, start = native_step_inputs(tokens.shape[1], ctx, start)
        feeds = {
            b.inputs_embeds: self.embedding.lookup(tokens) if inputs_embeds is None else inputs_embeds,
            b.rope_cos_sin: self.rope if rope is None else rope,
            b.context_lengths: ctx,
            b.kvcache_start_index: start,
            b.last_token_ids: np.asarray(last_token_ids, np.int64).reshape(batch, 1),
        }
        embeds = feeds[b.inputs_embeds]
        for k, name in enumerate(self.deepstack):
            feeds[name] = (np.zeros_like(embeds) if deepstack is None
                           else np.asarray(deepstack[k], np.float16).reshape(embeds.shape))
        feeds.update(state)
        out = self.backend.run(feeds)
        # The presents are the full-capacity buffers, fed back in place (on TensorRT, device handles).
        new_state = {s.past: out[s.present] for s in self.states}
        return out[b.logits][:, 0, :].astype(np.float32), new_state


def native_step_inputs(seq_len: int, context_lengths: np.ndarray, start: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(context_lengths, kvcache_start_index) as LLMEngineRunner feeds a trt_native_ops engine (native.md):
    the start index is each sequence's committed length `[B]` on every step, zeros on a fresh prefill (never
    the plugin path's empty tensor), and in decode context_lengths is the length of Q, 1."""
    batch = context_lengths.shape[0]
    if start.size == 0:
        start = np.zeros(batch, np.int32)
    elif seq_len == 1:
        context_lengths = np.ones(batch, np.int32)
    return context_lengths, start


def load_bundle(llm_dir: Path) -> tuple[dict, dict[str, np.ndarray]]:
    meta = json.loads((llm_dir / BUNDLE).read_text())
    return meta, read_safetensors(llm_dir / LOGITS)


def run_twin(llm_dir: Path, backend, components: dict | None = None) -> TwinRun:
    """Replay the golden bundle's scenarios through `backend`, paired with expected logits. `components`: the
    encoders' outputs on their golden inputs ({"visual": {output name: rows}}), which an image scenario
    scatters into its prompt as the runtime does."""
    meta, expected = load_bundle(llm_dir)
    run = TwinRun()
    for sc, k, step, logits in drive(llm_dir, backend, meta["scenarios"], int(meta["kv_capacity"]), components):
        run.steps.append(StepResult(sc, k, step["phase"], logits, np.asarray(expected[step["logits"]], np.float32)))
    return run


def drive(llm_dir: Path, backend, scenarios: list[dict], capacity: int, components: dict | None = None):
    """Run scenarios (bundle format) like llm_inference; yields (scenario, index, step, logits [B, V])."""
    twin = Twin(llm_dir, backend, capacity)
    for sc in scenarios:
        state = twin.new_state(len(sc["steps"][0]["context_lengths"]))
        media = sc.get("image") or sc.get("audio")
        embeds, rope, deepstack = _image_inputs(twin, sc, media, components) if media else (None, None, None)
        for k, st in enumerate(sc["steps"]):
            logits, state = twin.step(state, st["token_ids"], st["context_lengths"], st["kvcache_start_index"],
                                      st["last_token_ids"], deepstack if k == 0 else None,
                                      inputs_embeds=embeds if k == 0 else None, rope=rope)
            yield sc["name"], k, st, logits


def _image_inputs(twin: Twin, sc: dict, image: dict, components: dict | None):
    """An image (or audio) scenario's prefill embeddings (the encoder's rows, as run here, in the image or audio
    tokens), its per-sequence rope table (MRoPE from the bundle's positions and the config's rope, else the plain
    one) and, for Qwen3-VL, the prefill's deepstack_embeds_i (the encoder's deepstack outputs at the image
    tokens)."""
    from edgellm_core.errors import ExportError
    from edgellm_core.multimodal import assemble, mrope_table, scatter_features

    token = image.get("image_token_id", image.get("audio_token_id"))
    rows = (components or {}).get(image["component"], {}).get(image["output"])
    if rows is None:
        raise ExportError(f"golden scenario {sc['name']} needs the {image['component']} component's "
                          f"{image['output']!r} output, which was not computed", twin.llm_dir)
    ids = np.asarray(sc["steps"][0]["token_ids"], np.int64)  # every row one request with the image
    if image.get("assemble"):  # Phi-4-MM: crops laid out with the sidecar's separators first
        how = image["assemble"]
        if Path(how["sidecar"]).name != how["sidecar"]:
            raise ExportError(f"golden scenario {sc['name']} names sidecar {how['sidecar']!r}, not a file name of "
                              "the encoder's directory", twin.llm_dir)
        rows = assemble(how, rows, read_safetensors(twin.llm_dir.parent / image["component"] / how["sidecar"]))
    lo, hi = image["rows"]
    embeds = np.concatenate([scatter_features(twin.embedding.lookup(row[None]), row, token,
                                              np.asarray(rows)[lo:hi]) for row in ids])
    deepstack = None
    if image.get("deepstack"):
        outs = components[image["component"]]
        zeros = np.zeros((1, ids.shape[1], embeds.shape[-1]), np.float16)
        deepstack = [np.concatenate([scatter_features(zeros, row, token,
                                                      np.asarray(outs[name])[lo:hi]) for row in ids])
                     for name in image["deepstack"]]
    if image.get("positions") is None:
        return embeds, None, deepstack
    cfg, scaling = twin.config, twin.config["rope_scaling"]
    rotary = int(cfg["head_dim"] * (cfg.get("partial_rotary_factor") or 1.0))
    table = mrope_table(np.asarray(image["positions"]), twin.capacity, theta=cfg["rope_theta"], rotary_dim=rotary,
                        section=scaling["mrope_section"], interleaved=bool(scaling.get("mrope_interleaved", False)))
    return embeds, table, deepstack

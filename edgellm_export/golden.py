"""The golden bundle: fixed prompts, per-step runtime inputs and expected logits.

At export time the eager torch modules run a fixed scenario set (batch 2 with
ragged prompts: plain prefill + decode, chunked prefill + decode; decode is
teacher-forced so every backend sees identical inputs) and the inputs and
logits are stored next to the graph. The validation side replays the inputs
through a backend without needing torch or the checkpoint.

The eager pass is layer-major: inputs of every step are known up front, so
each layer's weights are used once, for all steps, as the weight writer
streams them past. Memory stays at one layer's weights, and for a MoE layer at
one `[E, ...]` expert stack: the layer runs up to its MoE input when the first
stack arrives, and each stack is used and dropped as it comes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edgellm_core.bindings import V0_7

from .config import SIGMOID_MOE, SOFTMAX_MOE, ModelConfig
from .models.blocks.linear import r16 as linear_r16
from .rope import reference_inv_freq_and_scale

BUNDLE_DIR = "golden"
BUNDLE_FILE = "bundle.json"
LOGITS_FILE = "logits.safetensors"
FORMAT = 1
KV_CAPACITY = 64
DECODE_STEPS = 4
PROMPT_LENGTHS = (11, 6)  # ragged batch of 2
CHUNK_FIRST = (6, 3)  # first chunk of each prompt in the chunked-prefill scenario


@dataclass
class Step:
    phase: str  # prefill | chunked_prefill | decode
    token_ids: np.ndarray  # int64 [B, S], right-padded with 0
    context_lengths: np.ndarray  # int32 [B]
    kvcache_start_index: np.ndarray  # int32 [0] or [B]
    last_token_ids: np.ndarray  # int64 [B, 1]
    logits: np.ndarray | None = None  # float32 [B, V]


@dataclass
class Scenario:
    name: str
    steps: list[Step] = field(default_factory=list)
    # An image scenario (VLM exports): the prefill's embeddings with the encoder's rows in the image tokens
    # (fp16 values `[1, S, H]`), the per-sequence rope table `[1, Cap, R]`, and what the bundle tells the
    # validation side to rebuild them from (`image`: component, output, rows, image_token_id, positions).
    embeds: np.ndarray | None = None
    rope: np.ndarray | None = None
    image: dict | None = None
    deepstack: list[np.ndarray] | None = None  # Qwen3-VL: the prefill's deepstack_embeds_i `[B, S, H]` fp16


def image_scenario(cfg: ModelConfig, lookup, features: np.ndarray, counts, image_token_id: int, extra_ids,
                   positions_fn, deepstack: dict[str, np.ndarray] | None = None, seed: int = 20261202,
                   assemble: dict | None = None, component: str = "visual", output: str = "output",
                   start: int | None = None, end: int | None = None, native: bool = False) -> Scenario:
    """Text, then one image (or audio clip) per entry of `counts` (its rows of `features`, in order, between the
    checkpoint's `start` / `end` tokens when it has them), text; prefill, then DECODE_STEPS teacher-forced steps.
    Two copies of that request in one batch: the golden pass runs every scenario at the text scenarios' batch of
    2. `lookup(ids)` gives the token embeddings `[S, H]` fp16, `positions_fn(prompt)` MRoPE positions `[3, S]`
    (None: plain RoPE). The MRoPE table (`rope`) is the caller's to set, once the bundle's capacity is known.
    `deepstack` (Qwen3-VL): the encoder's deepstack outputs by name, scattered at the image tokens (zeros
    elsewhere) into the prefill's deepstack_embeds_i, in the dict's order (the index i). `assemble` (Phi-4-MM):
    how the validation side lays the encoder's rows out before scattering them (`features` are already laid out).
    `component` / `output`: the encoder and its output the validation side scatters (audio: an audio scenario).
    `native`: the per-step inputs of the plugin-free form, as `make_scenarios` gives them."""
    from edgellm_core.multimodal import scatter_features

    rng = np.random.default_rng(seed)
    special = {image_token_id, *extra_ids.values()}
    text = [int(t) for t in rng.integers(0, cfg.vocab_size, 64) if int(t) not in special]
    prompt = text[:3]
    for n in counts:
        prompt += [start] if start is not None else []
        prompt += [image_token_id] * n
        prompt += [end] if end is not None else []
    prompt += text[3:5]
    forced = text[5:5 + DECODE_STEPS]
    rows = sum(counts)
    one = scatter_features(np.asarray(lookup(prompt), np.float16)[None], prompt, image_token_id, features[:rows])
    embeds = np.concatenate([one, one])
    positions = positions_fn(prompt)
    n = len(prompt)
    steps = [Step("prefill", np.asarray([prompt] * 2, np.int64), np.asarray([n] * 2, np.int32),
                  np.zeros(2 if native else 0, np.int32), np.asarray([[n - 1]] * 2, np.int64))]
    for k, tok in enumerate(forced):
        steps.append(Step("decode", np.asarray([[tok]] * 2, np.int64), np.asarray([1 if native else n + k + 1] * 2,
                                                                                 np.int32),
                          np.asarray([n + k] * 2, np.int32), np.zeros((2, 1), np.int64)))
    kind = "audio" if component == "audio" else "image"
    image = {"component": component, "output": output, "rows": [0, rows], f"{kind}_token_id": image_token_id,
             "positions": None if positions is None else positions.tolist()}
    if assemble is not None:
        image["assemble"] = assemble
    stacked = None
    if deepstack:
        zeros = np.zeros((1, n, cfg.hidden_size), np.float16)
        stacked = [np.concatenate([scatter_features(zeros, prompt, image_token_id, rows_[:rows])] * 2)
                   for rows_ in deepstack.values()]
        image["deepstack"] = list(deepstack)
    return Scenario(f"{kind}_prefill_decode", steps, embeds, None, image, stacked)


def _padded(seqs: list[list[int]]) -> np.ndarray:
    width = max(len(s) for s in seqs)
    return np.array([s + [0] * (width - len(s)) for s in seqs], dtype=np.int64)


def make_scenarios(vocab_size: int, seed: int = 20261128, *, native: bool = False) -> list[Scenario]:
    """The scenarios with the per-step inputs the runtime feeds. `native` (`trt_native_ops`, native.md):
    kvcache_start_index is `[B]` on every step (zeros on a fresh prefill, never the plugin path's empty
    tensor) and a decode step's context_lengths is 1 (the length of Q), not the cached length + 1."""
    rng = np.random.default_rng(seed)
    prompts = [rng.integers(0, vocab_size, n).tolist() for n in PROMPT_LENGTHS]
    forced = rng.integers(0, vocab_size, (DECODE_STEPS, len(prompts))).tolist()
    lens = np.array(PROMPT_LENGTHS, dtype=np.int32)

    def prefill(chunks, starts):
        n = np.array([len(c) for c in chunks], dtype=np.int32)
        fresh = np.zeros(len(chunks) if native else 0, np.int32)
        start = np.array(starts, dtype=np.int32) if starts is not None else fresh
        phase = "prefill" if starts is None else "chunked_prefill"
        return Step(phase, _padded(chunks), n, start, (n - 1).astype(np.int64)[:, None])

    def decodes(committed):
        steps = []
        for k, toks in enumerate(forced):
            done = committed + k  # tokens already in the cache
            ctx = np.ones_like(done) if native else done + 1
            steps.append(Step("decode", np.array(toks, dtype=np.int64)[:, None], ctx.astype(np.int32),
                              done.astype(np.int32), np.zeros((len(toks), 1), np.int64)))
        return steps

    plain = Scenario("prefill_decode", [prefill(prompts, None), *decodes(lens)])
    first = [p[:c] for p, c in zip(prompts, CHUNK_FIRST)]
    rest = [p[c:] for p, c in zip(prompts, CHUNK_FIRST)]
    chunked = Scenario("chunked_prefill_decode",
                       [prefill(first, None), prefill(rest, list(CHUNK_FIRST)), *decodes(lens)])
    return [plain, chunked]


def reference_rope_table(cfg: ModelConfig, capacity: int = KV_CAPACITY) -> np.ndarray:
    """[1, Cap, R] fp32 table of what the checkpoint means (not what a runtime builds); NoPE attention
    (Nemotron-H) means no rotation: cos 1, sin 0."""
    if not cfg.use_rope:
        r = cfg.rotary_dim
        return np.concatenate([np.ones((capacity, r // 2)), np.zeros((capacity, r // 2))], -1)[None].astype(
            np.float32)
    inv, scale = reference_inv_freq_and_scale(cfg, capacity)
    ang = np.arange(capacity, dtype=np.float64)[:, None] * inv[None, :]
    return (np.concatenate([np.cos(ang), np.sin(ang)], axis=-1) * scale)[None].astype(np.float32)


class GoldenRun:
    """Consumes the weight stream layer by layer and computes the expected logits."""

    def __init__(self, cfg: ModelConfig, family, embed_ref, scenarios: list[Scenario], quant=None, *,
                 native: bool = False, kv_capacity: int = KV_CAPACITY):
        """`native`: attention in the plugin-free form, whose caches have the graph's static `kv_capacity`."""
        import torch

        self.torch = torch
        self.cfg = cfg
        self.quant = quant
        self.scenarios = scenarios
        self.native, self.kv_capacity = native, kv_capacity
        self.layer_cls, self.head_cls = family.torch_modules()
        plain = torch.from_numpy(reference_rope_table(cfg, kv_capacity))
        # One table per scenario (a KV cache each): an image scenario brings its own (MRoPE) table.
        self.table = [plain if sc.rope is None else torch.from_numpy(sc.rope) for sc in scenarios]
        emb = embed_ref.view()
        # Hidden states of every step of every scenario, in execution order; an image scenario's prefill starts
        # from its embeddings with the encoder's rows in place.
        self.hidden = [(torch.from_numpy(sc.embeds).float() if k == 0 and sc.embeds is not None
                        else emb[torch.from_numpy(st.token_ids)].float().half().float())
                       for sc in scenarios for k, st in enumerate(sc.steps)]
        # Deepstack features (Qwen3-VL image scenario) by flat step index, added after decoder layer i.
        flat = [(sc, k) for sc in scenarios for k in range(len(sc.steps))]
        self.deepstack = {j: [torch.from_numpy(d).float() for d in sc.deepstack]
                          for j, (sc, k) in enumerate(flat) if k == 0 and sc.deepstack}
        self.pending: dict[str, object] = {}
        self.pending_layer: int | None = None
        self.streaming = None  # (layer module, x after its mixer, sizes, the MoE's eager Stream)

    def consume(self, name: str, tensor) -> None:
        """Called by the weight writer with each initializer as it is written.

        Layer tensors arrive grouped by layer, then the head's (`norm.weight`, the lm_head);
        `finish()` runs the head once everything has arrived.
        """
        layer = int(name.split(".", 2)[1]) if name.startswith("layers.") else None
        if (self.pending or self.streaming) and self.pending_layer is not None and layer != self.pending_layer:
            self._run_layer()  # the previous layer is complete
        self.pending_layer = layer
        if (layer is not None and name.endswith(".stacked") and self.cfg.mlp(layer) in (SOFTMAX_MOE, SIGMOID_MOE)
                and not self._packed_experts(layer)):
            self._take_stack(layer, name.split(".")[-2], tensor)  # used now, not kept
            return
        self.pending[name] = tensor

    def _packed_experts(self, layer: int) -> bool:
        """Experts in a quantized plugin's packed layout: kept whole, not streamed stack by stack."""
        prefix = f"layers.{layer}.mlp.experts."
        linears = self.quant.linears if self.quant is not None else {}
        return any(k.startswith(prefix) and q.format != "fp16" for k, q in linears.items())

    def _take_stack(self, index: int, proj: str, stack) -> None:
        torch = self.torch
        if self.streaming is None:  # everything before the stacks has arrived: run up to the MoE
            layer = self.layer_cls(self.cfg, self.pending, self.quant, index)
            states = [layer.initial_state(sc.steps[0].token_ids.shape[0], V0_7, self.kv_capacity)
                      for sc in self.scenarios]
            sizes = [x.shape[1] for x in self.hidden]
            x = layer.mix(torch.cat(self.hidden, dim=1), sizes, states, self.table, self._calls())
            self.streaming = (layer, x, sizes, layer.mlp_stream(x))
            self.pending = {}
        self.streaming[3].take(proj, stack)

    def finish(self) -> None:
        if self.pending_layer is not None:
            self._run_layer()
        self._run_head()

    def _calls(self):
        torch = self.torch
        return [(i, torch.from_numpy(st.context_lengths), torch.from_numpy(st.kvcache_start_index))
                for i, sc in enumerate(self.scenarios) for st in sc.steps]

    def _run_layer(self) -> None:
        if self.streaming is not None:
            layer, x, sizes, stream = self.streaming
            layer.t.update({k.split(".", 2)[2]: v for k, v in self.pending.items()})  # declared after the stacks
            x = linear_r16(x + stream.result(layer.t, layer.quant))
            self.hidden = list(x.split(sizes, 1))
            self.pending, self.streaming = {}, None
            self._add_deepstack(self.pending_layer)
            return
        layer = self.layer_cls(self.cfg, self.pending, self.quant, self.pending_layer, native=self.native)
        # One state per scenario (a KV cache, or a hybrid layer's conv and recurrent states), zeroed as the
        # runtime's are, carried across the scenario's steps.
        states = [layer.initial_state(sc.steps[0].token_ids.shape[0], V0_7, self.kv_capacity)
                  for sc in self.scenarios]
        self.hidden, _ = layer.forward_steps(self.hidden, states, self.table, self._calls())
        self.pending = {}
        self._add_deepstack(self.pending_layer)

    def _add_deepstack(self, layer: int) -> None:
        """After decoder layer i < Nd, the image scenario's prefill takes deepstack_embeds_i (the graph's Add)."""
        for j, features in self.deepstack.items():
            if layer < len(features):
                self.hidden[j] = linear_r16(self.hidden[j] + features[layer])

    def _run_head(self) -> None:
        torch = self.torch
        head = self.head_cls(self.cfg, self.pending, self.quant)
        steps = [st for sc in self.scenarios for st in sc.steps]
        logits = head.forward_steps(self.hidden, [torch.from_numpy(st.last_token_ids) for st in steps])
        for st, out in zip(steps, logits):
            st.logits = out[:, 0, :].numpy().astype(np.float32)
        self.pending = {}


def write_bundle(out_dir: Path, scenarios: list[Scenario], *, precision: str, kv_capacity: int = KV_CAPACITY) -> None:
    from safetensors.numpy import save_file

    d = out_dir / BUNDLE_DIR
    d.mkdir(parents=True, exist_ok=True)
    meta = {"format": FORMAT, "kv_capacity": kv_capacity, "precision": precision, "scenarios": []}
    arrays = {}
    for sc in scenarios:
        steps = []
        for k, st in enumerate(sc.steps):
            key = f"{sc.name}.{k}"
            arrays[key] = np.ascontiguousarray(st.logits)
            steps.append({
                "phase": st.phase,
                "token_ids": st.token_ids.tolist(),
                "context_lengths": st.context_lengths.tolist(),
                "kvcache_start_index": st.kvcache_start_index.tolist(),
                "last_token_ids": st.last_token_ids.tolist(),
                "logits": key,
            })
        media = {} if not sc.image else {"audio" if sc.image["component"] == "audio" else "image": sc.image}
        meta["scenarios"].append({"name": sc.name, "steps": steps, **media})
    (d / BUNDLE_FILE).write_text(json.dumps(meta, indent=1) + "\n")
    save_file(arrays, str(d / LOGITS_FILE))
    (d / LOGITS_FILE).chmod(0o644)  # save_file creates it private; the bundle ships to devices

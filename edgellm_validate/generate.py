"""`edgellm run OUT --prompt ...`: generate text from an export on the runtime twin.

A listening check before an export goes to a device: the prompt is tokenized with the
export's own tokenizer.json (the `tokenizers` library; nothing from the checkpoint is
executed), optionally formatted with processed_chat_template.json the way the runtime
formats a chat request, prefilled in one step and decoded one token at a time with the
carried state (KV caches, recurrent states) fed back in place, exactly as `validate`
drives the graph (`twin.Twin`). Text is streamed as it is decoded.

Torch-free, like the rest of edgellm_validate; `tokenizers` is imported only here.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edgellm_core.errors import EnvironmentProblem, ExportError

from .export_dir import find_llm_dir
from .runtime_rules import RuntimeRefusal

CHAT_TEMPLATE_FILE = "processed_chat_template.json"
# llm_build's default --maxKVCacheCapacity (the CPU twin's default capacity, capped by the model's range).
DEFAULT_KV_CAPACITY = 4096


# ------------------------------------------------------------------ the export's files


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ExportError(f"is not valid JSON ({e})", path) from None
    if not isinstance(data, dict):
        raise ExportError("must contain a JSON object", path)
    return data


def load_tokenizer(llm: Path):
    """The export's tokenizer.json through the `tokenizers` library (never transformers, no remote code)."""
    path = llm / "tokenizer.json"
    if not path.is_file():
        raise ExportError("the export has no tokenizer.json, so prompts cannot be tokenized; the checkpoint it was "
                          "exported from had none (Edge-LLM's llm_build needs it too): add the model's "
                          "tokenizer.json (and tokenizer_config.json) to the checkpoint and export again", llm)
    try:
        from tokenizers import Tokenizer
    except ImportError as e:
        raise EnvironmentProblem(f"`edgellm run` needs the tokenizers library, which cannot be imported ({e}); "
                                 "install it with `pip install tokenizers`") from None
    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:  # noqa: BLE001 - the library raises plain Exceptions for malformed files
        raise ExportError(f"cannot be loaded by the tokenizers library ({e})", path) from None


def _token_text(value) -> str | None:
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def eos_token_ids(llm: Path, tokenizer) -> list[int]:
    """Stop ids: `eos_token_id` of config.json and generation_config.json (int or list) where the export
    has them, and tokenizer_config.json's `eos_token` (what the runtime's tokenizer reads)."""
    ids: list[int] = []
    for name in ("config.json", "generation_config.json"):
        if (llm / name).is_file():
            value = _read_json(llm / name).get("eos_token_id")
            for v in value if isinstance(value, list) else [value]:
                if isinstance(v, int) and not isinstance(v, bool) and v >= 0:
                    ids.append(v)
    if (llm / "tokenizer_config.json").is_file():
        text = _token_text(_read_json(llm / "tokenizer_config.json").get("eos_token"))
        tid = tokenizer.token_to_id(text) if text else None
        if tid is not None:
            ids.append(int(tid))
    return sorted(set(ids))


@dataclass
class ChatTemplate:
    """processed_chat_template.json (contract text.md §6.4): the runtime's prefix/suffix form."""

    roles: dict
    generation_prompt: str = ""
    default_system_prompt: str = ""

    @classmethod
    def load(cls, llm: Path) -> ChatTemplate:
        path = llm / CHAT_TEMPLATE_FILE
        if not path.is_file():
            raise ExportError(f"the export has no {CHAT_TEMPLATE_FILE}, so --chat cannot format the prompt "
                              "(run without --chat, or export again)", llm)
        data = _read_json(path)
        if not isinstance(data.get("roles"), dict):
            raise ExportError("has no 'roles' object (the Edge-LLM runtime rejects it too)", path)
        return cls(data["roles"], data.get("generation_prompt") or "", data.get("default_system_prompt") or "")

    def render(self, messages: list[dict]) -> str:
        """prefix + content + suffix per message, the default system prompt injected when there is no system
        message (only if non-empty), then the generation prompt: how the runtime builds a chat request."""
        if self.default_system_prompt and not any(m["role"] == "system" for m in messages):
            messages = [{"role": "system", "content": self.default_system_prompt}, *messages]
        parts = []
        for m in messages:
            role = self.roles.get(m["role"]) or {}
            parts.append((role.get("prefix") or "") + m["content"] + (role.get("suffix") or ""))
        return "".join(parts) + self.generation_prompt


def encode_prompt(llm: Path, tokenizer, prompt: str, *, chat: bool = False, system: str | None = None) -> list[int]:
    """Prompt ids. Plain: the tokenizer's own special-token handling (e.g. a BOS post-processor), as HF's
    `tokenizer(prompt)`; --chat: the processed template's text, whose markers are already in it, tokenized
    without adding special tokens, as HF's `apply_chat_template(..., add_generation_prompt=True)`."""
    if not chat:
        return list(tokenizer.encode(prompt, add_special_tokens=True).ids)
    messages = ([{"role": "system", "content": system}] if system is not None else []) + \
        [{"role": "user", "content": prompt}]
    text = ChatTemplate.load(llm).render(messages)
    return list(tokenizer.encode(text, add_special_tokens=False).ids)


# ------------------------------------------------------------------ sampling, detokenisation


class Sampler:
    """Greedy when temperature is 0; else temperature + top-p (nucleus) from a seeded numpy generator,
    so the same seed, prompt and export give the same tokens."""

    def __init__(self, temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None):
        if temperature < 0 or not np.isfinite(temperature):
            raise ExportError(f"--temperature must be >= 0, got {temperature}")
        if not 0 < top_p <= 1:
            raise ExportError(f"--top-p must be in (0, 1], got {top_p}")
        self.temperature, self.top_p = float(temperature), float(top_p)
        self.seed = int(seed) if seed is not None else int(np.random.SeedSequence().entropy % 2**32)
        self.rng = np.random.default_rng(self.seed)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def __call__(self, logits: np.ndarray) -> int:
        logits = np.asarray(logits, np.float64)
        if self.greedy:
            return int(np.argmax(logits))
        z = logits / self.temperature
        probs = np.exp(z - z.max())
        probs /= probs.sum()
        order = np.argsort(-probs, kind="stable")
        sorted_probs = probs[order]
        # The smallest prefix whose mass reaches top_p (always at least the top token).
        keep = int(np.searchsorted(np.cumsum(sorted_probs), self.top_p, side="left")) + 1
        kept = sorted_probs[:keep] / sorted_probs[:keep].sum()
        return int(order[min(int(np.searchsorted(np.cumsum(kept), self.rng.random(), side="right")), keep - 1)])


class StreamDecoder:
    """Incremental detokenisation: text is released only once its bytes are complete, so a multi-byte
    character split over several tokens is never printed as U+FFFD halves (the offsets scheme of HF's
    text-generation-inference: decode a short window, emit what it adds)."""

    def __init__(self, tokenizer, skip_special_tokens: bool = False):
        self.tokenizer = tokenizer
        self.skip = skip_special_tokens
        self.ids: list[int] = []
        self.prefix = self.read = 0

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip)

    def push(self, token_id: int) -> str:
        self.ids.append(int(token_id))
        before = self._decode(self.ids[self.prefix:self.read])
        after = self._decode(self.ids[self.prefix:])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self.prefix, self.read = self.read, len(self.ids)
            return after[len(before):]
        return ""

    def flush(self) -> str:
        """Whatever is still held back at the end (an incomplete character decodes to U+FFFD)."""
        before = self._decode(self.ids[self.prefix:self.read])
        after = self._decode(self.ids[self.prefix:])
        self.prefix = self.read = len(self.ids)
        return after[len(before):]


# ------------------------------------------------------------------ the generation loop


@dataclass
class Generation:
    prompt_ids: list[int]
    capacity: int
    eos_ids: list[int]
    tokens: list[int] = field(default_factory=list)
    stop_reason: str | None = None  # "eos", "max_new_tokens", "kv_capacity", or None while running
    load_seconds: float = 0.0
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    decode_steps: int = 0


class Generator:
    """An export and its tokenizer; the backend is opened on the first `generate` (so a bad prompt is refused
    before the graph is loaded). `generate` yields one token id at a time."""

    def __init__(self, out_dir: Path, *, backend=None, kv_capacity: int | None = None, threads: int | None = None):
        self.llm = find_llm_dir(out_dir, need=("config.json", "embedding.safetensors"))
        self.tokenizer = load_tokenizer(self.llm)
        self.config = _read_json(self.llm / "config.json")
        self.eos_ids = eos_token_ids(self.llm, self.tokenizer)
        max_pos = int(self.config.get("max_position_embeddings") or DEFAULT_KV_CAPACITY)
        if kv_capacity is not None and kv_capacity < 1:
            raise ExportError(f"--kv-capacity must be >= 1, got {kv_capacity}")
        self.capacity = int(kv_capacity) if kv_capacity else min(DEFAULT_KV_CAPACITY, max_pos)
        self.backend, self.threads, self.twin = backend, threads, None
        self.load_seconds = 0.0

    def open(self):
        """The backend and the twin over it (idempotent)."""
        if self.twin is None:
            from .twin import Twin

            t0 = time.perf_counter()
            if self.backend is None:
                try:
                    from .cpu_backend import CpuBackend
                except ImportError as e:
                    raise EnvironmentProblem(f"the CPU twin needs onnxruntime, which cannot be imported ({e}); "
                                             "install it with `pip install onnxruntime`") from None
                self.backend = CpuBackend(self.llm, threads=self.threads)
            try:
                self.twin = Twin(self.llm, self.backend, self.capacity)
            except RuntimeRefusal as e:
                raise ExportError(f"the Edge-LLM runtime would refuse this export: {e}", self.llm) from None
            self.load_seconds = time.perf_counter() - t0
        return self.twin

    def close(self) -> None:
        if self.backend is not None:
            self.backend.close()
            self.backend = None
        self.twin = None

    def encode(self, prompt: str, *, chat: bool = False, system: str | None = None) -> list[int]:
        return encode_prompt(self.llm, self.tokenizer, prompt, chat=chat, system=system)

    def check_prompt(self, ids: list[int]) -> None:
        if not ids:
            raise ExportError("the prompt is empty after tokenization; give some text to --prompt")
        if len(ids) > self.capacity:
            raise ExportError(f"the prompt is {len(ids)} tokens, longer than the KV capacity of {self.capacity} "
                              f"tokens (the model's max_position_embeddings is "
                              f"{self.config.get('max_position_embeddings')}); shorten the prompt or raise "
                              "--kv-capacity")

    def generate(self, prompt_ids: list[int], *, max_new_tokens: int, sampler: Sampler,
                 between_steps: Callable[[], None] | None = None, gen: Generation | None = None) -> Iterator[int]:
        """Prefill, then decode until EOS (not yielded), max_new_tokens, or a full KV cache; yields token ids.
        `gen` (optional) receives the tokens, timings and stop reason as they happen."""
        self.check_prompt(prompt_ids)
        gen = gen if gen is not None else Generation(list(prompt_ids), self.capacity, self.eos_ids)
        twin = self.open()
        gen.load_seconds = self.load_seconds
        if max_new_tokens < 1:
            gen.stop_reason = "max_new_tokens"
            return
        n = len(prompt_ids)
        t0 = time.perf_counter()
        state = twin.new_state(1)
        logits, state = twin.step(state, [prompt_ids], [n], [], [n - 1])
        gen.prefill_seconds = time.perf_counter() - t0
        while True:
            token = sampler(logits[0])
            if token in self.eos_ids:
                gen.stop_reason = "eos"
                break
            gen.tokens.append(token)
            yield token
            if len(gen.tokens) >= max_new_tokens:
                gen.stop_reason = "max_new_tokens"
                break
            pos = n + len(gen.tokens) - 1  # where the new token's K/V go
            if pos >= self.capacity:
                gen.stop_reason = "kv_capacity"
                break
            if between_steps is not None:
                between_steps()
            t0 = time.perf_counter()
            logits, state = twin.step(state, [[token]], [pos + 1], [pos], [0])
            gen.decode_seconds += time.perf_counter() - t0
            gen.decode_steps += 1


# ------------------------------------------------------------------ the command


def _rate(n: int, seconds: float) -> str:
    return f"{n / seconds:,.1f} tokens/s" if seconds > 0 and n else "-"


def run_command(out_dir: Path, prompt: str, *, max_new_tokens: int = 128, chat: bool = False,
                system: str | None = None, temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None,
                kv_capacity: int | None = None, threads: int | None = None, quiet: bool = False,
                between_steps: Callable[[], None] | None = None, stdout=None, stderr=None) -> Generation:
    """`edgellm run`: stream the generated text to stdout, a stop line and a speed line to stderr.
    KeyboardInterrupt from `between_steps` propagates after the text so far is flushed (stats included)."""
    stdout = stdout or sys.stdout
    stderr = stderr or sys.stderr
    if system is not None and not chat:
        raise ExportError("--system needs --chat (a system message only exists in a chat-formatted prompt)")
    if max_new_tokens < 1:
        raise ExportError(f"--max-new-tokens must be >= 1, got {max_new_tokens}")
    sampler = Sampler(temperature, top_p, seed)
    generator = Generator(out_dir, kv_capacity=kv_capacity, threads=threads)
    try:
        ids = generator.encode(prompt, chat=chat, system=system)
        generator.check_prompt(ids)  # before the graph is loaded
        generator.open()
        gen = Generation(ids, generator.capacity, generator.eos_ids)
        stream = StreamDecoder(generator.tokenizer)
        try:
            for token in generator.generate(ids, max_new_tokens=max_new_tokens, sampler=sampler,
                                            between_steps=between_steps, gen=gen):
                piece = stream.push(token)
                if piece:
                    stdout.write(piece)
                    stdout.flush()
        except KeyboardInterrupt:  # Ctrl-C between steps: end the line, say how far it got, stop
            stdout.write(stream.flush() + "\n")
            stdout.flush()
            if not quiet:
                _report(gen, sampler, stderr)
            raise
        stdout.write(stream.flush() + "\n")
        stdout.flush()
        if not quiet:
            _report(gen, sampler, stderr)
        return gen
    finally:
        generator.close()


def _report(gen: Generation, sampler: Sampler, stderr) -> None:
    reasons = {
        "eos": "end-of-sequence token",
        "max_new_tokens": f"--max-new-tokens ({len(gen.tokens)})",
        "kv_capacity": f"the KV cache is full: its {gen.capacity} slots hold the prompt ({len(gen.prompt_ids)} "
                       f"tokens) and the first {len(gen.tokens) - 1} generated tokens; raise --kv-capacity for "
                       "longer answers",
        None: "interrupted",
    }
    how = "greedy" if sampler.greedy else f"temperature {sampler.temperature:g}, top-p {sampler.top_p:g}, " \
                                          f"seed {sampler.seed}"
    print(f"[stopped: {reasons[gen.stop_reason]}; {how}]", file=stderr)
    print(f"prompt: {len(gen.prompt_ids)} tokens in {gen.prefill_seconds:.3f} s "
          f"({_rate(len(gen.prompt_ids), gen.prefill_seconds)}); decode: {gen.decode_steps} tokens in "
          f"{gen.decode_seconds:.3f} s ({_rate(gen.decode_steps, gen.decode_seconds)}); "
          f"session load {gen.load_seconds:.2f} s", file=stderr, flush=True)

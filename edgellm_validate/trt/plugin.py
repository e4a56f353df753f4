"""Loading the Edge-LLM plugin library (`libNvInfer_edgellm_plugin.so`) into this process.

The library registers its TensorRT plugin creators from static initialisers when it is
loaded, so loading it with `RTLD_GLOBAL` before parsing or deserialising is all TensorRT
needs; it is then never unloaded (llm_build uses `RTLD_NODELETE` for the same reason: engines
keep calling plugin code). Its path comes from an explicit argument or `EDGELLM_PLUGIN_PATH`.
Unlike llm_build we do not fall back to `build/libNvInfer_edgellm_plugin.so` relative to the
working directory: a library picked up by accident is a worse failure than a clear error.
"""

from __future__ import annotations

import ctypes
import os
import threading
from dataclasses import dataclass
from pathlib import Path

from edgellm_core.digests import sha256_file
from edgellm_core.errors import EnvironmentProblem

PLUGIN_ENV = "EDGELLM_PLUGIN_PATH"
LIBRARY_NAME = "libNvInfer_edgellm_plugin.so"
# Plugins an Edge-LLM 0.7 dense decoder needs (op_type, version, namespace).
ATTENTION_PLUGIN = ("AttentionPlugin", "1", "")


def exported_plugins() -> list[tuple[str, str, str]]:
    """(op_type, version, namespace) of every Edge-LLM plugin an export of this tool can contain: the
    `trt_edgellm` ops of edgellm_core.ops (version 1, empty namespace, as the exporter writes them).
    A validation image's smoke check wants all of them registered, before any export exists."""
    from edgellm_core.ops import CUSTOM_OPS
    from edgellm_core.ops.attention_plugin import DOMAIN

    return sorted({(op_type, "1", "") for domain, op_type in CUSTOM_OPS if domain == DOMAIN})
_HOW = (f"build {LIBRARY_NAME} from TensorRT-Edge-LLM 0.7.x against the TensorRT this Python imports, "
        f"and set {PLUGIN_ENV} to its absolute path")


class PluginProblem(EnvironmentProblem):
    """The plugin library is missing, unloadable, or does not provide a plugin the graph uses."""


@dataclass(frozen=True)
class LoadedPlugin:
    path: Path  # resolved, absolute
    source: str  # "argument" or the environment variable's name
    handle: ctypes.CDLL

    def record(self) -> dict:
        """For build records: which library built an engine."""
        st = self.path.stat()
        return {"path": str(self.path), "source": self.source, "size": st.st_size, "sha256": sha256_file(self.path)}


_loaded: dict[Path, LoadedPlugin] = {}
_lock = threading.Lock()


def resolve_plugin_path(path: str | os.PathLike | None = None, environ: dict | None = None) -> tuple[Path, str]:
    """(absolute path, where it came from); raises PluginProblem saying what to do."""
    env = os.environ if environ is None else environ
    if path is not None and str(path) != "":
        raw, source = str(path), "argument"
    else:
        raw, source = env.get(PLUGIN_ENV, ""), PLUGIN_ENV
        if not raw.strip():
            raise PluginProblem(f"the TensorRT backend needs the Edge-LLM plugin library, and {PLUGIN_ENV} is "
                                f"not set; {_HOW}")
    p = Path(os.path.expanduser(raw.strip()))
    given = f"{source} ({raw})" if source == PLUGIN_ENV else "the plugin path given"
    if not p.is_absolute():
        p = Path.cwd() / p
    if not p.exists():
        raise PluginProblem(f"{given} names a file that does not exist; {_HOW}", p)
    if p.is_dir():
        cand = p / LIBRARY_NAME
        if cand.is_file():
            p = cand
        else:
            raise PluginProblem(f"{given} is a directory without {LIBRARY_NAME} in it; {_HOW}", p)
    if not p.is_file():
        raise PluginProblem(f"{given} is not a regular file", p)
    if not os.access(p, os.R_OK):
        raise PluginProblem(f"{given} is not readable by this user", p)
    return p.resolve(), source


def load_plugin_library(path: str | os.PathLike | None = None, environ: dict | None = None) -> LoadedPlugin:
    """dlopen the library once per process (RTLD_GLOBAL, never unloaded); idempotent for the same file."""
    resolved, source = resolve_plugin_path(path, environ)
    with _lock:
        if resolved in _loaded:
            return _loaded[resolved]
        if _loaded:
            other = next(iter(_loaded))
            raise PluginProblem(f"another Edge-LLM plugin library ({other}) is already loaded in this process; "
                                "two libraries would register the same plugin creators. Use one library per "
                                "process", resolved)
        mode = ctypes.RTLD_GLOBAL | getattr(os, "RTLD_NODELETE", 0)
        try:
            handle = ctypes.CDLL(str(resolved), mode=mode)
        except OSError as e:
            raise PluginProblem(
                f"cannot be loaded ({e}). Usual causes: built for another CPU architecture or against another "
                "TensorRT/CUDA than this machine has (libnvinfer, libcudart must resolve), or not a shared library",
                resolved) from None
        plugin = LoadedPlugin(resolved, source, handle)
        _loaded[resolved] = plugin
        return plugin


def missing_creators(registry, wanted: list[tuple[str, str, str]]) -> list[tuple[str, str, str]]:
    """The (op_type, version, namespace) triples the TensorRT plugin registry has no creator for.

    `get_creator` (TensorRT 10+) is asked first; the deprecated `get_plugin_creator` (V2 creators,
    gone in TensorRT 11) is the fallback, since 0.7.1's AttentionPlugin is an IPluginV2DynamicExt.
    """
    getters = [g for g in (getattr(registry, "get_creator", None), getattr(registry, "get_plugin_creator", None))
               if g is not None]
    return [w for w in wanted if all(g(*w) is None for g in getters)]


def check_creators(trt, plugin: LoadedPlugin | None, wanted: list[tuple[str, str, str]]) -> None:
    """Raise PluginProblem when a plugin the graph uses is not registered with TensorRT."""
    missing = missing_creators(trt.get_plugin_registry(), wanted)
    if missing:
        names = ", ".join(f"{n} v{v}" + (f" (namespace {ns!r})" if ns else "") for n, v, ns in missing)
        lib = f"the loaded library {plugin.path}" if plugin else "no Edge-LLM plugin library was loaded and TensorRT"
        raise PluginProblem(f"{lib} does not register {names}, which the graph uses; it may be built from another "
                            f"Edge-LLM release or with those kernels disabled; {_HOW}")

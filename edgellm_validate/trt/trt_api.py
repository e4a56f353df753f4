"""Small shared pieces of the TensorRT path: the lazy import, one process-lifetime logger,
dtype mapping, and which plugins an ONNX graph needs. Only `import_tensorrt` and
`process_logger` touch TensorRT; the rest is pure.
"""

from __future__ import annotations

import collections
import logging
import threading

import numpy as np

from edgellm_core.errors import EnvironmentProblem

from ..targets import NATIVE_MIN_TENSORRT  # a plugin-free (trt_native_ops) graph's TensorRT floor

log = logging.getLogger("edgellm.trt")

STANDARD_DOMAINS = {"", "ai.onnx", "ai.onnx.ml"}
# TensorRT-native custom ops (TRT_FP4DynamicQuantize, TRT_MXFP8*, ...): implemented by the parser, no plugin.
TRT_NATIVE_DOMAIN = "trt"


def import_tensorrt():
    try:
        import tensorrt as trt
    except ImportError as e:
        raise EnvironmentProblem(
            f"the TensorRT backend needs the `tensorrt` Python module, which cannot be imported ({e}). It comes "
            "with the target's TensorRT: JetPack / DriveOS apt packages for the system Python (a virtualenv needs "
            "--system-site-packages) or an NVIDIA container image. `pip install tensorrt` installs a TensorRT "
            "that will not match the one the Edge-LLM plugin was built against") from None
    return trt


def tensorrt_version(trt) -> str:
    return str(getattr(trt, "__version__", "unknown"))


# TensorRT versions each Edge-LLM release's plugin library works with, [low, high). 0.7.1 is built against
# TensorRT 10 (libnvinfer.so.10; JetPack 6.2 ships 10.3, JetPack 7.1 10.13.3.9) and its AttentionPlugin is a
# V2 plugin, whose registry path TensorRT 11 removed (contract engine-build-and-containers.md §2.2).
SUPPORTED_TENSORRT = {"0.7": ((10, 3), (11, 0))}


def supported_tensorrt(release: str | None, *, native: bool = False) -> tuple[tuple[int, int], tuple[int, int]]:
    """[low, high) TensorRT (major, minor) for an Edge-LLM release (`native`: a trt_native_ops export, which also
    needs NATIVE_MIN_TENSORRT). The image build checks the same range (containers.build_args)."""
    key = ".".join((release or "0.7").split(".")[:2])
    low, high = SUPPORTED_TENSORRT.get(key, SUPPORTED_TENSORRT["0.7"])
    return (max(low, NATIVE_MIN_TENSORRT) if native else low), high


def check_tensorrt_version(trt, release: str | None, *, native: bool = False) -> None:
    """EnvironmentProblem (exit 3) when this TensorRT is outside what the export's Edge-LLM release supports
    (`native`: a trt_native_ops export, which also needs NATIVE_MIN_TENSORRT)."""
    low, high = supported_tensorrt(release, native=native)
    version = tensorrt_version(trt)
    try:
        have = tuple(int(p) for p in version.split("-")[0].split(".")[:2])
    except ValueError:
        have = None
    if have is None or len(have) < 2 or not (low <= have < high):
        raise EnvironmentProblem(
            f"TensorRT {version} is outside what the Edge-LLM {release or '0.7'} "
            + ("runtime needs for a plugin-free (trt_native_ops) export" if native else "plugin library works with")
            + f" (TensorRT {low[0]}.{low[1]} up to, not including, {high[0]}.{high[1]}); "
            + ("build or run it with an image whose TensorRT is in that range (target x86-cuda-native)" if native
               else "use the TensorRT of the target's JetPack / DriveOS image (JetPack 6.2: 10.3, JetPack 7.1: "
                    "10.13.3.9)"))


class _LogSink:
    """Keeps the last messages so a failed parse or build can quote TensorRT's own errors."""

    def __init__(self, keep: int = 200):
        self.messages: collections.deque[tuple[str, str]] = collections.deque(maxlen=keep)

    def errors(self, since: int = 0) -> list[str]:
        return [m for sev, m in list(self.messages)[since:] if sev in ("INTERNAL_ERROR", "ERROR")]


SINK = _LogSink()
_loggers: dict[str, object] = {}  # per tensorrt module (tests use a stand-in); never released
_logger_lock = threading.Lock()
_LEVELS = {"INTERNAL_ERROR": logging.CRITICAL, "ERROR": logging.ERROR, "WARNING": logging.WARNING,
           "INFO": logging.INFO, "VERBOSE": logging.DEBUG}


def process_logger(trt, verbose: bool = False):
    """The one TensorRT logger of this process.

    TensorRT keeps the first logger it is given; a per-call logger that Python later collects
    crashes later builds (contract §4.1), so this one lives as long as the process.
    """
    key = f"{getattr(trt, '__name__', '')}:{id(trt)}"
    with _logger_lock:
        logger = _loggers.get(key)
        if logger is None:
            class EdgeLLMLogger(trt.ILogger):
                def __init__(self):
                    trt.ILogger.__init__(self)
                    self.verbose = False

                def log(self, severity, msg):
                    name = severity_name(severity)
                    if name == "VERBOSE" and not self.verbose:
                        return
                    SINK.messages.append((name, str(msg)))
                    log.log(_LEVELS.get(name, logging.INFO), "TensorRT: %s", msg)

            logger = _loggers[key] = EdgeLLMLogger()
        logger.verbose = verbose
        return logger


def severity_name(severity) -> str:
    return enum_name(severity)


def enum_name(value) -> str:
    """`trt.DataType.HALF` -> "HALF" (pybind11 enums have `.name`; fall back to the repr)."""
    name = getattr(value, "name", None)
    if isinstance(name, str):
        return name
    return str(value).rsplit(".", 1)[-1]


def numpy_dtype(trt_dtype) -> np.dtype:
    """numpy dtype for a TensorRT tensor dtype; FP8 / BF16 through ml_dtypes."""
    name = enum_name(trt_dtype)
    simple = {"FLOAT": np.float32, "HALF": np.float16, "INT8": np.int8, "INT32": np.int32, "INT64": np.int64,
              "BOOL": np.bool_, "UINT8": np.uint8}
    if name in simple:
        return np.dtype(simple[name])
    if name in ("FP8", "BF16"):
        import ml_dtypes

        return np.dtype(ml_dtypes.float8_e4m3fn if name == "FP8" else ml_dtypes.bfloat16)
    raise TypeError(f"TensorRT dtype {name} has no numpy equivalent for I/O binding")


def required_plugins(model) -> list[tuple[str, str, str]]:
    """(op_type, plugin version, namespace) for every node the ONNX parser must resolve to a plugin.

    The parser looks a non-standard op up by op_type with version "1" and an empty namespace unless the
    node carries `plugin_version` / `plugin_namespace` attributes (contract text.md §3.1). `trt`-domain
    nodes are TensorRT's own ops and need no plugin.
    """
    seen: dict[tuple[str, str, str], None] = {}
    for node in model.graph.node:
        if node.domain in STANDARD_DOMAINS or node.domain == TRT_NATIVE_DOMAIN:
            continue
        attrs = {a.name: a for a in node.attribute}
        version = attrs["plugin_version"].s.decode() if "plugin_version" in attrs else "1"
        namespace = attrs["plugin_namespace"].s.decode() if "plugin_namespace" in attrs else ""
        seen[(node.op_type, version, namespace)] = None
    return list(seen)

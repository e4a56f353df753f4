"""The TensorRT backend and its stand-in (tests/fake_tensorrt.py) against the REAL TensorRT Python API.

The real bindings of one 10.x and one 11.x release are imported (in subprocesses, over stand-in libraries;
see tests/fixtures/real_trt_bindings.py) and their classes, members, enum values and pybind11 signatures
compared with (1) every TensorRT name the backend's source uses, with the positional / keyword arguments it
passes, and (2) every public name the fake offers. A name only some supported versions have must be
feature-detected (`hasattr` / `getattr(..., default)`) by the backend. Skips when the wheels cannot be had.
"""

from __future__ import annotations

import ast
import enum
import inspect
import re
from dataclasses import dataclass
from pathlib import Path

import pytest
from fixtures import real_trt_bindings as rtb

ROOT = Path(__file__).resolve().parents[1]
TRT_DIR = ROOT / "edgellm_validate" / "trt"
FAKE = Path(__file__).resolve().parent / "fake_tensorrt.py"
MODULE = "<module>"

# What each receiver expression in the backend's source is, per file (the names come from TensorRT's docs:
# Builder.create_network -> INetworkDefinition, Runtime.deserialize_cuda_engine -> ICudaEngine, ...).
RECEIVERS = {
    "build.py": {"trt": MODULE, "builder": "Builder", "bconfig": "IBuilderConfig", "network": "INetworkDefinition",
                 "parser": "OnnxParser", "p": "IOptimizationProfile", "network.get_input(i)": "ITensor"},
    "runner.py": {"self.trt": MODULE, "self._runtime": "Runtime", "self.engine": "ICudaEngine",
                  "self.context": "IExecutionContext"},
    "plugin.py": {"trt": MODULE, "registry": "IPluginRegistry"},
    "trt_api.py": {"trt": MODULE, "trt.ILogger": "ILogger"},
    "backend.py": {"self.trt": MODULE},
}
# Files with no TensorRT object at all (cuda_device.py's `self.context` is a pycuda context).
NO_TRT = {"__init__.py", "cuda_device.py", "profiles.py", "visual_profiles.py", "audio_profiles.py"}
# Calls the AST cannot see: plugin.missing_creators calls get_creator / get_plugin_creator as `g(*w)` with
# (op_type, version, namespace); trt_api's logger overrides ILogger.log(severity, msg).
DYNAMIC_CALLS = [("IPluginRegistry", "get_creator", 3, set()), ("IPluginRegistry", "get_plugin_creator", 3, set())]
# String enum-member names the backend compares against (trt_api._LEVELS, trt_api.numpy_dtype).
ENUM_NAMES = {("ILogger", "Severity"): {"INTERNAL_ERROR", "ERROR", "WARNING", "INFO", "VERBOSE"},
              ("DataType",): {"FLOAT", "HALF", "INT8", "INT32", "INT64", "BOOL", "UINT8", "FP8", "BF16"}}


@pytest.fixture(scope="module")
def apis():
    return {v: rtb.real_api_or_skip(v) for v in rtb.VERSIONS}


def test_pybind_signature_parsing():
    doc = ("deserialize_cuda_engine(*args, **kwargs)\nOverloaded function.\n\n"
           "1. deserialize_cuda_engine(self: tensorrt.Runtime, serialized_engine: buffer) -> tensorrt.ICudaEngine\n\n"
           "    Deserialize...\n\n"
           "2. deserialize_cuda_engine(self: tensorrt.Runtime, stream_reader: tensorrt.IStreamReader) -> x\n")
    assert rtb.signatures("deserialize_cuda_engine", doc) == [[("serialized_engine", False)],
                                                               [("stream_reader", False)]]
    doc = ("get_creator(self: tensorrt.IPluginRegistry, type: str, version: str, plugin_namespace: str = '') -> "
           "tensorrt.IPluginCreatorInterface\n")
    sigs = rtb.signatures("get_creator", doc)
    assert sigs == [[("type", False), ("version", False), ("plugin_namespace", True)]]
    assert rtb.accepts(sigs, 2, set()) and rtb.accepts(sigs, 3, set()) and rtb.accepts(sigs, 2, {"plugin_namespace"})
    assert not rtb.accepts(sigs, 1, set()) and not rtb.accepts(sigs, 4, set()) and not rtb.accepts(sigs, 2, {"ns"})
    doc = "set_shape(self: X, input: str, min: Dims, opt: Dims = Dims((1, 2)), max: Dict[str, int] = {}) -> None"
    assert [p for p, _ in rtb.signatures("set_shape", doc)[0]] == ["input", "min", "opt", "max"]


# ---------------------------------------------------------------- lookups in a dumped API


def lookup(api: dict, owner: str | tuple, name: str | None = None) -> dict | None:
    """The entry for `owner.name` (owner: a class name, a nested path, or MODULE)."""
    mod = api["module"]
    if owner == MODULE:
        return mod.get(name)
    path = (owner,) if isinstance(owner, str) else owner
    entry = mod.get(path[0])
    for part in path[1:]:
        entry = (entry or {}).get("members", {}).get(part)
    if entry is None or name is None:
        return entry
    if name in entry.get("enum_members", ()):
        return {"kind": "enum_value"}
    return entry.get("members", {}).get(name)


def has(api, owner, name) -> bool:
    return lookup(api, owner, name) is not None


def overloads(api, owner, name) -> list:
    """Signatures of a method, or of a class's constructor when `name` is a class on the module."""
    entry = lookup(api, owner, name)
    if entry is None:
        return []
    if entry.get("kind") in ("class", "enum"):
        init = entry["members"].get("__init__", {})
        return rtb.signatures("__init__", init.get("doc", ""))
    return rtb.signatures(name, entry.get("doc", ""))


# ---------------------------------------------------------------- (1) what the backend uses


@dataclass(frozen=True)
class Use:
    file: str
    line: int
    owner: str | tuple  # MODULE, a class name, or (class, nested enum)
    name: str
    call: tuple | None  # (n positional, keywords) when called
    guarded: bool  # reached through hasattr / getattr(..., default)
    store: bool = False  # assigned to (a property must be writable)


def _constants(tree) -> dict[str, str]:
    return {t.id: n.value.value for n in tree.body if isinstance(n, ast.Assign)
            for t in n.targets if isinstance(t, ast.Name) and isinstance(n.value, ast.Constant)
            and isinstance(n.value.value, str)}


def backend_uses() -> list[Use]:
    uses = []
    for path in sorted(TRT_DIR.glob("*.py")):
        if path.name in NO_TRT:
            continue
        receivers = RECEIVERS[path.name]
        tree = ast.parse(path.read_text())
        consts = _constants(tree)
        calls = {id(n.func): n for n in ast.walk(tree) if isinstance(n, ast.Call)}

        def owner_of(expr, receivers=receivers):
            src = ast.unparse(expr)
            if src in receivers:
                return receivers[src]
            # trt.X (a class or enum on the module) as the receiver of .Y
            if isinstance(expr, ast.Attribute) and receivers.get(ast.unparse(expr.value)) == MODULE:
                return expr.attr
            if isinstance(expr, ast.Attribute) and isinstance(expr.value, ast.Attribute) and \
                    receivers.get(ast.unparse(expr.value.value)) == MODULE:
                return (expr.value.attr, expr.attr)
            return None

        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute):
                owner = owner_of(node.value)
                if owner is None:
                    continue
                call = calls.get(id(node))
                shape = None
                if call is not None:
                    shape = (len(call.args), frozenset(k.arg for k in call.keywords if k.arg))
                uses.append(Use(path.name, node.lineno, owner, node.attr, shape, False,
                                isinstance(node.ctx, ast.Store)))
            elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and \
                    node.func.id in ("getattr", "hasattr") and len(node.args) >= 2:
                owner = owner_of(node.args[0])
                key = node.args[1]
                name = key.value if isinstance(key, ast.Constant) else consts.get(getattr(key, "id", ""))
                if owner is None or not isinstance(name, str):
                    continue
                guarded = node.func.id == "hasattr" or len(node.args) == 3
                uses.append(Use(path.name, node.lineno, owner, name, None, guarded))
    return uses


def _guarded_names(uses) -> set:
    return {(u.owner, u.name) for u in uses if u.guarded}


def _guard_dominates(uses) -> set:
    """(owner, name) pairs the backend checks with hasattr / getattr(default) somewhere: a direct access of
    the same name elsewhere is then behind that check (e.g. `if hasattr(trt.BuilderFlag, "MONITOR_MEMORY")`)."""
    return _guarded_names(uses)


def test_backend_source_walk_sees_the_trt_calls():
    """The AST walk finds the calls the backend is known to make (guards the walk itself)."""
    seen = {(u.owner, u.name) for u in backend_uses()}
    for expected in [(MODULE, "Builder"), ("Builder", "build_serialized_network"), ("IBuilderConfig", "set_flag"),
                     ("INetworkDefinition", "get_input"), ("OnnxParser", "parse_from_file"),
                     ("IOptimizationProfile", "set_shape"), ("Runtime", "deserialize_cuda_engine"),
                     ("ICudaEngine", "get_tensor_profile_shape"), ("IExecutionContext", "execute_async_v3"),
                     (MODULE, "get_plugin_registry"), ("IPluginRegistry", "get_creator"), ("ITensor", "name"),
                     ("ILogger", "__init__"), ("BuilderFlag", "MONITOR_MEMORY"), ("TensorIOMode", "INPUT"),
                     ("ICudaEngine", "device_memory_size_v2"), ("PreviewFeature", "ALIASED_PLUGIN_IO_10_03")]:
        assert expected in seen, expected


# TensorRT objects the backend holds under a name the walk does not follow, and why that is enough.
UNTRACKED_RESULTS = {("build.py", "plan"): "IHostMemory: only bytes(plan), see the buffer test below"}


def test_every_trt_source_file_is_mapped():
    names = {p.name for p in TRT_DIR.glob("*.py")}
    assert names <= set(RECEIVERS) | NO_TRT, f"map the TensorRT receivers of {sorted(names - set(RECEIVERS) - NO_TRT)}"


def _returned_class(api, owner, name) -> str | None:
    """The TensorRT class a method returns (or a constructor makes), from the pybind11 signature."""
    entry = lookup(api, owner, name)
    if entry is None:
        return None
    if entry.get("kind") == "class":
        return name
    m = re.search(r"\) -> (?:tensorrt_bindings\.)?tensorrt\.(\w+)", entry.get("doc", ""))
    if m and lookup(api, m.group(1)) is not None and lookup(api, m.group(1))["kind"] == "class":
        return m.group(1)
    return None


def test_walk_follows_every_trt_object_the_backend_keeps(apis):
    """A TensorRT object kept in a variable the walk does not map would hide its uses from these tests."""
    api = apis[rtb.VERSIONS[0]]
    problems = []
    for path in sorted(TRT_DIR.glob("*.py")):
        if path.name in NO_TRT:
            continue
        receivers = RECEIVERS[path.name]
        for node in ast.walk(ast.parse(path.read_text())):
            if not (isinstance(node, ast.Assign) and isinstance(node.value, ast.Call)
                    and isinstance(node.value.func, ast.Attribute)):
                continue
            func = node.value.func
            owner = receivers.get(ast.unparse(func.value))
            if owner is None and isinstance(func.value, ast.Attribute) and \
                    receivers.get(ast.unparse(func.value.value)) == MODULE:
                owner = func.value.attr
            if owner is None:
                continue
            made = _returned_class(api, owner, func.attr)
            for target in node.targets:
                key = ast.unparse(target)
                if made and key not in receivers and (path.name, key) not in UNTRACKED_RESULTS:
                    problems.append(f"{path.name}:{node.lineno} {key} = {owner}.{func.attr}(...) -> {made}: add "
                                    f"{key!r} to RECEIVERS[{path.name!r}]")
                elif made and key in receivers and receivers[key] != made:
                    problems.append(f"{path.name}:{node.lineno} {key} is mapped to {receivers[key]}, real {made}")
    assert not problems, "\n".join(problems)


def test_every_trt_name_the_backend_uses_exists(apis):
    uses = backend_uses()
    guarded = _guard_dominates(uses)
    problems, differing = [], {}
    for u in uses:
        present = {v: has(api, u.owner, u.name) for v, api in apis.items()}
        if u.owner == MODULE and u.name.startswith("__"):
            continue  # __name__, __version__: every module has them (getattr with a default anyway)
        if not any(present.values()):
            problems.append(f"{u.file}:{u.line} {u.owner}.{u.name}: in no supported TensorRT")
        elif not all(present.values()):
            differing[(u.owner, u.name)] = sorted(v for v, p in present.items() if p)
            if (u.owner, u.name) not in guarded:
                problems.append(f"{u.file}:{u.line} {u.owner}.{u.name} only in {differing[(u.owner, u.name)]} "
                                "but is used without hasattr / getattr(default)")
    assert not problems, "\n".join(problems)
    # What is known to differ, and feature-detected: keep this list honest when versions move.
    assert set(differing) <= {("ICudaEngine", "device_memory_size"), ("ICudaEngine", "device_memory_size_v2"),
                              ("IPluginRegistry", "get_plugin_creator")}, differing


def test_backend_call_shapes_match_real_signatures(apis):
    problems = []
    calls = [u for u in backend_uses() if u.call is not None]
    calls += [Use("plugin.py", 0, o, n, (k, frozenset(kw)), True) for o, n, k, kw in DYNAMIC_CALLS]
    for u in calls:
        n_pos, kws = u.call
        for v, api in apis.items():
            entry = lookup(api, u.owner, u.name)
            if entry is None:
                continue  # absence is the other test's business
            if u.name == "__init__":  # trt.ILogger.__init__(self): self is passed explicitly
                sigs, n_pos = rtb.signatures("__init__", entry.get("doc", "")), n_pos - 1
            else:
                sigs = overloads(api, u.owner, u.name)
            if not sigs:
                problems.append(f"{v}: {u.owner}.{u.name} has no readable signature")
            elif not rtb.accepts(sigs, n_pos, set(kws)):
                problems.append(f"{v}: {u.file}:{u.line} {u.owner}.{u.name} called with {n_pos} positional "
                                f"+ {sorted(kws)}; real overloads {sigs}")
    assert not problems, "\n".join(problems)


def test_backend_assigns_only_writable_properties(apis):
    stores = [u for u in backend_uses() if u.store]
    assert (("IBuilderConfig", "profiling_verbosity")) in {(u.owner, u.name) for u in stores}
    for u in stores:
        for v, api in apis.items():
            entry = lookup(api, u.owner, u.name)
            assert entry and entry["kind"] == "property" and entry["writable"], (v, u)


def test_serialized_plan_and_flags_as_the_backend_treats_them(apis):
    """`bytes(plan)` needs IHostMemory's buffer protocol; the network flag is `1 << int(enum)`, whose value
    moved (STRONGLY_TYPED is 1 in 10.x, 0 in 11.x where EXPLICIT_BATCH is gone), so it must never be hard-coded."""
    for v, api in apis.items():
        assert lookup(api, "IHostMemory")["buffer"], v
        assert "STRONGLY_TYPED" in lookup(api, "NetworkDefinitionCreationFlag")["enum_members"], v
    src = (TRT_DIR / "build.py").read_text()
    assert "1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)" in src


def test_fake_enum_values_match_a_real_version(apis):
    """Where the backend does arithmetic on an enum (IntEnum in the fake), the fake's values are a real version's."""
    import fake_tensorrt

    fake = {m.name: int(m) for m in fake_tensorrt.NetworkDefinitionCreationFlag}
    real = {v: lookup(api, "NetworkDefinitionCreationFlag")["enum_values"] for v, api in apis.items()}
    assert any(all(r.get(k) == i for k, i in fake.items()) for r in real.values()), (fake, real)


def test_logger_override_matches_ilogger_log(apis):
    from edgellm_validate.trt import trt_api

    src = inspect.getsource(trt_api.process_logger)
    tree = ast.parse(src.strip() if src.startswith(" ") else src)
    log_def = next(n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name == "log")
    ours = [a.arg for a in log_def.args.args[1:]]
    for v, api in apis.items():
        sigs = rtb.signatures("log", lookup(api, "ILogger", "log")["doc"])
        assert [[p for p, _ in s] for s in sigs] == [ours], (v, sigs, ours)


def test_enum_member_names_the_backend_compares_exist(apis):
    for path, names in ENUM_NAMES.items():
        for v, api in apis.items():
            entry = lookup(api, path)
            assert entry is not None and names <= set(entry["enum_members"]), (v, path, names)


# ---------------------------------------------------------------- (2) the fake offers nothing real TensorRT lacks

FAKE_CLASSES = {"ILogger": "ILogger", "_Registry": "IPluginRegistry", "_Network": "INetworkDefinition",
                "_Tensor": "ITensor", "OnnxParser": "OnnxParser", "_Profile": "IOptimizationProfile",
                "_Config": "IBuilderConfig", "Builder": "Builder", "Runtime": "Runtime", "_Engine": "ICudaEngine",
                "_Context": "IExecutionContext"}


def _fake_surface():
    """[(real owner, name, params or None, where)] for every public name the fake offers as TensorRT."""
    import fake_tensorrt

    tree = ast.parse(FAKE.read_text())
    fake_only = set(fake_tensorrt.FAKE_ONLY)
    out = []
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and node.name in FAKE_CLASSES:
            owner = FAKE_CLASSES[node.name]
            state = set(getattr(getattr(fake_tensorrt, node.name), "FAKE_STATE", ()))
            for item in node.body:
                public_init = item.name == "__init__" if isinstance(item, ast.FunctionDef) and \
                    not node.name.startswith("_") else False  # private fake classes: made by the fake only
                if isinstance(item, ast.FunctionDef) and (not item.name.startswith("_") or public_init):
                    params = [a.arg for a in item.args.args[1:]]
                    out.append((owner, item.name, params, f"{node.name}.{item.name}"))
                elif isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name) and \
                        not item.target.id.startswith("_") and item.target.id not in state:
                    out.append((owner, item.target.id, None, f"{node.name}.{item.target.id}"))
            for sub in ast.walk(node):
                if isinstance(sub, (ast.Assign, ast.AnnAssign)):
                    for t in (sub.targets if isinstance(sub, ast.Assign) else [sub.target]):
                        if isinstance(t, ast.Attribute) and isinstance(t.value, ast.Name) and t.value.id == "self" \
                                and not t.attr.startswith("_") and t.attr not in state:
                            out.append((owner, t.attr, None, f"{node.name}.{t.attr} (instance attribute)"))
        elif isinstance(node, (ast.FunctionDef, ast.ClassDef)) and not node.name.startswith("_") and \
                node.name not in fake_only and node.name not in FAKE_CLASSES:
            out.append((MODULE, node.name, None, node.name))
        elif isinstance(node, ast.Assign):
            for t in node.targets:
                if isinstance(t, ast.Name) and not t.id.startswith("_") and t.id not in fake_only:
                    out.append((MODULE, t.id, None, t.id))
    # enum members
    for name in dir(fake_tensorrt):
        obj = getattr(fake_tensorrt, name)
        if isinstance(obj, type) and issubclass(obj, enum.Enum) and not name.startswith("_"):
            out += [(name, m, None, f"{name}.{m}") for m in obj.__members__]
    severity = fake_tensorrt.ILogger.Severity
    out += [(("ILogger", "Severity"), m, None, f"ILogger.Severity.{m}") for m in severity.__members__]
    return out


def test_fake_offers_only_real_tensorrt_names(apis):
    problems = []
    for owner, name, params, where in _fake_surface():
        if name == "__version__":
            continue
        have = [v for v, api in apis.items() if has(api, owner, name)]
        if not have:
            problems.append(f"fake_tensorrt {where}: real TensorRT has no {owner}.{name}")
            continue
        if params is None:
            continue
        sig_name = "__init__" if name == "__init__" else name
        ok = False
        for v in have:
            entry = lookup(api=apis[v], owner=owner, name=name)
            sigs = rtb.signatures(sig_name, entry.get("doc", ""))
            if any([p for p, _ in s][:len(params)] == params for s in sigs) or (not sigs and not params):
                ok = True
        if not ok:
            sigs = rtb.signatures(sig_name, lookup(apis[have[0]], owner, name).get("doc", ""))
            problems.append(f"fake_tensorrt {where}({', '.join(params)}): real parameters are {sigs}")
    assert not problems, "\n".join(problems)


def test_fake_methods_and_properties_are_real_methods_and_properties(apis):
    """A fake method where TensorRT has a property (or the reverse) would let `x.num_inputs()` pass the fake."""
    problems = []
    for node in ast.parse(FAKE.read_text()).body:
        if not (isinstance(node, ast.ClassDef) and node.name in FAKE_CLASSES):
            continue
        for item in node.body:
            if not isinstance(item, ast.FunctionDef) or item.name.startswith("_"):
                continue
            fake_kind = "property" if any(ast.unparse(d) == "property" for d in item.decorator_list) else "function"
            for v, api in apis.items():
                entry = lookup(api, FAKE_CLASSES[node.name], item.name)
                if entry is not None and entry["kind"] != fake_kind:
                    problems.append(f"{v}: fake {node.name}.{item.name} is a {fake_kind}, real one a {entry['kind']}")
    assert not problems, "\n".join(problems)


def test_backend_calls_only_methods(apis):
    problems = []
    for u in backend_uses():
        if u.call is None:
            continue
        for v, api in apis.items():
            entry = lookup(api, u.owner, u.name)
            if entry is not None and entry["kind"] in ("property", "value", "enum_value"):
                problems.append(f"{v}: {u.file}:{u.line} calls {u.owner}.{u.name}, a {entry['kind']}")
    assert not problems, "\n".join(problems)


def test_no_python_copy_of_a_serialized_engine():
    """Issue 12: on unified-memory boards an engine-sized copy in Python's heap is memory the engine itself
    needs. The build writes and hashes the IHostMemory buffer in place (a memoryview, which the real
    IHostMemory supports, checked above); the runner maps the engine file instead of reading it."""
    import ast
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "edgellm_validate" / "trt"
    for name in ("build.py", "runner.py"):
        tree = ast.parse((root / name).read_text())
        calls = [n for n in ast.walk(tree) if isinstance(n, ast.Call)]
        copies = [ast.unparse(c) for c in calls
                  if (isinstance(c.func, ast.Name) and c.func.id == "bytes" and c.args
                      and "plan" in ast.unparse(c.args[0]))
                  or (isinstance(c.func, ast.Attribute) and c.func.attr == "read_bytes")]
        assert copies == [], f"{name}: {copies}"
    assert "mmap.mmap(" in (root / "runner.py").read_text()


@pytest.mark.parametrize("version,ok", [("10.3.0.30", True), ("10.13.3.9", True), ("10.16.1.11", True),
                                        ("10.2.0", False), ("11.4.0.106", False), ("8.6.1", False),
                                        ("unknown", False)])
def test_tensorrt_version_policy_for_0_7(version, ok):
    """0.7.1's plugin library: TensorRT 10.3 up to (not including) 11; outside that, exit 3 with the reason."""
    from types import SimpleNamespace

    from edgellm_core.errors import EnvironmentProblem
    from edgellm_validate.trt.trt_api import check_tensorrt_version

    trt = SimpleNamespace(__version__=version)
    if ok:
        check_tensorrt_version(trt, "0.7.1")
    else:
        with pytest.raises(EnvironmentProblem, match="outside what the Edge-LLM 0.7.1 plugin library works with") as e:
            check_tensorrt_version(trt, "0.7.1")
        assert e.value.exit_code == 3 and version in str(e.value)

"""Finding and loading the Edge-LLM plugin library: clear environment errors, loaded once, RTLD_GLOBAL."""

from __future__ import annotations

import _ctypes
import ctypes
from pathlib import Path

import pytest

from edgellm_core.errors import EnvironmentProblem
from edgellm_validate.trt import plugin as plugin_mod
from edgellm_validate.trt.plugin import (
    LIBRARY_NAME,
    PLUGIN_ENV,
    PluginProblem,
    check_creators,
    load_plugin_library,
    missing_creators,
    resolve_plugin_path,
)

# Any real shared object works as a stand-in for loading: this interpreter's own _ctypes module.
SOME_SO = Path(_ctypes.__file__).resolve()


@pytest.fixture(autouse=True)
def fresh_registry(monkeypatch):
    monkeypatch.setattr(plugin_mod, "_loaded", {})


def test_env_unset_is_an_environment_problem():
    with pytest.raises(PluginProblem) as e:
        resolve_plugin_path(None, environ={})
    assert isinstance(e.value, EnvironmentProblem) and e.value.exit_code == 3
    msg = str(e.value)
    assert PLUGIN_ENV in msg and "not set" in msg and LIBRARY_NAME in msg and "absolute path" in msg


def test_blank_env_counts_as_unset():
    with pytest.raises(PluginProblem, match="not set"):
        resolve_plugin_path(None, environ={PLUGIN_ENV: "  "})


def test_env_pointing_nowhere_names_the_path(tmp_path):
    missing = tmp_path / "build" / LIBRARY_NAME
    with pytest.raises(PluginProblem) as e:
        resolve_plugin_path(None, environ={PLUGIN_ENV: str(missing)})
    assert e.value.path == str(missing) and PLUGIN_ENV in str(e.value) and "does not exist" in str(e.value)


def test_explicit_path_wins_over_env(tmp_path):
    lib = tmp_path / LIBRARY_NAME
    lib.write_bytes(b"\x7fELF")
    path, source = resolve_plugin_path(lib, environ={PLUGIN_ENV: "/nonexistent.so"})
    assert path == lib.resolve() and source == "argument"
    path, source = resolve_plugin_path(None, environ={PLUGIN_ENV: str(lib)})
    assert path == lib.resolve() and source == PLUGIN_ENV


def test_directory_holding_the_library_is_accepted(tmp_path):
    (tmp_path / LIBRARY_NAME).write_bytes(b"\x7fELF")
    assert resolve_plugin_path(tmp_path, environ={})[0] == (tmp_path / LIBRARY_NAME).resolve()
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(PluginProblem, match="directory without"):
        resolve_plugin_path(empty, environ={})


def test_relative_path_is_taken_from_the_working_directory(tmp_path, monkeypatch):
    (tmp_path / "build").mkdir()
    (tmp_path / "build" / LIBRARY_NAME).write_bytes(b"\x7fELF")
    monkeypatch.chdir(tmp_path)
    path, _ = resolve_plugin_path(None, environ={PLUGIN_ENV: f"build/{LIBRARY_NAME}"})
    assert path.is_absolute() and path == (tmp_path / "build" / LIBRARY_NAME).resolve()


def test_no_silent_fallback_to_the_build_directory(tmp_path, monkeypatch):
    """llm_build would pick up build/libNvInfer_edgellm_plugin.so from the CWD; we don't."""
    (tmp_path / "build").mkdir()
    (tmp_path / "build" / LIBRARY_NAME).write_bytes(b"\x7fELF")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(PLUGIN_ENV, raising=False)
    with pytest.raises(PluginProblem, match="not set"):
        resolve_plugin_path()


def test_unloadable_file_is_an_environment_problem(tmp_path):
    bad = tmp_path / LIBRARY_NAME
    bad.write_bytes(b"this is not a shared library")
    with pytest.raises(PluginProblem) as e:
        load_plugin_library(bad)
    assert "cannot be loaded" in str(e.value) and e.value.path == str(bad.resolve())
    assert list(plugin_mod._loaded.values()) == []


def test_load_once_global_and_kept(monkeypatch):
    modes = []
    real_cdll = ctypes.CDLL

    def spy(path, mode=0, **k):
        modes.append(mode)
        return real_cdll(path, mode=mode, **k)

    monkeypatch.setattr(plugin_mod.ctypes, "CDLL", spy)
    first = load_plugin_library(SOME_SO, environ={})
    again = load_plugin_library(None, environ={PLUGIN_ENV: str(SOME_SO)})
    assert again is first and len(modes) == 1  # dlopen'ed once
    assert modes[0] & ctypes.RTLD_GLOBAL
    assert list(plugin_mod._loaded.values()) == [first]
    rec = first.record()
    assert rec["path"] == str(SOME_SO) and len(rec["sha256"]) == 64 and rec["size"] > 0


def test_a_second_different_library_is_refused(tmp_path):
    load_plugin_library(SOME_SO, environ={})
    other = Path(ctypes.__file__).resolve().parent.parent / "lib-dynload"
    candidates = [p for p in other.glob("*.so") if p.resolve() != SOME_SO] if other.is_dir() else []
    if not candidates:
        pytest.skip("no second shared object to try")
    with pytest.raises(PluginProblem, match="already loaded"):
        load_plugin_library(candidates[0], environ={})


class Registry:
    def __init__(self, names):
        self.names = names

    def get_creator(self, name, version, namespace):
        return object() if (name, version, namespace) in self.names else None


class OldRegistry:  # TensorRT before get_creator: only the V2 lookup
    def get_plugin_creator(self, name, version, namespace):
        return object() if name == "AttentionPlugin" else None


def test_creator_checks():
    wanted = [("AttentionPlugin", "1", ""), ("Int4GroupwiseGemmPlugin", "1", "")]
    assert missing_creators(Registry({("AttentionPlugin", "1", "")}), wanted) == [wanted[1]]
    assert missing_creators(OldRegistry(), wanted[:1]) == []

    class Trt:
        @staticmethod
        def get_plugin_registry():
            return Registry({("AttentionPlugin", "1", "")})

    check_creators(Trt, None, wanted[:1])
    with pytest.raises(PluginProblem) as e:
        check_creators(Trt, None, wanted)
    assert "Int4GroupwiseGemmPlugin v1" in str(e.value) and e.value.exit_code == 3


def test_image_smoke_wants_every_plugin_an_export_can_need(monkeypatch):
    """The validation image's smoke check asks the plugin registry for every trt_edgellm op the exporter
    emits (AttentionPlugin, Int4GroupwiseGemmPlugin, the MoE plugins Int4MoePlugin, NvFP4MoEPluginGeforce and
    Nvfp4MoePlugin (version "1", default namespace, as their 0.7.1 creators register), and the hybrids' causal_conv1d,
    gated_delta_net and update_ssm_state, registered under those names in 0.7.1's plugin sources), so an image
    whose plugin library lacks one fails at build time, not at the first INT4 or hybrid export's validation."""
    import sys

    import fake_tensorrt

    from edgellm_validate import smoke

    assert plugin_mod.exported_plugins() == [("AttentionPlugin", "1", ""), ("Int4GroupwiseGemmPlugin", "1", ""),
                                             ("Int4MoePlugin", "1", ""), ("NvFP4MoEPluginGeforce", "1", ""),
                                             ("Nvfp4MoePlugin", "1", ""), ("ViTAttentionPlugin", "1", ""),
                                             ("causal_conv1d", "1", ""),
                                             ("gated_delta_net", "1", ""), ("update_ssm_state", "1", "")]
    monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt)
    monkeypatch.setattr(smoke, "cuda_devices", lambda: ([{"name": "fake", "sm": 110}], "fake"))
    fake_tensorrt.reset()  # AttentionPlugin only
    report = smoke.run_smoke("thor-jp7", plugin_path=str(SOME_SO), engine_check=False)
    assert any("Int4GroupwiseGemmPlugin" in p for p in report["problems"]), report["problems"]
    fake_tensorrt.REGISTRY.creators.add(("Int4GroupwiseGemmPlugin", "1", ""))
    monkeypatch.setattr(plugin_mod, "_loaded", {})
    report = smoke.run_smoke("thor-jp7", plugin_path=str(SOME_SO), engine_check=False)
    assert any("gated_delta_net" in p for p in report["problems"]), report["problems"]
    fake_tensorrt.REGISTRY.creators.update(plugin_mod.exported_plugins())
    monkeypatch.setattr(plugin_mod, "_loaded", {})
    report = smoke.run_smoke("thor-jp7", plugin_path=str(SOME_SO), engine_check=False)
    assert not any("plugin" in p.lower() for p in report["problems"]), report["problems"]
    assert report["plugin"]["creators"] == [name for name, _, _ in plugin_mod.exported_plugins()]
    fake_tensorrt.reset()

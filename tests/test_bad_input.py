"""Bad input through the real CLI: one-paragraph error naming the file, exit 2, output untouched.

Every case starts from a valid checkpoint, exports it once to OUT (so there is a
previous export to protect), then breaks the checkpoint and exports again, both
to a fresh path (which must not appear) and to OUT (which must keep its bytes).
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import edgellm_export.export as export_mod
from edgellm_export.cli import main
from edgellm_export.demo_checkpoint import write_demo_checkpoint

PREFIX = "edgellm: error: "
DROPPED = "model.layers.1.mlp.down_proj.weight"


@pytest.fixture(scope="module")
def demo_template(tmp_path_factory):
    return write_demo_checkpoint(tmp_path_factory.mktemp("demo") / "ckpt")


@pytest.fixture
def ckpt(demo_template, tmp_path):
    return Path(shutil.copytree(demo_template, tmp_path / "ckpt"))


def cli(capsys, *argv) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main([str(a) for a in argv])
    cap = capsys.readouterr()
    return code, cap.out, cap.err


def digests(d: Path) -> dict[str, str]:
    return {str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(d.rglob("*")) if p.is_file()}


def leftovers(out: Path) -> list[str]:
    return sorted(p.name for p in out.parent.iterdir()
                  if p.name.startswith(f".{out.name}.partial-") or p.name.startswith(f".{out.name}.old-"))


def error_paragraph(err: str, quiet: bool) -> str:
    """The error text; stderr holds exactly one error line and nothing but progress lines besides."""
    assert "Traceback" not in err, err
    lines = err.splitlines()
    errors = [ln for ln in lines if ln.startswith(PREFIX)]
    assert len(errors) == 1, err
    assert lines[-1] == errors[0], f"text after the error line:\n{err}"
    if quiet:
        assert lines == errors, err
    else:
        assert all(ln.startswith("[edgellm] ") for ln in lines[:-1]), err
    text = errors[0][len(PREFIX):]
    assert text.strip() == text and "  " not in text and len(text) > 20
    return text


# -- breakers: each returns (name that must appear in the message, key phrases) ---------------
def _rewrite_config(ckpt: Path, **changes) -> None:
    cfg = json.loads((ckpt / "config.json").read_text())
    for k, v in changes.items():
        if v is None:
            del cfg[k]
        else:
            cfg[k] = v
    (ckpt / "config.json").write_text(json.dumps(cfg))


def _rewrite_weights(ckpt: Path, edit) -> None:
    tensors = load_file(ckpt / "model.safetensors")
    edit(tensors)
    save_file(tensors, ckpt / "model.safetensors", metadata={"format": "pt"})


def _make_sharded(ckpt: Path, weight_map_edit=None) -> dict:
    """Replace model.safetensors by two shards + index; returns the index's weight_map."""
    tensors = load_file(ckpt / "model.safetensors")
    (ckpt / "model.safetensors").unlink()
    names = sorted(tensors)
    halves = {"model-00001-of-00002.safetensors": names[: len(names) // 2],
              "model-00002-of-00002.safetensors": names[len(names) // 2:]}
    weight_map = {}
    for shard, keys in halves.items():
        save_file({k: tensors[k] for k in keys}, ckpt / shard, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(keys, shard))
    if weight_map_edit:
        weight_map_edit(weight_map)
    (ckpt / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map}))
    return weight_map


def missing_config(ckpt):
    (ckpt / "config.json").unlink()
    return "config.json", ["missing"]


def config_invalid_json(ckpt):
    (ckpt / "config.json").write_text('{"model_type": "llama", "hidden_size": 128,,}')
    return "config.json", ["not valid JSON"]


def config_missing_hidden_size(ckpt):
    _rewrite_config(ckpt, hidden_size=None)
    return "config.json", ["lacks the required field", "hidden_size"]


def truncated_shard(ckpt):
    p = ckpt / "model.safetensors"
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
    return "model.safetensors", ["truncated", "not a valid safetensors file"]


def garbage_header_json(ckpt):
    p = ckpt / "model.safetensors"
    raw = bytearray(p.read_bytes())
    hlen = int.from_bytes(raw[:8], "little")
    raw[8 : 8 + hlen] = (b"\x00garbage\xff" * hlen)[:hlen]  # keep the length, ruin the JSON
    p.write_bytes(bytes(raw))
    return "model.safetensors", ["not a valid safetensors file", "header"]


def garbage_header_length(ckpt):
    p = ckpt / "model.safetensors"
    raw = bytearray(p.read_bytes())
    raw[:8] = b"\xde\xad\xbe\xef" * 2
    p.write_bytes(bytes(raw))
    return "model.safetensors", ["not a valid safetensors file", "does not fit"]


def index_missing_shard(ckpt):
    _make_sharded(ckpt)
    (ckpt / "model-00002-of-00002.safetensors").unlink()
    return "model.safetensors.index.json", ["model-00002-of-00002.safetensors", "missing"]


def index_parent_escape(ckpt):
    # The file exists, so only the path check can refuse it.
    shutil.copyfile(ckpt / "model.safetensors", ckpt.parent / "outside.safetensors")

    def edit(wm):
        wm[DROPPED] = "../outside.safetensors"
    _make_sharded(ckpt, edit)
    return "model.safetensors.index.json", ["../outside.safetensors", "outside the checkpoint"]


def index_absolute_path(ckpt):
    def edit(wm):
        wm[DROPPED] = "/etc/passwd"
    _make_sharded(ckpt, edit)
    return "model.safetensors.index.json", ["/etc/passwd", "outside the checkpoint"]


def tensor_missing(ckpt):
    _rewrite_weights(ckpt, lambda t: t.pop(DROPPED))
    return "model.safetensors", ["missing", "layers.1.mlp.down_proj.weight"]


def tensor_wrong_shape(ckpt):
    def edit(t):
        t["model.layers.0.self_attn.k_proj.weight"] = t["model.layers.0.self_attn.k_proj.weight"][:-1].clone()
    _rewrite_weights(ckpt, edit)
    return "model.safetensors", ["model.layers.0.self_attn.k_proj.weight", "shape [127, 128]", "[128, 128]"]


def unknown_model_type(ckpt):
    _rewrite_config(ckpt, model_type="gpt_bigcode")
    return "config.json", ["'gpt_bigcode' is not supported"]


def only_pickled_bin(ckpt):
    tensors = load_file(ckpt / "model.safetensors")
    (ckpt / "model.safetensors").unlink()
    torch.save(tensors, ckpt / "pytorch_model.bin")
    return "pytorch_model.bin", ["pickled", "safetensors"]


CASES = [missing_config, config_invalid_json, config_missing_hidden_size, truncated_shard,
         garbage_header_json, garbage_header_length, index_missing_shard, index_parent_escape,
         index_absolute_path, tensor_missing, tensor_wrong_shape, unknown_model_type, only_pickled_bin]


@pytest.fixture
def no_unpickling(monkeypatch):
    """Any call to the unpicklers fails the test (and is recorded even if swallowed)."""
    calls = []

    def forbid(name):
        def f(*a, **k):
            calls.append(name)
            raise AssertionError(f"{name} called")
        return f

    for mod, attr in ((pickle, "load"), (pickle, "loads"), (pickle, "Unpickler"), (torch, "load"),
                      (torch.serialization, "load")):
        monkeypatch.setattr(mod, attr, forbid(f"{mod.__name__}.{attr}"))
    return calls


@pytest.mark.parametrize("breaker", CASES, ids=[c.__name__ for c in CASES])
def test_bad_checkpoint(breaker, ckpt, tmp_path, capsys, no_unpickling):
    prev = tmp_path / "prev"
    code, _, err = cli(capsys, "-q", "export", "--no-golden", ckpt, prev)
    assert code == 0, err
    before = digests(prev)
    assert "llm/model.onnx.data" in before

    culprit, phrases = breaker(ckpt)

    # Into a fresh path: nothing may appear, not even a partial sibling.
    fresh = tmp_path / "fresh"
    code, out, err = cli(capsys, "export", ckpt, fresh)
    assert code == 2, err
    assert out == ""
    text = error_paragraph(err, quiet=False)
    assert culprit in text, text
    for phrase in phrases:
        assert phrase in text, f"{phrase!r} not in: {text}"
    assert not fresh.exists()
    assert leftovers(fresh) == []

    # Over the previous export: it keeps every byte.
    code, out, err = cli(capsys, "-q", "export", ckpt, prev)
    assert code == 2
    assert error_paragraph(err, quiet=True) == text.replace(str(fresh), str(prev))
    assert digests(prev) == before
    assert leftovers(prev) == []
    assert no_unpickling == []


def test_only_bin_is_never_unpickled_even_with_index(ckpt, tmp_path, capsys, no_unpickling):
    """A pytorch_model.bin.index.json next to the .bin changes nothing."""
    only_pickled_bin(ckpt)
    (ckpt / "pytorch_model.bin.index.json").write_text(
        json.dumps({"weight_map": {DROPPED: "pytorch_model.bin"}}))
    code, _, err = cli(capsys, "export", ckpt, tmp_path / "out")
    assert code == 2
    assert "pytorch_model.bin" in error_paragraph(err, quiet=False)
    assert no_unpickling == []
    assert not (tmp_path / "out").exists() and leftovers(tmp_path / "out") == []


def test_output_path_is_a_file(ckpt, tmp_path, capsys):
    out = tmp_path / "out"
    out.write_bytes(b"precious")
    code, stdout, err = cli(capsys, "export", ckpt, out)
    assert code == 2
    assert stdout == ""
    text = error_paragraph(err, quiet=False)
    assert str(out) in text and "not a directory" in text
    assert out.read_bytes() == b"precious"
    assert leftovers(out) == []


def test_output_parent_is_a_file(ckpt, tmp_path, capsys):
    parent = tmp_path / "afile"
    parent.write_bytes(b"x")
    code, _, err = cli(capsys, "-q", "export", ckpt, parent / "out")
    assert code == 2
    text = error_paragraph(err, quiet=True)
    assert str(parent) in text and "parent directory" in text
    assert parent.read_bytes() == b"x"


@pytest.mark.parametrize("previous", [True, False], ids=["over-previous", "fresh"])
def test_keyboard_interrupt_while_writing_weights(previous, ckpt, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    before = None
    if previous:
        code, _, err = cli(capsys, "-q", "export", ckpt, out)  # with the golden bundle
        assert code == 0, err
        before = digests(out)
        assert "llm/golden/bundle.json" in before

    reached = []

    def interrupted(*args, **kwargs):
        # Something was already written into the temporary sibling when Ctrl-C hits.
        path = args[2]  # (graph, writer, path, ...)
        assert path.parent.parent.name.startswith(".out.partial-")
        assert (path.parent / "model.onnx").stat().st_size > 0
        reached.append(path)
        raise KeyboardInterrupt

    monkeypatch.setattr(export_mod, "_write_weights", interrupted)
    code, stdout, err = cli(capsys, "export", ckpt, out)
    assert len(reached) == 1
    assert code == 130
    assert stdout == ""
    assert "Traceback" not in err
    assert err.splitlines()[-1].startswith("edgellm: interrupted; no partial output was left")
    assert not reached[0].exists()
    assert leftovers(out) == []
    if previous:
        assert digests(out) == before
    else:
        assert not out.exists()


def test_missing_checkpoint_directory(tmp_path, capsys):
    code, _, err = cli(capsys, "-q", "export", tmp_path / "nope", tmp_path / "out")
    assert code == 2
    text = error_paragraph(err, quiet=True)
    assert str(tmp_path / "nope") in text and "does not exist" in text
    assert not (tmp_path / "out").exists() and leftovers(tmp_path / "out") == []


@pytest.mark.parametrize("where", ["checkpoint", "parent", "unrelated"])
def test_never_replaces_a_directory_that_is_not_an_export(where, ckpt, tmp_path, capsys):
    """OUT = the checkpoint (or a directory holding it) used to delete the checkpoint."""
    out = {"checkpoint": ckpt, "parent": ckpt.parent, "unrelated": tmp_path / "docs"}[where]
    if where == "unrelated":
        out.mkdir()
        (out / "notes.txt").write_text("keep me")
    before = digests(out)
    code, _, err = cli(capsys, "-q", "export", "--no-golden", ckpt, out)
    assert code == 2
    text = error_paragraph(err, quiet=True)
    assert str(out) in text
    assert ("replace the checkpoint" if where != "unrelated" else "refusing to replace it") in text
    assert digests(out) == before
    assert leftovers(out) == []


def test_replaces_an_empty_directory_and_an_earlier_export(ckpt, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    assert cli(capsys, "-q", "export", "--no-golden", ckpt, out)[0] == 0
    first = digests(out)
    (out / "validation.json").write_text("{}")  # what `edgellm validate` leaves behind
    assert cli(capsys, "-q", "export", "--no-golden", ckpt, out)[0] == 0
    assert digests(out) == first  # replaced as a whole, validation.json gone
    assert leftovers(out) == []


def test_failed_final_rename_restores_the_previous_export(ckpt, tmp_path, capsys, monkeypatch):
    import edgellm_export.output_dir as output_dir_mod

    out = tmp_path / "out"
    assert cli(capsys, "-q", "export", "--no-golden", ckpt, out)[0] == 0
    before = digests(out)
    real_rename = output_dir_mod.os.rename
    calls = []

    def rename(src, dst):
        calls.append((Path(src).name, Path(dst).name))
        if Path(src).name.startswith(".out.partial-"):
            raise OSError(28, "No space left on device")
        return real_rename(src, dst)

    monkeypatch.setattr(output_dir_mod.os, "rename", rename)
    code, _, err = cli(capsys, "-q", "export", "--no-golden", ckpt, out)
    monkeypatch.undo()
    assert [c[0] for c in calls] == ["out", f".out.partial-{os.getpid()}", calls[0][1]]
    assert code == 3  # an environment problem, not bad input
    text = error_paragraph(err, quiet=True)
    assert str(out) in text and "No space left on device" in text
    assert digests(out) == before
    assert leftovers(out) == []


def test_unwritable_output_parent(ckpt, tmp_path, capsys, monkeypatch):
    """(Simulated: tests may run as root, where chmod does not stop writes.)"""
    real_mkdir = Path.mkdir

    def mkdir(self, *args, **kwargs):
        if self.name.startswith(".out.partial-"):
            raise PermissionError(13, "Permission denied")
        return real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", mkdir)
    code, _, err = cli(capsys, "-q", "export", "--no-golden", ckpt, tmp_path / "out")
    monkeypatch.undo()
    assert code == 3  # the parent is not writable: an environment problem
    text = error_paragraph(err, quiet=True)
    assert str(tmp_path) in text and "Permission denied" in text
    assert not (tmp_path / "out").exists() and leftovers(tmp_path / "out") == []


def test_unsupported_head_dim_names_config(tmp_path, capsys):
    import json as _json

    from edgellm_export.cli import main as _main
    from edgellm_export.demo_checkpoint import write_demo_checkpoint as _demo

    ckpt = _demo(tmp_path / "ckpt")
    cfg = _json.loads((ckpt / "config.json").read_text())
    cfg["head_dim"] = 32
    (ckpt / "config.json").write_text(_json.dumps(cfg))
    assert _main(["export", str(ckpt), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "config.json" in err and "head_dim 32" in err
    assert not (tmp_path / "out").exists()


def test_disk_error_is_a_clean_message(tmp_path, capsys, monkeypatch):
    import errno

    import edgellm_export.export as export_mod
    from edgellm_export.cli import main as _main
    from edgellm_export.demo_checkpoint import write_demo_checkpoint as _demo

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "out" / "llm" / "model.onnx.data"))

    monkeypatch.setattr(export_mod, "_write_weights", full)
    ckpt = _demo(tmp_path / "ckpt")
    assert _main(["export", str(ckpt), str(tmp_path / "out")]) == 3
    err = capsys.readouterr().err
    assert "No space left on device" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if ".partial-" in p.name]


def test_write_error_in_writer_thread_propagates(tmp_path, capsys, monkeypatch):
    """The weight writer runs on a thread; its disk-full error still ends the export cleanly."""
    import errno

    import edgellm_export.stream_writer as stream_writer
    from edgellm_export.cli import main as _main
    from edgellm_export.demo_checkpoint import write_demo_checkpoint as _demo

    calls = []

    def pwrite(fd, data, offset):
        calls.append(offset)
        if len(calls) > 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        return len(data)

    monkeypatch.setattr(stream_writer.os, "pwrite", pwrite)
    ckpt = _demo(tmp_path / "ckpt")
    assert _main(["-q", "export", str(ckpt), str(tmp_path / "out")]) == 3
    err = capsys.readouterr().err
    assert "No space left on device" in err and "model.onnx.data" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if ".partial-" in p.name]

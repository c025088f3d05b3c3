"""qspec as a build step: the output folder is never anything but the old build or the new one,
depfiles name every input, unchanged files keep their mtimes, --check, --json and the cache."""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from qspec import buildcache
from qspec.cli import main
from qspec.compiler.errors import UserError
from qspec.compiler.folder import check_writable, locked, sha256_file
from qspec.dsl.load import check_file
from tests.projects import HEADER, TOKEN_BATCHES

# A tiny model whose weights live in a safetensors file beside it (read by Rust, not Python).
MODEL = (
    """
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from shapes import HIDDEN  # a module of the user's project

HERE = Path(__file__).parent
(HERE / "imported.marker").write_text("the model entry ran")


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(50, 32)
        self.fc1 = nn.Linear(32, HIDDEN)
        self.fc2 = nn.Linear(HIDDEN, 8)

    def forward(self, ids):
        return self.fc2(torch.relu(self.fc1(self.embed(ids)))).mean(1)


def load():
    model = Tiny()
    model.load_state_dict(load_file(HERE / "weights.safetensors"))
    return model, (torch.randint(0, 50, (4, 6)),)
"""
    + TOKEN_BATCHES
)
BODY = 'target onnx { device cpu }\nlayer "fc*" { weight int4 group 32 }\n'


def write_weights(folder: Path, seed: int = 0) -> None:
    import torch
    from safetensors.torch import save_file

    torch.manual_seed(seed)
    state = {
        "embed.weight": torch.randn(50, 32),
        "fc1.weight": torch.randn(64, 32) * 0.2,
        "fc1.bias": torch.zeros(64),
        "fc2.weight": torch.randn(8, 64) * 0.2,
        "fc2.bias": torch.zeros(8),
    }
    save_file(state, folder / "weights.safetensors")


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    folder = tmp_path / "my project #1"  # a space and a '#' for the depfile's escaping
    folder.mkdir()
    monkeypatch.delitem(sys.modules, "shapes", raising=False)  # imported afresh, as by the CLI
    (folder / "shapes.py").write_text("HIDDEN = 64\n")
    (folder / "model.py").write_text(MODEL)
    write_weights(folder)
    (folder / "tiny.qspec").write_text(HEADER + BODY)
    return folder


def compile_(project: Path, out: str, *extra: str) -> int:
    return main(["compile", str(project / "tiny.qspec"), "-o", out, *extra])


def snapshot(folder: Path) -> dict[str, tuple[str, int]]:
    """Every file under `folder` with its hash and mtime."""
    return {
        str(p.relative_to(folder)): (sha256_file(p), p.stat().st_mtime_ns)
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


# ---- -o never removes what qspec did not write ----------------------------------------------


@pytest.mark.parametrize("case", ["user folder", "file", "cwd", "parent", "empty", "spec folder"])
def test_output_refuses_what_qspec_did_not_write(
    project: Path, tmp_path: Path, case: str, monkeypatch, capsys
):
    (project / "imported.marker").unlink(missing_ok=True)
    (project / "notes.txt").write_text("precious")
    monkeypatch.chdir(project)
    out = {
        "user folder": str(tmp_path / "mine"),
        "file": "notes.txt",
        "cwd": ".",
        "parent": "..",
        "empty": "",
        "spec folder": str(project),
    }[case]
    (tmp_path / "mine").mkdir(exist_ok=True)
    (tmp_path / "mine" / "thesis.tex").write_text("precious")
    before = snapshot(tmp_path)
    assert compile_(project, out) == 2
    assert "error" in capsys.readouterr().err
    assert snapshot(tmp_path) == before  # nothing touched
    assert not (project / "imported.marker").exists()  # refused before the model loaded


@pytest.mark.parametrize("added", ["notes.txt", "data/x.txt", "tvm/extra.bin", "empty folder/"])
def test_a_build_holding_user_files_is_not_replaced(project: Path, tmp_path: Path, added, capsys):
    """A build folder the user put a file into (or a copied manifest beside their data) is no
    longer only qspec's: replacing it would delete what qspec did not write."""
    out = tmp_path / "build"
    assert compile_(project, str(out)) == 0
    (out / "tvm").mkdir()  # a folder the manifest does not list
    (out / "tvm" / "model.so").write_text("")
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["files"]["tvm/model.so"] = sha256_file(out / "tvm" / "model.so")
    (out / "manifest.json").write_text(json.dumps(manifest))
    target = out / added
    if added.endswith("/"):
        target.mkdir()
    else:
        target.parent.mkdir(exist_ok=True)
        target.write_text("precious")
    before = snapshot(out)
    (project / "tiny.qspec").write_text(HEADER + BODY.replace("int4", "int8"))
    assert compile_(project, str(out)) == 2
    assert "which qspec did not write" in capsys.readouterr().err
    assert snapshot(out) == before and target.exists()


def test_unwritable_output_is_reported_up_front(project: Path, tmp_path: Path, capsys):
    (tmp_path / "a file").write_text("x")
    assert compile_(project, str(tmp_path / "a file" / "build")) == 2
    assert capsys.readouterr().err.startswith("qspec: error: cannot write")
    assert not (project / "imported.marker").exists()


def test_full_disk_is_reported_up_front(tmp_path: Path, monkeypatch):
    monkeypatch.setattr(shutil, "disk_usage", lambda _: shutil._ntuple_diskusage(1, 1, 0))
    with pytest.raises(UserError, match=r"cannot write .*MiB free"):
        check_writable(tmp_path / "build")


def test_builds_follow_the_umask_and_a_failed_build_keeps_the_previous(
    project: Path, tmp_path: Path, capsys
):
    out = tmp_path / "build"
    old = os.umask(0o022)
    try:
        assert compile_(project, str(out)) == 0
    finally:
        os.umask(old)
    assert out.stat().st_mode & 0o777 == 0o755
    before = snapshot(out)
    assert compile_(project, str(out), "--fail-under", "snr=1000", "--no-cache") == 1
    assert "previous build" in capsys.readouterr().err
    assert snapshot(out) == before
    assert not list(tmp_path.glob(".build.building-*"))


def test_unchanged_artifacts_keep_their_mtime(project: Path, tmp_path: Path):
    out = tmp_path / "build"
    assert compile_(project, str(out), "--no-cache") == 0
    first = snapshot(out)
    time.sleep(0.01)
    assert compile_(project, str(out), "--no-cache") == 0
    second = snapshot(out)
    assert second["model.onnx"] == first["model.onnx"]  # same bytes, same mtime
    assert second["manifest.json"][1] > first["manifest.json"][1]  # always refreshed


def test_a_second_compile_waits_for_the_lock(project: Path, tmp_path: Path, monkeypatch, capsys):
    out = tmp_path / "build"
    monkeypatch.setenv("QSPEC_LOCK_TIMEOUT", "0.5")
    with open(tmp_path / ".build.lock", "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        assert compile_(project, str(out)) == 2
        fcntl.flock(handle, fcntl.LOCK_UN)
    assert "being built by another qspec process" in capsys.readouterr().err
    assert not out.exists()


def test_recovery_restores_a_build_parked_between_renames(tmp_path: Path):
    out = tmp_path / "build"
    parked = tmp_path / ".build.old-12345"
    parked.mkdir()
    (parked / "manifest.json").write_text('{"format_version": 1}')
    staging = tmp_path / ".build.building-abc_1234"
    staging.mkdir()
    with locked(out):
        pass
    assert (out / "manifest.json").is_file()
    assert not parked.exists() and not staging.exists()


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_killed_compiles_leave_the_old_build(project: Path, tmp_path: Path, sig: signal.Signals):
    out = tmp_path / "build"
    assert compile_(project, str(out), "--no-cache") == 0
    before = snapshot(out)
    write_weights(project, seed=1)  # the next build would differ
    command = [sys.executable, "-m", "qspec", "compile", str(project / "tiny.qspec")]
    process = subprocess.Popen([*command, "-o", str(out), "--no-cache"], stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while not list(tmp_path.glob(".build.building-*")) and time.monotonic() < deadline:
        time.sleep(0.02)
    process.send_signal(sig)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == (-signal.SIGKILL if sig == signal.SIGKILL else 143), stderr
    assert snapshot(out) == before
    if sig == signal.SIGTERM:  # cleaned up on the way out
        assert not list(tmp_path.glob(".build.building-*"))
    assert compile_(project, str(out), "--no-cache") == 0  # and the next build cleans up
    assert not list(tmp_path.glob(".build.*-*"))


# ---- depfile, --check, --json ----------------------------------------------------------------


def test_depfile_lists_every_input_escaped(project: Path, tmp_path: Path, monkeypatch):
    include = project / "common.qspec"
    include.write_text("qspec 1\ntarget onnx { device cpu }\n")
    (project / "tiny.qspec").write_text(
        HEADER + 'include "common.qspec"\nlayer "fc*" { weight int4 group 32 }\n'
    )
    monkeypatch.chdir(tmp_path)
    assert compile_(project, "out/b/", "--depfile", "out/b.d") == 0
    text = (tmp_path / "out" / "b.d").read_text()
    rule, *empty_rules = text.split("\n\n")
    target, _, prerequisites = rule.partition(": \\\n")
    assert target == "out/b/manifest.json"  # as spelled on the command line
    listed = [line.strip().removesuffix(" \\") for line in prerequisites.splitlines()]
    escaped = str(project).replace(" ", "\\ ").replace("#", "\\#")
    expected = ["common.qspec", "model.py", "shapes.py", "tiny.qspec", "weights.safetensors"]
    assert listed == [f"{escaped}/{name}" for name in expected]
    assert [r.strip() for r in empty_rules if r.strip()] == [f"{name}:" for name in listed]


def test_depfile_inside_the_build_is_refused(project: Path, tmp_path: Path, capsys):
    assert compile_(project, str(tmp_path / "b"), "--depfile", str(tmp_path / "b" / "d")) == 2
    assert "inside the build folder" in capsys.readouterr().err


@pytest.mark.parametrize("victim", ["tiny.qspec", "model.py", "notes.txt"])
def test_depfile_never_overwrites_a_user_file(project: Path, tmp_path: Path, victim: str, capsys):
    (project / "notes.txt").write_text("precious")
    before = (project / victim).read_bytes()
    assert compile_(project, str(tmp_path / "b"), "--depfile", str(project / victim)) == 2
    assert "is not a depfile qspec wrote" in capsys.readouterr().err
    assert (project / victim).read_bytes() == before
    assert not (tmp_path / "b").exists()


def test_a_fifo_depfile_is_refused_without_opening_it(project: Path, tmp_path: Path, capsys):
    """Opening a FIFO to read it blocks until a writer comes: it must not be opened at all."""
    fifo = tmp_path / "deps.d"
    os.mkfifo(fifo)
    assert compile_(project, str(tmp_path / "b"), "--depfile", str(fifo)) == 2
    assert "is not a depfile qspec wrote" in capsys.readouterr().err


def test_leftovers_are_only_what_qspec_names(tmp_path: Path):
    """Folders that merely look like staging folders are the user's: left alone."""
    mine = [tmp_path / ".build.building-notes", tmp_path / ".build.old-final"]
    for folder in mine:
        folder.mkdir()
    with locked(tmp_path / "build"):
        pass
    assert all(folder.is_dir() for folder in mine)


def test_check_follows_content(project: Path, tmp_path: Path, capsys):
    out = str(tmp_path / "build")
    assert compile_(project, out, "--check") == 1  # nothing built yet
    assert not (tmp_path / "build").exists() and not list(tmp_path.glob(".build*"))
    assert compile_(project, out) == 0
    assert compile_(project, out, "--check") == 0
    os.utime(project / "weights.safetensors")  # touched, same bytes
    spec = project / "tiny.qspec"
    spec.write_text("# a comment and other spacing\n" + spec.read_text().replace("  ", " "))
    assert compile_(project, out, "--check") == 0
    write_weights(project, seed=3)
    assert compile_(project, out, "--check") == 1
    assert compile_(project, out) == 0
    assert compile_(project, out, "--check") == 0
    (project / "shapes.py").write_text("HIDDEN = 64  # an edit to a module model.py imports\n")
    assert compile_(project, out, "--check") == 1
    assert compile_(project, out) == 0
    (tmp_path / "build" / "model.onnx").write_bytes(b"edited")
    capsys.readouterr()
    assert compile_(project, out, "--check", "--json") == 1
    assert json.loads(capsys.readouterr().out)["up_to_date"] is False


def test_json_prints_one_object_on_stdout(project: Path, tmp_path: Path, capsys):
    assert compile_(project, str(tmp_path / "b"), "--json", "--timings") == 0
    captured = capsys.readouterr()
    result = json.loads(captured.out)
    assert result["cache"] == "miss"
    artifact = result["artifacts"][0]
    assert artifact["sha256"] == sha256_file(Path(artifact["file"]))
    assert result["fidelity"]["cosine_mean"] > 0.9 and "timings_s" in result
    assert "emit onnx" in captured.err


# ---- the build cache -------------------------------------------------------------------------


def test_a_cache_hit_restores_without_torch(project: Path, tmp_path: Path):
    out = tmp_path / "build"
    assert compile_(project, str(out)) == 0
    first = snapshot(out)
    shutil.rmtree(out)
    (project / "imported.marker").unlink()
    probe = (
        "import sys; from qspec.cli import main; "
        f"code = main(['compile', {str(project / 'tiny.qspec')!r}, '-o', {str(out)!r}, '--json']);"
        "print('torch' in sys.modules, code)"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True
    )
    assert result.stdout.strip().endswith("False 0")
    assert '"cache": "hit"' in result.stdout
    assert not (project / "imported.marker").exists()  # no user code ran
    assert {name: digest for name, (digest, _) in snapshot(out).items()} == {
        name: digest for name, (digest, _) in first.items()
    }


def test_an_up_to_date_folder_is_left_alone(project: Path, tmp_path: Path, capsys):
    out = tmp_path / "b"
    assert compile_(project, str(out)) == 0
    assert main(["cache", "clear"]) == 0  # not even the cache is needed
    before = snapshot(out)
    (project / "imported.marker").unlink()
    capsys.readouterr()
    assert compile_(project, str(out), "--json", "--depfile", str(tmp_path / "b.d")) == 0
    assert json.loads(capsys.readouterr().out)["cache"] == "up to date"
    after = snapshot(out)
    assert after.pop("manifest.json")[1] >= before.pop("manifest.json")[1]  # refreshed
    assert after == before
    assert not (project / "imported.marker").exists()  # no user code ran
    assert "weights.safetensors" in (tmp_path / "b.d").read_text()


def test_a_corrupt_cache_entry_is_rebuilt(project: Path, tmp_path: Path, capsys):
    assert compile_(project, str(tmp_path / "b"), "--json") == 0
    capsys.readouterr()
    (entry,) = [folder for folder, _, _ in buildcache.entries()]
    (entry / "files" / "model.onnx").write_bytes(b"not the model")
    shutil.rmtree(tmp_path / "b")
    assert compile_(project, str(tmp_path / "b"), "--json") == 0
    assert json.loads(capsys.readouterr().out)["cache"] == "miss"
    assert (tmp_path / "b" / "model.onnx").read_bytes() != b"not the model"
    shutil.rmtree(tmp_path / "b")
    assert compile_(project, str(tmp_path / "b"), "--json") == 0
    assert json.loads(capsys.readouterr().out)["cache"] == "hit"


def test_hostile_entries_are_ignored(tmp_path: Path, monkeypatch):
    monkeypatch.setenv("QSPEC_CACHE_DIR", str(tmp_path / "cache"))
    entry = tmp_path / "cache" / "builds" / "a" / buildcache.inputs_key({})
    entry.mkdir(parents=True)
    for files in ({"../../../../etc/passwd": "0" * 64}, {"/etc/passwd": "0" * 64}, "junk"):
        record = {"version": buildcache.ENTRY_VERSION, "inputs": {}, "files": files}
        (entry / "entry.json").write_text(json.dumps(record))
        assert buildcache.lookup("a", tmp_path) is None
    (entry / "entry.json").write_text("\x00not json")
    assert buildcache.lookup("a", tmp_path) is None


def test_cache_location_limit_and_clear(project: Path, tmp_path: Path, monkeypatch, capsys):
    chosen = tmp_path / "chosen"
    assert compile_(project, str(tmp_path / "b"), "--cache-dir", str(chosen)) == 0
    assert (chosen / "builds").is_dir()
    (chosen / "user-file.txt").write_text("not qspec's")
    assert main(["cache", "info", "--cache-dir", str(chosen)]) == 0
    assert "builds: 1" in capsys.readouterr().out
    monkeypatch.setenv("QSPEC_CACHE_DIR", str(chosen))
    assert buildcache.layer_entries()  # the passes' per-layer results
    used = {path for path, _, _ in buildcache.layer_entries()}
    monkeypatch.setenv("QSPEC_CACHE_SIZE", "1K")
    assert buildcache.limit() == 1024
    assert buildcache.evict(buildcache.limit())
    assert not buildcache.entries() and not buildcache.layer_entries()
    assert all(not path.exists() for path in used)
    monkeypatch.setenv("QSPEC_CACHE_SIZE", "5G")
    assert compile_(project, str(tmp_path / "c"), "--cache-dir", str(chosen)) == 0
    assert main(["cache", "clear", "--cache-dir", str(chosen)]) == 0
    assert not (chosen / "builds").exists() and (chosen / "user-file.txt").exists()


def test_an_unwritable_cache_does_not_fail_the_build(project: Path, tmp_path: Path):
    (tmp_path / "plain file").write_text("x")
    cache = str(tmp_path / "plain file" / "cache")
    assert compile_(project, str(tmp_path / "b"), "--cache-dir", cache) == 0


def test_the_action_key_ignores_formatting_and_sees_rules(tmp_path: Path):
    spec = tmp_path / "a.qspec"
    spec.write_text(HEADER + BODY)
    key = buildcache.action_key(check_file(spec).raise_errors())
    spec.write_text("# comment\n" + HEADER + BODY.replace("{ ", "{   "))
    assert buildcache.action_key(check_file(spec).raise_errors()) == key
    spec.write_text(HEADER + BODY.replace("int4", "int8"))
    assert buildcache.action_key(check_file(spec).raise_errors()) != key


# ---- what a stranger found -------------------------------------------------------------------


def test_only_hugging_face_folders_count_whole(tmp_path: Path):
    from qspec.compiler.inputs import build_inputs

    plain = tmp_path / "plain"
    (plain / "out").mkdir(parents=True)
    for name in ("config.json", "weights.safetensors", "notes.txt", "out/model.onnx"):
        (plain / name).write_text("{}")
    assert build_inputs([plain / "config.json"], []) == [plain / "config.json"]
    (plain / "config.json").write_text('{"model_type": "bert"}')
    (plain / "tokenizer.json").write_text("{}")
    assert build_inputs([plain / "config.json"], []) == [
        plain / name for name in ("config.json", "tokenizer.json", "weights.safetensors")
    ]


def test_qspec_reading_its_own_files_adds_no_inputs(tmp_path: Path):
    """The cache key hashes qspec's source (the grammar, the CUDA stub's C) during a build:
    those reads are qspec's, not the build's, or the first build in a process would list them."""
    from qspec.compiler.cache import SOURCE_ROOT
    from qspec.compiler.inputs import build_inputs

    data = tmp_path / "data.npz"
    data.write_bytes(b"x")
    own = [SOURCE_ROOT / "backends" / "tvm" / "driver_stub.c", SOURCE_ROOT / "dsl" / "qspec.lark"]
    assert all(path.is_file() for path in own)
    assert build_inputs([*own, data], []) == [data.resolve()]


def test_an_input_changed_during_the_build_is_caught(tmp_path: Path):
    from qspec.compiler.inputs import recording

    read, named = tmp_path / "read.bin", tmp_path / "named.txt"
    read.write_bytes(b"a")
    named.write_text("a")
    with recording() as record:
        read.read_bytes()
        assert record.changed([read.resolve(), named.resolve()]) == []
        time.sleep(0.01)
        read.write_bytes(b"bb")
        named.write_text("b")
        assert record.changed([read.resolve(), named.resolve()]) == [
            read.resolve(),
            named.resolve(),
        ]


@pytest.mark.parametrize("code", ["0", "1", "3"])
def test_sys_exit_in_user_code_is_a_user_error(project: Path, tmp_path: Path, code: str, capsys):
    model = project / "model.py"
    model.write_text(
        model.read_text().replace(
            "def load():\n", f"def load():\n    import sys; sys.exit({code})\n"
        )
    )
    assert compile_(project, str(tmp_path / "b")) == 2
    assert f"called sys.exit({code})" in capsys.readouterr().err


def test_entries_import_siblings_lazily_and_calibrate_on_numpy(project: Path, tmp_path: Path):
    (project / "lazy.py").write_text("import numpy as np\nROWS = 8\n")
    model = project / "model.py"
    model.write_text(
        model.read_text().replace(
            '        yield {"ids": torch.randint(0, 50, (8, 6), generator=generator)}',
            "        import lazy\n"
            "        ids = torch.randint(0, 50, (lazy.ROWS, 6), generator=generator)\n"
            '        yield {"ids": ids.numpy()}',
        )
    )
    assert compile_(project, str(tmp_path / "b")) == 0


def test_json_stdout_stays_clean_when_user_code_prints(project: Path, tmp_path: Path):
    model = project / "model.py"
    model.write_text(
        model.read_text().replace(
            "def load():\n",
            "def load():\n    print('LOADING');  import os; os.system('echo child')\n",
        )
    )
    command = [sys.executable, "-m", "qspec", "compile", str(project / "tiny.qspec")]
    run = subprocess.run(
        [*command, "-o", str(tmp_path / "b"), "--json"], capture_output=True, text=True
    )
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout)["cache"] == "miss"
    assert "LOADING" in run.stderr and "child" in run.stderr


def test_an_unwritable_depfile_is_reported_before_building(project: Path, tmp_path: Path, capsys):
    (tmp_path / "plain").write_text("x")
    depfile = str(tmp_path / "plain" / "b.d")
    assert compile_(project, str(tmp_path / "b"), "--depfile", depfile) == 2
    assert "cannot write the depfile" in capsys.readouterr().err
    assert not (tmp_path / "b").exists() and not (project / "imported.marker").exists()


def test_an_entry_whose_manifest_disagrees_is_not_restored(project: Path, tmp_path: Path, capsys):
    assert compile_(project, str(tmp_path / "b")) == 0
    (entry,) = [folder for folder, _, _ in buildcache.entries()]
    model = entry / "files" / "model.onnx"
    model.write_bytes(model.read_bytes()[:-1] + b"\x00")
    record = json.loads((entry / "entry.json").read_text())
    record["files"]["model.onnx"] = sha256_file(model)  # re-signed, but not the manifest
    (entry / "entry.json").write_text(json.dumps(record))
    capsys.readouterr()
    assert compile_(project, str(tmp_path / "c"), "--json") == 0
    assert json.loads(capsys.readouterr().out)["cache"] == "miss"
    assert (tmp_path / "c" / "model.onnx").read_bytes() == (
        tmp_path / "b" / "model.onnx"
    ).read_bytes()


def test_cache_clear_keeps_what_qspec_did_not_write(tmp_path: Path, monkeypatch, capsys):
    cache = tmp_path / "shared"
    monkeypatch.setenv("QSPEC_CACHE_DIR", str(cache))
    foreign = [
        cache / "layers" / "my_notes.txt",
        cache / "builds" / "ci.yml",
        cache / "latency.json",
    ]
    for path in foreign:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("not qspec's [")
    assert main(["cache", "clear"]) == 0
    assert all(path.exists() for path in foreign)
    assert main(["cache", "clear", "--cache-dir", ""]) == 2

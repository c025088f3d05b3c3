"""The build-system integrations (integrations/): real make, ninja and CMake (with the Ninja
and the Unix Makefiles generators) drive `qspec compile --depfile` on a small project.

Each build tool goes through the same story: the first build compiles; a second build and a
build after touching an unrelated file do not run qspec; new weights rebuild; a spec that stops
including a file, deleted at the same time, rebuilds without "no rule to make target" (the
depfile's empty rules), and the next build is again a no-op.

"qspec ran" is read off manifest.json, which every successful build rewrites (and nothing else
does); the tools' own dry runs (`make -q`, `ninja -n`) must agree.
"""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from projects import HEADER, TINY_MODEL

INTEGRATIONS = Path(__file__).resolve().parents[1] / "integrations"
BIN = Path(sys.executable).parent  # the venv's bin: qspec, and ninja/cmake from PyPI if there
QSPEC = BIN / "qspec"

# TINY_MODEL's module, with load() taking its weights from weights.npz next to it (np.load is
# seen by the interpreter's audit hook, so the depfile lists the weights).
MODEL = (
    TINY_MODEL
    + """

from pathlib import Path

import numpy as np


def load():
    model = Tiny()
    with np.load(Path(__file__).with_name("weights.npz")) as arrays:
        model.load_state_dict({name: torch.from_numpy(arrays[name]) for name in arrays.files})
    ids = torch.randint(0, 50, (4, 6), generator=torch.Generator().manual_seed(0))
    return model.eval(), (ids,)
"""
)
SHAPES = {
    "embed.weight": (50, 32),
    "fc1.weight": (64, 32),
    "fc1.bias": (64,),
    "fc2.weight": (8, 64),
    "fc2.bias": (8,),
}
TARGET = "target onnx { device cpu }\n"
LAYERS = 'layer "fc*" { weight int4 group 32 }\n'
SPEC = HEADER + 'include "common.qspec"\n' + LAYERS
SPEC_INLINED = HEADER + TARGET + LAYERS  # the same build without the include


def find_tool(name: str, accept: Callable[[str], bool] = lambda program: True) -> str | None:
    """A program on PATH, else in the venv's bin (the PyPI packages `ninja` and `cmake`)."""
    for program in (shutil.which(name), shutil.which(name, path=str(BIN))):
        if program is not None and accept(program):
            return program
    return None


def cmake_3_21(program: str) -> bool:
    """Whether `program --version` says CMake 3.21 or newer (QSpec.cmake's minimum)."""
    words = subprocess.run([program, "--version"], capture_output=True, text=True).stdout.split()
    if words[:2] != ["cmake", "version"] or len(words) < 3:
        return False
    numbers = [int(part) for part in words[2].split("-")[0].split(".")[:2] if part.isdigit()]
    return tuple(numbers) >= (3, 21)


MAKE, NINJA, CMAKE = find_tool("make"), find_tool("ninja"), find_tool("cmake", cmake_3_21)


def weights_bytes(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    arrays = {
        name: (rng.standard_normal(shape) * 0.3).astype(np.float32)
        for name, shape in SHAPES.items()
    }
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)  # the zip's timestamps vary: written once, reused byte for byte
    return buffer.getvalue()


@pytest.fixture(scope="module")
def weights() -> dict[int, bytes]:
    return {1: weights_bytes(1), 2: weights_bytes(2)}


@pytest.fixture(scope="module")
def shared_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One qspec cache for the module's builds: the projects are identical, so after the first
    tool, the others' builds may be served from qspec's content cache (each build tool must
    still run qspec when an input changed, which is what these tests check)."""
    return tmp_path_factory.mktemp("integrations-cache")


def write_project(folder: Path, weights: dict[int, bytes]) -> Path:
    folder.mkdir(parents=True)
    (folder / "model.py").write_text(MODEL)
    (folder / "weights.npz").write_bytes(weights[1])
    (folder / "common.qspec").write_text("qspec 1\n" + TARGET)
    (folder / "tiny.qspec").write_text(SPEC)
    (folder / "notes.txt").write_text("not an input\n")
    return folder


def stamp(path: Path) -> int:
    return path.stat().st_mtime_ns


def make_newer(path: Path, than: Path) -> None:
    """Give `path` the current time, waiting where the file system's clock is coarse until that
    is later than `than`'s modification time."""
    deadline = time.monotonic() + 3
    os.utime(path)
    while stamp(path) <= stamp(than):
        assert time.monotonic() < deadline, f"the mtime of {path} does not advance"
        time.sleep(0.05)
        os.utime(path)


def run(args: list[str | Path], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(arg) for arg in args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )


def ok(done: subprocess.CompletedProcess) -> str:
    output = done.stdout + done.stderr
    assert done.returncode == 0, f"{' '.join(done.args)} exited {done.returncode}:\n{output}"
    return output


@dataclass
class Project:
    folder: Path
    env: dict[str, str]  # the build tools' environment (qspec's cache folder)
    weights: dict[int, bytes]


@dataclass
class Build:
    """One build tool set up in a project: `command()` runs it, `up_to_date()` is the tool's
    own dry run (None where it has none)."""

    project: Project
    manifest: Path
    command: Callable[[], subprocess.CompletedProcess]
    up_to_date: Callable[[], bool | None]
    after: Callable[[Build], None] = lambda build: None  # checks of the tool's own

    def build(self) -> str:
        return ok(self.command())


def story(tool: Build) -> None:
    project, manifest = tool.project.folder, tool.manifest
    model = manifest.with_name("model.onnx")

    output = tool.build()
    assert manifest.is_file(), output
    assert model.is_file(), output
    built = stamp(manifest)
    tool.after(tool)

    output = tool.build()
    assert stamp(manifest) == built, f"a second build ran qspec:\n{output}"
    assert tool.up_to_date() in (True, None)

    make_newer(project / "notes.txt", manifest)
    output = tool.build()
    assert stamp(manifest) == built, f"touching an unrelated file ran qspec:\n{output}"

    before = model.read_bytes()
    (project / "weights.npz").write_bytes(tool.project.weights[2])
    make_newer(project / "weights.npz", manifest)
    assert tool.up_to_date() in (False, None)
    output = tool.build()
    assert stamp(manifest) != built, f"new weights did not run qspec:\n{output}"
    assert model.read_bytes() != before, "new weights, same model"
    built, model_built = stamp(manifest), stamp(model)

    # The spec stops including common.qspec (its target is written in place) and the file is
    # deleted in the same step: the old dependency list still names it.
    (project / "tiny.qspec").write_text(SPEC_INLINED)
    (project / "common.qspec").unlink()
    make_newer(project / "tiny.qspec", manifest)
    output = tool.build()
    assert stamp(manifest) != built, f"a changed spec did not run qspec:\n{output}"
    assert stamp(model) == model_built, "the same model.onnx was written again (restat)"
    built = stamp(manifest)
    output = tool.build()
    assert stamp(manifest) == built, f"the build after dropping the include ran qspec:\n{output}"
    assert tool.up_to_date() in (True, None)

    # A failed compile fails the build and leaves the folder as it was, so the next build
    # tries again (the fixed spec is the one built above: qspec's cache may serve it).
    (project / "tiny.qspec").write_text(SPEC_INLINED + "layer {\n")
    make_newer(project / "tiny.qspec", manifest)
    failed = tool.command()
    assert failed.returncode != 0, failed.stdout + failed.stderr
    assert stamp(manifest) == built
    (project / "tiny.qspec").write_text(SPEC_INLINED)
    make_newer(project / "tiny.qspec", manifest)
    output = tool.build()
    assert stamp(manifest) != built, f"the build after a failed one did not run qspec:\n{output}"


@pytest.fixture
def project(tmp_path: Path, weights: dict[int, bytes], shared_cache: Path) -> Project:
    folder = write_project(tmp_path / "project", weights)
    return Project(folder, {**os.environ, "QSPEC_CACHE_DIR": str(shared_cache)}, weights)


@pytest.mark.skipif(MAKE is None, reason="make is not installed")
def test_make(project: Project):
    folder, env = project.folder, project.env
    assert MAKE is not None
    (folder / "Makefile").write_text(
        f"QSPEC := {QSPEC}\n"
        "QSPEC_SPECS := tiny.qspec\n"
        f"include {INTEGRATIONS / 'make' / 'qspec.mk'}\n"
        ".PHONY: all\n"
        "all: $(QSPEC_MANIFESTS)\n"  # the default goal: the depfiles' rules do not take it
    )

    def dry_run() -> bool:
        return run([MAKE, "-q", "build/tiny/manifest.json"], folder, env).returncode == 0

    def depfile(tool: Build) -> None:
        text = (folder / "build" / "tiny.d").read_text()
        assert text.startswith("build/tiny/manifest.json:"), text
        for name in ("tiny.qspec", "common.qspec", "model.py", "weights.npz"):
            assert f"{folder.resolve() / name}" in text, (name, text)
            assert f"\n{folder.resolve() / name}:\n" in text, (name, text)  # like gcc -MP
        assert "notes.txt" not in text

    manifest = folder / "build" / "tiny" / "manifest.json"
    story(Build(project, manifest, lambda: run([MAKE], folder, env), dry_run, depfile))
    assert "Nothing to be done for 'all'" in ok(run([MAKE], folder, env))


@pytest.mark.skipif(NINJA is None, reason="ninja is not installed (PATH, or pip install ninja)")
def test_ninja(project: Project):
    folder, env = project.folder, project.env
    assert NINJA is not None
    example = (INTEGRATIONS / "ninja" / "build.ninja").read_text()
    assert "\nqspec = qspec\n" in example
    # The example as shipped, with this venv's qspec, and an edge that uses only model.onnx:
    # restat must spare it when a rebuild leaves model.onnx as it was.
    (folder / "build.ninja").write_text(
        example.replace("\nqspec = qspec\n", f"\nqspec = {QSPEC}\n")
        + "\nrule copy\n  command = cp $in $out\n"
        + "build deploy/model.onnx: copy build/tiny/model.onnx\n"
        + "default deploy/model.onnx\n"
    )
    deployed = folder / "deploy" / "model.onnx"

    def dry_run() -> bool:
        return "no work to do" in ok(run([NINJA, "-n"], folder, env))

    def recorded(tool: Build) -> None:
        deps = ok(run([NINJA, "-t", "deps", "build/tiny/manifest.json"], folder, env))
        for name in ("tiny.qspec", "common.qspec", "model.py", "weights.npz"):
            assert name in deps, deps
        assert "notes.txt" not in deps
        assert not (folder / "build" / "tiny.d").exists()  # moved into .ninja_deps

    stamps = []

    def build() -> subprocess.CompletedProcess:
        done = run([NINJA], folder, env)
        if deployed.exists():
            stamps.append(stamp(deployed))
        return done

    manifest = folder / "build" / "tiny" / "manifest.json"
    story(Build(project, manifest, build, dry_run, recorded))
    # deploy/model.onnx: copied by the first build and for the new weights, never else.
    assert len(set(stamps)) == 2, stamps


def cmake_story(project: Project, generator: str, program: str) -> None:
    folder, env = project.folder, project.env
    assert CMAKE is not None
    (folder / "CMakeLists.txt").write_text(
        "cmake_minimum_required(VERSION 3.21)\n"
        "project(tiny NONE)\n"
        f'include("{INTEGRATIONS / "cmake" / "QSpec.cmake"}")\n'
        "qspec_compile(NAME tiny_model SRC tiny.qspec OUT_DIR qspec/tiny)\n"
    )
    binary = folder / "cmake-build"
    configure = [CMAKE, "-S", folder, "-B", binary, "-G", generator]
    configure += [f"-DCMAKE_MAKE_PROGRAM={program}", f"-DQSPEC_EXECUTABLE={QSPEC}"]
    ok(run(configure, folder, env))

    def dry_run() -> bool | None:
        if generator != "Ninja":
            return None  # the generated Makefiles have no trustworthy -q
        return "no work to do" in ok(run([program, "-n", "tiny_model"], binary, env))

    manifest = binary / "qspec" / "tiny" / "manifest.json"
    story(Build(project, manifest, lambda: run([CMAKE, "--build", binary], folder, env), dry_run))


needs_cmake = pytest.mark.skipif(
    CMAKE is None,
    reason="CMake 3.21 or newer is not installed (PATH, or pip install cmake)",
)


@needs_cmake
@pytest.mark.skipif(NINJA is None, reason="ninja is not installed (PATH, or pip install ninja)")
def test_cmake_ninja(project: Project):
    assert NINJA is not None
    cmake_story(project, "Ninja", NINJA)


@needs_cmake
@pytest.mark.skipif(MAKE is None, reason="make is not installed")
def test_cmake_unix_makefiles(project: Project):
    assert MAKE is not None
    cmake_story(project, "Unix Makefiles", MAKE)


def test_cmake_module_needs_3_21():
    """The version check is the module's first statement: CMake older than 3.21 is told so."""
    text = (INTEGRATIONS / "cmake" / "QSpec.cmake").read_text()
    code = [line for line in text.splitlines() if line.strip() and not line.startswith("#")]
    assert code[0] == 'if(CMAKE_VERSION VERSION_LESS "3.21")'
    assert "FATAL_ERROR" in code[1]


BAZEL = shutil.which("bazel") or shutil.which("bazelisk")


@pytest.mark.skipif(BAZEL is None, reason="bazel is not on PATH")
def test_bazel(project: Project, tmp_path: Path):
    folder, env = project.folder, project.env
    assert BAZEL is not None
    (folder / "MODULE.bazel").write_text("")
    (folder / "WORKSPACE").write_text("")  # Bazel 6 and older
    shutil.copy(INTEGRATIONS / "bazel" / "qspec.bzl", folder / "qspec.bzl")
    (folder / "BUILD.bazel").write_text(
        'load(":qspec.bzl", "qspec_compile")\n\n'
        "qspec_compile(\n"
        '    name = "tiny",\n'
        '    spec = "tiny.qspec",\n'
        '    srcs = ["common.qspec", "model.py"],\n'
        '    deps = ["weights.npz"],\n'
        f'    qspec_path = "{QSPEC}",\n'
        ")\n"
    )
    startup = [BAZEL, f"--output_user_root={tmp_path / 'bazel-root'}", "--max_idle_secs=30"]
    try:
        ok(run([*startup, "build", "//:tiny"], folder, env))
        out = folder / "bazel-bin" / "tiny"
        assert (out / "manifest.json").is_file()
        before = (out / "model.onnx").read_bytes()
        (folder / "weights.npz").write_bytes(project.weights[2])
        ok(run([*startup, "build", "//:tiny"], folder, env))
        assert (out / "model.onnx").read_bytes() != before
    finally:
        run([*startup, "shutdown"], folder, env)

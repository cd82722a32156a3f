"""Native builds (gpuopt/backends/cxx_build.py): cached on every input, published atomically,
safe when threads and processes build the same thing at once, nothing left by a failure, and
a runaway compiler stopped by its memory cap."""

from __future__ import annotations

import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from gpuopt.backends import cxx_build

from .toolchain import missing

SOURCE = 'extern "C" int answer() { return ANSWER; }\n'


@pytest.fixture
def compiler() -> str:
    found = cxx_build.find_compiler()
    if found is None:
        missing("no C++ compiler is installed")
    return found


def _library(compiler: str, cache: Path, source: str = SOURCE, define: str = "42", header: Path | None = None):
    command = [compiler, f"-DANSWER={define}", "-shared", "-fPIC", "answer.cpp", "-o", "answer.so"]
    if header is not None:
        command[1:1] = ["-include", str(header)]
    return cxx_build.build([command], {"answer.cpp": source}, cache, inputs=[header] if header else [])


def _leftovers(cache: Path) -> list[str]:
    return [p.name for p in cache.iterdir() if p.name.startswith(".")]


def test_threads_and_processes_building_one_thing_share_one_result(compiler, tmp_path):
    script = (
        "import sys; from pathlib import Path; sys.path.insert(0, sys.argv[1]);"
        "from tests.test_build import _library; print(_library(sys.argv[2], Path(sys.argv[3])))"
    )
    root = str(Path(__file__).resolve().parents[1])
    processes = [subprocess.Popen([sys.executable, "-c", script, root, compiler, str(tmp_path)],
                                  stdout=subprocess.PIPE, text=True) for _ in range(3)]
    with ThreadPoolExecutor(4) as pool:
        folders = set(pool.map(lambda _: _library(compiler, tmp_path), range(4)))
    folders |= {Path(p.communicate()[0].strip()) for p in processes}
    assert all(p.returncode == 0 for p in processes)
    assert len(folders) == 1 and (folders.pop() / "answer.so").is_file()
    assert len(list(tmp_path.iterdir())) == 1 and not _leftovers(tmp_path)


def test_every_input_is_part_of_the_key(compiler, tmp_path, monkeypatch):
    header = tmp_path / "inputs" / "extra.h"
    header.parent.mkdir()
    header.write_text("// one\n")
    cache = tmp_path / "cache"
    first = _library(compiler, cache, header=header)
    assert _library(compiler, cache, header=header) == first  # nothing changed: reused
    variants = [
        _library(compiler, cache, source=SOURCE + "// edited\n", header=header),  # the source
        _library(compiler, cache, define="43", header=header),  # a flag
    ]
    header.write_text("// two\n")
    variants.append(_library(compiler, cache, header=header))  # an input file's contents
    monkeypatch.setattr(cxx_build, "compiler_identity", lambda c: "another compiler version")
    variants.append(_library(compiler, cache, header=header))  # the compiler
    assert len({first, *variants}) == 5


def test_a_failed_build_leaves_nothing_behind(compiler, tmp_path):
    with pytest.raises(cxx_build.BuildError, match="(?s)failed.*#error"):
        _library(compiler, tmp_path, source="#error broken\n")
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(cxx_build.BuildError):  # and nothing is reused: it fails again
        _library(compiler, tmp_path, source="#error broken\n")


def test_a_runaway_command_is_stopped_by_its_memory_cap(tmp_path):
    hungry = [sys.executable, "-c", "block = bytearray(3 << 30)"]
    with pytest.raises(cxx_build.BuildError, match="MemoryError"):
        cxx_build.build([hungry], {}, tmp_path, memory_limit=1 << 30)
    assert list(tmp_path.iterdir()) == []


def test_compiler_choice_follows_cxx(monkeypatch, tmp_path):
    monkeypatch.setenv("CXX", "no-such-compiler-anywhere")
    assert cxx_build.find_compiler() is None
    fake = tmp_path / "my-c++"
    fake.write_text("#!/bin/sh\n")
    fake.chmod(0o755)
    monkeypatch.setenv("CXX", str(fake))
    assert cxx_build.find_compiler() == str(fake)

"""Building C++ with the system compiler, cached on disk, safe under threads and processes.

A build is a list of compiler commands run in a fresh private folder over the files given.
The folder is named by a digest of everything that can change the result (the commands, the
compiler's own version text, the files, and any other inputs named by path), and appears in
the cache with one atomic rename once every command has succeeded: a reader never sees half
a build, two builders of the same thing never collide (the loser's copy is dropped), and a
failed build leaves nothing behind that a later run could reuse. Each command runs with its
address space capped, so a runaway compiler fails its build instead of the machine.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path

MEMORY_LIMIT = 4 << 30  # bytes of address space per compiler process
TIMEOUT = 600.0  # seconds per command
_HOST_LOCK = threading.Lock()  # one host helper built at a time in this process


class BuildError(RuntimeError):
    """A compiler command failed; the message ends with the tail of its output."""


def find_compiler() -> str | None:
    """The C++ compiler to use: ``$CXX``, else the first of c++, g++, clang++ on the PATH."""
    candidates = [os.environ["CXX"]] if os.environ.get("CXX") else ["c++", "g++", "clang++"]
    for name in candidates:
        found = shutil.which(name)
        if found:
            return found
    return None


@functools.cache
def compiler_identity(compiler: str) -> str:
    """What ``compiler --version`` prints (part of every cache key: an upgrade rebuilds)."""
    result = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=60)
    return f"{os.path.realpath(compiler)}\n{result.stdout}"


def _digest(commands: Sequence[Sequence[str]], files: Mapping[str, str | bytes],
            inputs: Sequence[Path]) -> str:
    h = hashlib.sha256()

    def add(label: str, data: bytes) -> None:
        h.update(f"{label}:{len(data)}:".encode())
        h.update(data)

    for command in commands:
        add("compiler", compiler_identity(command[0]).encode())
        add("command", "\0".join(command).encode())
    for name in sorted(files):
        data = files[name]
        add(f"file {name}", data.encode() if isinstance(data, str) else data)
    for root in inputs:
        paths = sorted(p for p in root.rglob("*") if p.is_file()) if root.is_dir() else [root]
        for path in paths:
            add(f"input {path}", path.read_bytes())
    return h.hexdigest()[:32]


def build(commands: Sequence[Sequence[str]], files: Mapping[str, str | bytes], cache: Path,
          inputs: Sequence[Path] = (), memory_limit: int = MEMORY_LIMIT) -> Path:
    """Run ``commands`` (in order, in a folder holding ``files``) unless an identical build is
    cached; returns the folder with everything they produced.

    Commands name files relative to the folder. ``inputs`` are other files or folders the
    commands read (headers on an include path): their contents are part of the key.
    """
    folder = cache / _digest(commands, files, inputs)
    if folder.is_dir():
        return folder
    cache.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".building-", dir=cache))  # unique per thread and process
    try:
        for name, data in files.items():
            (work / name).write_bytes(data.encode() if isinstance(data, str) else data)
        for command in commands:
            _run_limited(command, work, memory_limit)
        try:
            os.rename(work, folder)  # atomic; fails if another builder published first
        except OSError:
            if not folder.is_dir():
                raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return folder


def _run_limited(command: Sequence[str], cwd: Path, memory_limit: int) -> None:
    # The limit is set by a shell in the child (preexec_fn is unsafe with threads).
    limited = ["/bin/sh", "-c", f'ulimit -v {memory_limit // 1024} && exec "$@"', "sh", *command]
    # A sanitizer runtime preloaded into this process (the tests' sanitized runs) must not
    # follow into the compiler: it needs far more address space than the cap.
    environment = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
    try:
        result = subprocess.run(limited, cwd=cwd, env=environment, capture_output=True, text=True,
                                timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        raise BuildError(f"{Path(command[0]).name} ran over {TIMEOUT:.0f} s") from None
    if result.returncode != 0:
        output = (result.stderr + result.stdout)[-6000:]
        raise BuildError(f"{Path(command[0]).name} failed (exit {result.returncode}):\n{output}")


def host_helper(name: str, source: str, flags: Sequence[str], cache: Path, link: Sequence[str] = ()
                ) -> ctypes.PyDLL | None:
    """``name``.cpp (``source``) built with the system compiler and ``flags`` into a shared
    library linked with ``link`` (after the source: libraries), cached, and loaded for calls that
    hold the GIL (``ctypes.PyDLL``); None where no compiler works or it cannot be built or
    loaded (the caller has a Python way)."""
    compiler = find_compiler()
    if compiler is None:
        return None
    command = [compiler, "-O2", "-shared", "-fPIC", *flags, f"{name}.cpp", "-o", f"{name}.so", *link]
    try:
        with _HOST_LOCK:
            folder = build([command], {f"{name}.cpp": source}, cache)
        return ctypes.PyDLL(str(folder / f"{name}.so"))
    except (BuildError, OSError, subprocess.SubprocessError):
        return None

"""Compile the C measurement kernels with the system compiler into a per-user cache, once.

Only building and caching a shared library lives here; it must not run or time anything.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path

from allocators.errors import KernelBuildError
from profilers.machine_info import cpu_model

CSRC = Path(__file__).with_name("csrc")
KERNEL_SOURCES = ("chase.c", "stream.c")
# -O3, not -O2: gcc 12 at -O2 vectorises only loops needing neither a scalar tail nor an aliasing
# check, so the write, copy, triad and update passes ran one double per instruction and capped
# what they measure in cache (the pointer chase has nothing to vectorise either way).
BASE_FLAGS = ("-O3", "-shared", "-fPIC", "-std=gnu11")


def cache_dir() -> Path:
    """Per-user folder for built kernels: ``$XDG_CACHE_HOME/tiered-offload/kernels``.

    >>> cache_dir().name
    'kernels'
    """
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(root) / "tiered-offload" / "kernels"


def find_compiler(cc: str | None = None) -> str:
    """Path of the C compiler: ``cc`` if given, else ``$CC``, else ``cc``/``gcc``/``clang``.

    >>> find_compiler("/no/such/cc")
    Traceback (most recent call last):
    ...
    allocators.errors.KernelBuildError: C compiler '/no/such/cc' not found; install gcc or set CC=/path/to/cc
    """
    candidates = [cc] if cc else [os.environ.get("CC"), "cc", "gcc", "clang"]
    for name in candidates:
        if name and shutil.which(name):
            return str(shutil.which(name))
    shown = cc or "cc, gcc or clang"
    raise KernelBuildError(f"C compiler {shown!r} not found; install gcc or set CC=/path/to/cc")


def _compile(compiler: str, flags: Sequence[str], sources: Sequence[Path], target: Path) -> str:
    with tempfile.NamedTemporaryFile(dir=target.parent, suffix=".so", delete=False) as tmp:
        tmp_path = Path(tmp.name)
    cmd = [compiler, *flags, "-o", str(tmp_path), *map(str, sources), "-lpthread"]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        tmp_path.unlink(missing_ok=True)
        return proc.stderr.strip() or f"{compiler} exited {proc.returncode}"
    # Atomic rename: two processes building at once both end with a complete library.
    os.replace(tmp_path, target)
    return ""


def build_kernels(cc: str | None = None, directory: Path | None = None) -> Path:
    """Build (or reuse) the kernel library and return its path.

    Tries ``-march=native`` first and falls back to generic code if the compiler rejects it.

    >>> build_kernels().suffix  # doctest: +SKIP
    '.so'
    """
    compiler = find_compiler(cc)
    sources = [CSRC / name for name in KERNEL_SOURCES]
    digest = hashlib.sha256()
    for path in sources:
        digest.update(path.read_bytes())
    # A home directory shared by different machines must not hand one CPU's -march=native build
    # to another, so the CPU model is part of the cache key.
    digest.update(" ".join([compiler, *BASE_FLAGS, cpu_model()]).encode())
    folder = directory or cache_dir()
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / f"offload_profile_{digest.hexdigest()[:16]}.so"
    if target.exists():
        return target
    error = _compile(compiler, (*BASE_FLAGS, "-march=native"), sources, target)
    if error:
        error = _compile(compiler, BASE_FLAGS, sources, target)
    if error:
        raise KernelBuildError(f"building the profiling kernels with {compiler} failed: {error}")
    return target

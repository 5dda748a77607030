"""Build (once, cached) and load the fused C++ step kernel from optim_cpu/csrc.

Nothing is compiled at import: :func:`load_kernel` builds on first call (saying so on stderr)
and returns None, with a warning, when no compiler or build works, so callers can fall back to
torch's fused kernel. ``python -m optim_cpu`` builds it ahead (.ci/setup does).
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import threading
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType

from allocators.errors import KernelBuildError

_CSRC = Path(__file__).parent / "csrc"
_SOURCES = ("fused_step.cpp",)
# -ffp-contract=off: the portable loop must not fuse a*b+c on its own, so it gives the same bits
# as the AVX-512 body (which fuses exactly where the source says fma) on every compiler.
_CFLAGS = ("-O3", "-march=native", "-ffp-contract=off", "-fno-math-errno")

_lock = threading.Lock()
_loaded: dict[str, ModuleType | None] = {}


def build_dir() -> Path:
    """Where the compiled kernel is cached: $TORCH_EXTENSIONS_DIR, else ~/.cache/tiered-offload.

    >>> build_dir().name in ('torch_extensions', 'tiered_offload')
    True
    """
    root = os.environ.get("TORCH_EXTENSIONS_DIR")
    if root:
        return Path(root) / "tiered_offload"
    return Path.home() / ".cache" / "tiered-offload" / "torch_extensions"


def _cpu_tag() -> str:
    # -march=native code must never be loaded on another CPU model (a shared home directory or
    # a copied cache would crash with SIGILL), so the CPU's flags are part of the module's name.
    flags = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "model name")):
                flags += line
            if line.startswith("flags"):
                break
    except OSError:
        flags = "unknown"
    return hashlib.sha1(flags.encode()).hexdigest()[:10]


def _kernel_key() -> str:
    # The CPU (see _cpu_tag), the sources, the flags and torch's version (its ABI) name a build:
    # two checkouts of the same code share one, and a changed source gets a new one.
    import torch

    digest = hashlib.sha1(" ".join((*_CFLAGS, torch.__version__)).encode())
    for source in _SOURCES:
        digest.update((_CSRC / source).read_bytes())
    return f"{_cpu_tag()}_{digest.hexdigest()[:8]}"


def kernel_path() -> Path:
    """The compiled kernel's file for this CPU, these sources and this torch (may not exist yet).

    >>> kernel_path().suffix
    '.so'
    """
    key = _kernel_key()
    return build_dir() / f"optim_cpu_{key}" / f"optim_cpu_fused_{key}.so"


def is_built() -> bool:
    """Whether the kernel is compiled already, so :func:`load_kernel` only loads it.

    >>> isinstance(is_built(), bool)
    True
    """
    return kernel_path().is_file()


def _import(path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _compile(path: Path) -> ModuleType:
    from torch.utils import cpp_extension

    return cpp_extension.load(
        name=path.stem,
        sources=[str(_CSRC / s) for s in _SOURCES],
        extra_cflags=list(_CFLAGS),
        build_directory=str(path.parent),
        verbose=False,
    )


@contextmanager
def _build_notice(path: Path) -> Iterator[None]:
    """Say on stderr that the kernel is compiling (a spinner on a terminal, one line otherwise),
    and how long it took: the first optimizer step would otherwise stall about 30 s unexplained."""
    from rich.console import Console

    console = Console(stderr=True, highlight=False)
    message = (
        "Building the optim_cpu C++ kernel, once for this CPU and torch (about 30 s; cached in "
        f"{path.parent})"
    )
    start = time.perf_counter()
    if console.is_terminal:
        with console.status(message + "..."):
            yield
    else:
        console.print(message + "...", markup=False, soft_wrap=True)
        yield
    console.print(f"optim_cpu kernel built in {time.perf_counter() - start:.0f} s", markup=False)


def _build() -> ModuleType:
    path = kernel_path()
    if path.is_file():
        # Loaded directly: torch's loader runs ninja, which rebuilds whenever the sources' path
        # differs from the last build's (another checkout of the same code), about 30 s each.
        try:
            return _import(path)
        except ImportError:
            pass  # half written by a build running now: torch's loader waits for its lock
    path.parent.mkdir(parents=True, exist_ok=True)
    with _build_notice(path):
        return _compile(path)


def load_kernel() -> ModuleType | None:
    """Return the compiled kernel module, building it on first use; None (and a warning) if not.

    The result is remembered for the process, so a failed build warns once and is not retried.

    >>> kernel = load_kernel()  # doctest: +SKIP
    >>> kernel.isa()  # doctest: +SKIP
    'avx512'
    """
    with _lock:
        if "kernel" not in _loaded:
            try:
                _loaded["kernel"] = _build_or_raise()
            except KernelBuildError as exc:
                warnings.warn(
                    f"{exc}; falling back to torch's fused AdamW kernel (slower: grads are "
                    "upcast and half-precision copies made in separate passes). Install g++ "
                    "and ninja to get the fused kernel.",
                    RuntimeWarning,
                    stacklevel=2,
                )
                _loaded["kernel"] = None
        return _loaded["kernel"]


def _build_or_raise() -> ModuleType:
    try:
        return _build()
    except Exception as exc:  # a compiler, ninja or linker failure arrives as many types
        raise KernelBuildError(f"could not build the optim_cpu C++ kernel: {exc}") from exc


def forget_kernel() -> None:
    """Drop the remembered result so the next :func:`load_kernel` tries again (for tests).

    >>> forget_kernel()
    """
    with _lock:
        _loaded.clear()

"""Build (once, cached) and load the fused C++ step kernel from optim_cpu/csrc.

Nothing is compiled at import: :func:`load_kernel` builds on first call and returns None, with a
warning, when no compiler or build works, so callers can fall back to torch's fused kernel.
"""

from __future__ import annotations

import hashlib
import os
import threading
import warnings
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


def _build() -> ModuleType:
    from torch.utils import cpp_extension

    directory = build_dir() / f"optim_cpu_{_cpu_tag()}"
    directory.mkdir(parents=True, exist_ok=True)
    return cpp_extension.load(
        name=f"optim_cpu_fused_{_cpu_tag()}",
        sources=[str(_CSRC / s) for s in _SOURCES],
        extra_cflags=list(_CFLAGS),
        build_directory=str(directory),
        verbose=False,
    )


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

"""Page-lock existing host memory for GPU DMA with cudaHostRegister, in chunks, through torch.

Only registration lives here; it must not allocate memory or initialise CUDA at import time.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

# One registration per buffer by default: a copy whose host range spans two registrations may
# not be recognised as pinned by the driver (the GPU benchmark's `hostbuffer_split` case measures
# it). Pieces remain available (chunk_nbytes) to bound how long one call holds the driver lock.
DEFAULT_REGISTER_CHUNK_NBYTES: int | None = None

# cudaHostRegisterPortable: pinned for every CUDA context, not only the current one.
_HOST_REGISTER_PORTABLE = 1


class PinningFallbackWarning(UserWarning):
    """cudaHostRegister refused a buffer; it stays usable but unpinned (slower, synchronous DMA)."""


@dataclass(frozen=True)
class Registration:
    """Outcome of :func:`register`: ``pinned`` and, when False, ``reason``.

    ``ranges`` lists the (address, nbytes) pieces registered, for :func:`unregister`.
    """

    pinned: bool
    reason: str | None = None
    ranges: tuple[tuple[int, int], ...] = ()


def cuda_status() -> tuple[bool, str | None]:
    """Whether CUDA can pin memory here; when not, the reason. Does not create a CUDA context.

    >>> available, reason = cuda_status()
    >>> available or bool(reason)
    True
    """
    import torch  # deferred: importing torch costs about a second, and pinning is optional

    if not torch.cuda.is_available():
        build = "a CPU-only torch build" if torch.version.cuda is None else "no visible GPU"
        return False, f"CUDA is not available ({build}); memory stays unpinned"
    return True, None


def _error_text(cudart, code: int) -> str:
    try:
        return f"cudaError {code}: {cudart.cudaGetErrorString(cudart.cudaError(code))}"
    except (AttributeError, TypeError, ValueError):
        return f"cudaError {code}"


def register(
    addr: int, nbytes: int, chunk_nbytes: int | None = DEFAULT_REGISTER_CHUNK_NBYTES
) -> Registration:
    """Page-lock ``[addr, addr + nbytes)`` in one call, or in pieces of ``chunk_nbytes`` (page
    aligned).

    Without CUDA returns ``Registration(pinned=False, reason=...)`` quietly; when the driver
    refuses a piece, the pieces done are unregistered, a PinningFallbackWarning names the
    piece and the error, and the memory stays usable unpinned.

    >>> register(0, 4096).pinned  # doctest: +SKIP
    False
    """
    if chunk_nbytes is None:
        chunk_nbytes = max(nbytes, 4096)
    if chunk_nbytes <= 0 or chunk_nbytes % 4096:
        raise ValueError(
            f"chunk_nbytes = {chunk_nbytes} must be a positive multiple of 4096 (host pages)"
        )
    available, reason = cuda_status()
    if not available:
        return Registration(pinned=False, reason=reason)
    import torch

    cudart = torch.cuda.cudart()
    done: list[tuple[int, int]] = []
    for offset in range(0, nbytes, chunk_nbytes):
        piece = min(chunk_nbytes, nbytes - offset)
        code = int(cudart.cudaHostRegister(addr + offset, piece, _HOST_REGISTER_PORTABLE))
        if code != 0:
            unregister(Registration(pinned=True, ranges=tuple(done)))
            why = (
                f"cudaHostRegister refused bytes {offset}..{offset + piece} of {nbytes} "
                f"({_error_text(cudart, code)}); the buffer stays unpinned"
            )
            warnings.warn(
                why + ". Check `ulimit -l` (locked memory) and free host memory.",
                PinningFallbackWarning,
                stacklevel=2,
            )
            return Registration(pinned=False, reason=why)
        done.append((addr + offset, piece))
    return Registration(pinned=True, ranges=tuple(done))


def unregister(registration: Registration) -> list[str]:
    """Unpin what :func:`register` pinned; returns the errors met (empty when all went well).

    Errors are returned, not raised: this runs from finalizers and at interpreter exit, when
    the CUDA runtime may already be unloading.

    >>> unregister(Registration(pinned=False))
    []
    """
    if not registration.ranges:
        return []
    import torch

    cudart = torch.cuda.cudart()
    errors = []
    for start, piece in registration.ranges:
        code = int(cudart.cudaHostUnregister(start))
        if code != 0:
            errors.append(
                f"cudaHostUnregister({start:#x}, {piece} bytes): {_error_text(cudart, code)}"
            )
    return errors

"""Linux NUMA memory policy through the raw syscalls the allocators use (mbind, move_pages).

Only thin, checked wrappers live here: no libnuma, no buffers, no striping, no CUDA.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import functools
import os
import platform
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from enum import IntEnum, IntFlag
from pathlib import Path

import numpy as np

from allocators.cpu_lists import parse_cpu_list
from allocators.errors import NumaError, PlacementError

# Syscall numbers per architecture (arch/x86/entry/syscalls/syscall_64.tbl and the generic
# table include/uapi/asm-generic/unistd.h that aarch64 uses).
_SYSCALL_NUMBERS = {
    "x86_64": {"mbind": 237, "move_pages": 279},
    "aarch64": {"mbind": 235, "move_pages": 239},
}
_MACHINE_ALIASES = {"amd64": "x86_64", "arm64": "aarch64"}

# move_pages takes one pointer per page; querying in batches bounds the temporary arrays.
_MOVE_PAGES_BATCH = 1 << 20


class Mode(IntEnum):
    """Memory policy modes of ``include/uapi/linux/mempolicy.h``."""

    MPOL_DEFAULT = 0
    MPOL_PREFERRED = 1
    MPOL_BIND = 2
    MPOL_INTERLEAVE = 3
    MPOL_LOCAL = 4
    MPOL_PREFERRED_MANY = 5
    MPOL_WEIGHTED_INTERLEAVE = 6


class ModeFlag(IntFlag):
    """Flags OR-ed into a mode by mbind (how the node mask is interpreted)."""

    MPOL_F_NUMA_BALANCING = 1 << 13
    MPOL_F_RELATIVE_NODES = 1 << 14
    MPOL_F_STATIC_NODES = 1 << 15


_MODE_FLAGS_MASK = int(
    ModeFlag.MPOL_F_NUMA_BALANCING | ModeFlag.MPOL_F_RELATIVE_NODES | ModeFlag.MPOL_F_STATIC_NODES
)

# Errors after which we give up on placement but keep the memory usable: a container without
# CAP_SYS_NICE (docker's seccomp profile answers EPERM) or a kernel/seccomp without the call.
_FALLBACK_ERRNOS = (errno.EPERM, errno.ENOSYS)


class NumaFallbackWarning(UserWarning):
    """Placement was refused by the OS (EPERM/ENOSYS); memory falls back to default placement."""


class NumaUnavailableError(NumaError):
    """A query or migration syscall was refused (EPERM/ENOSYS): nothing to fall back to."""


@dataclass(frozen=True)
class PolicyOutcome:
    """What became of a placement request: ``enforced`` False means default placement is used.

    ``reason`` says why when not enforced; callers store it in their state (e.g. a buffer's
    ``fallback_reason``).
    """

    enforced: bool
    reason: str | None = None


_warned: set[tuple[str, int]] = set()


@functools.cache
def libc() -> ctypes.CDLL:
    """The C library, loaded once with errno capture (for syscall, mmap, madvise, memset).

    >>> libc().getpid() == os.getpid()
    True
    """
    try:
        lib = ctypes.CDLL("libc.so.6", use_errno=True)
    except OSError:
        lib = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    lib.syscall.restype = ctypes.c_long
    return lib


def _syscall_number(name: str) -> int:
    machine = platform.machine().lower()
    table = _SYSCALL_NUMBERS.get(_MACHINE_ALIASES.get(machine, machine))
    if table is None:
        raise NumaError(
            f"no NUMA syscall numbers for CPU architecture {machine!r}; "
            f"supported: {sorted(_SYSCALL_NUMBERS)}"
        )
    return table[name]


def _syscall(name: str, *args: ctypes._SimpleCData | ctypes.Array | None) -> tuple[int, int]:
    """Run syscall ``name``; return (result, errno) with errno 0 on success.

    Every argument is a ctypes value: syscall() is variadic, so a bare Python int would be
    passed as a 32-bit int and the kernel would read garbage in the upper half.
    """
    ctypes.set_errno(0)
    result = libc().syscall(ctypes.c_long(_syscall_number(name)), *args)
    return result, (ctypes.get_errno() if result < 0 else 0)


def online_nodes(sysfs_root: str | os.PathLike[str] = "/sys") -> tuple[int, ...]:
    """NUMA nodes that hold memory (``has_memory``; ``online`` on kernels without it).

    A CPU-only node is online but cannot take a page, so it is not a placement target.

    >>> 0 in online_nodes()
    True
    """
    node_dir = Path(sysfs_root) / "devices/system/node"
    for name in ("has_memory", "online"):
        if (node_dir / name).exists():
            return parse_cpu_list((node_dir / name).read_text(), what=str(node_dir / name))
    # A kernel built without CONFIG_NUMA has no node directory: everything is node 0.
    return (0,)


def allowed_nodes() -> tuple[int, ...]:
    """Nodes this process may allocate from (its cpuset's ``Mems_allowed_list``).

    >>> 0 in allowed_nodes()
    True
    """
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("Mems_allowed_list:"):
            return parse_cpu_list(line.split(":", 1)[1], what="Mems_allowed_list")
    return online_nodes()


def check_nodes(nodes: Iterable[int], sysfs_root: str | os.PathLike[str] = "/sys") -> None:
    """Raise PlacementError naming any node that does not exist and the nodes that do.

    >>> check_nodes([0])
    >>> check_nodes([7])  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    allocators.errors.PlacementError: NUMA node 7 does not exist or has no memory...
    """
    online = online_nodes(sysfs_root)
    missing = [n for n in nodes if n not in online]
    if missing:
        names = ", ".join(str(n) for n in missing)
        raise PlacementError(
            f"NUMA node {names} does not exist or has no memory on this machine; "
            f"online nodes with memory: {list(online)}; place the buffer on one of those"
        )


@functools.cache
def kernel_maxnode_bits() -> int:
    """How many bits a node mask has for this kernel (a multiple of 64).

    The kernel prints ``Mems_allowed`` with one bit per possible node id (MAX_NUMNODES); a mask
    this long names every node the kernel may have.

    >>> kernel_maxnode_bits() % 64
    0
    """
    bits = 0
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("Mems_allowed:"):
            bits = 4 * sum(c in "0123456789abcdefABCDEF" for c in line.split(":", 1)[1])
    possible = Path("/sys/devices/system/node/possible")
    if possible.exists():
        bits = max(
            bits, max(parse_cpu_list(possible.read_text(), what=str(possible)), default=0) + 1
        )
    return max(64, -(-bits // 64) * 64)


def _nodemask(nodes: Iterable[int]) -> tuple[ctypes.Array, int]:
    """A node mask array and the ``maxnode`` to pass with it.

    The kernel reads ``maxnode - 1`` bits (libnuma passes its mask size + 1 for that reason).
    """
    bits = kernel_maxnode_bits()
    words = (ctypes.c_ulong * (bits // 64))()
    for node in nodes:
        if not 0 <= node < bits:
            raise PlacementError(
                f"NUMA node {node} is outside this kernel's node range 0..{bits - 1}; "
                f"online nodes with memory: {list(online_nodes())}"
            )
        words[node // 64] |= 1 << (node % 64)
    return words, bits + 1


def _fallback(call: str, err: int, what: str) -> PolicyOutcome:
    """Warn once per (call, errno) and report default placement."""
    cause = (
        "the process lacks CAP_SYS_NICE (a container's seccomp profile refuses NUMA calls)"
        if err == errno.EPERM
        else "the kernel or a seccomp filter does not offer this syscall"
    )
    reason = f"{call} refused with {errno.errorcode[err]} ({cause}); {what} uses default placement"
    if (call, err) not in _warned:
        _warned.add((call, err))
        warnings.warn(
            reason + ". Run with CAP_SYS_NICE (docker --cap-add SYS_NICE) to place memory.",
            NumaFallbackWarning,
            stacklevel=3,
        )
    return PolicyOutcome(enforced=False, reason=reason)


def _error(call: str, err: int, detail: str) -> NumaError:
    message = f"{call} failed with {errno.errorcode.get(err, err)} ({os.strerror(err)}): {detail}"
    if err == errno.EINVAL:
        message += (
            f"; a node may be outside this process's allowed nodes {list(allowed_nodes())}"
            f" (online nodes with memory: {list(online_nodes())}), or the mode/flags/range"
            " are not valid together"
        )
    return NumaError(err, message)


def _validate_mode(mode: int, nodes: Sequence[int]) -> Mode:
    try:
        checked = Mode(int(mode) & ~_MODE_FLAGS_MASK)
    except ValueError:
        raise NumaError(
            f"memory policy mode {mode!r} is not one of {[m.name for m in Mode]}"
        ) from None
    needs_nodes = checked not in (Mode.MPOL_DEFAULT, Mode.MPOL_LOCAL)
    if needs_nodes and not nodes and checked is not Mode.MPOL_PREFERRED:
        raise PlacementError(f"{checked.name} needs at least one node; pass nodes=[0] or similar")
    if not needs_nodes and nodes:
        raise PlacementError(f"{checked.name} takes no nodes; pass nodes=() or use MPOL_BIND")
    return checked


def mbind(addr: int, nbytes: int, mode: int, nodes: Sequence[int], flags: int = 0) -> PolicyOutcome:
    """Set the policy of the pages in ``[addr, addr + nbytes)``; applies to pages faulted later.

    ``addr`` must be page aligned. Missing nodes raise PlacementError before the call; EPERM
    and ENOSYS warn once and return ``PolicyOutcome(enforced=False, reason=...)``.

    >>> import mmap
    >>> m = mmap.mmap(-1, 8192)
    >>> addr = ctypes.addressof(ctypes.c_char.from_buffer(m))
    >>> mbind(addr, 8192, Mode.MPOL_BIND, [0]).enforced
    True
    """
    checked = _validate_mode(mode, nodes)
    check_nodes(nodes)
    words, maxnode = _nodemask(nodes)
    result, err = _syscall(
        "mbind",
        ctypes.c_void_p(addr),
        ctypes.c_ulong(nbytes),
        ctypes.c_long(int(mode)),
        words,
        ctypes.c_ulong(maxnode),
        ctypes.c_uint(int(flags)),
    )
    if result == 0:
        return PolicyOutcome(enforced=True)
    if err in _FALLBACK_ERRNOS:
        return _fallback("mbind", err, "this memory")
    raise _error(
        "mbind",
        err,
        f"{checked.name} of {nbytes} bytes at {addr:#x} on nodes {list(nodes)}, flags {flags:#x}",
    )


def _move_pages_array(
    pid: int, addrs: np.ndarray, nodes: np.ndarray | None, flags: int
) -> np.ndarray:
    """move_pages over numpy arrays, in batches; returns int32 status per page."""
    status = np.empty(len(addrs), dtype=np.int32)
    for start in range(0, len(addrs), _MOVE_PAGES_BATCH):
        batch = np.ascontiguousarray(addrs[start : start + _MOVE_PAGES_BATCH], dtype=np.uint64)
        out = status[start : start + len(batch)]
        target = None
        if nodes is not None:
            target = np.ascontiguousarray(nodes[start : start + len(batch)], dtype=np.int32)
        result, err = _syscall(
            "move_pages",
            ctypes.c_int(pid),
            ctypes.c_ulong(len(batch)),
            batch.ctypes.data_as(ctypes.c_void_p),
            None if target is None else target.ctypes.data_as(ctypes.c_void_p),
            out.ctypes.data_as(ctypes.c_void_p),
            ctypes.c_int(int(flags)),
        )
        if result < 0:
            verb = "query" if nodes is None else "move"
            if err in _FALLBACK_ERRNOS:
                raise NumaUnavailableError(
                    err,
                    f"move_pages refused with {errno.errorcode[err]}: cannot {verb} page "
                    "placement (needs CAP_SYS_NICE in most containers)",
                )
            raise _error("move_pages", err, f"{verb} {len(batch)} pages of pid {pid}")
    return status


def move_pages(
    pid: int, addrs: Sequence[int], nodes: Sequence[int] | None = None, flags: int = 0
) -> list[int]:
    """Report (``nodes=None``) or change the node of each page; pid 0 is this process.

    Returns one status per page: its node, or a negative errno (``-errno.ENOENT`` for a page
    never touched, ``-errno.EFAULT`` for an unmapped address).

    >>> buf = ctypes.create_string_buffer(4096)
    >>> move_pages(0, [ctypes.addressof(buf) // 4096 * 4096])[0] in online_nodes()
    True
    """
    if nodes is not None:
        if len(nodes) != len(addrs):
            raise NumaError(
                f"move_pages got {len(addrs)} addresses but {len(nodes)} target nodes; "
                "give one node per address"
            )
        check_nodes(set(nodes))
    array = np.asarray(addrs, dtype=np.uint64)
    target = None if nodes is None else np.asarray(nodes, dtype=np.int32)
    return [int(s) for s in _move_pages_array(pid, array, target, flags)]


def page_nodes(addr: int, nbytes: int, page_nbytes: int | None = None) -> np.ndarray:
    """Node of every page in ``[addr, addr + nbytes)`` (negative errno where not present).

    >>> buf = ctypes.create_string_buffer(4096)
    >>> set(page_nodes(ctypes.addressof(buf) // 4096 * 4096, 4096).tolist()) <= set(online_nodes())
    True
    """
    page = page_nbytes or os.sysconf("SC_PAGE_SIZE")
    addrs = np.arange(addr, addr + nbytes, page, dtype=np.uint64)
    return _move_pages_array(0, addrs, None, 0)

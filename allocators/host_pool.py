"""A thread-safe cache of HostBuffers by size class and placement, to keep mmap/pinning off the hot path.

It decides only reuse and eviction; placing, pinning and freeing memory are HostBuffer's job.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from allocators.host_buffer import PAGE_NBYTES, HostBuffer
from allocators.placement import Placement, as_placement
from allocators.striping import DEFAULT_CHUNK_NBYTES, split_nbytes
from allocators.units import parse_size

# Classes per doubling of size. Eight bound the rounding waste below 1/8 (12.5%), where
# power-of-two classes (torch's pinned allocator) can waste nearly 2x; exact sizes would waste
# nothing but miss whenever a sequence length changes by one token.
_CLASSES_PER_DOUBLING = 8


def size_class(nbytes: int) -> int:
    """The pooled size for a request: whole pages, rounded up by less than 12.5%.

    >>> size_class(1), size_class(9 * 4096), size_class(17 * 4096) // 4096
    (4096, 36864, 18)
    """
    pages = -(-nbytes // PAGE_NBYTES)
    # Pages in [2**k, 2**(k+1)) round up to a multiple of 2**(k-3): eight classes per doubling.
    step = 1 << max(0, pages.bit_length() - _CLASSES_PER_DOUBLING.bit_length())
    return -(-pages // step) * step * PAGE_NBYTES


@dataclass(frozen=True)
class PoolStats:
    """Bytes held by a pool (in use + cached) and how requests were served."""

    held_nbytes: int
    in_use_nbytes: int
    cached_nbytes: int
    hits: int
    misses: int
    evictions: int


_Key = tuple[int, Placement, bool]


class HostPool:
    """Reuses released HostBuffers of the same size class, placement and pinning.

    Cached (released) buffers stay mapped and pinned; past ``max_cached_nbytes`` the least
    recently released are freed. Buffer options (huge pages, chunking, strictness) apply to
    every buffer the pool makes.

    >>> pool = HostPool(max_cached_nbytes="64MiB", pin=False)
    >>> buf = pool.acquire(10_000, placement=0)
    >>> pool.release(buf)
    >>> pool.acquire(9_000, placement=0) is buf
    True
    >>> pool.stats().hits
    1
    """

    def __init__(
        self,
        max_cached_nbytes: int | str = "4GiB",
        *,
        pin: bool = True,
        huge_pages: bool = True,
        chunk_nbytes: int = DEFAULT_CHUNK_NBYTES,
        prefault_threads: int | None = None,
        strict: bool = False,
    ) -> None:
        self.max_cached_nbytes = parse_size(max_cached_nbytes, what="max_cached_nbytes")
        self.pin = pin
        self._options = {
            "huge_pages": huge_pages,
            "chunk_nbytes": chunk_nbytes,
            "prefault_threads": prefault_threads,
            "strict": strict,
        }
        self._lock = threading.Lock()
        self._in_use: dict[int, tuple[_Key, HostBuffer]] = {}
        self._cached: OrderedDict[int, tuple[_Key, HostBuffer]] = OrderedDict()
        self._by_key: dict[_Key, list[HostBuffer]] = {}
        self._hits = self._misses = self._evictions = 0

    @property
    def chunk_nbytes(self) -> int:
        """Bytes per stripe chunk in every buffer this pool makes (how a split placement is cut).

        >>> HostPool(pin=False, chunk_nbytes=4 << 20).chunk_nbytes
        4194304
        """
        return self._options["chunk_nbytes"]

    def size_for(self, nbytes: int) -> int:
        """The bytes :meth:`acquire` maps for a request of ``nbytes``: its size class.

        >>> HostPool(pin=False).size_for(1) == PAGE_NBYTES
        True
        """
        return size_class(nbytes)

    def acquire(
        self,
        nbytes: int | str,
        placement: Placement | int | Sequence[tuple[int, float]],
        pin: bool | None = None,
        *,
        room_nbytes: Mapping[int, int] | None = None,
    ) -> HostBuffer:
        """A buffer of at least ``nbytes`` on ``placement``: a cached one if any, else a new one.

        ``pin`` defaults to the pool's setting. ``room_nbytes`` (node -> bytes) bounds what the
        cache may keep on each named node once a new buffer has to be made: cached buffers
        holding more there are freed first, least recently released first. A caller with
        per-node budgets passes what its budget leaves, so memory held (in use + cached) stays
        within the budget even when requests change size class and old buffers never hit again.

        >>> pool = HostPool(pin=False)
        >>> pool.release(pool.acquire(1 << 20, 0))
        >>> _ = pool.acquire(2 << 20, 0, room_nbytes={0: 0})
        >>> pool.stats().cached_nbytes, pool.stats().evictions
        (0, 1)
        """
        request = parse_size(nbytes, what="HostPool.acquire nbytes")
        if request <= 0:
            raise ValueError(f"HostPool.acquire nbytes = {nbytes!r} must be > 0 bytes")
        key = (self.size_for(request), as_placement(placement), self.pin if pin is None else pin)
        with self._lock:
            shelf = self._by_key.get(key)
            if shelf:
                buf = self._take_cached_locked(id(shelf[-1]))
                self._in_use[id(buf)] = (key, buf)
                self._hits += 1
                return buf
            self._misses += 1
            victims = self._evict_for_room_locked(room_nbytes) if room_nbytes else []
        for victim in victims:
            victim.free()
        # Made outside the lock: mapping and pre-faulting take milliseconds per MiB.
        buf = HostBuffer(key[0], key[1], pin=key[2], **self._options)
        with self._lock:
            self._in_use[id(buf)] = (key, buf)
        return buf

    def release(self, buf: HostBuffer) -> None:
        """Return ``buf`` to the pool for reuse; its tensor views must be gone, and so must any
        asynchronous copy (DMA) into or out of it: past ``max_cached_nbytes`` a released buffer
        is unpinned and unmapped at once, and a cached one is handed to the next acquire().

        A buffer freed by its user is forgotten instead of cached.
        """
        if buf.live_views:
            raise BufferError(
                f"{buf!r} still has {buf.live_views} live tensor view(s); delete them before "
                "release(), or the next acquire() would hand out memory still in use"
            )
        with self._lock:
            entry = self._in_use.pop(id(buf), None)
            if entry is None or entry[1] is not buf:
                raise ValueError(f"{buf!r} was not acquired from this pool (or was released twice)")
            if buf.freed:
                return
            key = entry[0]
            self._cached[id(buf)] = (key, buf)
            self._by_key.setdefault(key, []).append(buf)
            victims = self._evict_locked(self.max_cached_nbytes)
        for victim in victims:
            victim.free()

    def abandon(self, buf: HostBuffer) -> None:
        """Forget ``buf`` while views of it are alive (held by an exception's frames, say): it
        is not cached, and its memory is unmapped when its last view goes.

        >>> import torch
        >>> pool = HostPool(pin=False)
        >>> buf = pool.acquire(4096, 0); view = buf.tensor(torch.uint8, (4096,))
        >>> pool.abandon(buf); pool.stats().held_nbytes, buf.freed
        (0, False)
        >>> del view, buf
        """
        with self._lock:
            entry = self._in_use.pop(id(buf), None)
        if entry is None or entry[1] is not buf:
            raise ValueError(f"{buf!r} was not acquired from this pool (or was released twice)")

    def _take_cached_locked(self, ident: int) -> HostBuffer:
        """Remove the cached buffer ``ident`` from the cache and its shelf, and return it."""
        key, buf = self._cached.pop(ident)
        shelf = self._by_key[key]
        shelf.remove(buf)
        if not shelf:
            del self._by_key[key]
        return buf

    def _evict_locked(self, limit_nbytes: int) -> list[HostBuffer]:
        """Drop least recently released buffers until the cache holds at most ``limit_nbytes``."""
        victims = []
        cached = sum(buf.nbytes for _, buf in self._cached.values())
        while cached > limit_nbytes:
            buf = self._take_cached_locked(next(iter(self._cached)))
            cached -= buf.nbytes
            victims.append(buf)
        self._evictions += len(victims)
        return victims

    def _evict_for_room_locked(self, room_nbytes: Mapping[int, int]) -> list[HostBuffer]:
        """Drop least recently released buffers on the nodes where the cache holds more than
        ``room_nbytes`` allows; buffers on other nodes stay."""
        shares = {
            ident: split_nbytes(buf.nbytes, key[1], self.chunk_nbytes)
            for ident, (key, buf) in self._cached.items()
        }
        cached: dict[int, int] = {}
        for share in shares.values():
            for node, n in share.items():
                cached[node] = cached.get(node, 0) + n
        over = {n for n, room in room_nbytes.items() if cached.get(n, 0) > max(room, 0)}
        victims = []
        for ident in list(self._cached):
            if not over:
                break
            if not any(n > 0 and node in over for node, n in shares[ident].items()):
                continue
            victims.append(self._take_cached_locked(ident))
            for node, n in shares[ident].items():
                cached[node] = cached.get(node, 0) - n
                if node in over and cached[node] <= max(room_nbytes[node], 0):
                    over.discard(node)
        self._evictions += len(victims)
        return victims

    def clear(self) -> None:
        """Free every cached buffer; buffers in use stay with their users.

        >>> pool = HostPool(pin=False)
        >>> pool.release(pool.acquire(4096, 0)); pool.clear(); pool.stats().cached_nbytes
        0
        """
        with self._lock:
            victims = [buf for _, buf in self._cached.values()]
            self._cached.clear()
            self._by_key.clear()
        for victim in victims:
            victim.free()

    def stats(self) -> PoolStats:
        """Bytes held and request counts so far."""
        with self._lock:
            in_use = sum(buf.nbytes for _, buf in self._in_use.values())
            cached = sum(buf.nbytes for _, buf in self._cached.values())
            return PoolStats(
                held_nbytes=in_use + cached,
                in_use_nbytes=in_use,
                cached_nbytes=cached,
                hits=self._hits,
                misses=self._misses,
                evictions=self._evictions,
            )

import threading

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from allocators.host_buffer import PAGE_NBYTES
from allocators.host_pool import HostPool, size_class

MiB = 1 << 20


@pytest.fixture
def pool():
    p = HostPool(max_cached_nbytes=8 * MiB, pin=False)
    yield p
    p.clear()


@given(st.integers(1, 1 << 40))
def test_size_classes_waste_less_than_an_eighth(nbytes):
    pages = -(-nbytes // PAGE_NBYTES) * PAGE_NBYTES
    cls = size_class(nbytes)
    assert cls % PAGE_NBYTES == 0
    assert pages <= cls < pages * 1.125 + PAGE_NBYTES


def test_sizes_in_one_class_share_it():
    assert size_class(1000 * 4096) == size_class(1001 * 4096)
    assert size_class(1000 * 4096) != size_class(1200 * 4096)


def test_a_released_buffer_is_reused_for_the_same_class_and_placement(pool):
    first = pool.acquire(3 * MiB, placement=0)
    pool.release(first)
    again = pool.acquire(3 * MiB - 5, placement=[(0, 1.0)])
    assert again is first
    stats = pool.stats()
    assert (stats.hits, stats.misses) == (1, 1)
    assert stats.in_use_nbytes == first.nbytes and stats.cached_nbytes == 0
    pool.release(again)


def test_other_sizes_or_pinning_miss(pool):
    buf = pool.acquire(MiB, placement=0)
    pool.release(buf)
    bigger = pool.acquire(2 * MiB, placement=0)
    pinned = pool.acquire(MiB, placement=0, pin=True)
    assert bigger is not buf and pinned is not buf
    assert pool.stats().misses == 3
    pool.release(bigger)
    pool.release(pinned)


def test_stats_count_held_in_use_and_cached_bytes(pool):
    a = pool.acquire(MiB, 0)
    b = pool.acquire(2 * MiB, 0)
    pool.release(a)
    stats = pool.stats()
    assert stats.in_use_nbytes == b.nbytes
    assert stats.cached_nbytes == a.nbytes
    assert stats.held_nbytes == a.nbytes + b.nbytes
    pool.release(b)


def test_the_least_recently_released_are_evicted_past_the_limit(pool):
    bufs = [pool.acquire(3 * MiB, 0) for _ in range(3)]
    for buf in bufs:
        pool.release(buf)
    stats = pool.stats()
    assert stats.evictions == 1 and stats.cached_nbytes == 6 * MiB
    assert bufs[0].freed and not bufs[1].freed and not bufs[2].freed


def test_clear_frees_cached_buffers_and_keeps_those_in_use(pool):
    cached = pool.acquire(MiB, 0)
    in_use = pool.acquire(MiB, 0)
    pool.release(cached)
    pool.clear()
    assert cached.freed and not in_use.freed
    assert pool.stats().cached_nbytes == 0
    pool.release(in_use)


def test_release_refuses_a_buffer_with_live_views(pool):
    buf = pool.acquire(MiB, 0)
    view = buf.tensor(torch.uint8, (10,))
    with pytest.raises(BufferError, match="live tensor view"):
        pool.release(buf)
    del view
    pool.release(buf)


def test_release_refuses_foreign_and_double_releases(pool):
    buf = pool.acquire(MiB, 0)
    pool.release(buf)
    with pytest.raises(ValueError, match="not acquired from this pool"):
        pool.release(buf)
    other = HostPool(pin=False)
    stranger = other.acquire(MiB, 0)
    with pytest.raises(ValueError, match="not acquired from this pool"):
        pool.release(stranger)
    other.release(stranger)
    other.clear()


def test_a_buffer_freed_by_its_user_is_forgotten(pool):
    buf = pool.acquire(MiB, 0)
    buf.free()
    pool.release(buf)
    assert pool.stats().held_nbytes == 0


def test_concurrent_acquire_and_release_keep_the_books(pool):
    def worker():
        for _ in range(20):
            pool.release(pool.acquire(MiB, 0))

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    stats = pool.stats()
    assert stats.hits + stats.misses == 80
    assert stats.in_use_nbytes == 0
    assert stats.cached_nbytes == stats.misses * size_class(MiB) - stats.evictions * size_class(MiB)


def test_a_miss_frees_cached_buffers_only_on_nodes_over_their_room(pool):
    old = pool.acquire(1 * MiB, placement=0)
    older = pool.acquire(2 * MiB, placement=0)
    pool.release(older)
    pool.release(old)
    # Room on a node the cache does not use frees nothing.
    pool.release(pool.acquire(3 * MiB, placement=0, room_nbytes={1: 0}))
    assert pool.stats().evictions == 0
    # 3 MiB of room on node 0 with 6 MiB cached: the least recently released go (2 MiB, then
    # 1 MiB) until what is left fits; the most recent (3 MiB) stays.
    kept = pool.acquire(4 * MiB, placement=0, room_nbytes={0: 3 * MiB})
    assert pool.stats().cached_nbytes == 3 * MiB and older.freed and old.freed
    pool.release(kept)


def test_a_hit_never_frees_what_is_cached(pool):
    buf = pool.acquire(1 * MiB, placement=0)
    pool.release(buf)
    pool.release(pool.acquire(2 * MiB, placement=0))
    assert pool.acquire(1 * MiB, placement=0, room_nbytes={0: 0}) is buf
    assert pool.stats().evictions == 0

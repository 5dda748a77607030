import ctypes
import errno
import gc
import warnings

import numpy as np
import pytest
import torch
from numa_maps import policy_of

from allocators import cuda_host, host_buffer, numa
from allocators.errors import OffloadError, PlacementError
from allocators.host_buffer import PAGE_NBYTES, HostBuffer, PlacementDriftWarning

MiB = 1 << 20
needs_cuda = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU (torch.cuda.is_available() is False)"
)


@pytest.fixture(autouse=True)
def fresh_warnings(monkeypatch):
    monkeypatch.setattr(numa, "_warned", set())


def mapped(addr):
    """Whether ``addr`` lies in one of this process's mappings."""
    for line in open("/proc/self/maps").read().splitlines():
        low, high = (int(x, 16) for x in line.split()[0].split("-"))
        if low <= addr < high:
            return True
    return False


def test_a_1gib_buffer_on_node_0_has_all_its_pages_there():
    with HostBuffer(1 << 30, placement=0, pin=False) as buf:
        assert buf.pages_per_node() == {0: (1 << 30) // PAGE_NBYTES}
        assert buf.misplaced_pages == 0
        assert buf.placement_enforced


def test_size_is_rounded_to_whole_pages_only():
    with HostBuffer(5 * MiB + 1, placement=[(0, 1.0)], pin=False) as buf:
        assert buf.requested_nbytes == 5 * MiB + 1
        assert buf.nbytes == 5 * MiB + PAGE_NBYTES


def test_size_strings_are_accepted():
    with HostBuffer("64KiB", placement=0, pin=False) as buf:
        assert buf.nbytes == 64 * 1024


def test_a_missing_node_raises_before_any_memory_is_mapped(monkeypatch):
    monkeypatch.setattr(host_buffer, "_map_anonymous", lambda *a: pytest.fail("mapped"))
    with pytest.raises(PlacementError, match=r"node 7 .*online nodes with memory: \[0"):
        HostBuffer(MiB, placement=[(0, 0.5), (7, 0.5)])


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"nbytes": 0}, "must be > 0"),
        ({"nbytes": "lots"}, "not a size"),
        ({"chunk_nbytes": 1000}, "multiple of the page size"),
        ({"prefault_threads": -1}, ">= 1"),
    ],
)
def test_bad_arguments_say_what_to_write(kwargs, fragment):
    args = {"nbytes": MiB, "placement": 0, "pin": False} | kwargs
    with pytest.raises(ValueError, match=fragment):
        HostBuffer(**args)


def test_default_policy_is_preferred_and_strict_is_bind():
    with HostBuffer(MiB, placement=0, pin=False) as loose:
        assert policy_of(loose.ptr) == "prefer:0"
    with HostBuffer(MiB, placement=0, pin=False, strict=True) as strict:
        assert policy_of(strict.ptr) == "bind:0"


def test_each_stripe_is_bound_before_first_touch(monkeypatch):
    # Node 1 does not exist here: record the mbind calls instead of making them, and let the
    # placement check find every page on node 0.
    calls = []

    def record(addr, nbytes, mode, nodes, flags=0):
        calls.append((nbytes, tuple(nodes), numa.move_pages(0, [addr])[0]))
        return numa.PolicyOutcome(enforced=True)

    monkeypatch.setattr(numa, "check_nodes", lambda nodes: None)
    monkeypatch.setattr(numa, "mbind", record)
    with pytest.warns(PlacementDriftWarning, match="not on their planned node"):
        buf = HostBuffer(8 * MiB, placement=[(0, 1), (1, 1)], pin=False)
    assert [nodes for _, nodes, _ in calls] == [(0,), (1,), (0,), (1,)]
    assert {nbytes for nbytes, _, _ in calls} == {2 * MiB}
    assert {status for _, _, status in calls} == {-errno.ENOENT}
    assert buf.misplaced_pages == 4 * MiB // PAGE_NBYTES
    buf.free()


def test_mbind_eperm_falls_back_to_a_usable_unplaced_buffer(monkeypatch):
    real = numa._syscall
    monkeypatch.setattr(
        numa, "_syscall", lambda name, *a: (-1, errno.EPERM) if name == "mbind" else real(name, *a)
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first = HostBuffer(MiB, placement=0, pin=False)
        second = HostBuffer(MiB, placement=0, pin=False)
    assert [w.category for w in caught] == [numa.NumaFallbackWarning]
    for buf in (first, second):
        assert not buf.placement_enforced
        assert "EPERM" in buf.fallback_reason
        assert buf.misplaced_pages is None
        view = buf.tensor(torch.int64, (MiB // 8,))
        view.fill_(7)
        assert int(view.sum()) == 7 * MiB // 8
        del view
        buf.free()
    assert "placement not enforced" in repr(first)


def test_tensor_views_share_the_buffer_memory():
    with HostBuffer(MiB, placement=0, pin=False) as buf:
        floats = buf.tensor(torch.float32, (4, 1024))
        floats.copy_(torch.arange(4096, dtype=torch.float32).view(4, 1024))
        raw = ctypes.string_at(buf.ptr + 4 * 100, 4)
        assert np.frombuffer(raw, dtype=np.float32)[0] == 100.0
        later = buf.tensor(torch.float32, (2,), offset_bytes=4 * 4094)
        assert later.tolist() == [4094.0, 4095.0]
        later[0] = -1.0
        assert floats[3, 1022] == -1.0
        del floats, later


@pytest.mark.parametrize(
    ("dtype", "shape", "offset", "fragment"),
    [
        (torch.float32, (MiB,), 0, "needs 4194304 bytes"),
        (torch.float32, (1,), MiB, "needs"),
        (torch.float64, (1,), 4, "multiple of 8"),
        (torch.float32, (-1, 2), 0, "ints >= 0"),
        (torch.float32, (1,), -8, ">= 0"),
    ],
)
def test_bad_views_say_what_is_wrong(dtype, shape, offset, fragment):
    with HostBuffer(MiB, placement=0, pin=False) as buf:
        with pytest.raises(ValueError, match=fragment):
            buf.tensor(dtype, shape, offset_bytes=offset)


def test_free_is_idempotent_and_unmaps():
    buf = HostBuffer(4 * MiB, placement=0, pin=False)
    addr = buf.ptr
    assert mapped(addr)
    buf.free()
    buf.free()
    assert buf.freed and not mapped(addr)
    assert "freed" in repr(buf)


def test_a_freed_buffer_refuses_new_views():
    buf = HostBuffer(MiB, placement=0, pin=False)
    buf.free()
    with pytest.raises(BufferError, match="freed"):
        buf.tensor(torch.uint8, (1,))
    with pytest.raises(BufferError, match="freed"):
        buf.pages_per_node()


def test_free_is_refused_while_a_view_or_a_slice_of_it_lives():
    buf = HostBuffer(MiB, placement=0, pin=False)
    view = buf.tensor(torch.float32, (1024,))
    part = view[10:20]
    del view
    with pytest.raises(BufferError, match="1 tensor view"):
        buf.free()
    del part
    buf.free()
    assert buf.freed


def test_free_force_frees_under_live_views():
    buf = HostBuffer(MiB, placement=0, pin=False)
    view = buf.tensor(torch.uint8, (16,))
    buf.free(force=True)
    assert buf.freed and not mapped(buf.ptr)
    del view


def test_a_view_keeps_a_dropped_buffer_mapped():
    view = HostBuffer(MiB, placement=0, pin=False).tensor(torch.int32, (1024,))
    gc.collect()
    view.fill_(3)
    assert int(view.sum()) == 3 * 1024


def test_memory_is_released_when_the_last_reference_goes():
    buf = HostBuffer(MiB, placement=0, pin=False)
    addr, finalizer = buf.ptr, buf._finalizer
    assert finalizer.atexit
    del buf
    gc.collect()
    assert not finalizer.alive and not mapped(addr)


def test_leaving_a_with_block_with_a_live_view_is_refused():
    with pytest.raises(BufferError, match="still alive"):
        with HostBuffer(MiB, placement=0, pin=False) as buf:
            view = buf.tensor(torch.uint8, (1,))
    del view
    buf.free()


def test_prefault_falls_back_to_memset_on_old_kernels(monkeypatch):
    monkeypatch.setattr(host_buffer, "_MADV_POPULATE_WRITE", 9999)  # unknown advice: EINVAL
    with HostBuffer(4 * MiB, placement=0, pin=False, prefault_threads=2) as buf:
        assert buf.pages_per_node() == {0: 4 * MiB // PAGE_NBYTES}


def test_huge_pages_can_be_turned_off():
    with HostBuffer(4 * MiB, placement=0, pin=False, huge_pages=False) as buf:
        assert not buf.huge_pages


def test_repr_shows_size_placement_and_pinning():
    with HostBuffer(2 * MiB, placement=0, pin=False) as buf:
        assert repr(buf) == "HostBuffer(2.00 MiB, node0:1, pinned=False)"


def test_without_cuda_pinning_is_skipped_with_a_reason(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with HostBuffer(MiB, placement=0) as buf:
        assert not buf.pinned
        assert "CUDA is not available" in buf.pin_reason


class RefusingCudart:
    """Stands in for torch.cuda.cudart(): accepts the first registration, refuses the next."""

    def __init__(self):
        self.registered, self.unregistered = [], []

    def cudaHostRegister(self, ptr, size, flags):
        if self.registered:
            return 2  # cudaErrorMemoryAllocation
        self.registered.append((ptr, size))
        return 0

    def cudaHostUnregister(self, ptr):
        self.unregistered.append(ptr)
        return 0


def test_a_driver_refusal_warns_unpins_and_keeps_the_buffer(monkeypatch):
    cudart = RefusingCudart()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "cudart", lambda: cudart)
    with pytest.warns(cuda_host.PinningFallbackWarning, match="cudaError 2"):
        buf = HostBuffer(8 * MiB, placement=0, register_chunk_nbytes=4 * MiB)
    assert not buf.pinned and "refused bytes 4194304..8388608" in buf.pin_reason
    assert cudart.unregistered == [buf.ptr]
    view = buf.tensor(torch.uint8, (8,))
    view.fill_(1)
    del view
    buf.free()


@pytest.mark.gpu
@needs_cuda
def test_a_pinned_buffer_round_trips_through_the_gpu():
    with HostBuffer(64 * MiB, placement=0, register_chunk_nbytes=16 * MiB) as buf:
        assert buf.pinned, buf.pin_reason
        host = buf.tensor(torch.float32, (16 * MiB,))
        assert host.is_pinned()
        host.copy_(torch.arange(16 * MiB, dtype=torch.float32))
        back = host.to("cuda", non_blocking=True).mul_(2).to("cpu")
        assert torch.equal(back, host * 2)
        assert buf.pages_per_node() == {0: 64 * MiB // PAGE_NBYTES}
        del host


@pytest.mark.parametrize("nbytes", [2**62, 2**63, 1 << 50])
def test_an_absurd_size_is_refused_before_striping(monkeypatch, nbytes):
    def no_striping(*args):
        raise AssertionError("striped a buffer larger than the machine (hours of looping)")

    monkeypatch.setattr(host_buffer, "stripe", no_striping)
    with pytest.raises(OffloadError, match="more than"):
        HostBuffer(nbytes, placement=0, pin=False)


def test_more_than_the_machine_names_its_memory():
    too_big = host_buffer.machine_memory_nbytes() + (1 << 30)
    with pytest.raises(MemoryError, match="more than this machine's memory"):
        HostBuffer(too_big, placement=0, pin=False)

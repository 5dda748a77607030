"""TieredAllocator: budgets per tier and node, refusal before touching memory, release, close."""

import resource
import threading

import pytest
import torch

from allocators.errors import BudgetExceededError, PlacementError
from allocators.host_buffer import HostBuffer
from allocators.host_pool import size_class
from allocators.placement import as_placement, interleave
from allocators.policies import cxl_aware
from allocators.tensor_classes import TensorGroup
from allocators.tiered import TieredAllocator
from allocators.topology import NumaNode, Topology

GIB = 1 << 30
MIB = 1 << 20
PAGE = resource.getpagesize()


class FakeBuffer:
    def __init__(self, nbytes: int, placement, round_to: int):
        self.nbytes = -(-nbytes // round_to) * round_to
        self.placement = placement
        self.freed = False
        self._memory = torch.zeros(min(self.nbytes, 1 << 16), dtype=torch.uint8)

    def tensor(self, dtype, shape, offset_bytes=0):
        start = offset_bytes // torch.empty((), dtype=dtype).element_size()
        return self._memory.view(dtype)[start : start + torch.Size(shape).numel()].view(shape)


class FakeBacking:
    """Counts what was acquired and released; hands out small CPU tensors as memory, sized in
    whole ``round_to`` units and striped in ``chunk_nbytes``."""

    def __init__(self, round_to: int = PAGE, chunk_nbytes: int = 2 * MIB):
        self.round_to = round_to
        self.chunk_nbytes = chunk_nbytes
        self.acquired: list[FakeBuffer] = []
        self.released: list[FakeBuffer] = []
        self.lock = threading.Lock()

    def size_for(self, nbytes):
        return -(-nbytes // self.round_to) * self.round_to

    def acquire(self, nbytes, placement, pin=True, room_nbytes=None):
        buffer = FakeBuffer(nbytes, placement, self.round_to)
        with self.lock:
            self.acquired.append(buffer)
        return buffer

    def release(self, buffer):
        with self.lock:
            assert not buffer.freed, "released twice"
            buffer.freed = True
            self.released.append(buffer)


def topology(n_cxl: int = 2, free_bytes: int = 1 << 40) -> Topology:
    dram = NumaNode(id=0, kind="dram", cpus=(0, 1), total_bytes=1 << 40, free_bytes=free_bytes)
    cxl = [
        NumaNode(id=i, kind="cxl", cpus=(), total_bytes=1 << 40, free_bytes=1 << 40)
        for i in range(1, n_cxl + 1)
    ]
    nodes = (dram, *cxl)
    distances = {a.id: {b.id: 10 if a.id == b.id else 14 + b.id for b in nodes} for a in nodes}
    return Topology(nodes=nodes, distances=distances, gpus=(), source="hand-built test machine")


def allocator(budgets=None, **kwargs):
    backing = FakeBacking()
    alloc = TieredAllocator(
        topology(), budgets or {"dram": "1GiB", "cxl": "2GiB"}, backing=backing, **kwargs
    )
    return alloc, backing


def row(alloc, tier, node):
    return next(r for r in alloc.usage() if r.tier == tier and r.node == node)


def test_a_class_without_a_plan_goes_to_local_dram():
    alloc, backing = allocator()
    grads = alloc.allocate("grads", 100 * MIB)
    assert grads.nbytes_per_node == {0: 100 * MIB}
    assert grads.tiers == ("dram",)
    assert backing.acquired[0].placement == as_placement(0)


def test_request_is_rounded_to_whole_pages():
    alloc, _ = allocator()
    assert alloc.allocate("grads", 1).charged_nbytes == PAGE


def test_planned_placement_is_used_and_charged_per_node_as_chunks_are_striped():
    # 10 MiB over {1, 2} in 2 MiB chunks: 5 chunks, the odd one to node 1 (listed first).
    alloc, _ = allocator(placements={"activations": interleave([1, 2])})
    act = alloc.allocate("activations", 10 * MIB)
    assert act.nbytes_per_node == {1: 6 * MIB, 2: 4 * MIB}
    assert act.tiers == ("cxl",)
    assert row(alloc, "cxl", 1).used_nbytes == 6 * MIB
    assert row(alloc, "cxl", 2).used_nbytes == 4 * MIB
    assert row(alloc, "cxl", None).used_nbytes == 10 * MIB
    assert row(alloc, "cxl", None).used_nbytes_by_class["activations"] == 10 * MIB


def test_striped_over_dram_and_cxl_counts_in_both_tiers():
    alloc, _ = allocator()
    buf = alloc.allocate("params", 12 * MIB, placement=interleave([0, 1, 2]))
    assert buf.nbytes_per_node == {0: 4 * MIB, 1: 4 * MIB, 2: 4 * MIB}
    assert buf.tiers == ("dram", "cxl")
    assert row(alloc, "dram", None).n_allocations == 1
    assert row(alloc, "cxl", None).n_allocations == 1
    assert row(alloc, "cxl", 2).n_allocations == 1


def test_over_budget_request_is_refused_before_any_memory_is_touched():
    alloc, backing = allocator({"dram": "1GiB", "cxl": "2GiB"})
    alloc.allocate("optimizer_state", 768 * MIB)
    with pytest.raises(BudgetExceededError) as info:
        alloc.allocate("master_params", 512 * MIB)
    message = str(info.value)
    assert "master_params request of 512 MiB (536870912 bytes)" in message
    assert "tier 'dram' has a budget of 1.00 GiB" in message
    assert "768 MiB already used" in message
    assert "raise budget 'dram'" in message
    assert "nothing was allocated" in message
    assert len(backing.acquired) == 1
    assert row(alloc, "dram", 0).used_nbytes == 768 * MIB


def test_per_node_cxl_budget_is_enforced_even_when_the_tier_has_room():
    # cxl 2 GiB -> 1 GiB per node; 1.5 GiB on node 1 alone passes it.
    alloc, backing = allocator()
    with pytest.raises(BudgetExceededError, match="tier 'cxl'.*node 1 would need 1.50 GiB"):
        alloc.allocate("kv_cache", 3 * GIB // 2, placement=1)
    assert backing.acquired == []


def test_a_tier_not_named_keeps_its_capacity():
    alloc = TieredAllocator(topology(), {"dram": "1GiB"}, backing=FakeBacking())
    assert alloc.budgets.node_nbytes == {0: GIB, 1: 1 << 40, 2: 1 << 40}
    assert alloc.allocate("activations", MIB, placement=2).nbytes_per_node == {2: MIB}


def test_a_tier_named_with_zero_takes_nothing():
    alloc = TieredAllocator(topology(), {"dram": "1GiB", "cxl": 0}, backing=FakeBacking())
    with pytest.raises(BudgetExceededError, match="tier 'cxl' has a budget of 0 B"):
        alloc.allocate("activations", MIB, placement=2)


def test_free_memory_of_the_node_is_respected_even_under_a_larger_budget():
    alloc = TieredAllocator(topology(free_bytes=GIB), {"dram": "64GiB"}, backing=FakeBacking())
    alloc.allocate("grads", 800 * MIB)
    with pytest.raises(BudgetExceededError, match="node 0 had only 1.00 GiB free.*OOM killer"):
        alloc.allocate("grads", 300 * MIB)


def test_release_returns_budget_and_memory_and_is_idempotent():
    alloc, backing = allocator()
    first = alloc.allocate("optimizer_state", 768 * MIB)
    alloc.release(first)
    alloc.release(first)
    assert backing.released == [first.buffer]
    assert row(alloc, "dram", 0).used_nbytes == 0
    assert row(alloc, "dram", 0).peak_nbytes == 768 * MIB
    alloc.allocate("optimizer_state", 768 * MIB)
    assert row(alloc, "dram", None).used_nbytes_by_class["optimizer_state"] == 768 * MIB


def test_released_allocation_refuses_new_views():
    alloc, _ = allocator()
    buf = alloc.allocate("grads", MIB)
    assert buf.tensor(torch.bfloat16, (4, 8)).shape == (4, 8)
    alloc.release(buf)
    with pytest.raises(ValueError, match="released"):
        buf.tensor(torch.bfloat16, (4, 8))


def test_release_of_a_foreign_allocation_is_an_error():
    alloc, _ = allocator()
    other, _ = allocator()
    with pytest.raises(ValueError, match="not made by this TieredAllocator"):
        alloc.release(other.allocate("grads", MIB))


def test_close_frees_everything_and_refuses_later_allocations():
    backing = FakeBacking()
    with TieredAllocator(topology(), {"dram": "1GiB", "cxl": "2GiB"}, backing=backing) as alloc:
        for cls in ("grads", "params", "activations"):
            alloc.allocate(cls, 3 * MIB, placement=interleave([0, 1]))
    assert len(backing.released) == 3
    assert all(b.freed for b in backing.acquired)
    assert alloc.live_allocations == ()
    assert all(r.used_nbytes == 0 and r.n_allocations == 0 for r in alloc.usage())
    with pytest.raises(ValueError, match="closed"):
        alloc.allocate("grads", MIB)
    alloc.close()


def test_a_larger_buffer_than_asked_is_charged_at_its_real_size():
    # The backing says whole pages but maps 2 MiB units: 3 MiB costs 4 MiB of budget.
    class UnderSizingBacking(FakeBacking):
        def size_for(self, nbytes):
            return -(-nbytes // PAGE) * PAGE

    backing = UnderSizingBacking(round_to=2 * MIB)
    alloc = TieredAllocator(topology(), {"dram": "5MiB"}, backing=backing)
    assert alloc.allocate("grads", 3 * MIB).nbytes_per_node == {0: 4 * MIB}
    # Page-rounded 1 MiB passes the first check; its real 2 MiB does not: handed back.
    with pytest.raises(BudgetExceededError, match="tier 'dram'"):
        alloc.allocate("grads", MIB)
    assert backing.released == [backing.acquired[1]]
    assert row(alloc, "dram", 0).used_nbytes == 4 * MIB


def test_plan_from_a_policy_drives_the_allocator():
    groups = [
        TensorGroup("latency_critical", ("optimizer_state", "master_params"), 900 * MIB, True, ()),
        TensorGroup("compute_grads", ("grads",), 800 * MIB, False, ()),
    ]
    budgets = {"dram": "1GiB", "cxl": "2GiB"}
    plan = cxl_aware(groups, topology().tiers, budgets)
    alloc = TieredAllocator(topology(), budgets, placements=plan.by_class(), backing=FakeBacking())
    alloc.allocate("optimizer_state", 900 * MIB)
    grads = alloc.allocate("grads", 800 * MIB)
    # grads: 124 MiB of local left < 800 MiB / 3, so local takes 124 MiB and each CXL node
    # (800 - 124) / 2 = 338 MiB; in 2 MiB chunks that is 62 + 169 + 169, exactly the plan.
    assert grads.nbytes_per_node == plan.nbytes_per_node["compute_grads"]
    assert grads.nbytes_per_node == {0: 124 * MIB, 1: 338 * MIB, 2: 338 * MIB}


def test_usage_frame_has_a_row_per_tier_and_node_and_a_column_per_class():
    alloc, _ = allocator()
    alloc.allocate("kv_cache", 4 * MIB, placement=interleave([0, 2]))
    frame = alloc.usage_frame()
    assert list(zip(frame["tier"], frame["node"], strict=True)) == [
        ("dram", "all"),
        ("dram", 0),
        ("cxl", "all"),
        ("cxl", 1),
        ("cxl", 2),
    ]
    assert frame["kv_cache"].tolist() == [2 * MIB, 2 * MIB, 2 * MIB, 0, 2 * MIB]
    assert frame["budget_nbytes"].tolist() == [GIB, GIB, 2 * GIB, GIB, GIB]


@pytest.mark.parametrize(
    ("call", "error", "fragment"),
    [
        (lambda a: a.allocate("weights", MIB), ValueError, "tensor class 'weights' is not known"),
        (lambda a: a.allocate("grads", 0), ValueError, "must be a positive int"),
        (lambda a: a.allocate("grads", MIB, placement=7), PlacementError, "node 7 does not exist"),
    ],
)
def test_bad_requests_say_what_is_wrong(call, error, fragment):
    alloc, _ = allocator()
    with pytest.raises(error, match=fragment):
        call(alloc)


def test_bad_plan_and_budgets_are_refused_at_construction():
    with pytest.raises(ValueError, match="tensor class 'moments' is not known"):
        TieredAllocator(topology(), placements={"moments": 0}, backing=FakeBacking())
    with pytest.raises(ValueError, match="budget 'dram' = '64 gigs' is not a size"):
        TieredAllocator(topology(), {"dram": "64 gigs"}, backing=FakeBacking())


def test_concurrent_allocations_never_pass_the_budget():
    # 8 threads each try 40 x 8 MiB against a 1 GiB local budget: exactly 128 fit at once.
    alloc, backing = allocator({"dram": "1GiB"})
    refused = []
    barrier = threading.Barrier(8)

    def worker():
        barrier.wait()
        for _ in range(40):
            try:
                alloc.allocate("activations", 8 * MIB)
            except BudgetExceededError:
                refused.append(1)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(alloc.live_allocations) == 128
    assert len(refused) == 8 * 40 - 128
    assert row(alloc, "dram", 0).used_nbytes == GIB
    assert row(alloc, "dram", 0).peak_nbytes == GIB
    alloc.close()
    assert len(backing.released) == 128


class HostBufferBacking:
    """No pooling: each acquire maps a fresh HostBuffer, each release frees it."""

    chunk_nbytes = 2 * MIB

    def size_for(self, nbytes):
        return -(-nbytes // PAGE) * PAGE

    def acquire(self, nbytes, placement, pin=True, room_nbytes=None):
        return HostBuffer(nbytes, placement, pin=pin)

    def release(self, buffer):
        buffer.free()


def test_real_host_buffer_on_node_0_is_placed_charged_and_freed():
    alloc = TieredAllocator(topology(), {"dram": "64MiB"}, backing=HostBufferBacking(), pin=False)
    state = alloc.allocate("optimizer_state", 8 * MIB + 1)
    buffer = state.buffer
    assert state.charged_nbytes == buffer.nbytes == 8 * MIB + PAGE
    view = state.tensor(torch.float32, (1024, 2048))
    view.fill_(2.0)
    assert float(view.sum()) == 2.0 * 1024 * 2048
    del view
    assert buffer.pages_per_node() == {0: buffer.nbytes // PAGE}
    alloc.close()
    assert buffer.freed
    assert row(alloc, "dram", 0).used_nbytes == 0


def test_default_budgets_work_on_a_machine_without_cxl_and_usage_shows_only_real_tiers():
    alloc = TieredAllocator(topology(n_cxl=0), backing=FakeBacking())
    assert [(r.tier, r.node, r.budget_nbytes) for r in alloc.usage()] == [
        ("dram", None, 64 * GIB),
        ("dram", 0, 64 * GIB),
    ]
    with pytest.raises(PlacementError, match="node 1 does not exist"):
        alloc.allocate("activations", MIB, placement=1)


def test_default_pool_is_checked_at_its_size_class_before_mapping_anything():
    # 9 pages + 1 byte asks for 10 pages; the pool's size class for 10 pages is 10 pages.
    nbytes = 9 * PAGE + 1
    assert size_class(nbytes) == 10 * PAGE
    alloc = TieredAllocator(topology(), {"dram": 10 * PAGE - 1}, pin=False)
    with pytest.raises(BudgetExceededError, match="tier 'dram'"):
        alloc.allocate("grads", nbytes)
    assert alloc.backing.stats().misses == 0
    alloc.close()


def test_default_pool_reuses_released_memory_and_close_empties_it():
    alloc = TieredAllocator(topology(), {"dram": "64MiB"}, pin=False)
    first = alloc.allocate("grads", 3 * MIB)
    assert first.charged_nbytes == first.buffer.nbytes == size_class(3 * MIB)
    alloc.release(first)
    second = alloc.allocate("grads", 3 * MIB)
    assert second.buffer is first.buffer
    assert alloc.backing.stats().hits == 1
    alloc.close()
    assert first.buffer.freed
    assert alloc.backing.stats().held_nbytes == 0


def test_release_with_live_views_is_refused_and_keeps_the_charge():
    alloc = TieredAllocator(topology(), {"dram": "64MiB"}, pin=False)
    acts = alloc.allocate("activations", MIB)
    view = acts.tensor(torch.float32, (256, 1024))
    with pytest.raises(BufferError, match="live tensor view"):
        alloc.release(acts)
    assert row(alloc, "dram", 0).used_nbytes == MIB
    with pytest.raises(BufferError, match=r"close\(\) left 1 allocation\(s\).*activations"):
        alloc.close()
    del view
    alloc.close()
    assert acts.released and acts.buffer.freed
    assert row(alloc, "dram", 0).used_nbytes == 0


def test_a_backing_that_says_its_size_and_chunk_is_charged_by_them():
    # 9 MiB rounds to 12 MiB; 4 MiB chunks over {1, 2}: 3 chunks, two on node 1.
    backing = FakeBacking(round_to=4 * MIB, chunk_nbytes=4 * MIB)
    alloc = TieredAllocator(
        topology(), {"dram": "1GiB", "cxl": "2GiB"}, {"activations": interleave([1, 2])}, backing
    )
    act = alloc.allocate("activations", 9 * MIB)
    assert act.nbytes_per_node == {1: 8 * MIB, 2: 4 * MIB}
    with pytest.raises(BudgetExceededError):
        alloc.allocate("activations", 2 * GIB - 11 * MIB)
    assert len(backing.acquired) == 1


def test_a_host_pool_is_charged_by_its_size_class_and_chunk_size():
    from allocators.host_pool import HostPool

    class FakeMemoryPool(HostPool):
        """HostPool's sizing and chunking, with fake memory (nodes 1 and 2 are not real here)."""

        def acquire(self, nbytes, placement, pin=None, room_nbytes=None):
            return FakeBuffer(self.size_for(nbytes), placement, PAGE)

    pool = FakeMemoryPool(pin=False, chunk_nbytes=4 * MIB)
    alloc = TieredAllocator(
        topology(), {"dram": "1GiB", "cxl": "2GiB"}, {"activations": interleave([1, 2])}, pool
    )
    # 12 MiB splits 8/4 in the pool's 4 MiB chunks, where 2 MiB chunks would give 6/6.
    assert alloc.allocate("activations", 12 * MIB).nbytes_per_node == {1: 8 * MIB, 2: 4 * MIB}
    assert pool.size_for(12 * MIB + 1) == size_class(12 * MIB + 1)


def test_allocation_views_start_at_the_offset_given():
    backing = FakeBacking()
    alloc = TieredAllocator(topology(), {"dram": "1GiB", "cxl": "2GiB"}, backing=backing)
    grads = alloc.allocate("grads", 64)
    grads.tensor(torch.int32, (4,)).copy_(torch.arange(4, dtype=torch.int32))
    assert grads.tensor(torch.int32, (2,), offset_bytes=8).tolist() == [2, 3]


def test_allocation_views_pass_the_offset_to_a_real_host_buffer():
    alloc = TieredAllocator(topology(), {"dram": "64MiB"}, pin=False)
    grads = alloc.allocate("grads", 4096)
    grads.tensor(torch.int32, (4,)).copy_(torch.arange(4, dtype=torch.int32))
    assert grads.tensor(torch.int32, (1,), offset_bytes=12).tolist() == [3]
    with pytest.raises(ValueError, match="offset_bytes = 2 must be >= 0 and a multiple of 4"):
        grads.tensor(torch.int32, (1,), offset_bytes=2)
    alloc.release(grads)
    alloc.close()


def test_default_pool_keeps_memory_held_within_the_budget_when_sizes_change():
    # A run whose saved tensors change size class every step would leave each step's buffers
    # cached and unusable; in use plus cached must still stay within the budget.
    alloc = TieredAllocator(topology(), {"dram": "16MiB"}, pin=False)
    for step in range(6):
        live = [alloc.allocate("activations", (3 + step) * MIB) for _ in range(2)]
        assert alloc.backing.stats().held_nbytes <= 16 * MIB
        for allocation in live:
            alloc.release(allocation)
    alloc.close()


def test_default_pool_caches_a_whole_step_of_activations_beyond_a_fixed_cache():
    # Steady state: the same requests every step are all hits after the first, however much
    # of the budget they take (the pool's cache is sized by the budget, not a fixed 4 GiB).
    alloc = TieredAllocator(topology(), {"dram": "24MiB", "cxl": 0}, pin=False)
    for _ in range(3):
        live = [alloc.allocate("activations", 5 * MIB) for _ in range(4)]
        for allocation in live:
            alloc.release(allocation)
    stats = alloc.backing.stats()
    assert (stats.misses, stats.hits, stats.evictions) == (4, 8, 0)
    assert alloc.backing.max_cached_nbytes == 24 * MIB
    alloc.close()

import ctypes
import errno
import mmap
import threading
import warnings

import pytest

from allocators import numa
from allocators.errors import NumaError, PlacementError
from allocators.numa import Mode

PAGE = mmap.PAGESIZE


@pytest.fixture(autouse=True)
def fresh_warnings(monkeypatch):
    """Each test sees the warn-once memory empty."""
    monkeypatch.setattr(numa, "_warned", set())


@pytest.fixture
def region():
    """Four anonymous pages, untouched, and their address."""
    m = mmap.mmap(-1, 4 * PAGE)
    anchor = ctypes.c_char.from_buffer(m)
    yield ctypes.addressof(anchor), m
    del anchor
    m.close()


def refuse(call, err, monkeypatch):
    """Make syscall ``call`` fail with ``err``; the others go to the kernel."""
    real = numa._syscall

    def fake(name, *args):
        return (-1, err) if name == call else real(name, *args)

    monkeypatch.setattr(numa, "_syscall", fake)


def in_thread(fn):
    """Run ``fn`` in a fresh thread (set_mempolicy is per thread) and return its result."""
    out = {}

    def body():
        try:
            out["value"] = fn()
        except BaseException as exc:
            out["error"] = exc

    thread = threading.Thread(target=body)
    thread.start()
    thread.join()
    if "error" in out:
        raise out["error"]
    return out["value"]


def write_tree(root, files):
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


def test_this_machine_has_node_0_online():
    assert 0 in numa.online_nodes()


def test_online_nodes_come_from_has_memory(tmp_path):
    root = write_tree(
        tmp_path,
        {"devices/system/node/has_memory": "0-1,3\n", "devices/system/node/online": "0-4\n"},
    )
    assert numa.online_nodes(root) == (0, 1, 3)


def test_online_nodes_fall_back_to_online(tmp_path):
    root = write_tree(tmp_path, {"devices/system/node/online": "0,2\n"})
    assert numa.online_nodes(root) == (0, 2)


def test_a_missing_node_is_named_with_the_online_nodes():
    with pytest.raises(PlacementError, match=r"node 7 .*online nodes with memory: \[0"):
        numa.check_nodes([0, 7])


def test_mbind_checks_nodes_before_the_syscall(region, monkeypatch):
    monkeypatch.setattr(numa, "_syscall", lambda *a: pytest.fail("syscall made"))
    with pytest.raises(PlacementError, match="node 7"):
        numa.mbind(region[0], PAGE, Mode.MPOL_BIND, [7])


def test_mbind_einval_says_which_nodes_are_allowed(region, monkeypatch):
    refuse("mbind", errno.EINVAL, monkeypatch)
    with pytest.raises(NumaError, match=r"EINVAL.*allowed nodes \[0"):
        numa.mbind(region[0], PAGE, Mode.MPOL_BIND, [0])


def test_mbind_binds_a_range_and_pages_land_there(region):
    addr, m = region
    assert numa.mbind(addr, 4 * PAGE, Mode.MPOL_BIND, [0]).enforced
    policy = numa.get_mempolicy(addr)
    assert (policy.mode, policy.nodes) == (Mode.MPOL_BIND, (0,))
    m[:] = b"x" * len(m)
    assert numa.node_of(addr + PAGE) == 0


def test_mbind_on_an_unmapped_range_is_an_error():
    m = mmap.mmap(-1, PAGE)
    addr = ctypes.addressof(ctypes.c_char.from_buffer(m))
    # A range past the mapping's end that nothing maps: the kernel answers EFAULT.
    with pytest.raises(NumaError, match="mbind failed with EFAULT"):
        numa.mbind(addr + (1 << 40) // PAGE * PAGE, PAGE, Mode.MPOL_BIND, [0])


@pytest.mark.parametrize("call", ["mbind", "set_mempolicy"])
@pytest.mark.parametrize("err", [errno.EPERM, errno.ENOSYS])
def test_a_refused_placement_warns_once_and_falls_back(call, err, region, monkeypatch):
    refuse(call, err, monkeypatch)
    apply = {
        "mbind": lambda: numa.mbind(region[0], PAGE, Mode.MPOL_BIND, [0]),
        "set_mempolicy": lambda: numa.set_mempolicy(Mode.MPOL_BIND, [0]),
    }[call]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first, second = apply(), apply()
    assert [w.category for w in caught] == [numa.NumaFallbackWarning]
    assert not first.enforced and not second.enforced
    assert errno.errorcode[err] in first.reason
    assert "default placement" in first.reason


@pytest.mark.parametrize(
    ("mode", "nodes"),
    [
        (Mode.MPOL_BIND, (0,)),
        (Mode.MPOL_INTERLEAVE, (0,)),
        (Mode.MPOL_PREFERRED, (0,)),
        (Mode.MPOL_PREFERRED_MANY, (0,)),
        (Mode.MPOL_WEIGHTED_INTERLEAVE, (0,)),
        (Mode.MPOL_LOCAL, ()),
    ],
)
def test_get_mempolicy_reads_back_what_a_thread_set(mode, nodes):
    def round_trip():
        outcome = numa.set_mempolicy(mode, nodes)
        try:
            return outcome, numa.get_mempolicy()
        finally:
            numa.set_mempolicy(Mode.MPOL_DEFAULT)

    try:
        outcome, policy = in_thread(round_trip)
    except NumaError as exc:
        if exc.errno == errno.EINVAL:
            pytest.skip(f"this kernel does not know {mode.name}: {exc}")
        raise
    assert outcome.enforced
    assert policy.mode == mode
    if mode is not Mode.MPOL_LOCAL:
        assert policy.nodes == nodes


def test_set_mempolicy_leaves_other_threads_alone():
    in_thread(lambda: numa.set_mempolicy(Mode.MPOL_BIND, [0]))
    assert numa.get_mempolicy().mode == Mode.MPOL_DEFAULT


def test_static_nodes_flag_is_reported_back():
    def round_trip():
        numa.set_mempolicy(Mode.MPOL_BIND, [0], flags=numa.ModeFlag.MPOL_F_STATIC_NODES)
        try:
            return numa.get_mempolicy()
        finally:
            numa.set_mempolicy(Mode.MPOL_DEFAULT)

    assert in_thread(round_trip).flags == numa.ModeFlag.MPOL_F_STATIC_NODES


def test_relative_nodes_may_name_nodes_beyond_the_online_ones():
    def round_trip():
        outcome = numa.set_mempolicy(
            Mode.MPOL_INTERLEAVE, [1], flags=numa.ModeFlag.MPOL_F_RELATIVE_NODES
        )
        numa.set_mempolicy(Mode.MPOL_DEFAULT)
        return outcome

    assert in_thread(round_trip).enforced


def test_mems_allowed_lists_node_0():
    assert 0 in numa.get_mempolicy(flags=numa.GetFlag.MPOL_F_MEMS_ALLOWED).nodes


@pytest.mark.parametrize(
    ("mode", "nodes", "fragment"),
    [
        (42, [0], "not one of"),
        (Mode.MPOL_BIND, [], "at least one node"),
        (Mode.MPOL_LOCAL, [0], "no nodes"),
    ],
)
def test_bad_modes_say_what_to_write(mode, nodes, fragment):
    with pytest.raises((NumaError, PlacementError), match=fragment):
        numa.set_mempolicy(mode, nodes)


def test_move_pages_reports_untouched_and_unmapped_pages(region):
    addr, m = region
    m[:PAGE] = b"y" * PAGE
    status = numa.move_pages(0, [addr, addr + PAGE, 4096])
    assert status == [0, -errno.ENOENT, -errno.EFAULT]


def test_move_pages_moves_to_a_named_node(region):
    addr, m = region
    m[:] = b"z" * len(m)
    assert numa.move_pages(0, [addr, addr + PAGE], nodes=[0, 0]) == [0, 0]


def test_move_pages_wants_one_node_per_page(region):
    with pytest.raises(NumaError, match="one node per address"):
        numa.move_pages(0, [region[0]], nodes=[0, 0])


def test_move_pages_refused_raises_unavailable(region, monkeypatch):
    refuse("move_pages", errno.EPERM, monkeypatch)
    with pytest.raises(numa.NumaUnavailableError, match="CAP_SYS_NICE"):
        numa.move_pages(0, [region[0]])


def test_migrate_pages_between_the_same_node_moves_nothing():
    assert numa.migrate_pages(0, [0], [0]) == 0


def test_syscall_numbers_follow_the_cpu(monkeypatch):
    monkeypatch.setattr(numa.platform, "machine", lambda: "aarch64")
    assert numa._syscall_number("mbind") == 235
    monkeypatch.setattr(numa.platform, "machine", lambda: "x86_64")
    assert numa._syscall_number("move_pages") == 279
    monkeypatch.setattr(numa.platform, "machine", lambda: "riscv64")
    with pytest.raises(NumaError, match="riscv64"):
        numa._syscall_number("mbind")


def test_node_masks_cover_the_kernels_node_range():
    words, maxnode = numa._nodemask([0, 65])
    assert maxnode == numa.kernel_maxnode_bits() + 1
    assert numa._mask_nodes(words) == (0, 65)


def test_weighted_interleave_on_an_old_kernel_says_what_is_missing(tmp_path):
    with pytest.raises(NumaError, match="Linux 6.9"):
        numa.interleave_weights(tmp_path)


def test_weighted_interleave_weights_read_and_write(tmp_path):
    base = "kernel/mm/mempolicy/weighted_interleave"
    root = write_tree(tmp_path, {f"{base}/node0": "1\n", f"{base}/node2": "1\n"})
    numa.set_interleave_weights({2: 3}, root)
    assert numa.interleave_weights(root) == {0: 1, 2: 3}


@pytest.mark.parametrize(("weights", "fragment"), [({0: 0}, "1..255"), ({5: 1}, "node 5")])
def test_bad_interleave_weights_are_refused(weights, fragment, tmp_path):
    root = write_tree(tmp_path, {"kernel/mm/mempolicy/weighted_interleave/node0": "1\n"})
    with pytest.raises((NumaError, PlacementError), match=fragment):
        numa.set_interleave_weights(weights, root)

import ctypes
import errno
import mmap
import warnings

import pytest
from numa_maps import policy_of

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
    assert policy_of(addr) == "bind:0"
    m[:] = b"x" * len(m)
    assert numa.move_pages(0, [addr + PAGE]) == [0]


def test_mbind_on_an_unmapped_range_is_an_error():
    m = mmap.mmap(-1, PAGE)
    addr = ctypes.addressof(ctypes.c_char.from_buffer(m))
    # A range past the mapping's end that nothing maps: the kernel answers EFAULT.
    with pytest.raises(NumaError, match="mbind failed with EFAULT"):
        numa.mbind(addr + (1 << 40) // PAGE * PAGE, PAGE, Mode.MPOL_BIND, [0])


@pytest.mark.parametrize("err", [errno.EPERM, errno.ENOSYS])
def test_a_refused_placement_warns_once_and_falls_back(err, region, monkeypatch):
    refuse("mbind", err, monkeypatch)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first = numa.mbind(region[0], PAGE, Mode.MPOL_BIND, [0])
        second = numa.mbind(region[0], PAGE, Mode.MPOL_BIND, [0])
    assert [w.category for w in caught] == [numa.NumaFallbackWarning]
    assert not first.enforced and not second.enforced
    assert errno.errorcode[err] in first.reason
    assert "default placement" in first.reason


@pytest.mark.parametrize(
    ("mode", "nodes", "fragment"),
    [
        (42, [0], "not one of"),
        (Mode.MPOL_BIND, [], "at least one node"),
        (Mode.MPOL_LOCAL, [0], "no nodes"),
    ],
)
def test_bad_modes_say_what_to_write(mode, nodes, fragment, region):
    with pytest.raises((NumaError, PlacementError), match=fragment):
        numa.mbind(region[0], PAGE, mode, nodes)


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
    assert len(words) * 64 == numa.kernel_maxnode_bits()
    assert (words[0], words[1]) == (1, 1 << 1)

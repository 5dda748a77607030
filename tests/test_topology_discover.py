import shutil
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from allocators import sysfs_files
from allocators.errors import TopologyError
from allocators.gpu_discovery import discover_gpus
from allocators.sysfs_topology import discover

FIXTURES = Path(__file__).parent / "fixtures" / "sysfs"
KIB = 1024
GIB = 1024**3


def fixture(name: str):
    return discover(FIXTURES / name, use_nvml=False)


def copy_fixture(name: str, tmp_path: Path) -> Path:
    return Path(shutil.copytree(FIXTURES / name, tmp_path / name))


def test_two_socket_nodes_are_dram_with_cpus():
    topo = fixture("two-socket")
    assert [(n.id, n.kind, n.has_cpus) for n in topo.nodes] == [
        (0, "dram", True),
        (1, "dram", True),
    ]


def test_cpus_are_parsed_from_ranges():
    node0 = fixture("two-socket").node(0)
    assert node0.cpus == tuple(range(0, 16)) + tuple(range(32, 48))


def test_capacities_come_from_node_meminfo_in_kib():
    node0 = fixture("two-socket").node(0)
    assert node0.total_bytes == 263921152 * KIB
    assert node0.free_bytes == 250000000 * KIB


def test_distance_rows_map_to_online_nodes():
    assert fixture("two-socket").distances == {0: {0: 10, 1: 21}, 1: {0: 21, 1: 10}}


def test_without_a_gpu_the_first_cpu_node_is_local_and_the_other_socket_remote():
    tiers = fixture("two-socket").tiers
    assert [n.id for n in tiers.local_dram] == [0]
    assert [n.id for n in tiers.remote_dram] == [1]
    assert tiers.cxl == ()


def test_cpu_less_node_with_memory_is_cxl():
    topo = fixture("one-socket-one-cxl")
    assert [(n.id, n.kind) for n in topo.nodes] == [(0, "dram"), (1, "cxl")]
    assert topo.node(1).cpus == ()


def test_cxl_region_evidence_goes_to_the_dax_target_node_not_its_numa_node():
    topo = fixture("one-socket-one-cxl")
    assert "cxl region0/dax0.0" in topo.node(1).cxl_evidence
    assert topo.node(0).cxl_evidence == ()


def test_memory_tiers_come_from_kernel_memory_tiering():
    topo = fixture("one-socket-one-cxl")
    assert (topo.node(0).memory_tier, topo.node(1).memory_tier) == (4, 22)
    assert "slower memory tier 22 (CPU nodes: 4)" in topo.node(1).cxl_evidence


def test_hmat_rates_are_read_in_ns_and_gib_per_s():
    rates = fixture("one-socket-one-cxl").node(1).rates
    assert (rates.latency_ns, rates.read_gib_per_s, rates.write_gib_per_s) == (250.0, 50.0, 35.0)
    assert rates.h2d_gib_per_s is None


def test_tiers_are_ordered_by_distance_from_the_gpu_node():
    topo = fixture("two-socket-two-cxl")
    assert topo.gpus[0].numa_node == 1
    tiers = topo.tiers
    assert [n.id for n in tiers.local_dram] == [1]
    assert [n.id for n in tiers.remote_dram] == [0]
    assert [n.id for n in tiers.cxl] == [3, 2]


def test_two_cxl_nodes_each_name_their_own_region():
    topo = fixture("two-socket-two-cxl")
    assert "cxl region0/dax0.0" in topo.node(2).cxl_evidence
    assert "cxl region1/dax1.0" in topo.node(3).cxl_evidence


def test_node_whose_online_blocks_are_all_movable_is_movable_only():
    topo = fixture("cxl-movable")
    assert topo.node(1).movable_only is True
    assert topo.node(0).movable_only is False


def test_one_normal_block_makes_a_node_not_movable_only(tmp_path):
    root = copy_fixture("cxl-movable", tmp_path)
    (root / "devices/system/node/node1/memory513/valid_zones").write_text("Normal\n")
    assert discover(root, use_nvml=False).node(1).movable_only is False


def test_offline_blocks_do_not_count_for_movable(tmp_path):
    root = copy_fixture("cxl-movable", tmp_path)
    # memory515 is offline and lists the zones it could join, "Normal Movable"
    assert discover(root, use_nvml=False).node(1).movable_only is True
    (root / "devices/system/node/node1/memory515/state").write_text("online\n")
    assert discover(root, use_nvml=False).node(1).movable_only is False


def test_gpu_reporting_node_minus_one_is_put_on_the_first_cpu_node_with_a_note():
    topo = fixture("vm-gpu-unknown-node")
    (gpu,) = topo.gpus
    assert (gpu.pci_bus_id, gpu.numa_node, gpu.numa_node_known) == ("0000:00:05.0", 0, False)
    assert any("reports NUMA node -1" in note and "node 0" in note for note in topo.notes)


def test_only_nvidia_display_devices_count_as_gpus():
    # the fixture also holds a QEMU VGA device (vendor 0x1234)
    assert [g.pci_bus_id for g in fixture("vm-gpu-unknown-node").gpus] == ["0000:00:05.0"]


def test_gpu_numa_node_comes_from_its_pci_device():
    (gpu,) = fixture("one-socket-one-cxl").gpus
    assert (gpu.numa_node, gpu.numa_node_known, gpu.source) == (0, True, "sysfs")


def test_node_with_cpus_and_no_memory_is_skipped_with_a_note():
    topo = fixture("memoryless-cpu-node")
    assert topo.node_ids == (0,)
    assert any("node 1 has CPUs 8-15 but no memory" in note for note in topo.notes)


def test_kernel_without_numa_gives_one_node_sized_from_memory_blocks():
    topo = fixture("no-numa-kernel")
    (node,) = topo.nodes
    assert (node.id, node.cpus, node.total_bytes) == (0, (0, 1, 2, 3), 4 * 0x8000000)
    assert any("kernel without NUMA" in note for note in topo.notes)


def test_missing_meminfo_keeps_the_node_at_size_zero_with_a_note(tmp_path):
    root = copy_fixture("two-socket", tmp_path)
    (root / "devices/system/node/node1/meminfo").unlink()
    topo = discover(root, use_nvml=False)
    assert topo.node(1).total_bytes == 0
    assert any("node 1: meminfo missing" in note for note in topo.notes)


def test_missing_distance_defaults_to_20_remote_with_a_note(tmp_path):
    root = copy_fixture("two-socket", tmp_path)
    (root / "devices/system/node/node0/distance").unlink()
    topo = discover(root, use_nvml=False)
    assert topo.distance(0, 1) == 20
    assert any("node 0: distance missing" in note for note in topo.notes)


def test_missing_memory_tiering_is_noted(tmp_path):
    root = copy_fixture("two-socket", tmp_path)
    shutil.rmtree(root / "devices/virtual/memory_tiering")
    topo = discover(root, use_nvml=False)
    assert topo.node(0).memory_tier is None
    assert any("no kernel memory tiers" in note for note in topo.notes)


def test_cpu_less_node_without_cxl_region_is_cxl_with_a_note(tmp_path):
    root = copy_fixture("one-socket-one-cxl", tmp_path)
    shutil.rmtree(root / "bus/cxl/devices/region0")
    topo = discover(root, use_nvml=False)
    assert topo.node(1).kind == "cxl"
    assert any("no CXL region in bus/cxl" in note for note in topo.notes)
    assert any("mem0 present but no region" in note for note in topo.notes)


def test_root_that_is_not_a_sysfs_tree_raises_naming_it(tmp_path):
    with pytest.raises(
        TopologyError, match=f"{tmp_path}.*is not a sysfs tree.*devices/system/node"
    ):
        discover(tmp_path, use_nvml=False)


def test_missing_root_raises_naming_it(tmp_path):
    with pytest.raises(TopologyError, match="nowhere.*is not a directory"):
        discover(tmp_path / "nowhere", use_nvml=False)


def test_captured_this_machine_is_one_dram_node():
    topo = fixture("this-machine")
    assert [(n.id, n.kind, n.movable_only) for n in topo.nodes] == [(0, "dram", False)]
    assert topo.node(0).cpus and topo.node(0).total_bytes > 0


@pytest.mark.skipif(
    not Path("/sys/devices/system/node/node0").is_dir(), reason="needs a Linux NUMA sysfs"
)
def test_discover_on_the_real_sys_finds_node0_as_dram_with_cpus():
    topo = discover()
    node0 = topo.node(0)
    assert node0.kind == "dram" and node0.has_cpus
    assert 0 < node0.free_bytes <= node0.total_bytes


class _FakeNvml:
    """Stands in for pynvml: one GPU at bus 98:00.0, or an init that fails like on a CPU box."""

    class NVMLError(Exception):
        pass

    NVML_AFFINITY_SCOPE_NODE = 0

    def __init__(self, *, starts=True, affinity_mask=0, bus_id="00000000:98:00.0"):
        self.starts, self.affinity_mask, self.bus_id = starts, affinity_mask, bus_id
        self.shut_down = False

    def nvmlInit(self):
        if not self.starts:
            raise self.NVMLError("NVML Shared Library Not Found")

    def nvmlShutdown(self):
        self.shut_down = True

    def nvmlDeviceGetCount(self):
        return 1

    def nvmlDeviceGetHandleByIndex(self, i):
        return i

    def nvmlDeviceGetName(self, handle):
        return "NVIDIA H100 80GB HBM3"

    def nvmlDeviceGetPciInfo(self, handle):
        return SimpleNamespace(busId=self.bus_id.encode())

    def nvmlDeviceGetMemoryInfo(self, handle):
        return SimpleNamespace(total=80 * GIB)

    def nvmlDeviceGetMemoryAffinity(self, handle, size, scope):
        return [self.affinity_mask]


def _pretend_live(monkeypatch, root: Path, nvml: _FakeNvml) -> None:
    monkeypatch.setattr(sysfs_files, "LIVE_SYSFS", root.resolve())
    monkeypatch.setitem(sys.modules, "pynvml", nvml)


def test_nvml_gpu_takes_its_numa_node_from_the_pci_device_in_sysfs(monkeypatch):
    root = FIXTURES / "two-socket-two-cxl"
    nvml = _FakeNvml()
    _pretend_live(monkeypatch, root, nvml)
    (gpu,) = discover_gpus(root, cpu_node_ids=[0, 1]).gpus
    assert (gpu.name, gpu.pci_bus_id, gpu.numa_node, gpu.source) == (
        "NVIDIA H100 80GB HBM3",
        "0000:98:00.0",
        1,
        "nvml",
    )
    assert gpu.total_bytes == 80 * GIB and nvml.shut_down


def test_nvml_memory_affinity_resolves_a_node_that_sysfs_reports_as_minus_one(monkeypatch):
    root = FIXTURES / "vm-gpu-unknown-node"
    _pretend_live(monkeypatch, root, _FakeNvml(affinity_mask=0b1, bus_id="00000000:00:05.0"))
    found = discover_gpus(root, cpu_node_ids=[0])
    assert (found.gpus[0].numa_node, found.gpus[0].numa_node_known) == (0, True)
    assert found.notes == ()


def test_nvml_that_cannot_start_falls_back_to_pci_devices_without_error(monkeypatch):
    root = FIXTURES / "two-socket-two-cxl"
    _pretend_live(monkeypatch, root, _FakeNvml(starts=False))
    (gpu,) = discover_gpus(root, cpu_node_ids=[0, 1]).gpus
    assert (gpu.source, gpu.numa_node) == ("sysfs", 1)


def test_fixture_roots_never_ask_nvml(monkeypatch):
    nvml = _FakeNvml()
    nvml.nvmlInit = lambda: pytest.fail("NVML was called for a fixture root")
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    assert discover(FIXTURES / "two-socket-two-cxl").gpus[0].source == "sysfs"

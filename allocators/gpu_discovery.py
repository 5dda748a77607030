"""Find the machine's NVIDIA GPUs and the NUMA node each one's PCIe link hangs off: NVML when it
works, else the PCI devices in sysfs. Must not initialise CUDA, and never calls NVML on fixture roots.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from allocators.sysfs_files import is_live, read_int
from allocators.topology import GpuInfo

NVIDIA_VENDOR_ID = 0x10DE
# PCI base class 0x03 (display): 0x0300 VGA-compatible, 0x0302 3D controller (data-centre GPUs).
GPU_PCI_CLASSES = (0x0300, 0x0302)


@dataclass(frozen=True)
class GpuDiscovery:
    """The GPUs found and the assumptions made on the way (to be copied into Topology.notes)."""

    gpus: tuple[GpuInfo, ...]
    notes: tuple[str, ...]


@dataclass(frozen=True)
class _FoundGpu:
    name: str
    pci_bus_id: str
    total_bytes: int
    nvml_node: int | None


def sysfs_bus_id(nvml_bus_id: str) -> str:
    """Turn NVML's bus id (8-digit domain, upper case) into the name of its sysfs PCI directory.

    >>> sysfs_bus_id("00000000:9A:00.0")
    '0000:9a:00.0'
    """
    domain, _, rest = nvml_bus_id.strip().partition(":")
    return f"{int(domain, 16):04x}:{rest.lower()}"


def discover_gpus(
    sysfs_root: str | Path = "/sys", *, cpu_node_ids: Sequence[int], use_nvml: bool = True
) -> GpuDiscovery:
    """List NVIDIA GPUs with their NUMA node; a node of -1 is replaced by the first CPU node.

    NVML is asked only when ``use_nvml`` is set and ``sysfs_root`` is the live ``/sys`` (a fixture
    tree must not be mixed with the GPUs of the machine running the tests). When NVML cannot start
    (no driver: the normal case on CPU machines) the PCI devices under the root are used instead.

    >>> vm = Path(__file__).parents[1] / "tests/fixtures/sysfs/vm-gpu-unknown-node"
    >>> found = discover_gpus(vm, cpu_node_ids=[0])
    >>> [(g.pci_bus_id, g.numa_node, g.numa_node_known) for g in found.gpus]
    [('0000:00:05.0', 0, False)]
    """
    root = Path(sysfs_root)
    notes: list[str] = []
    found = None
    source = "sysfs"
    if use_nvml and is_live(root):
        found = _nvml_gpus()
        source = "nvml"
    if found is None:
        found = _pci_gpus(root)
        source = "sysfs"
        if found:
            notes.append(
                "GPUs found as PCI devices (NVML unavailable): names are PCI ids, HBM size "
                "unknown; indices follow PCI bus order"
            )
    gpus = []
    for index, gpu in enumerate(found):
        node, known, note = _resolve_node(root, gpu, index, cpu_node_ids)
        if note:
            notes.append(note)
        gpus.append(
            GpuInfo(
                index=index,
                name=gpu.name,
                pci_bus_id=gpu.pci_bus_id,
                numa_node=node,
                numa_node_known=known,
                total_bytes=gpu.total_bytes,
                source=source,
            )
        )
    return GpuDiscovery(gpus=tuple(gpus), notes=tuple(notes))


def _resolve_node(
    root: Path, gpu: _FoundGpu, index: int, cpu_node_ids: Sequence[int]
) -> tuple[int, bool, str]:
    node = read_int(root / "bus" / "pci" / "devices" / gpu.pci_bus_id / "numa_node")
    if node is not None and node >= 0:
        return node, True, ""
    if gpu.nvml_node is not None:
        return gpu.nvml_node, True, ""
    fallback = cpu_node_ids[0] if cpu_node_ids else 0
    reported = "-1" if node is not None else "no numa_node file"
    many = f" (the first of {len(cpu_node_ids)} CPU nodes: the local/remote split may be wrong)"
    return (
        fallback,
        False,
        f"GPU {index} ({gpu.pci_bus_id}) reports NUMA node {reported} (unknown, common in VMs); "
        f"treated as local to node {fallback}{many if len(cpu_node_ids) > 1 else ''}",
    )


def _pci_gpus(root: Path) -> list[_FoundGpu]:
    devices = root / "bus" / "pci" / "devices"
    found = []
    for dev in sorted(devices.glob("*")) if devices.is_dir() else []:
        vendor = read_int(dev / "vendor", base=16)
        pci_class = read_int(dev / "class", base=16)
        if vendor != NVIDIA_VENDOR_ID or pci_class is None or pci_class >> 8 not in GPU_PCI_CLASSES:
            continue
        device_id = read_int(dev / "device", base=16)
        label = f"{device_id:04x}" if device_id is not None else "????"
        found.append(
            _FoundGpu(
                name=f"NVIDIA GPU [10de:{label}]",
                pci_bus_id=dev.name,
                total_bytes=0,
                nvml_node=None,
            )
        )
    return found


def _nvml_gpus() -> list[_FoundGpu] | None:
    """GPUs as NVML sees them, or None when NVML cannot start (no driver, no library)."""
    try:
        import pynvml
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        return None
    try:
        found = []
        for i in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(i)
            name = pynvml.nvmlDeviceGetName(handle)
            bus_id = pynvml.nvmlDeviceGetPciInfo(handle).busId
            found.append(
                _FoundGpu(
                    name=name.decode() if isinstance(name, bytes) else name,
                    pci_bus_id=sysfs_bus_id(
                        bus_id.decode() if isinstance(bus_id, bytes) else bus_id
                    ),
                    total_bytes=int(pynvml.nvmlDeviceGetMemoryInfo(handle).total),
                    nvml_node=_nvml_nearest_node(pynvml, handle),
                )
            )
        return found
    finally:
        pynvml.nvmlShutdown()


def _nvml_nearest_node(pynvml, handle) -> int | None:
    """The one NUMA node NVML names as nearest to the GPU; None if it names none or several.

    nvmlDeviceGetNumaNodeId is not used: on coherent platforms it names the GPU's own memory
    node, not the CPU node that the PCIe link hangs off.
    """
    try:
        mask = pynvml.nvmlDeviceGetMemoryAffinity(handle, 1, pynvml.NVML_AFFINITY_SCOPE_NODE)
    except pynvml.NVMLError:
        return None
    bits = int(mask[0])
    nodes = [n for n in range(64) if bits >> n & 1]
    return nodes[0] if len(nodes) == 1 else None

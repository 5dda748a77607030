"""Who measured: host name, CPU model and cores, memory, and the software versions in use.

Only reading these facts lives here; it must not initialise CUDA (NVML answers the driver).
"""

from __future__ import annotations

import os
import platform
import socket
from dataclasses import dataclass
from importlib import metadata

import psutil


@dataclass(frozen=True)
class MachineInfo:
    """The machine a profile was measured on.

    >>> collect_machine().logical_cpus >= 1
    True
    """

    hostname: str
    cpu_model: str
    cores: int
    logical_cpus: int
    memory_bytes: int


@dataclass(frozen=True)
class Versions:
    """Software that took part; ``cuda`` and ``driver`` are None without a GPU.

    >>> collect_versions().python.count(".") >= 1
    True
    """

    python: str
    torch: str
    cuda: str | None
    driver: str | None
    offload_profile: str


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (the platform's processor name elsewhere).

    >>> bool(cpu_model())
    True
    """
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def collect_machine() -> MachineInfo:
    """Facts about this machine (psutil for core counts and memory).

    >>> collect_machine().cores >= 1
    True
    """
    logical = psutil.cpu_count(logical=True) or os.cpu_count() or 1
    return MachineInfo(
        hostname=socket.gethostname(),
        cpu_model=cpu_model(),
        cores=psutil.cpu_count(logical=False) or logical,
        logical_cpus=logical,
        memory_bytes=int(psutil.virtual_memory().total),
    )


def _driver_version() -> str | None:
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            version = pynvml.nvmlSystemGetDriverVersion()
        finally:
            pynvml.nvmlShutdown()
    except Exception:  # noqa: BLE001 - any NVML failure just means "no driver to report"
        return None
    return version.decode() if isinstance(version, bytes) else str(version)


def collect_versions() -> Versions:
    """Versions of Python, torch (and its CUDA), the NVIDIA driver and this package.

    >>> collect_versions().torch.startswith("2.")
    True
    """
    import torch

    try:
        ours = metadata.version("tiered-offload")
    except metadata.PackageNotFoundError:
        ours = "unknown (not installed)"
    return Versions(
        python=platform.python_version(),
        torch=torch.__version__,
        cuda=torch.version.cuda,
        driver=_driver_version() if torch.version.cuda else None,
        offload_profile=ours,
    )

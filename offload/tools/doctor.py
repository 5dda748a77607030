"""`offload doctor`'s checks: is this machine (or a captured sysfs tree) ready for offload, and if
not, what to fix. Each check returns a CheckResult; nothing here prints, and nothing is left allocated.
"""

from __future__ import annotations

import os
import resource
import shutil
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from allocators import numa
from allocators.host_buffer import HostBuffer
from allocators.policies import Budgets, parse_budgets
from allocators.sysfs_files import is_live, read_text
from allocators.sysfs_topology import discover
from allocators.topology import Topology
from allocators.units import format_bytes
from optim_cpu import native

Status = Literal["ok", "warn", "fail", "skipped"]
PROBE_NBYTES = 4 << 20
CAP_IPC_LOCK = 14
CAP_SYS_NICE = 23
_THP_DIR = Path("kernel/mm/transparent_hugepage")


@dataclass(frozen=True)
class CheckResult:
    """One line of the doctor's report: which check, how it went, what was found, what to do.

    ``fix`` is empty when there is nothing to do.

    >>> CheckResult("thp", "ok", "enabled = madvise").failed
    False
    """

    check: str
    status: Status
    finding: str
    fix: str = ""

    @property
    def failed(self) -> bool:
        return self.status == "fail"


@dataclass(frozen=True)
class PinProbe:
    """What pinning a test buffer on a node did: pinned or why not, and its pages per node after."""

    pinned: bool
    reason: str | None
    pages_per_node: dict[int, int]


def read_cap_eff(status_path: str | Path = "/proc/self/status") -> int:
    """This process's effective capability mask (``CapEff`` of /proc/self/status); 0 if unreadable.

    >>> read_cap_eff("/nonexistent")
    0
    """
    text = read_text(Path(status_path)) or ""
    for line in text.splitlines():
        if line.startswith("CapEff:"):
            return int(line.split(":", 1)[1].strip(), 16)
    return 0


def has_cap(cap_eff: int, cap: int) -> bool:
    """Whether capability number ``cap`` is set in the mask ``cap_eff``.

    >>> has_cap(1 << CAP_SYS_NICE, CAP_SYS_NICE), has_cap(0, CAP_IPC_LOCK)
    (True, False)
    """
    return bool(cap_eff >> cap & 1)


def check_mbind(node: int, cap_eff: int) -> CheckResult:
    """Place a 4 MiB buffer on ``node`` with mbind and report whether the OS allowed it.

    >>> check_mbind(0, read_cap_eff()).check
    'mbind'
    """
    nice = "set" if has_cap(cap_eff, CAP_SYS_NICE) else "not set"
    with warnings.catch_warnings():
        # The fallback warning would repeat what this result says.
        warnings.simplefilter("ignore", numa.NumaFallbackWarning)
        with HostBuffer(PROBE_NBYTES, placement=node, pin=False) as buf:
            enforced, reason = buf.placement_enforced, buf.fallback_reason
    if enforced:
        return CheckResult("mbind", "ok", f"placed {format_bytes(PROBE_NBYTES)} on node {node}")
    return CheckResult(
        "mbind",
        "fail",
        f"mbind refused ({reason}); CAP_SYS_NICE is {nice} in CapEff {cap_eff:#x}",
        "grant CAP_SYS_NICE (docker run --cap-add SYS_NICE, or a seccomp profile allowing mbind); "
        "without it every buffer lands wherever the kernel puts it",
    )


def _selected(text: str | None) -> str | None:
    """The bracketed choice of a sysfs setting such as ``always [madvise] never``."""
    if text is None:
        return None
    for word in text.split():
        if word.startswith("[") and word.endswith("]"):
            return word[1:-1]
    return text.strip()


def check_thp(sysfs_root: Path) -> CheckResult:
    """Transparent huge pages: warn when ``enabled`` or ``defrag`` is ``never``.

    >>> check_thp(Path("/nonexistent")).status
    'skipped'
    """
    settings = {
        name: _selected(read_text(sysfs_root / _THP_DIR / name)) for name in ("enabled", "defrag")
    }
    if settings["enabled"] is None:
        return CheckResult("thp", "skipped", f"no {sysfs_root / _THP_DIR / 'enabled'} to read")
    finding = ", ".join(f"{k} = {v}" for k, v in settings.items() if v is not None)
    off = [k for k, v in settings.items() if v == "never"]
    if not off:
        return CheckResult("thp", "ok", finding)
    return CheckResult(
        "thp",
        "warn",
        finding,
        "; ".join(f"echo madvise > /sys/{_THP_DIR}/{k}" for k in off)
        + " (buffers ask for huge pages with madvise; 4 KiB pages cost TLB misses and pinning time)",
    )


def check_cxl_movable(topo: Topology) -> CheckResult:
    """Warn for each CXL node whose memory is online only as ZONE_MOVABLE.

    >>> from allocators.sysfs_topology import discover
    >>> root = Path(__file__).parents[2] / "tests/fixtures/sysfs/cxl-movable"
    >>> check_cxl_movable(discover(root, use_nvml=False)).status
    'warn'
    """
    cxl = [n for n in topo.nodes if n.kind == "cxl"]
    if not cxl:
        return CheckResult("cxl movable", "ok", "no CXL nodes")
    movable = [n.id for n in cxl if n.movable_only]
    if not movable:
        return CheckResult(
            "cxl movable", "ok", f"CXL nodes {[n.id for n in cxl]} are not movable-only"
        )
    return CheckResult(
        "cxl movable",
        "warn",
        f"CXL nodes {movable} are online as ZONE_MOVABLE only: pinning a buffer there migrates its "
        "pages to DRAM",
        "online the CXL memory blocks as kernel memory (daxctl reconfigure-device "
        "--mode=system-ram --no-movable, or echo online_kernel > .../memoryN/state), "
        "or keep pinned buffers off these nodes",
    )


def probe_pin(node: int) -> PinProbe:
    """Pin a 4 MiB buffer placed on ``node`` and read back where its pages are.

    >>> probe_pin(0).pages_per_node[0] > 0
    True
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with HostBuffer(PROBE_NBYTES, placement=node, pin=True) as buf:
            return PinProbe(buf.pinned, buf.pin_reason, buf.pages_per_node())


def check_cxl_pin(
    topo: Topology,
    live: bool,
    cuda_reason: str | None,
    probe: Callable[[int], PinProbe] = probe_pin,
) -> list[CheckResult]:
    """Pin a test buffer on each movable CXL node and fail when its pages left the node.

    ``cuda_reason`` is why CUDA cannot pin (None when it can); the test then is skipped.

    >>> check_cxl_pin(Topology((), {}, (), "example"), True, None)
    []
    """
    nodes = [n.id for n in topo.nodes if n.kind == "cxl" and n.movable_only]
    results = []
    for node in nodes:
        name = f"cxl pin node {node}"
        if not live:
            results.append(
                CheckResult(
                    name, "skipped", "sysfs root is a captured tree; pinning needs this machine"
                )
            )
            continue
        if cuda_reason is not None:
            results.append(CheckResult(name, "skipped", f"pin test not run: {cuda_reason}"))
            continue
        outcome = probe(node)
        if not outcome.pinned:
            results.append(
                CheckResult(
                    name, "warn", f"pinning refused ({outcome.reason})", "see the memlock check"
                )
            )
            continue
        total = sum(outcome.pages_per_node.values())
        moved = {n: c for n, c in outcome.pages_per_node.items() if n != node}
        if not moved:
            results.append(
                CheckResult(name, "ok", f"all {total} pages stayed on node {node} after pinning")
            )
            continue
        results.append(
            CheckResult(
                name,
                "fail",
                f"{sum(moved.values())} of {total} pages left node {node} when pinned; "
                f"pages per node now {outcome.pages_per_node}",
                "online the CXL memory as kernel memory (daxctl reconfigure-device --no-movable) "
                "or set pin=False for buffers on this node",
            )
        )
    return results


def read_memlock_limit() -> int:
    """The soft RLIMIT_MEMLOCK in bytes (resource.RLIM_INFINITY when unlimited).

    >>> isinstance(read_memlock_limit(), int)
    True
    """
    return resource.getrlimit(resource.RLIMIT_MEMLOCK)[0]


def check_memlock(
    limit_nbytes: int, cap_eff: int, uid: int, needed_nbytes: int | None
) -> CheckResult:
    """Warn when the locked-memory limit is below what pinning the budgets needs.

    cudaHostRegister counts against RLIMIT_MEMLOCK unless the process is root or has CAP_IPC_LOCK.

    >>> check_memlock(8 << 20, 0, 1000, 64 << 30).status
    'warn'
    >>> check_memlock(8 << 20, 0, 0, 64 << 30).status
    'ok'
    """
    shown = "unlimited" if limit_nbytes == resource.RLIM_INFINITY else format_bytes(limit_nbytes)
    if uid == 0 or has_cap(cap_eff, CAP_IPC_LOCK):
        who = "root" if uid == 0 else "CAP_IPC_LOCK"
        return CheckResult("memlock", "ok", f"limit {shown}, not enforced for {who}")
    if limit_nbytes == resource.RLIM_INFINITY:
        return CheckResult("memlock", "ok", "limit unlimited")
    fix = (
        "raise it: ulimit -l unlimited, memlock in /etc/security/limits.conf, "
        "LimitMEMLOCK=infinity for a systemd unit, or --ulimit memlock=-1 for docker"
    )
    if needed_nbytes is None:
        return CheckResult(
            "memlock",
            "warn",
            f"limit {shown} (no budgets given to compare); pinning more fails",
            fix,
        )
    if limit_nbytes < needed_nbytes:
        return CheckResult(
            "memlock",
            "warn",
            f"limit {shown} is below the budgets' {format_bytes(needed_nbytes)}: "
            "buffers past it stay unpinned",
            fix,
        )
    return CheckResult(
        "memlock", "ok", f"limit {shown} covers the budgets' {format_bytes(needed_nbytes)}"
    )


def nvml_gpu_count() -> tuple[int | None, str | None]:
    """GPUs NVML sees, or (None, why) when NVML cannot be initialised.

    >>> count, why = nvml_gpu_count()
    >>> count is not None or bool(why)
    True
    """
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception as exc:  # NVMLError, or an ImportError without the package
        return None, f"NVML unavailable ({exc})"
    try:
        return pynvml.nvmlDeviceGetCount(), None
    finally:
        pynvml.nvmlShutdown()


def torch_cuda_count() -> tuple[int, str | None]:
    """CUDA devices torch can use, and why not when none.

    >>> count, why = torch_cuda_count()
    >>> count > 0 or bool(why)
    True
    """
    from allocators.cuda_host import cuda_status

    available, reason = cuda_status()
    if not available:
        return 0, reason
    import torch

    return torch.cuda.device_count(), None


def check_gpus(
    nvml: tuple[int | None, str | None], cuda: tuple[int, str | None], visible: str | None
) -> list[CheckResult]:
    """NVML and CUDA visibility: skipped without a GPU, fail when a GPU exists torch cannot use.

    >>> [r.status for r in check_gpus((None, "no NVML"), (0, "CPU-only torch"), None)]
    ['skipped', 'skipped']
    """
    nvml_count, nvml_why = nvml
    cuda_count, cuda_why = cuda
    env = (
        f"CUDA_VISIBLE_DEVICES={visible!r}" if visible is not None else "CUDA_VISIBLE_DEVICES unset"
    )
    if nvml_count is None:
        nvml_line = CheckResult("nvml", "skipped", f"{nvml_why}; no GPU inventory")
    elif nvml_count == 0:
        nvml_line = CheckResult("nvml", "skipped", "NVML sees no GPU")
    else:
        nvml_line = CheckResult("nvml", "ok", f"NVML sees {nvml_count} GPU(s)")
    if cuda_count > 0:
        cuda_line = CheckResult("cuda", "ok", f"torch sees {cuda_count} GPU(s); {env}")
    elif nvml_count:
        fix = (
            "unset CUDA_VISIBLE_DEVICES or list the GPUs to use"
            if visible is not None
            else "install a CUDA build of torch matching the driver"
        )
        cuda_line = CheckResult(
            "cuda", "fail", f"NVML sees {nvml_count} GPU(s) but torch none ({cuda_why}); {env}", fix
        )
    else:
        cuda_line = CheckResult(
            "cuda", "skipped", f"{cuda_why}; {env}; pinning and GPU checks skipped"
        )
    return [nvml_line, cuda_line]


def check_budgets(topo: Topology, budgets: Budgets | Mapping[str, int | str] | None) -> CheckResult:
    """Fail when a node's budget is more than the node has free, naming node and numbers.

    >>> root = Path(__file__).parents[2] / "tests/fixtures/sysfs/cxl-movable"
    >>> check_budgets(discover(root, use_nvml=False), {"dram": "1TiB"}).status
    'fail'
    """
    if not budgets:
        return CheckResult("budgets", "skipped", "no --config budgets or --budget given")
    parsed = parse_budgets(budgets, topo.tiers_for())
    problems = []
    for tier, total in parsed.declared.items():
        if total and parsed.tier_nbytes(tier) == 0:
            problems.append(f"{tier} budget {format_bytes(total)} but no {tier} node here")
    for node_id, nbytes in parsed.node_nbytes.items():
        free = topo.node(node_id).free_bytes
        if nbytes > free:
            problems.append(
                f"node {node_id} ({parsed.node_tier[node_id]}): budget {format_bytes(nbytes)} "
                f"> free {format_bytes(free)}"
            )
    if problems:
        return CheckResult(
            "budgets",
            "fail",
            "; ".join(problems),
            "lower the budgets, free memory on those nodes, or drop a tier this machine lacks",
        )
    return CheckResult("budgets", "ok", f"fit in free memory: {parsed.describe()}")


def check_kernel(built: bool, path: Path, compiler: str | None) -> CheckResult:
    """Whether the optim_cpu C++ step kernel is compiled: if not, the first ``optimizer.step()``
    compiles it (about 30 s), or falls back to torch's slower kernel without a compiler.

    >>> check_kernel(True, Path("/k.so"), "c++").finding
    'optim_cpu C++ kernel built: /k.so'
    >>> check_kernel(False, Path("/k.so"), None).status
    'warn'
    """
    if built:
        return CheckResult("cpu kernel", "ok", f"optim_cpu C++ kernel built: {path}")
    if compiler is None:
        return CheckResult(
            "cpu kernel",
            "warn",
            "optim_cpu C++ kernel not built and no C++ compiler found: the CPU optimizer uses "
            "torch's fused AdamW (slower)",
            "install g++ and ninja, then run: python -m optim_cpu",
        )
    return CheckResult(
        "cpu kernel",
        "ok",
        f"optim_cpu C++ kernel not built yet: the first optimizer.step() compiles it (about 30 s) with {compiler}",
        "build it ahead: python -m optim_cpu",
    )


def run_checks(
    sysfs_root: str | Path = "/sys", budgets: Mapping[str, int | str] | None = None
) -> list[CheckResult]:
    """Run every check against ``sysfs_root`` (and this process) with the given tier budgets.

    Checks that need the live machine (mbind, pinning) run on this process; against a captured
    tree the pin test is skipped and mbind is tried on a node of this machine.

    >>> root = Path(__file__).parents[2] / "tests/fixtures/sysfs/cxl-movable"
    >>> [r.check for r in run_checks(root)][:3]
    ['mbind', 'thp', 'cxl movable']
    """
    root = Path(sysfs_root)
    live = is_live(root)
    topo = discover(root, use_nvml=live)
    cap_eff = read_cap_eff()
    probe_node = topo.anchor_node() if live else numa.online_nodes()[0]
    parsed = parse_budgets(budgets, topo.tiers_for()) if budgets else None
    needed = sum(parsed.node_nbytes.values()) if parsed else None
    cuda = torch_cuda_count()
    results = [check_mbind(probe_node, cap_eff), check_thp(root), check_cxl_movable(topo)]
    results += check_cxl_pin(topo, live, cuda[1] if cuda[0] == 0 else None)
    results.append(check_memlock(read_memlock_limit(), cap_eff, os.getuid(), needed))
    results += check_gpus(nvml_gpu_count(), cuda, os.environ.get("CUDA_VISIBLE_DEVICES"))
    results.append(check_budgets(topo, parsed))
    path = native.kernel_path()
    results.append(check_kernel(path.is_file(), path, shutil.which("c++") or shutil.which("g++")))
    return results

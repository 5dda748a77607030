"""optim_cpu: CPU optimizers over host-resident fp32 state, and a scheduler that keeps their
memory traffic out of the way of the GPU's DMA.
"""

from allocators.errors import KernelBuildError
from optim_cpu.adam import CPUAdam, CPUAdamW
from optim_cpu.bucket import Bucket
from optim_cpu.contention import DEFAULT_POLICY, ContentionPolicy, DmaSignal
from optim_cpu.host_optimizer import HostOptimizer
from optim_cpu.lion import CPULion
from optim_cpu.native import load_kernel
from optim_cpu.scheduler import StepScheduler
from optim_cpu.state_alloc import StateAllocator

__all__ = [
    "DEFAULT_POLICY",
    "Bucket",
    "CPUAdam",
    "CPUAdamW",
    "CPULion",
    "ContentionPolicy",
    "DmaSignal",
    "HostOptimizer",
    "KernelBuildError",
    "StateAllocator",
    "StepScheduler",
    "load_kernel",
]

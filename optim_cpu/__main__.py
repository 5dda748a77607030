"""``python -m optim_cpu``: build the C++ step kernel ahead (as .ci/setup does), so no training
run's first optimizer step waits for the compiler; exit 1 when it cannot be built."""

from optim_cpu.native import kernel_path, load_kernel

kernel = load_kernel()
if kernel is None:
    raise SystemExit(1)
print(f"optim_cpu kernel ready ({kernel.isa()}): {kernel_path()}")

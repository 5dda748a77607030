"""The torch.optim.Optimizer contract for optimizers whose fp32 master params and state live in host
memory and are stepped by chunks on a pinned worker pool (the base of CPUAdamW, CPUAdam, CPULion).

It validates inputs, owns state allocation and bucket bookkeeping; the arithmetic is in the
kernels (optim_cpu/csrc, optim_cpu.fallback) and must not be written here.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from concurrent.futures import Future
from functools import partial
from types import ModuleType
from typing import Any, TypedDict

import torch

from optim_cpu import fallback
from optim_cpu.bucket import Bucket
from optim_cpu.native import load_kernel
from optim_cpu.numa_cores import worker_cpus
from optim_cpu.scheduler import Chunk, StepScheduler
from optim_cpu.state_alloc import StateAllocator, allocate_state

_GRAD_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_OUT_DTYPES = (torch.bfloat16, torch.float16)
DEFAULT_CHUNK_ELEMS = 1 << 18


class HostOptimizerOptions(TypedDict, total=False):
    """The keyword options every HostOptimizer subclass takes (documented on CPUAdamW).

    >>> sorted(HostOptimizerOptions.__annotations__)[:2]
    ['chunk_elems', 'cpus']
    """

    state_allocator: StateAllocator | None
    scheduler: StepScheduler | None
    threads: int | None
    numa_node: int | None
    cpus: Iterable[int] | None
    chunk_elems: int


class HostOptimizer(torch.optim.Optimizer):
    """Base class: subclasses set ``_STATE`` and implement ``_check_hparams`` and ``_chunks``.

    ``_STATE`` lists (state key, tensor class) in the order they are allocated for each param.
    State is allocated when a param group is added, in param order, so the placement plan sees
    all of it up front and allocation order never depends on which bucket arrives first.
    """

    _STATE: tuple[tuple[str, str], ...] = ()

    def __init__(
        self,
        params: Iterable[Any],
        defaults: dict[str, Any],
        *,
        state_allocator: StateAllocator | None = None,
        scheduler: StepScheduler | None = None,
        threads: int | None = None,
        numa_node: int | None = None,
        cpus: Iterable[int] | None = None,
        chunk_elems: int = DEFAULT_CHUNK_ELEMS,
    ) -> None:
        if isinstance(chunk_elems, bool) or not isinstance(chunk_elems, int) or chunk_elems < 1:
            raise ValueError(f"chunk_elems = {chunk_elems!r}; write an int >= 1 (default 2**18)")
        self._check_hparams(defaults, where="defaults")
        # Set before super().__init__, which calls add_param_group.
        self._state_allocator = state_allocator
        self._state_owners: list[Any] = []
        self._group_index: dict[torch.Tensor, int] = {}
        self._grad_buffers: dict[torch.Tensor, torch.Tensor] = {}
        self._out_buffers: dict[torch.Tensor, torch.Tensor] = {}
        self._scheduler = scheduler
        self._own_scheduler = scheduler is None
        self._threads = threads
        self._numa_node = numa_node
        # Checked now, not at the first step, so a bad list fails where it was written.
        self._cpus = None if cpus is None or scheduler is not None else worker_cpus(numa_node, cpus)
        self._chunk_elems = chunk_elems
        self._kernel: ModuleType | None = None
        super().__init__(params, defaults)

    # -- construction -------------------------------------------------------------------------

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group (per-group hyper-parameters allowed) and allocate its params' state.

        >>> from optim_cpu import CPUAdamW
        >>> opt = CPUAdamW([torch.zeros(2)], lr=0.1)
        >>> opt.add_param_group({"params": [torch.zeros(3)], "lr": 0.01})
        >>> [g["lr"] for g in opt.param_groups]
        [0.1, 0.01]
        """
        group = dict(param_group)
        params = group.get("params")
        params = [params] if isinstance(params, torch.Tensor) else list(params or [])
        for p in params:
            self._check_param(p)
        group["params"] = params
        self._check_hparams(
            {**self.defaults, **group}, where=f"param group {len(self.param_groups)}"
        )
        super().add_param_group(group)
        for p in params:
            self._group_index[p] = len(self.param_groups) - 1
            self._init_state(p)

    def _check_param(self, p: Any) -> None:
        if not isinstance(p, torch.Tensor):
            raise TypeError(f"params must be tensors, got {type(p).__name__}")
        if p.device.type != "cpu":
            raise ValueError(
                f"param of shape {list(p.shape)} is on {p.device}; {type(self).__name__} keeps fp32 "
                "master params in host memory: pass CPU tensors (e.g. p.detach().float().cpu())"
            )
        if p.dtype != torch.float32:
            raise ValueError(
                f"param of shape {list(p.shape)} is {p.dtype}; master params must be float32 "
                "(write the half-precision copy through bind_buffers(out=...))"
            )
        if not p.is_contiguous():
            raise ValueError(
                f"param of shape {list(p.shape)} is not contiguous; pass p.contiguous()"
            )

    def _init_state(self, p: torch.Tensor) -> None:
        state = self.state[p]
        state["step"] = torch.tensor(0.0)
        for key, tensor_class in self._STATE:
            tensor, owner = allocate_state(self._state_allocator, tensor_class, p)
            state[key] = tensor
            self._state_owners.append(owner)

    # -- buffers the runtime owns ---------------------------------------------------------------

    def bind_buffers(
        self,
        param: torch.Tensor,
        *,
        grad: torch.Tensor | None = None,
        out: torch.Tensor | None = None,
    ) -> None:
        """Read ``param``'s gradient from ``grad`` and write its bf16/fp16 copy to ``out`` on every step.

        ``grad`` is where the gradient lands from the GPU (fp32, bf16 or fp16, same shape); it
        replaces ``param.grad``. ``out`` (bf16 or fp16) receives the updated param in the same pass.

        >>> from optim_cpu import CPUAdamW
        >>> p = torch.zeros(4)
        >>> opt = CPUAdamW([p], lr=0.1)
        >>> out = torch.empty(4, dtype=torch.bfloat16)
        >>> opt.bind_buffers(p, grad=torch.ones(4, dtype=torch.bfloat16), out=out)
        >>> opt.step(); out.tolist()
        [-0.10009765625, -0.10009765625, -0.10009765625, -0.10009765625]
        """
        self._group_of(param)
        if grad is not None:
            self._grad_buffers[param] = self._checked_grad(param, grad)
        if out is not None:
            self._out_buffers[param] = self._checked_out(param, out)

    def _group_of(self, p: torch.Tensor) -> dict[str, Any]:
        index = self._group_index.get(p)
        if index is None:
            raise ValueError(
                f"tensor of shape {list(p.shape)} is not a param of this optimizer; pass one of "
                "the tensors given at construction or through add_param_group"
            )
        return self.param_groups[index]

    def _checked_grad(self, p: torch.Tensor, grad: Any) -> torch.Tensor:
        if not isinstance(grad, torch.Tensor):
            raise TypeError(
                f"grad for param {list(p.shape)} is {type(grad).__name__}, not a tensor"
            )
        if grad.dtype not in _GRAD_DTYPES:
            raise ValueError(
                f"grad for param {list(p.shape)} is {grad.dtype}; write float32, bfloat16 or float16"
            )
        if grad.shape != p.shape:
            raise ValueError(
                f"grad has shape {list(grad.shape)} but its param has {list(p.shape)}; "
                "pass the gradient of that param (same shape)"
            )
        if grad.device.type != "cpu":
            raise ValueError(
                f"grad for param {list(p.shape)} is on {grad.device}; copy it to host first"
            )
        return grad.contiguous()

    def _checked_out(self, p: torch.Tensor, out: Any) -> torch.Tensor:
        if not isinstance(out, torch.Tensor) or out.dtype not in _OUT_DTYPES:
            what = out.dtype if isinstance(out, torch.Tensor) else type(out).__name__
            raise ValueError(
                f"out for param {list(p.shape)} is {what}; write a bfloat16 or float16 tensor"
            )
        if out.numel() != p.numel() or out.device.type != "cpu" or not out.is_contiguous():
            raise ValueError(
                f"out for param {list(p.shape)} must be a contiguous CPU tensor of {p.numel()} "
                f"elements; got {list(out.shape)} on {out.device}"
            )
        return out

    # -- stepping -------------------------------------------------------------------------------

    @property
    def kernel_name(self) -> str:
        """Which kernel steps: 'avx512' or 'portable' (C++), or 'torch-fused' (the fallback).

        >>> from optim_cpu import CPUAdamW
        >>> CPUAdamW([torch.zeros(1)]).kernel_name in ("avx512", "portable", "torch-fused")
        True
        """
        kernel = self._resolve_kernel()
        return kernel.isa() if kernel is not fallback else fallback.NAME

    def _resolve_kernel(self) -> ModuleType:
        if self._kernel is None:
            self._kernel = load_kernel() or fallback
        return self._kernel

    @property
    def scheduler(self) -> StepScheduler:
        """The worker pool that runs the chunks (created on first use unless one was given)."""
        if self._scheduler is None:
            self._scheduler = StepScheduler(
                self._threads, numa_node=self._numa_node, cpus=self._cpus
            )
        return self._scheduler

    def step_bucket(self, bucket: Bucket) -> Future:
        """Step ``bucket``'s params on the worker pool; the Future resolves when they are updated.

        Inputs are checked and step counts advanced before this returns, so errors surface here.
        Params without a grad are skipped, as torch.optim does.

        >>> from optim_cpu import CPUAdamW
        >>> p = torch.ones(3)
        >>> opt = CPUAdamW([p], lr=0.5, weight_decay=0.0)
        >>> opt.step_bucket(Bucket([p], grads=[torch.ones(3)])).result()
        >>> [round(x, 4) for x in p.tolist()]
        [0.5, 0.5, 0.5]
        """
        kernel = self._resolve_kernel()
        chunks: list[Chunk] = []
        grads = bucket.grads or (None,) * len(bucket.params)
        outs = bucket.outputs or (None,) * len(bucket.params)
        for p, grad, out in zip(bucket.params, grads, outs, strict=True):
            group = self._group_of(p)
            grad = self._grad_source(p, grad)
            if grad is None:
                continue
            out = self._checked_out(p, out) if out is not None else self._out_buffers.get(p)
            self._check_hparams(group, where=f"param group {self._group_index[p]}")
            state = self.state[p]
            state["step"] += 1
            step_fn = self._step_fn(kernel, p.detach(), grad, state, out, group, int(state["step"]))
            n = p.numel()
            chunks.extend(
                partial(step_fn, begin, min(n, begin + self._chunk_elems))
                for begin in range(0, n, self._chunk_elems)
            )
        return self.scheduler.submit(chunks)

    def _grad_source(self, p: torch.Tensor, grad: torch.Tensor | None) -> torch.Tensor | None:
        if grad is not None:
            return self._checked_grad(p, grad)
        if p in self._grad_buffers:
            return self._grad_buffers[p]
        if p.grad is None:
            return None
        if p.grad.is_sparse:
            raise ValueError(
                f"param {list(p.shape)} has a sparse grad; CPU optimizers need dense grads"
            )
        return self._checked_grad(p, p.grad)

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Step every param that has a grad (bound buffer or ``.grad``) and wait for it.

        >>> from optim_cpu import CPUAdamW
        >>> p = torch.ones(2, requires_grad=True)
        >>> opt = CPUAdamW([p], lr=0.5, weight_decay=0.0)
        >>> p.sum().backward(); opt.step(); [round(x, 4) for x in p.tolist()]
        [0.5, 0.5]
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        params = [p for group in self.param_groups for p in group["params"]]
        self.step_bucket(Bucket(params)).result()
        return loss

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load state (ours or torch.optim.AdamW's) into the tensors this optimizer allocated.

        The allocated tensors are kept and filled, so state stays where the placement put it.
        """
        homes = {p: {k: self.state[p][k] for k, _ in self._STATE} for p in self._group_index}
        super().load_state_dict(state_dict)
        for p, tensors in homes.items():
            loaded = self.state[p]
            for key, home in tensors.items():
                value = loaded.get(key)
                if value is None:
                    home.zero_()
                elif tuple(value.shape) != tuple(home.shape):
                    raise ValueError(
                        f"state {key!r} in the loaded dict has shape {list(value.shape)} but its "
                        f"param has {list(home.shape)}; load a state dict saved for these params"
                    )
                else:
                    home.copy_(value)
                loaded[key] = home
            loaded["step"] = torch.tensor(float(loaded.get("step", 0.0)))

    def close(self) -> None:
        """Stop the worker threads this optimizer started (not those of a scheduler passed in)."""
        if self._own_scheduler and self._scheduler is not None:
            self._scheduler.close()
            self._scheduler = None

    # -- for subclasses -------------------------------------------------------------------------

    def _check_hparams(self, group: dict[str, Any], *, where: str) -> None:
        raise NotImplementedError

    def _step_fn(
        self,
        kernel: ModuleType,
        p: torch.Tensor,
        grad: torch.Tensor,
        state: dict[str, Any],
        out: torch.Tensor | None,
        group: dict[str, Any],
        step: int,
    ) -> Callable[[int, int], None]:
        raise NotImplementedError


def check_number(group: dict[str, Any], key: str, low: float, high: float, *, where: str) -> None:
    """Raise ValueError unless ``group[key]`` is a real number in [low, high].

    >>> check_number({"lr": -1.0}, "lr", 0.0, float("inf"), where="defaults")
    Traceback (most recent call last):
    ValueError: defaults: lr = -1.0 must be in [0.0, inf]; write e.g. lr=0.001
    """
    value = group[key]
    example = {"lr": "lr=0.001", "eps": "eps=1e-8", "weight_decay": "weight_decay=0.01"}
    hint = example.get(key, f"{key}=<number>")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        raise ValueError(
            f"{where}: {key} = {value!r} must be in [{low}, {high}]; write e.g. {hint}"
        )


def check_betas(group: dict[str, Any], *, where: str) -> None:
    """Raise ValueError unless ``group['betas']`` is a pair of numbers in [0, 1).

    >>> check_betas({"betas": (0.9, 1.0)}, where="defaults")
    Traceback (most recent call last):
    ValueError: defaults: betas = (0.9, 1.0) must be two numbers in [0, 1); write e.g. betas=(0.9, 0.999)
    """
    betas = group["betas"]
    ok = (
        isinstance(betas, (tuple, list))
        and len(betas) == 2
        and all(
            isinstance(b, (int, float)) and not isinstance(b, bool) and 0.0 <= b < 1.0
            for b in betas
        )
    )
    if not ok:
        raise ValueError(
            f"{where}: betas = {betas!r} must be two numbers in [0, 1); write e.g. betas=(0.9, 0.999)"
        )

"""The optimizer that steps fp32 master params on the host in place of the user's: optim_cpu's
CPUAdamW/CPUAdam for torch's AdamW/Adam (their state placed by the plan), else the user's own class
rebuilt over the masters. Hyper-parameters are read from the user's groups at every step, so LR
schedulers attached to the user's optimizer still drive it. It must not hold device tensors.
"""

from __future__ import annotations

import inspect
import threading
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from allocators.errors import OffloadError
from optim_cpu import Bucket, CPUAdam, CPUAdamW, StepScheduler
from optim_cpu.contention import ContentionPolicy, DmaSignal
from optim_cpu.state_alloc import StateAllocator


def host_setting(key: str, value):
    """A user's group setting as the host copy of the optimizer needs it.

    The user's optimizer was built for device params: ``capturable=True`` (CUDA-graph safe
    steps) is refused by torch for CPU params at the first step, and a tensor hyper-parameter
    on the GPU cannot drive a CPU step, so the host copy steps non-capturable with plain floats.
    :meth:`HostStep.state_dict` hands the user's own values back.

    >>> host_setting("capturable", True), host_setting("lr", torch.tensor(0.5))
    (False, 0.5)
    >>> host_setting("betas", (torch.tensor(0.9), 0.99))
    (0.8999999761581421, 0.99)
    """
    if key == "capturable":
        return False
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return float(value)
    if isinstance(value, tuple) and any(isinstance(v, torch.Tensor) for v in value):
        return tuple(host_setting(key, v) for v in value)
    return value


def native_class(optimizer: torch.optim.Optimizer) -> type | None:
    """optim_cpu's class computing exactly what ``optimizer`` computes, or None.

    >>> native_class(torch.optim.AdamW([torch.zeros(1)])).__name__
    'CPUAdamW'
    >>> native_class(torch.optim.AdamW([torch.zeros(1)], amsgrad=True)) is None
    True
    """
    kind = type(optimizer)
    if kind not in (torch.optim.AdamW, torch.optim.Adam):
        return None
    for group in optimizer.param_groups:
        if group.get("amsgrad") or group.get("maximize") or group.get("differentiable"):
            return None
        if kind is torch.optim.Adam and group.get("decoupled_weight_decay"):
            return None
        if isinstance(group.get("lr"), torch.Tensor):
            return None
    return CPUAdamW if kind is torch.optim.AdamW else CPUAdam


class HostStep:
    """Step any subset of master params with the user's optimizer's rule and hyper-parameters.

    Each master's gradient and half-precision copy live in buffers bound once (:meth:`bind`).
    A single coordinator thread (:meth:`submit`) runs bucket work in order; :meth:`step` hands
    the stepping to optim_cpu's worker pool and returns its future, so the coordinator never
    waits for the arithmetic.
    optim_cpu's pool (:attr:`scheduler`, None for a rebuilt user class) follows ``contention``
    (None: unrestricted) while ``dma`` (the copy streams' signal) is up.

    >>> p = torch.nn.Parameter(torch.ones(2))
    >>> user = torch.optim.SGD([p], lr=0.5)
    >>> master = torch.ones(2)
    >>> host = HostStep(user, [[master]])
    >>> host.bind(master, torch.ones(2))
    >>> host.step([master]).result(); master
    tensor([0.5000, 0.5000])
    >>> host.close()

    A None master is a frozen parameter (``requires_grad=False``): as in torch, it is never
    stepped and gets no state; state dicts still number parameters as the user's optimizer does.
    """

    def __init__(
        self,
        user_optimizer: torch.optim.Optimizer,
        master_groups: list[list[torch.Tensor | None]],
        *,
        state_allocator: StateAllocator | None = None,
        threads: int | None = None,
        contention: ContentionPolicy | None = None,
        dma: DmaSignal | None = None,
    ) -> None:
        self.user_optimizer = user_optimizer
        groups = []
        for user_group, masters in zip(user_optimizer.param_groups, master_groups, strict=True):
            group = {k: host_setting(k, v) for k, v in user_group.items() if k != "params"}
            group["params"] = [m for m in masters if m is not None]
            groups.append(group)
        # Per group, which positions the inner optimizer holds (False: a frozen parameter).
        self._stepped = [[m is not None for m in masters] for masters in master_groups]
        # State a loaded dict had for frozen parameters, by the user's index: given back as is.
        self._frozen_state: dict[int, dict] = {}
        native = native_class(user_optimizer)
        self.is_native = native is not None
        self.scheduler: StepScheduler | None = None
        if native is not None:
            hyper = {k: user_optimizer.defaults[k] for k in ("lr", "betas", "eps", "weight_decay")}
            self.scheduler = StepScheduler(threads, policy=contention, dma=dma)
            self.inner = native(
                groups, **hyper, state_allocator=state_allocator, scheduler=self.scheduler
            )
        else:
            self.inner = self._rebuild_user_class(user_optimizer, groups)
        self._masters = [m for group in groups for m in group["params"]]
        # master -> (gradient buffer, half-precision output or None), for the rebuilt class.
        self._bound: dict[torch.Tensor, tuple[torch.Tensor, torch.Tensor | None]] = {}
        self._lock = threading.Lock()
        self._coordinator = ThreadPoolExecutor(max_workers=1, thread_name_prefix="offload-step")

    @staticmethod
    def _rebuild_user_class(user_optimizer, groups) -> torch.optim.Optimizer:
        cls = type(user_optimizer)
        # Some defaults (AdamW's decoupled_weight_decay) are not constructor arguments; every
        # group carries them anyway.
        accepted = inspect.signature(cls.__init__).parameters
        defaults = {
            k: host_setting(k, v) for k, v in user_optimizer.defaults.items() if k in accepted
        }
        try:
            return cls(groups, **defaults)
        except (TypeError, ValueError) as exc:
            raise OffloadError(
                f"optimizer offload cannot rebuild {cls.__name__} over host masters ({exc}); "
                "use a torch.optim optimizer such as AdamW, or pass optimizer_offload=False"
            ) from exc

    def sync_hyperparameters(self) -> None:
        """Copy every setting but ``params`` from the user's groups (a scheduler changed lr)."""
        for user_group, group in zip(
            self.user_optimizer.param_groups, self.inner.param_groups, strict=True
        ):
            for key, value in user_group.items():
                if key != "params":
                    group[key] = host_setting(key, value)

    def bind(
        self, master: torch.Tensor, grad: torch.Tensor, out: torch.Tensor | None = None
    ) -> None:
        """Read ``master``'s gradient (fp32/bf16/fp16) from ``grad`` and write its half copy to
        ``out`` (None: no copy) at every :meth:`step`. Checked here, once, not at each step."""
        if self.is_native:
            self.inner.bind_buffers(master, grad=grad, out=out)
        elif grad.shape != master.shape:
            raise ValueError(
                f"grad has shape {list(grad.shape)} but its master has {list(master.shape)}; "
                "bind the gradient of that param (same shape)"
            )
        self._bound[master] = (grad, out)

    def step(self, masters: list[torch.Tensor]) -> Future:
        """Step ``masters`` (each bound) from their gradient buffers; other masters are left as
        they are. The future resolves when their values and half copies are written: optim_cpu's
        own (the work runs on its pool), or a finished one for a rebuilt user class."""
        with self._lock:
            self.sync_hyperparameters()
            if self.is_native:
                return self.inner.step_bucket(Bucket(masters))
            done: Future = Future()
            try:
                self._step_rebuilt(masters)
            except BaseException as exc:
                done.set_exception(exc)
            else:
                done.set_result(None)
            return done

    def _step_rebuilt(self, masters: list[torch.Tensor]) -> None:
        for master in masters:
            grad = self._bound[master][0]
            master.grad = grad if grad.dtype == master.dtype else grad.to(master.dtype)
        try:
            self.inner.step()
        finally:
            for master in self._masters:
                master.grad = None
        for master in masters:
            out = self._bound[master][1]
            if out is not None:
                out.copy_(master.view(out.shape))

    def submit(self, work) -> Future:
        """Run ``work()`` on the coordinator thread, after the work submitted before it."""
        return self._coordinator.submit(work)

    def state_dict(self) -> dict:
        """The inner optimizer's state dict, numbered as the user's optimizer numbers its
        parameters, tensors cloned so that nothing handed out points into host blocks that may
        be freed."""
        with self._lock:
            state = self.inner.state_dict()
        user_index = [index for index, stepped in enumerate(self._flat_stepped()) if stepped]
        params = self._user_index_groups()
        # The user's own settings (capturable, tensor lr) go back, not the host copy's.
        for saved, user_group, indices in zip(
            state["param_groups"], self.user_optimizer.param_groups, params, strict=True
        ):
            saved.update({k: v for k, v in user_group.items() if k != "params"})
            saved["params"] = indices
        merged = {user_index[index]: s for index, s in state["state"].items()}
        merged.update(self._frozen_state)
        state["state"] = {
            index: {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in s.items()}
            for index, s in sorted(merged.items())
        }
        return state

    def load_state_dict(self, state: dict) -> None:
        """Load a state dict made by :meth:`state_dict` or by the user's optimizer."""
        saved_groups = state["param_groups"]
        if len(saved_groups) != len(self._stepped) or any(
            len(g["params"]) != len(stepped)
            for g, stepped in zip(saved_groups, self._stepped, strict=False)
        ):
            raise ValueError(
                "loaded state dict's parameter groups do not match the optimizer's groups: "
                f"{[len(g['params']) for g in saved_groups]} parameters saved, "
                f"{[len(s) for s in self._stepped]} here; load a state dict saved for these params"
            )
        saved_state = state["state"]
        frozen, groups = {}, []
        for saved, stepped, indices in zip(
            saved_groups, self._stepped, self._user_index_groups(), strict=True
        ):
            kept = []
            for saved_index, is_stepped, user_index in zip(
                saved["params"], stepped, indices, strict=True
            ):
                if is_stepped:
                    kept.append(saved_index)
                elif saved_index in saved_state:
                    frozen[user_index] = saved_state[saved_index]
            groups.append({**saved, "params": kept})
        with self._lock:
            self.inner.load_state_dict({**state, "param_groups": groups})
        self._frozen_state = frozen

    def _flat_stepped(self) -> list[bool]:
        return [stepped for group in self._stepped for stepped in group]

    def _user_index_groups(self) -> list[list[int]]:
        """Each group's parameter indices as the user's optimizer's state_dict() numbers them."""
        groups, start = [], 0
        for stepped in self._stepped:
            groups.append(list(range(start, start + len(stepped))))
            start += len(stepped)
        return groups

    def has_state(self) -> bool:
        """True once any parameter has been stepped (or state was loaded)."""
        if self._frozen_state:
            return True
        for state in self.inner.state.values():
            step = state.get("step")
            if (step is None and state) or (step is not None and float(step) > 0):
                return True
        return False

    def close(self) -> None:
        """Stop the coordinator and the optimizer's workers and drop every host view."""
        self._coordinator.shutdown(wait=True)
        if self.scheduler is not None:
            self.scheduler.close()
        self.inner.state.clear()
        self.inner.param_groups.clear()
        self._masters = []
        self._bound.clear()

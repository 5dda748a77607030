"""The runtime's parts on their own: copy streams, activation hooks, the optimizer patch; the CUDA
paths run only where a GPU is present."""

from __future__ import annotations

import threading

import pytest
import torch
from torch import nn

from allocators.sysfs_topology import discover
from offload.runtime.activation_offload import ActivationOffloader, find_layers
from offload.runtime.host_memory import HostMemory
from offload.runtime.optimizer_offload import OptimizerOffload, PartialStepWarning
from offload.runtime.optimizer_patch import OptimizerPatch
from offload.runtime.streams import CopyEvent, CopyStreams
from offload.tools.tiny_finetune import tiny_llama
from optim_cpu.contention import DmaSignal

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture
def memory():
    mem = HostMemory(discover(), {"dram": "1GiB"})
    yield mem
    mem.close()


def test_cpu_copies_are_counted_per_direction_and_tier():
    streams = CopyStreams(torch.device("cpu"))
    host = torch.empty(8)
    streams.d2h(torch.ones(8), host, {"dram": 0.5, "cxl": 0.5})
    streams.h2d(host, torch.empty(8))
    counters = streams.collect()
    assert (counters.d2h_nbytes, counters.h2d_nbytes) == (32, 32)
    assert counters.nbytes_by_tier == {("d2h", "dram"): 16, ("d2h", "cxl"): 16, ("h2d", "dram"): 32}
    assert streams.collect().d2h_nbytes == 0


def test_parameters_and_their_views_are_never_offloaded(memory):
    model = nn.Linear(64, 64)
    off = ActivationOffloader(model, memory, CopyStreams(torch.device("cpu")), min_nbytes=0)
    try:
        assert not off._should_offload(model.weight)
        assert not off._should_offload(model.weight.t())
        assert off._should_offload(torch.randn(64, 64))
    finally:
        off.remove()


def test_small_tensors_stay_where_they_are(memory):
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 1))
    off = ActivationOffloader(model, memory, CopyStreams(torch.device("cpu")), min_nbytes=1 << 20)
    model(torch.randn(2, 4)).sum().backward()
    off.remove()
    assert off.offloaded_count == 0


def test_backward_prefetches_the_layer_below(memory):
    layers = nn.ModuleList([nn.Linear(32, 32) for _ in range(4)])
    model = nn.Sequential(*layers)
    streams = CopyStreams(torch.device("cpu"))
    off = ActivationOffloader(model, memory, streams, min_nbytes=0, layers=layers)
    fetched_tags = []
    original = off._prefetch_below
    off._prefetch_below = lambda tag: (fetched_tags.append(tag), original(tag))
    x = torch.randn(8, 32, requires_grad=True)
    model(x).sum().backward()
    off.remove()
    # Backward enters the layers top-down (tag 4 is what follows the last layer).
    assert fetched_tags == sorted(fetched_tags, reverse=True) and len(fetched_tags) >= 4


class ThreeHeads(nn.Module):
    """Like an attention block's q, k and v projections: three ops save the same input."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(32)
        self.q, self.k, self.v = (nn.Linear(32, 32) for _ in range(3))

    def forward(self, x):
        h = self.norm(x)
        return (self.q(h) * self.k(h) + self.v(h)).sum()


def test_a_tensor_saved_by_several_ops_is_offloaded_once(memory):
    torch.manual_seed(0)
    model = ThreeHeads()
    x = torch.randn(16, 32, requires_grad=True)
    model(x).backward()
    expected = [p.grad.clone() for p in model.parameters()] + [x.grad.clone()]
    model.zero_grad()
    x.grad = None
    off = ActivationOffloader(model, memory, CopyStreams(torch.device("cpu")), min_nbytes=1024)
    model(x).backward()
    off.remove()
    # h (16 x 32 fp32 = 2 KiB) is saved by q, k and v: one host copy, two shares.
    assert off.shared_count == 2 and off.shared_nbytes == 2 * 16 * 32 * 4
    got = [p.grad for p in model.parameters()] + [x.grad]
    for ours, ref in zip(got, expected, strict=True):
        assert torch.equal(ours, ref)
    assert memory.pool_stats().in_use_nbytes == 0


def test_a_shared_copy_is_not_reused_after_its_tensor_changed_or_died(memory):
    def saves(fn):
        off = ActivationOffloader(
            nn.Identity(), memory, CopyStreams(torch.device("cpu")), min_nbytes=0
        )
        with torch.autograd.graph.saved_tensors_hooks(off._pack, off._unpack):
            fn()
        off.remove()
        return off.offloaded_count, off.shared_count

    w = torch.randn(8, 8, requires_grad=True)

    def bumped():
        a = torch.randn(8, 8)
        _ = a @ w
        a.add_(1.0)  # a new version: the host copy of the old one must not stand for it
        _ = a @ w

    def freed_and_reallocated():
        for _ in range(3):
            _ = torch.randn(8, 8) @ w  # each temporary may reuse the last one's address

    assert saves(bumped) == (2, 0)
    assert saves(freed_and_reallocated) == (3, 0)


def test_find_layers_picks_the_hugging_face_decoder_stack():
    pytest.importorskip("transformers")
    model = tiny_llama(hidden=32, layers=3, vocab=64)
    assert find_layers(model) is model.model.layers


def test_patch_keeps_an_lr_scheduler_wrapper_and_restores_it(memory):
    model = nn.Linear(4, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    torch.optim.lr_scheduler.StepLR(opt, step_size=1)
    scheduler_step = vars(opt)["step"]
    off = OptimizerOffload(opt, memory, CopyStreams(torch.device("cpu")))
    patch = OptimizerPatch(opt, off)
    assert getattr(opt.step, "_wrapped_by_lr_sched", False)
    patch.remove()
    off.close()
    assert vars(opt)["step"] is scheduler_step


def test_optimizer_without_a_host_rule_falls_back_to_its_own_class(memory):
    torch.manual_seed(0)
    model = nn.Linear(8, 2)
    reference = nn.Linear(8, 2)
    reference.load_state_dict(model.state_dict())
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    ref_opt = torch.optim.SGD(reference.parameters(), lr=0.1, momentum=0.9)
    off = OptimizerOffload(opt, memory, CopyStreams(torch.device("cpu")))
    x = torch.randn(4, 8)
    for _ in range(3):
        model(x).square().sum().backward()
        off.step()
        reference(x).square().sum().backward()
        ref_opt.step()
        ref_opt.zero_grad()
    off.close()
    assert torch.equal(model.weight, reference.weight)


def test_a_bucket_mixing_an_odd_sized_bf16_param_and_an_fp32_one_steps(memory):
    torch.manual_seed(0)
    params = [nn.Parameter(torch.randn(4)), nn.Parameter(torch.randn(3).to(torch.bfloat16))]
    reference = [nn.Parameter(p.detach().clone()) for p in params]
    off = OptimizerOffload(
        torch.optim.SGD(params, lr=0.1), memory, CopyStreams(torch.device("cpu"))
    )
    ref_opt = torch.optim.SGD(reference, lr=0.1)
    for group in (params, reference):
        sum(p.float().square().sum() for p in group).backward()
    off.step()
    ref_opt.step()
    off.close()
    # The bf16 param is stepped on an fp32 master and rounded once; its gradient is the same.
    assert torch.equal(params[0], reference[0])
    assert torch.allclose(params[1].float(), reference[1].float(), atol=1e-2)


class HeldCopy:
    """A queued copy: it runs when the host waits for it or for a copy queued after it."""

    def __init__(self, streams: HeldStreams, src: torch.Tensor, dst: torch.Tensor) -> None:
        self.streams, self.src, self.dst, self.done = streams, src, dst, False

    def query(self) -> bool:
        return self.done

    def synchronize(self) -> None:
        self.streams.run_until(self)


class HeldStreams:
    """CopyStreams' calls with each copy held until the host waits for it, as a GPU may still be
    running it long after the call: a compute-stream wait does not run it (the host goes on).
    One queue for both directions keeps the copies in issue order."""

    def __init__(self) -> None:
        self.queue: list[HeldCopy] = []
        self.h2d_issued: list[HeldCopy] = []
        self.compute_waited_for: list[HeldCopy] = []
        self._lock = threading.Lock()
        # As CopyStreams' signal: up while a held copy has yet to run.
        self.dma = DmaSignal()
        self.dma.watch(lambda: bool(self.queue))

    def d2h(self, src, dst, tiers=None) -> HeldCopy:
        return self._hold(src, dst)

    def h2d(self, src, dst, after=None, wait_compute=True, tiers=None) -> HeldCopy:
        copy = self._hold(src, dst)
        self.h2d_issued.append(copy)
        return copy

    def mark(self) -> CopyEvent:
        return CopyEvent(None)

    def wait(self, event) -> None:
        self.compute_waited_for.append(event)

    def in_flight(self) -> int:
        return len(self.queue)

    def run_until(self, copy: HeldCopy) -> None:
        with self._lock:
            while not copy.done:
                head = self.queue.pop(0)
                with torch.no_grad():
                    head.dst.copy_(head.src)
                head.src = head.dst = None
                head.done = True

    def _hold(self, src, dst) -> HeldCopy:
        copy = HeldCopy(self, src, dst)
        with self._lock:
            self.queue.append(copy)
        return copy


def _copies_in_flight_at_each_release(memory, streams, monkeypatch) -> list[int]:
    counts: list[int] = []
    release = memory.release

    def counting_release(block):
        counts.append(streams.in_flight())
        release(block)

    monkeypatch.setattr(memory, "release", counting_release)
    return counts


def test_close_lets_the_last_steps_copies_back_finish_before_freeing_their_blocks(
    memory, monkeypatch
):
    torch.manual_seed(0)
    model = nn.Linear(8, 4)
    streams = HeldStreams()
    off = OptimizerOffload(torch.optim.AdamW(model.parameters(), lr=0.1), memory, streams)
    in_flight = _copies_in_flight_at_each_release(memory, streams, monkeypatch)
    model(torch.ones(2, 8)).sum().backward()
    off.step()
    assert streams.in_flight() > 0  # only the compute stream waits for the copies back
    updated = [slot.master.clone() for slot in off.slots]
    off.close()
    assert in_flight and not any(in_flight)
    for param, master in zip(model.parameters(), updated, strict=True):
        assert torch.equal(param.detach(), master)


def test_close_lands_gradients_of_a_bucket_still_waiting_for_others(memory, monkeypatch):
    model = nn.Linear(8, 4)
    unused = nn.Parameter(torch.zeros(4))  # same bucket, never gets a gradient
    streams = HeldStreams()
    opt = torch.optim.AdamW([*model.parameters(), unused], lr=0.1)
    off = OptimizerOffload(opt, memory, streams)
    in_flight = _copies_in_flight_at_each_release(memory, streams, monkeypatch)
    model(torch.ones(2, 8)).sum().backward()
    assert streams.in_flight() > 0
    off.close()
    assert in_flight and not any(in_flight)


@pytest.mark.gpu
@needs_gpu
def test_cuda_round_trip_through_side_streams():
    streams = CopyStreams(torch.device("cuda"))
    src = torch.arange(1 << 20, device="cuda", dtype=torch.float32)
    host = torch.empty(src.shape, pin_memory=True)
    stored = streams.d2h(src, host)
    back = torch.empty_like(src)
    loaded = streams.h2d(host, back, after=stored)
    streams.wait(loaded)
    assert torch.equal(back, src)
    counters = streams.collect()
    assert counters.d2h_ms > 0 and counters.h2d_ms > 0


@pytest.mark.gpu
@needs_gpu
def test_cuda_enable_matches_plain_training():
    import offload

    def run(offloaded: bool) -> list[float]:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(256, 1024), nn.GELU(), nn.Linear(1024, 256)).cuda()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        sess = (
            offload.enable(model, opt, budgets={"dram": "1GiB"}, activation_min_nbytes=0)
            if offloaded
            else None
        )
        gen = torch.Generator().manual_seed(1)
        losses = []
        for _ in range(5):
            x = torch.randn(64, 256, generator=gen).cuda()
            loss = model(x).square().mean()
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses.append(loss.item())
        if sess is not None:
            assert sess.report()["d2h_nbytes"].gt(0).all()
            sess.disable()
        return losses

    ours, reference = run(True), run(False)
    assert all(abs(a - b) <= 1e-5 * max(1.0, abs(b)) for a, b in zip(ours, reference, strict=True))


@pytest.mark.gpu
@needs_gpu
def test_cuda_bf16_params_come_back_as_the_rounded_masters_every_step():
    """The updated bf16 params are written into the gradients' host buffers and copied back on
    the side stream: on a real GPU the copies are asynchronous, so a wrong order would show."""
    import offload

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(512, 2048), nn.GELU(), nn.Linear(2048, 512))
    model = model.to("cuda", torch.bfloat16)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    with offload.enable(
        model, opt, budgets={"dram": "1GiB"}, bucket_nbytes="256KiB", activation_min_nbytes=0
    ) as sess:
        for _ in range(4):
            x = torch.randn(32, 512, device="cuda", dtype=torch.bfloat16)
            model(x).float().square().mean().backward()
            opt.step()
            opt.zero_grad()
            torch.cuda.synchronize()
            for slot in sess.optimizer_offload.slots:
                assert torch.equal(slot.param.detach().cpu(), slot.master.to(torch.bfloat16))


@pytest.mark.gpu
@needs_gpu
def test_cuda_llama_with_shared_saves_clipping_and_chunked_loss_matches_plain():
    import offload

    def run(offloaded: bool) -> tuple[list[float], object]:
        model = tiny_llama(0, hidden=128, layers=3, vocab=512).cuda()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        sess = None
        if offloaded:
            sess = offload.enable(
                model, opt, budgets={"dram": "1GiB"}, activation_min_nbytes=0, loss_chunk_tokens=48
            )
        gen = torch.Generator().manual_seed(1)
        losses = []
        for _ in range(4):
            ids = torch.randint(0, 512, (2, 128), generator=gen).cuda()
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
            opt.step()
            opt.zero_grad()
            losses.append(loss.item())
        report = None
        if sess is not None:
            report = sess.report()
            sess.disable()
        return losses, report

    (ours, report), (reference, _) = run(True), run(False)
    assert all(abs(a - b) <= 1e-4 * max(1.0, abs(b)) for a, b in zip(ours, reference, strict=True))
    # Phases are device time from CUDA events; shared saves moved once.
    assert (report["forward_ms"] > 0).all() and (report["backward_ms"] > 0).all()
    assert report["activation_shared_nbytes"].sum() > 0
    assert report["hidden_transfer_fraction"].between(0, 1).all()


class StopBackward(torch.autograd.Function):
    """Identity forward; its backward raises, as an error or a KeyboardInterrupt would."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        raise RuntimeError("backward stopped here")


def test_zero_grad_after_a_stopped_backward_orders_the_early_copies_back_before_forward(memory):
    torch.manual_seed(0)
    lower, upper = nn.Linear(8, 8), nn.Linear(8, 8)
    streams = HeldStreams()
    opt = torch.optim.AdamW([*lower.parameters(), *upper.parameters()], lr=0.1)
    # One bucket per layer: the upper layer's gradients arrive first and are stepped at once.
    off = OptimizerOffload(opt, memory, streams, bucket_nbytes=8 * 8 * 4 + 8 * 4)

    def loss(stop: bool) -> torch.Tensor:
        h = lower(torch.ones(2, 8))
        return upper(StopBackward.apply(h) if stop else h).sum()

    loss(stop=False).backward()
    off.step()  # the first step is never stepped early
    before = len(streams.h2d_issued)
    with pytest.raises(RuntimeError, match="backward stopped here"):
        loss(stop=True).backward()
    with pytest.warns(PartialStepWarning):
        off.zero_grad()
    early = streams.h2d_issued[before:]
    assert early and all(copy in streams.compute_waited_for for copy in early)
    off.close()

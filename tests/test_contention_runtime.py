"""The CPU optimizer scheduled around the runtime's DMA: CopyStreams raise the DMA signal while a
copy moves data (read from the copy's own events on CUDA, checked here with a fake CUDA layer),
the host step's scheduler reads that signal, and pacing it never changes a value."""

from __future__ import annotations

import gc
import shutil
import threading
from pathlib import Path

import pytest
import torch
from test_stream_copy_timing import FakeStream  # a CUDA stream that orders nothing
from torch import nn

import offload
from allocators.errors import ConfigError
from offload.config import OffloadConfig, resolve_config
from offload.planning.contention_choice import choose_contention, default_profile_path
from offload.runtime.streams import CopyStreams
from optim_cpu import ContentionPolicy, DmaSignal, StepScheduler
from optim_cpu.native import load_kernel
from profilers.profile_rates import node_rates
from profilers.result_row import ResultRow
from profilers.trial_stats import TrialStats


class FakeEvent:
    """A CUDA event whose completion the test decides."""

    def __init__(self, **_):
        self.done = False

    def record(self, stream=None):
        pass

    def query(self) -> bool:
        return self.done

    def synchronize(self) -> None:
        self.done = True

    def elapsed_time(self, end) -> float:
        return 1.0


@pytest.fixture
def fake_cuda(monkeypatch):
    """CopyStreams on a fake CUDA layer; returns (streams, events made, in creation order)."""
    events: list[FakeEvent] = []

    def make_event(**kw):
        events.append(FakeEvent(**kw))
        return events[-1]

    monkeypatch.setattr(torch.cuda, "Event", make_event)
    monkeypatch.setattr(torch.cuda, "Stream", FakeStream)
    monkeypatch.setattr(torch.cuda, "stream", lambda s: s)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: FakeStream())
    monkeypatch.setattr(torch.Tensor, "record_stream", lambda self, stream: None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    streams = CopyStreams(torch.device("cuda"))
    return streams, events


def test_the_signal_rises_when_a_gpu_copy_starts_and_falls_when_it_ends(fake_cuda):
    streams, events = fake_cuda
    assert not streams.dma.active
    streams.h2d(torch.ones(4), torch.empty(4), wait_compute=False)
    start, end = events
    assert not streams.dma.active, "queued behind other work, not moving data yet"
    start.done = True
    assert streams.dma.active
    end.done = True
    assert not streams.dma.active


def test_a_later_copy_on_the_stream_keeps_the_signal_up_after_the_first_ends(fake_cuda):
    streams, events = fake_cuda
    streams.d2h(torch.ones(4), torch.empty(4))
    streams.d2h(torch.ones(4), torch.empty(4))
    first_start, first_end, second_start, second_end = events
    first_start.done = first_end.done = True
    assert not streams.dma.active
    second_start.done = True
    assert streams.dma.active
    second_end.done = True
    assert not streams.dma.active


def test_either_direction_in_flight_raises_the_signal(fake_cuda):
    streams, events = fake_cuda
    streams.d2h(torch.ones(4), torch.empty(4))
    streams.h2d(torch.ones(4), torch.empty(4))
    d2h_start, d2h_end, h2d_start, h2d_end = events
    d2h_start.done = d2h_end.done = True
    h2d_start.done = True
    assert streams.dma.active
    h2d_end.done = True
    assert not streams.dma.active


def test_finished_gpu_copies_are_forgotten_as_new_ones_are_issued(fake_cuda):
    streams, events = fake_cuda
    for _ in range(100):
        streams.d2h(torch.ones(4), torch.empty(4))
        for event in events[-2:]:
            event.done = True
    assert len(streams._unfinished["d2h"]) <= 1


def test_a_synchronous_cpu_copy_holds_the_signal_while_it_copies(monkeypatch):
    streams = CopyStreams(torch.device("cpu"))
    seen = []
    original_copy = torch.Tensor.copy_

    def watched_copy(self, src, non_blocking=False):
        seen.append(streams.dma.active)
        return original_copy(self, src)

    monkeypatch.setattr(torch.Tensor, "copy_", watched_copy)
    streams.d2h(torch.ones(4), torch.empty(4))
    streams.h2d(torch.ones(4), torch.empty(4))
    assert seen == [True, True]
    assert not streams.dma.active


def test_pauses_are_counted_as_paced_only_during_dma():
    dma = DmaSignal()
    policy = ContentionPolicy(duty_cycle_during_dma=0.5)
    with StepScheduler(threads=1, policy=policy, dma=dma) as idle:
        idle.submit([lambda: threading.Event().wait(0.002)] * 5).result(30)
    with StepScheduler(threads=1, policy=policy, dma=dma) as busy, dma.dma_active():
        busy.submit([lambda: threading.Event().wait(0.002)] * 5).result(30)
    # Read after close: a chunk's future resolves before the pause that follows it.
    assert idle.paced_ms == 0.0
    assert busy.paced_ms > 0.0


def test_a_capped_worker_held_back_while_work_waited_is_counted_as_paced():
    dma = DmaSignal()
    release = threading.Event()
    policy = ContentionPolicy(threads_during_dma=1)
    with StepScheduler(threads=2, policy=policy, dma=dma) as sched:
        assert sched.dma_threads == 1
        dma.begin()
        # Worker 0 is busy on the first chunk; worker 1 may not take the second while DMA runs.
        future = sched.submit([release.wait, lambda: None])
        threading.Event().wait(0.05)
        dma.end()
        release.set()
        future.result(30)
    assert sched.paced_ms > 0.0


def test_a_scheduler_watching_a_gpu_copy_resumes_capped_workers_when_it_ends(fake_cuda):
    streams, events = fake_cuda
    streams.h2d(torch.ones(4), torch.empty(4), wait_compute=False)
    start, end = events
    start.done = True
    names = []
    gate = threading.Event()
    policy = ContentionPolicy(threads_during_dma=1)
    with StepScheduler(threads=2, policy=policy, dma=streams.dma) as sched:
        # Worker 0 blocks on the first chunk; the others are left to worker 1.
        future = sched.submit([gate.wait] + [lambda: names.append(1)] * 4)
        threading.Event().wait(0.05)
        held = list(names)
        end.done = True  # nobody is told: the held worker must notice by asking
        for _ in range(200):
            if len(names) == 4:
                break
            threading.Event().wait(0.01)
        ran_after_copy = len(names)
        gate.set()
        future.result(30)
    assert held == [], "worker 1 must be held back while the copy runs"
    assert ran_after_copy == 4, "worker 1 must resume once the copy has finished"


# -- the contention setting: enable(contention=...), YAML, OFFLOAD_CONTENTION -------------------

PROFILES = Path(__file__).parent / "fixtures" / "profiles"


@pytest.fixture
def kernel_loaded():
    """Load optim_cpu's kernel first: a first load that (re)builds it leaves import frames in
    a reference cycle that holds the first step's views until the next garbage collection, and
    disable() would then find host blocks still in use."""
    load_kernel()
    gc.collect()


def tiny_model_and_optimizer(seed: int = 0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    return model, torch.optim.AdamW(model.parameters(), lr=1e-2)


def train(model, optimizer, steps: int = 3) -> None:
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        model(torch.randn(8, 16, generator=gen)).pow(2).sum().backward()
        optimizer.step()
        optimizer.zero_grad()


@pytest.mark.parametrize(
    "value, expected",
    [
        ("auto", "auto"),
        ("off", "off"),
        (False, "off"),
        ({"threads_during_dma": 2}, ContentionPolicy(threads_during_dma=2)),
        ("threads_during_dma=1,duty_cycle_during_dma=0.5", ContentionPolicy(1, 0.5)),
        (ContentionPolicy(duty_cycle_during_dma=0.25), ContentionPolicy(None, 0.25)),
    ],
)
def test_contention_settings_are_read_in_every_form(value, expected):
    assert OffloadConfig.from_kwargs(contention=value).contention == expected


def test_contention_is_read_from_yaml_and_the_environment(tmp_path):
    path = tmp_path / "offload.yaml"
    path.write_text("contention:\n  threads_during_dma: 1\n")
    assert OffloadConfig.from_yaml(path).contention == ContentionPolicy(threads_during_dma=1)
    path.write_text("contention: off\n")  # YAML 1.1 reads this as false
    assert OffloadConfig.from_yaml(path).contention == "off"
    environ = {"OFFLOAD_CONTENTION": "duty_cycle_during_dma=0.5"}
    paced = ContentionPolicy(duty_cycle_during_dma=0.5)
    assert resolve_config(None, environ=environ).contention == paced
    assert resolve_config(None, {"contention": "off"}, environ=environ).contention == "off"


@pytest.mark.parametrize(
    "value, message",
    [
        ("fast", "not a contention setting; write 'auto', 'off'"),
        (True, "not a contention setting"),
        (0.5, "not a contention setting"),
        ({"threads": 2}, r"unknown knob\(s\) \['threads'\]"),
        ({"threads_during_dma": 0}, "threads_during_dma = 0; write an int >= 1"),
        ({"duty_cycle_during_dma": 1.5}, r"write a fraction in \(0, 1\]"),
        ("threads_during_dma=two", "'two' is not a number"),
        ("pace=1", "unknown knob 'pace'"),
    ],
)
def test_bad_contention_settings_are_refused_with_what_to_write(value, message):
    with pytest.raises(ConfigError, match=message):
        OffloadConfig.from_kwargs(contention=value)


def test_auto_is_on_where_the_profile_shows_dma_slowed_by_the_step():
    choice = choose_contention("auto", threads=8, profile=PROFILES / "dma_slowed.json")
    assert choice.policy == ContentionPolicy(threads_during_dma=4)
    assert "fell to 70%" in choice.reason


def test_auto_is_off_where_the_profile_shows_no_gain():
    choice = choose_contention("auto", threads=8, profile=PROFILES / "dma_unaffected.json")
    assert choice.policy is None and "kept 97%" in choice.reason


def test_auto_is_off_without_a_real_dma_measurement_or_without_a_profile(tmp_path):
    emulated = choose_contention("auto", threads=2, profile=PROFILES / "emulated_only.json")
    assert emulated.policy is None and "no contention measured with real DMA" in emulated.reason
    missing = choose_contention("auto", threads=2, profile=tmp_path / "profile.json")
    assert missing.policy is None and "no machine profile" in missing.reason


def test_auto_reads_the_profile_offload_profile_writes_by_default(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert choose_contention("auto", threads=2).policy is None
    default_profile_path().parent.mkdir()
    shutil.copy(PROFILES / "dma_slowed.json", default_profile_path())
    assert choose_contention("auto", threads=2).policy == ContentionPolicy(threads_during_dma=1)


def test_the_profile_records_the_dma_share_kept_while_adamw_steps():
    stats = lambda median: TrialStats(median, median, median, 5, False)  # noqa: E731
    rows = [
        ResultRow.from_stats("contention", "dma idle", "node0", 1 << 28, "GiB/s", stats(50.0)),
        ResultRow.from_stats("contention", "dma + adamw", "node0", 1 << 28, "GiB/s", stats(35.0)),
        # Emulated DMA takes a core a copy engine does not: it never stands for the node.
        ResultRow.from_stats(
            "contention", "emulated dma + adamw", "node0", 1 << 26, "GiB/s", stats(1.0),
            emulated=True,
        ),
    ]  # fmt: skip
    assert node_rates(rows)[0].dma_share_during_step == pytest.approx(0.7)
    assert node_rates(rows[2:]) == {}


def test_enable_paces_the_host_step_and_reports_it_per_step(tmp_path, monkeypatch, kernel_loaded):
    monkeypatch.chdir(tmp_path)
    model, opt = tiny_model_and_optimizer()
    policy = {"threads_during_dma": 1, "duty_cycle_during_dma": 0.5}
    with offload.enable(
        model, opt, activations=False, contention=policy, optimizer_threads=2
    ) as sess:
        scheduler = sess.optimizer_offload.host.scheduler
        assert scheduler.dma is sess.streams.dma, "the host step must see the copies' signal"
        sess.streams.dma.begin()  # a copy in flight for the whole run
        train(model, opt)
        sess.streams.dma.end()
        report = sess.report()
    assert sess.contention.reason == "as set"
    assert list(report["optimizer_threads"]) == [2, 2, 2]
    assert list(report["optimizer_dma_threads"]) == [1, 1, 1]
    assert scheduler.paced_ms > 0.0
    assert report["optimizer_paced_ms"].sum() <= scheduler.paced_ms + 1e-9


def test_auto_without_a_profile_leaves_the_step_unpaced(tmp_path, monkeypatch, kernel_loaded):
    monkeypatch.chdir(tmp_path)
    model, opt = tiny_model_and_optimizer()
    with offload.enable(model, opt, activations=False, optimizer_threads=2) as sess:
        train(model, opt, steps=2)
        report = sess.report()
    assert not sess.contention.on and "no machine profile" in sess.contention.reason
    assert list(report["optimizer_paced_ms"]) == [0.0, 0.0]
    assert list(report["optimizer_dma_threads"]) == [2, 2]


def test_a_paced_step_gives_bitwise_the_same_parameters_as_an_unpaced_one(
    tmp_path, monkeypatch, kernel_loaded
):
    monkeypatch.chdir(tmp_path)
    results = []
    for contention in ("off", {"threads_during_dma": 1, "duty_cycle_during_dma": 0.5}):
        model, opt = tiny_model_and_optimizer()
        with offload.enable(
            model, opt, activations=False, contention=contention, optimizer_threads=2,
            bucket_nbytes=256,
        ) as sess:  # fmt: skip
            sess.streams.dma.begin()
            train(model, opt, steps=4)
            sess.streams.dma.end()
        results.append([p.detach().clone() for p in model.parameters()])
    for off, paced in zip(*results, strict=True):
        assert torch.equal(off, paced)

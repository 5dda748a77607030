"""StepScheduler: pinned workers, bucket futures, DMA-aware thread caps, and the node's core list."""

import os
import threading

import pytest
import torch

from optim_cpu import Bucket, ContentionPolicy, CPUAdamW, DmaSignal, StepScheduler
from optim_cpu.numa_cores import node_cpus


def test_bucket_futures_complete_and_equal_one_full_step():
    gen = torch.Generator().manual_seed(0)
    shapes = [(300,), (50, 7), (1000,), (9,)]
    full_params = [torch.randn(s, generator=gen) for s in shapes]
    bucket_params = [p.clone() for p in full_params]
    grads = [torch.randn(s, generator=gen).bfloat16() for s in shapes]
    full = CPUAdamW(full_params, lr=1e-2, chunk_elems=64)
    split = CPUAdamW(bucket_params, lr=1e-2, chunk_elems=64)
    for _ in range(3):
        full.step_bucket(Bucket(full_params, grads=grads)).result()
        # Buckets arrive in backward order and run while the next one is being submitted.
        futures = [
            split.step_bucket(Bucket(bucket_params[2:], grads=grads[2:])),
            split.step_bucket(Bucket(bucket_params[:2], grads=grads[:2])),
        ]
        for future in futures:
            assert future.result(timeout=30) is None
    for a, b in zip(full_params, bucket_params, strict=True):
        assert torch.equal(a, b)


def test_workers_are_pinned_to_the_node_cores():
    seen = []
    with StepScheduler(threads=2, numa_node=0) as sched:
        tasks = [lambda: seen.append(os.sched_getaffinity(threading.get_native_id()))] * 4
        sched.submit(tasks).result(timeout=30)
    assert all(cpus == set(node_cpus(0)) for cpus in seen)


def test_a_failing_chunk_fails_the_bucket_future():
    def boom():
        raise RuntimeError("chunk failed")

    with StepScheduler(threads=2) as sched:
        future = sched.submit([lambda: None, boom, lambda: None])
        with pytest.raises(RuntimeError, match="chunk failed"):
            future.result(timeout=30)


def test_thread_cap_holds_back_workers_while_dma_is_active():
    dma = DmaSignal()
    names = []
    policy = ContentionPolicy(threads_during_dma=1)
    with StepScheduler(threads=2, policy=policy, dma=dma) as sched:
        with dma.dma_active():
            sched.submit([lambda: names.append(threading.current_thread().name)] * 20).result(30)
    assert set(names) == {"optim-cpu-0"}


def test_capped_workers_resume_when_dma_ends():
    dma = DmaSignal()
    policy = ContentionPolicy(threads_during_dma=1)
    started = threading.Event()
    release = threading.Event()
    names = set()

    def blocker():
        started.set()
        release.wait(30)

    with StepScheduler(threads=2, policy=policy, dma=dma) as sched:
        dma.begin()
        first = sched.submit([blocker])
        started.wait(30)
        # Worker 0 is busy and worker 1 is capped, so this bucket can only run once DMA ends.
        second = sched.submit([lambda: names.add(threading.current_thread().name)])
        assert not second.done()
        dma.end()
        second.result(timeout=30)
        release.set()
        first.result(timeout=30)
    assert names == {"optim-cpu-1"}


def test_pacing_sleeps_in_proportion_to_the_chunk_only_during_dma():
    policy = ContentionPolicy(duty_cycle_during_dma=0.25)
    assert policy.pause_s(chunk_s=0.001, dma_active=True) == pytest.approx(0.003)
    assert policy.pause_s(chunk_s=0.001, dma_active=False) == 0.0


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"threads_during_dma": 0}, "threads_during_dma = 0"),
        (
            {"duty_cycle_during_dma": 0.0},
            r"duty_cycle_during_dma = 0.0; write a fraction in \(0, 1\]",
        ),
    ],
)
def test_bad_policies_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ContentionPolicy(**kwargs)


def test_dma_end_without_begin_is_refused():
    with pytest.raises(RuntimeError, match="without a matching begin"):
        DmaSignal().end()


def write_node(root, node, cpulist):
    path = root / "devices" / "system" / "node" / f"node{node}"
    path.mkdir(parents=True)
    (path / "cpulist").write_text(cpulist + "\n")


def test_node_cpus_reads_the_node_cpulist_within_the_allowed_cpus(tmp_path):
    allowed = sorted(os.sched_getaffinity(0))
    write_node(tmp_path, 0, f"{allowed[0]},100000")
    assert node_cpus(0, sysfs_root=tmp_path) == (allowed[0],)


def test_a_cpu_less_node_falls_back_to_all_allowed_cpus(tmp_path):
    write_node(tmp_path, 2, "")
    assert node_cpus(2, sysfs_root=tmp_path) == tuple(sorted(os.sched_getaffinity(0)))


def test_a_missing_node_is_refused_with_the_nodes_that_exist(tmp_path):
    write_node(tmp_path, 0, "0")
    with pytest.raises(ValueError, match=r"NUMA node 3 does not exist .*\['node0'\]"):
        node_cpus(3, sysfs_root=tmp_path)


def test_workers_are_pinned_to_the_cpus_given():
    first = min(os.sched_getaffinity(0))
    seen = []
    with StepScheduler(threads=2, cpus=[first]) as sched:
        assert sched.cpus == (first,)
        tasks = [lambda: seen.append(os.sched_getaffinity(threading.get_native_id()))] * 4
        sched.submit(tasks).result(timeout=30)
    assert seen and all(cpus == {first} for cpus in seen)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"cpus": []}, "names no CPU"),
        ({"cpus": [-1]}, "not a CPU id"),
        ({"cpus": "0-1"}, "not a list of CPU ids"),
        ({"cpus": [max(os.sched_getaffinity(0)) + 4096]}, "not allowed for this process"),
        ({"cpus": [0], "numa_node": 0}, "not both"),
    ],
)
def test_bad_cpus_are_refused_with_the_allowed_list(kwargs, message):
    with pytest.raises(ValueError, match=message):
        StepScheduler(**kwargs)
    with pytest.raises(ValueError, match=message):
        CPUAdamW([torch.zeros(2)], **kwargs)


def test_optimizer_cpus_reach_its_scheduler():
    first = min(os.sched_getaffinity(0))
    opt = CPUAdamW([torch.zeros(2)], cpus=[first], threads=1)
    assert opt.scheduler.cpus == (first,)
    opt.close()

"""A pool of worker threads pinned to one NUMA node's cores that runs optimizer chunks and hands back
a Future per bucket, so a bucket can be stepped while backward goes on.

It runs whatever chunk callables it is given and applies the contention policy between chunks;
it must not know about optimizers, tensors or how a chunk is computed.
"""

from __future__ import annotations

import os
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future

from optim_cpu.contention import DEFAULT_POLICY, ContentionPolicy, DmaSignal
from optim_cpu.numa_cores import worker_cpus

Chunk = Callable[[], None]


class _Job:
    """One submitted bucket: its future and how many of its chunks are still out."""

    def __init__(self, future: Future, chunks: int) -> None:
        self.future = future
        self.left = chunks
        self.error: BaseException | None = None


class StepScheduler:
    """Worker threads pinned to the cores of ``numa_node`` (all allowed cores for None).

    Chunks of a bucket run in any order on any worker; callers must make chunks touch disjoint
    memory, which is what makes the result independent of scheduling. Workers start on the
    first :meth:`submit`, not at construction.

    Args:
        threads: worker count (default: the node's core count).
        numa_node: node whose cores the workers are pinned to.
        cpus: the CPUs the workers are pinned to instead of a node's cores (each must be in
            this process's affinity mask); give ``numa_node`` or ``cpus``, not both.
        policy: what workers do while ``dma`` is active (default :data:`DEFAULT_POLICY`).
        dma: the signal the runtime raises around transfers (default: a private, idle one).

    >>> sched = StepScheduler(threads=2)
    >>> out = []
    >>> sched.submit([lambda: out.append(1), lambda: out.append(2)]).result()
    >>> sorted(out)
    [1, 2]
    >>> sched.close()
    """

    def __init__(
        self,
        threads: int | None = None,
        *,
        numa_node: int | None = None,
        cpus: Iterable[int] | None = None,
        policy: ContentionPolicy | None = None,
        dma: DmaSignal | None = None,
        sysfs_root: str = "/sys",
    ) -> None:
        self.cpus = worker_cpus(numa_node, cpus, sysfs_root=sysfs_root)
        if threads is None:
            threads = len(self.cpus)
        if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
            raise ValueError(f"threads = {threads!r}; write an int >= 1 or None for one per core")
        self.threads = threads
        self.numa_node = numa_node
        self.policy = policy or DEFAULT_POLICY
        self.dma = dma or DmaSignal()
        self._cond = threading.Condition()
        self._queue: deque[tuple[_Job, Chunk]] = deque()
        self._workers: list[threading.Thread] = []
        self._closed = False
        # Worker-seconds the policy held workers back (capped while work waited, or paused).
        self._paced_s = 0.0
        self.dma.subscribe(self._wake)

    @property
    def paced_ms(self) -> float:
        """Worker-milliseconds, summed over workers since construction, that the policy held
        back: a capped worker waiting while chunks were queued, or a worker's pause after a chunk.

        >>> StepScheduler(threads=1).paced_ms
        0.0
        """
        with self._cond:
            return self._paced_s * 1e3

    @property
    def dma_threads(self) -> int:
        """How many workers may take chunks while DMA is in flight (all unless capped).

        >>> StepScheduler(threads=4, policy=ContentionPolicy(threads_during_dma=1)).dma_threads
        1
        """
        cap = self.policy.threads_during_dma
        return self.threads if cap is None else min(cap, self.threads)

    def submit(self, chunks: Sequence[Chunk]) -> Future:
        """Queue ``chunks``; the Future resolves (to None) when all ran, or to the first error.

        >>> with StepScheduler(threads=1) as sched:
        ...     sched.submit([]).done()
        True
        """
        future: Future = Future()
        future.set_running_or_notify_cancel()
        if not chunks:
            future.set_result(None)
            return future
        job = _Job(future, len(chunks))
        with self._cond:
            if self._closed:
                raise RuntimeError("StepScheduler is closed; create a new one")
            self._start_workers()
            self._queue.extend((job, chunk) for chunk in chunks)
            self._cond.notify_all()
        return future

    def close(self) -> None:
        """Finish queued chunks, then stop the workers. Safe to call twice."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        for worker in self._workers:
            worker.join()
        self._workers.clear()

    def __enter__(self) -> StepScheduler:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _start_workers(self) -> None:
        while len(self._workers) < self.threads:
            worker = threading.Thread(
                target=self._run,
                args=(len(self._workers),),
                name=f"optim-cpu-{len(self._workers)}",
                daemon=True,
            )
            worker.start()
            self._workers.append(worker)

    def _wake(self) -> None:
        with self._cond:
            self._cond.notify_all()

    def _next(self, index: int) -> tuple[_Job, Chunk] | None:
        held_since = None
        with self._cond:
            while True:
                if self._queue:
                    if self.policy.allows(index, self.dma.active):
                        self._count_held(held_since)
                        return self._queue.popleft()
                    if held_since is None:
                        held_since = time.perf_counter()
                elif held_since is not None:
                    # Another worker took the work this one was held back from.
                    self._count_held(held_since)
                    held_since = None
                if self._closed and not self._queue:
                    return None
                # A timeout, because a capped worker must notice DMA ending even if a listener
                # was registered after the signal flipped, and an asynchronous copy's end is
                # only seen by asking (DmaSignal.watch): a held worker asks every millisecond.
                self._cond.wait(timeout=0.05 if held_since is None else 0.001)

    def _count_held(self, since: float | None) -> None:
        if since is not None:
            self._paced_s += time.perf_counter() - since

    def _run(self, index: int) -> None:
        # Per-thread affinity: on Linux a thread's native id is a valid pid for this call.
        os.sched_setaffinity(threading.get_native_id(), self.cpus)
        while (item := self._next(index)) is not None:
            job, chunk = item
            start_s = time.perf_counter()
            if job.error is None:
                try:
                    chunk()
                except BaseException as exc:  # handed to the caller through the Future
                    job.error = exc
            self._finish(job)
            pause_s = self.policy.pause_s(time.perf_counter() - start_s, self.dma.active)
            if pause_s > 0:
                time.sleep(pause_s)
                with self._cond:
                    self._paced_s += pause_s

    def _finish(self, job: _Job) -> None:
        with self._cond:
            job.left -= 1
            done = job.left == 0
        if done:
            if job.error is not None:
                job.future.set_exception(job.error)
            else:
                job.future.set_result(None)

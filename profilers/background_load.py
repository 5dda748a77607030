"""A load that runs in a thread while something else is measured, and reports its own rate.

Only the thread and its bookkeeping live here; what the load does is the caller's function.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable


class BackgroundLoad:
    """Call ``work()`` in a loop on a thread between ``start()`` and ``stop()``.

    ``work`` returns how many units (bytes, steps) it did; ``stop()`` returns units per second.
    The work must drop the GIL (ctypes calls and torch ops do) or it will stall the foreground.

    >>> load = BackgroundLoad(lambda: (time.sleep(0.001), 1)[1])
    >>> load.start(); time.sleep(0.05); load.stop() > 0
    True
    """

    def __init__(self, work: Callable[[], float]) -> None:
        self._work = work
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._units = 0.0
        self._seconds = 0.0
        self._error: BaseException | None = None

    def _run(self) -> None:
        start = time.perf_counter()
        try:
            while not self._stop.is_set():
                self._units += self._work()
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread by stop()
            self._error = exc
        self._seconds = time.perf_counter() - start

    def start(self) -> None:
        """Start the loop; the first call of ``work`` begins at once."""
        if self._thread is not None:
            raise RuntimeError("BackgroundLoad already started; make a new one per measurement")
        self._thread = threading.Thread(target=self._run, name="offload-profile-load", daemon=True)
        self._thread.start()

    def stop(self) -> float:
        """Stop after the current call of ``work`` and return units per second."""
        if self._thread is None:
            raise RuntimeError("BackgroundLoad.stop() before start()")
        self._stop.set()
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self._units / self._seconds if self._seconds > 0 else 0.0

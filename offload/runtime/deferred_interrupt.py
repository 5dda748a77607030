"""Hold back a Ctrl-C (SIGINT) until a block that must not stop half-way has finished, then raise
it. It must not swallow the interrupt, and does nothing outside the main thread.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType


class DeferredInterrupt:
    """While inside, a SIGINT is remembered instead of raised; leaving raises KeyboardInterrupt.

    Python delivers SIGINT to the main thread between any two bytecodes: an optimizer step cut
    there has updated some parameters and not others. Only the main thread can install a
    signal handler, so elsewhere (and under a handler that is not Python's default one) this
    changes nothing.

    >>> import os
    >>> try:
    ...     with DeferredInterrupt():
    ...         os.kill(os.getpid(), signal.SIGINT)
    ...         finished = True
    ... except KeyboardInterrupt:
    ...     print("raised after the block; finished:", finished)
    raised after the block; finished: True
    """

    def __init__(self) -> None:
        self._previous = None
        self._pending = False

    def __enter__(self) -> DeferredInterrupt:
        if (
            threading.current_thread() is threading.main_thread()
            and signal.getsignal(signal.SIGINT) is signal.default_int_handler
        ):
            self._previous = signal.signal(signal.SIGINT, self._remember)
        return self

    def _remember(self, signum: int, frame: FrameType | None) -> None:
        self._pending = True

    def __exit__(self, exc_type, exc, tb) -> None:
        if self._previous is None:
            return
        signal.signal(signal.SIGINT, self._previous)
        self._previous = None
        # An error of the block itself wins; the interrupt is only raised after a clean finish.
        if self._pending and exc_type is None:
            self._pending = False
            raise KeyboardInterrupt("interrupted during the optimizer step; the step completed")

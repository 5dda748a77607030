"""One process-wide switch in front of DeepSpeed's pinned-memory backend lookup: a pin asked for
while this thread runs a placed DeepSpeed call goes to that call's placement, any other the stock
way. It routes only; it must not allocate, classify or free.

DeepSpeed 0.19's accelerators ask ``deepspeed.utils.pin_memory.get_active_native_pinned_memory()``
for a backend on every ``get_accelerator().pin_memory``; the switch replaces that function while at
least one placement needs it (counted), and puts the stock one back when the last one is done.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

_lock = threading.Lock()
_local = threading.local()
_installed: dict[str, Any] = {"count": 0, "stock": None}


def _routed_lookup() -> Any:
    stack = getattr(_local, "stack", None)
    if stack and not getattr(_local, "bypass", False):
        return stack[-1]
    return _installed["stock"]()


def install() -> None:
    """Put the switch in front of DeepSpeed's lookup (once per process; calls are counted).

    >>> install(); uninstall()  # doctest: +SKIP
    """
    from deepspeed.utils import pin_memory as ds_pin_memory

    with _lock:
        if _installed["count"] == 0:
            _installed["stock"] = ds_pin_memory.get_active_native_pinned_memory
            ds_pin_memory.get_active_native_pinned_memory = _routed_lookup
        _installed["count"] += 1


def uninstall() -> None:
    """Undo one :func:`install`; the last one puts DeepSpeed's own lookup back.

    >>> uninstall()
    Traceback (most recent call last):
    ...
    RuntimeError: uninstall() without a matching install(): the pin switch is not installed
    """
    with _lock:
        if _installed["count"] == 0:
            raise RuntimeError(
                "uninstall() without a matching install(): the pin switch is not installed"
            )
        _installed["count"] -= 1
        if _installed["count"] == 0:
            from deepspeed.utils import pin_memory as ds_pin_memory

            ds_pin_memory.get_active_native_pinned_memory = _installed["stock"]
            _installed["stock"] = None


def installed() -> bool:
    """Whether the switch is in front of DeepSpeed's lookup now.

    >>> isinstance(installed(), bool)
    True
    """
    return _installed["count"] > 0


@contextmanager
def routing(backend: object) -> Iterator[None]:
    """Send this thread's pins to ``backend`` for the duration (innermost wins).

    >>> with routing("ours"):
    ...     _local.stack[-1]
    'ours'
    """
    stack = getattr(_local, "stack", None)
    if stack is None:
        stack = _local.stack = []
    stack.append(backend)
    try:
        yield
    finally:
        stack.pop()


@contextmanager
def stock() -> Iterator[None]:
    """Let this thread's pins go DeepSpeed's own way for the duration, even inside :func:`routing`.

    >>> with routing("ours"), stock():
    ...     _local.bypass
    True
    """
    previous = getattr(_local, "bypass", False)
    _local.bypass = True
    try:
        yield
    finally:
        _local.bypass = previous


def routed(function: Callable[..., Any], backend: object) -> Callable[..., Any]:
    """``function`` wrapped so that its pins (and its callees') go to ``backend``.

    >>> routed(lambda: _local.stack[-1], "ours")()
    'ours'
    """

    def call(*args: Any, **kwargs: Any) -> Any:
        with routing(backend):
            return function(*args, **kwargs)

    call.__wrapped__ = function  # type: ignore[attr-defined]
    call.__name__ = getattr(function, "__name__", "routed")
    call.__doc__ = function.__doc__
    return call

"""Hugging Face Trainer (and TRL's SFTTrainer, DPOTrainer, ..., which are Trainers): offload at
train begin with the Trainer's own optimizer and gradient accumulation, and the offload report's
columns in the Trainer's logs, so TensorBoard, W&B and ``log_history`` get them. It must not
change how the Trainer trains: clipping (``max_grad_norm``) stays the Trainer's, routed to the
host gradients by offload.runtime.clip_patch.
"""

from __future__ import annotations

import math
from typing import Any

from transformers import Trainer, TrainerCallback

from allocators.errors import OffloadError
from offload.enable import enable

LOG_PREFIX = "offload/"


class OffloadCallback(TrainerCallback):
    """``offload.enable(model, optimizer, **enable_kwargs)`` from ``on_train_begin`` to
    ``on_train_end``, with ``grad_accumulation_steps`` set to the Trainer's.

    Use :func:`offload_trainer` to add it: it puts the callback first, so the columns it adds
    to each log reach the reporting callbacks (TensorBoard, W&B) that come after it. After
    training, ``callback.session.report()`` has one row per optimizer step.

    Args:
        **enable_kwargs: settings for :func:`offload.enable` (``budgets``, ``policy``,
            ``activations``, ...); ``grad_accumulation_steps`` defaults to the Trainer's.
    """

    def __init__(self, **enable_kwargs: Any) -> None:
        self.enable_kwargs = enable_kwargs
        self.session = None
        self._logged_rows = 0

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        if optimizer is None:
            raise OffloadError(
                "OffloadCallback got no optimizer at train begin; add it with "
                "offload.integrations.offload_trainer(trainer) and call trainer.train()"
            )
        if self.session is not None and self.session.enabled:
            # The last train() stopped on an error before on_train_end: start afresh.
            self.session.disable()
        settings = {"grad_accumulation_steps": args.gradient_accumulation_steps}
        settings.update(self.enable_kwargs)
        self.session = enable(model, optimizer, **settings)
        self._logged_rows = 0

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.session is None or logs is None:
            return
        values = step_means(self.session.records[self._logged_rows :])
        self._logged_rows = len(self.session.records)
        logs.update(values)
        # Trainer appended a copy of the logs to log_history before calling the callbacks.
        if state.log_history:
            state.log_history[-1].update(values)

    def on_train_end(self, args, state, control, **kwargs):
        # The optimizer gets its state back and host memory is freed; the report stays.
        if self.session is not None:
            self.session.disable()


def offload_trainer(trainer: Trainer, **enable_kwargs: Any) -> OffloadCallback:
    """Offload ``trainer``'s model and optimizer while it trains: the one line to add.

    >>> callback = offload_trainer(trainer, budgets={"dram": "64GiB"})  # doctest: +SKIP
    >>> trainer.train()  # doctest: +SKIP
    >>> callback.session.report()  # doctest: +SKIP
    """
    callback = OffloadCallback(**enable_kwargs)
    # First, so the columns on_log adds are in the dict the reporting callbacks read next.
    trainer.callback_handler.callbacks.insert(0, callback)
    return callback


def step_means(rows: list[dict]) -> dict[str, float]:
    """The mean of each numeric report column over ``rows``, named ``offload/<column>``.

    >>> step_means([{"step": 0, "forward_ms": 2.0, "peak_hbm_nbytes": None},
    ...             {"step": 1, "forward_ms": 4.0, "peak_hbm_nbytes": None}])
    {'offload/forward_ms': 3.0}
    """
    sums: dict[str, float] = {}
    counts: dict[str, int] = {}
    for row in rows:
        for column, value in row.items():
            if column == "step" or isinstance(value, bool) or not isinstance(value, int | float):
                continue
            if math.isfinite(value):
                sums[column] = sums.get(column, 0.0) + value
                counts[column] = counts.get(column, 0) + 1
    return {f"{LOG_PREFIX}{column}": sums[column] / counts[column] for column in sums}

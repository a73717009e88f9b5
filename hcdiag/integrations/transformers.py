"""A transformers ``TrainerCallback`` that adds hcdiag's metrics to the Trainer's logs.

    from hcdiag.integrations.transformers import HcdiagCallback
    trainer = Trainer(model=model, args=args, train_dataset=ds)
    HcdiagCallback.attach(trainer, every=50, max_col_err=1e-3, stop_on_threshold=True)
    trainer.train()

Every ``every`` optimizer steps (``state.global_step``) the callback computes the monitor's metrics on the
live model after the optimizer step, asks the Trainer to log that step (``control.should_log``), and in
``on_log`` adds them to the ``logs`` dict handed to the callbacks after it (the ``report_to`` integrations:
TensorBoard, W&B, ...) and to that step's ``state.log_history`` record (so they land in
``trainer_state.json``). :meth:`HcdiagCallback.attach` puts the callback ahead of the reporting callbacks;
passed in ``Trainer(callbacks=[...])`` it runs after them, so the metrics then reach ``log_history`` but not
the reporters. A threshold crossed with ``stop_on_threshold`` sets ``control.should_training_stop``.
"""

from __future__ import annotations

from typing import Any

from transformers import TrainerCallback

from hcdiag.integrations._holder import MonitorHolder
from hcdiag.monitor import Monitor

__all__ = ["HcdiagCallback"]


class HcdiagCallback(MonitorHolder, TrainerCallback):
    """``monitor``: a :class:`~hcdiag.monitor.Monitor`, or None to build one from the Trainer's model at the
    start of training with ``monitor_kwargs`` (``every``, ``probe``, ``max_col_err``, ``sinks``, ...)."""

    def __init__(self, monitor: Monitor | None = None, **monitor_kwargs: Any) -> None:
        super().__init__(monitor, **monitor_kwargs)
        self._pending: tuple[int, dict[str, float]] | None = None

    @classmethod
    def attach(cls, trainer: Any, monitor: Monitor | None = None, **monitor_kwargs: Any) -> HcdiagCallback:
        """Add a callback to ``trainer`` ahead of its reporting callbacks (so ``report_to`` sees the metrics)."""
        cb = cls(monitor, **monitor_kwargs)
        trainer.add_callback(cb)
        handler = trainer.callback_handler.callbacks
        handler.remove(cb)
        handler.insert(0, cb)
        return cb

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        if self.monitor is None and model is None:
            raise ValueError("HcdiagCallback: the Trainer passed no model; give a Monitor instead")
        self._ensure_monitor(model)

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        assert self.monitor is not None
        metrics = self.monitor.step(state.global_step)
        if not metrics:
            return
        self._pending = (state.global_step, metrics)
        self.history[state.global_step] = metrics
        control.should_log = True
        if self.monitor.should_stop:
            control.should_training_stop = True

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, float] | None = None,
               **kwargs: Any) -> None:
        if self._pending is None or self._pending[0] != state.global_step:
            return
        _, metrics = self._pending
        self._pending = None
        if logs is not None:
            logs.update(metrics)
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(metrics)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.monitor is not None:
            self.monitor.close()

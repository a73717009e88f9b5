"""A Lightning ``Callback`` that logs hcdiag's metrics through the LightningModule's ``log_dict``.

    from hcdiag.integrations.lightning import HcdiagLightningCallback
    trainer = L.Trainer(callbacks=[HcdiagLightningCallback(every=50, max_gain=2.0, stop_on_threshold=True)])

After every training batch whose ``trainer.global_step`` (optimizer steps done) is a multiple of ``every``, the
monitor's metrics of the live module go to ``pl_module.log_dict`` (so to every logger the Trainer has, and to
``trainer.callback_metrics``). A threshold crossed with ``stop_on_threshold`` sets ``trainer.should_stop``.
Works with ``lightning`` (``lightning.pytorch``) or ``pytorch_lightning``, whichever is installed.
"""

from __future__ import annotations

from typing import Any

try:
    from lightning.pytorch import Callback
except ImportError:
    try:
        from pytorch_lightning import Callback
    except ImportError:
        raise ImportError(
            "hcdiag.integrations.lightning needs lightning or pytorch_lightning; pip install lightning"
        ) from None

from hcdiag.integrations._holder import MonitorHolder
from hcdiag.monitor import Monitor

__all__ = ["HcdiagLightningCallback"]


class HcdiagLightningCallback(MonitorHolder, Callback):
    """``monitor``: a :class:`~hcdiag.monitor.Monitor`, or None to build one on the LightningModule at the
    start of training with ``monitor_kwargs`` (``every``, ``probe``, ``max_col_err``, ``sinks``, ...)."""

    def __init__(self, monitor: Monitor | None = None, **monitor_kwargs: Any) -> None:
        super().__init__(monitor, **monitor_kwargs)
        self._last_step: int | None = None

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        self._ensure_monitor(pl_module)

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        assert self.monitor is not None
        step = int(trainer.global_step)
        if step == self._last_step:  # gradient accumulation: several batches end at one optimizer step
            return
        self._last_step = step
        metrics = self.monitor.step(step)
        if not metrics:
            return
        self.history[step] = metrics
        pl_module.log_dict(metrics, on_step=True, on_epoch=False, sync_dist=False, rank_zero_only=True)
        if self.monitor.should_stop:
            trainer.should_stop = True

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        if self.monitor is not None:
            self.monitor.close()

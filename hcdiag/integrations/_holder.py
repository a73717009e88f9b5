"""What every framework adapter holds: a :class:`~hcdiag.monitor.Monitor` (given, or built from keyword arguments
when training starts) and the metrics it logged per step."""

from __future__ import annotations

from typing import Any

from hcdiag.monitor import Monitor


class MonitorHolder:
    """``monitor``: a Monitor, or None to build one on the model at the start of training with
    ``monitor_kwargs`` (``every``, ``probe``, ``max_col_err``, ``sinks``, ...)."""

    def __init__(self, monitor: Monitor | None = None, **monitor_kwargs: Any) -> None:
        if monitor is not None and monitor_kwargs:
            raise TypeError("pass either a Monitor or its keyword arguments, not both")
        self.monitor = monitor
        self.monitor_kwargs = monitor_kwargs
        self.history: dict[int, dict[str, float]] = {}  # step -> metrics logged there

    def _ensure_monitor(self, model: Any) -> Monitor:
        """The monitor, built on ``model`` the first time when none was given."""
        if self.monitor is None:
            self.monitor = Monitor(model, **self.monitor_kwargs)
        return self.monitor

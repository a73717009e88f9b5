"""Live HC diagnostics inside a training loop: ``Monitor(model, every=N).step(step) -> {key: float}``.

Dimension letters: L sites, n streams, C width of one stream.

The monitor reads the model's *live* parameters through the same readers as a checkpoint: its state dict is
wrapped in :class:`StateDictSource` (an in-memory :class:`hcdiag.io.base.TensorSource`), the layout is detected
or forced as :func:`hcdiag.io.load.load` does, and the resulting sites go through
:func:`hcdiag.track.summarize_model`, i.e. :func:`hcdiag.stochasticity.analyze_stochasticity` and
:func:`hcdiag.gain.gain_from_model`: the numbers are those ``hcdiag stochasticity`` / ``gain-sweep --from``
print for a checkpoint saved at that step. Every tensor is copied to CPU float64 under ``torch.no_grad()``; the
model's parameters, dtype, device and mode are not touched.

Distributed (``torch.distributed`` initialised; DDP, or FSDP2 with DTensor parameters): every rank takes part in
gathering the HC tensors only (``DTensor.full_tensor()`` for the keys the layout reads, found once from shapes),
rank ``compute_rank`` computes, the dict is broadcast, so every rank returns the same dict; sinks write on rank 0.

Framework adapters live in :mod:`hcdiag.integrations` (transformers ``TrainerCallback``, Lightning ``Callback``).
"""

from __future__ import annotations

import csv
import json
import math
import os
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import torch

from hcdiag.enums import DType, Probe
from hcdiag.errors import InputError, UsageError
from hcdiag.model import LoadedModel, TensorInfo

__all__ = [
    "CsvSink",
    "JsonlSink",
    "Monitor",
    "Sink",
    "StateDictSource",
    "TensorBoardSink",
    "load_tensors",
    "sink_for",
]


# ------------------------------------------------------------------------------------------------------------
# Reading a live model through hcdiag.io


def _is_dtensor(t: Any) -> bool:
    return type(t).__name__ == "DTensor" and hasattr(t, "full_tensor")


def _full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor: a DTensor's shards gathered (``full_tensor()``, a collective), else ``t`` itself."""
    return t.full_tensor() if _is_dtensor(t) else t  # type: ignore[attr-defined]


class StateDictSource:
    """A :class:`~hcdiag.io.base.TensorSource` over an in-memory state dict (``{key: tensor}``).

    Keys have wrapper prefixes stripped (``module.`` of DDP, ``_orig_mod.`` of torch.compile), as for files.
    ``get`` returns a detached CPU copy in the asked dtype (never a view of the model's storage); a DTensor is
    gathered with ``full_tensor()`` first (a collective: under torch.distributed every rank must ask for the
    same keys in the same order). ``shapes_only=True`` hands out zeros of each tensor's (global) shape without
    reading any data, to find which keys a layout reads (``keys_read``)."""

    kind = "state_dict"

    def __init__(
        self,
        tensors: Mapping[str, torch.Tensor],
        *,
        path: str = "<model>",
        config: dict[str, Any] | None = None,
        metadata: Mapping[str, str] | None = None,
        shapes_only: bool = False,
    ) -> None:
        from hcdiag.io.source import strip_key

        self.path = path
        self.config = config
        self.metadata: dict[str, str] = dict(metadata or {})
        self.notes: list[str] = []
        self.shapes_only = shapes_only
        self._tensors = {strip_key(k): v for k, v in tensors.items() if isinstance(v, torch.Tensor)}
        self.keys_read: list[str] = []
        self.bytes_read = 0
        self.bytes_total = sum(t.numel() * t.element_size() for t in self._tensors.values())

    def keys(self) -> list[str]:
        return list(self._tensors)

    def info(self, key: str) -> TensorInfo:
        t = self._tensor(key)
        return TensorInfo(key=key, shape=tuple(t.shape), dtype=str(t.dtype).removeprefix("torch."))

    def _tensor(self, key: str) -> torch.Tensor:
        try:
            return self._tensors[key]
        except KeyError:
            raise InputError(f"{self.path}: no tensor named {key!r}", path=self.path) from None

    def get(self, key: str, dtype: torch.dtype | None = torch.float64) -> torch.Tensor:
        t = self._tensor(key)
        if key not in self.keys_read:
            self.keys_read.append(key)
            self.bytes_read += t.numel() * t.element_size()
        want = dtype or t.dtype
        if self.shapes_only:
            return torch.zeros(tuple(t.shape), dtype=want)
        with torch.no_grad():
            return _full(t).detach().to(device="cpu", dtype=want, copy=True)

    def close(self) -> None:
        self._tensors.clear()


def _model_config(model: Any) -> dict[str, Any] | None:
    """A transformers model's config as config.json would hold it (the transformers layout reads it)."""
    cfg = getattr(model, "config", None)
    to_dict = getattr(cfg, "to_dict", None)
    return to_dict() if callable(to_dict) else None


def load_tensors(
    source: StateDictSource,
    *,
    layout: str | None = None,
    iters: int | None = None,
    convention: str | None = None,
    options: Any = None,
) -> LoadedModel:
    """Sites of an in-memory source, as :func:`hcdiag.io.load.load` builds them from a file: the layout forced
    (``layout``) or detected in priority order, its own ``load``, the same size bounds. Raises InputError when
    no layout matches."""
    from hcdiag.io.base import LoadOptions, get_layout
    from hcdiag.io.limits import MAX_SITES, MAX_STREAM_WIDTH, MAX_STREAMS, bounded
    from hcdiag.io.load import detect_layout

    opts = options or LoadOptions(iters=iters, convention=convention)
    if layout is not None:
        lay, reason = get_layout(layout), f"forced with layout={layout!r}"
    else:
        found = detect_layout(source)
        if found is None:
            raise InputError(
                f"{source.path}: no known hyper-connection layout among the model's {len(source.keys())} "
                "tensors; pass layout= (see `hcdiag inspect`) or metadata= for hcdiag's native layout",
                path=source.path)
        lay, reason = found
    model = lay.load(source, opts)
    if not model.sites:
        raise InputError(f"{source.path}: the {lay.name} layout found no HC sites", path=source.path)
    bounded(model.n, MAX_STREAMS, "streams n", source.path)
    bounded(model.n * model.C, MAX_STREAM_WIDTH, "n * C (stream entries per token)", source.path)
    bounded(len(model.sites), MAX_SITES, "the number of HC sites", source.path)
    model.layout = lay.name
    model.layout_reason = model.layout_reason or reason
    model.bytes_read, model.bytes_total = int(source.bytes_read), int(source.bytes_total)
    return model


# ------------------------------------------------------------------------------------------------------------
# Sinks


class Sink(Protocol):
    """Where a monitor writes each step's metrics (rank 0 only)."""

    def write(self, step: int, metrics: Mapping[str, float]) -> None: ...

    def close(self) -> None: ...


class JsonlSink:
    """One JSON object per call, ``{"step": s, key: value, ...}``, appended and flushed (a log, so appended
    line by line rather than written to a temp file and renamed). NaN / Inf are written as null."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._f = _open_append(self.path)

    def write(self, step: int, metrics: Mapping[str, float]) -> None:
        row = {"step": int(step), **{k: (v if math.isfinite(v) else None) for k, v in metrics.items()}}
        self._f.write(json.dumps(row, allow_nan=False) + "\n")
        self._f.flush()

    def close(self) -> None:
        self._f.close()


class CsvSink:
    """Long-form CSV ``step,key,value`` (keys may differ between calls), appended and flushed."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        new = not self.path.exists() or self.path.stat().st_size == 0
        self._f = _open_append(self.path)
        self._w = csv.writer(self._f, lineterminator="\n")
        if new:
            self._w.writerow(["step", "key", "value"])

    def write(self, step: int, metrics: Mapping[str, float]) -> None:
        for k, v in metrics.items():
            self._w.writerow([int(step), k, repr(float(v))])
        self._f.flush()

    def close(self) -> None:
        self._f.close()


class TensorBoardSink:
    """Scalars through ``torch.utils.tensorboard.SummaryWriter`` (needs the ``tensorboard`` package)."""

    def __init__(self, log_dir: str | os.PathLike[str]) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as exc:
            raise UsageError(f"TensorBoard sink needs the tensorboard package ({exc}); pip install tensorboard",
                             "sinks") from None
        self._w = SummaryWriter(log_dir=str(log_dir))

    def write(self, step: int, metrics: Mapping[str, float]) -> None:
        for k, v in metrics.items():
            self._w.add_scalar(k, v, global_step=int(step))
        self._w.flush()

    def close(self) -> None:
        self._w.close()


def _open_append(path: Path) -> Any:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        return path.open("a", encoding="utf-8", newline="")
    except OSError as exc:
        raise UsageError(f"cannot open {path} for writing: {exc.strerror}; choose a writable path", "sinks") from None


def sink_for(target: str | os.PathLike[str] | Sink) -> Sink:
    """A sink object for ``target``: ``*.jsonl`` / ``*.json`` -> :class:`JsonlSink`, ``*.csv`` ->
    :class:`CsvSink`, a directory or ``tensorboard:DIR`` -> :class:`TensorBoardSink`; sink objects pass."""
    if hasattr(target, "write") and hasattr(target, "close"):
        return target  # type: ignore[return-value]
    text = os.fspath(target)  # type: ignore[arg-type]
    if text.startswith("tensorboard:"):
        return TensorBoardSink(text.removeprefix("tensorboard:"))
    suffix = Path(text).suffix.lower()
    if suffix in (".jsonl", ".json"):
        return JsonlSink(text)
    if suffix == ".csv":
        return CsvSink(text)
    if suffix == "" or Path(text).is_dir():
        return TensorBoardSink(text)
    raise UsageError(f"sink {text!r}: use a .jsonl or .csv file, or tensorboard:DIR", "sinks")


# ------------------------------------------------------------------------------------------------------------
# The monitor


def _dist() -> Any:
    """torch.distributed when a process group is up, else None."""
    d = torch.distributed
    return d if d.is_available() and d.is_initialized() else None


class Monitor:
    """HC diagnostics of ``model`` every ``every`` steps, from its live parameters.

    probe / tokens / seed / iters / convention / dtype / tol: as for ``hcdiag stochasticity``.
    layout: force a layout (default: detected from the parameter names); config: the model's config.json dict
    (default: ``model.config.to_dict()`` when it has one); metadata: hcdiag metadata (native layout).
    sinks: paths or :class:`Sink` objects (see :func:`sink_for`). max_col_err / max_gain: warn once when the
    worst column error / the larger composite gain exceeds them; ``stop_on_threshold`` makes
    :attr:`should_stop` true then (the adapters stop training through their framework). compute_rank: the rank
    that computes under torch.distributed.

    ``step(step)`` returns the flat dict of :meth:`hcdiag.track.ModelSummary.flat` (``hc/<site>/row_err``,
    ``hc/composite/gain_fwd``, ...) when ``step % every == 0``, else ``{}``.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        *,
        every: int = 1,
        probe: Probe | str | Any = Probe.STATIC,
        tokens: int = 64,
        seed: int = 0,
        iters: int | None = None,
        convention: str | None = None,
        dtype: DType | str = DType.FLOAT64,
        tol: float = 1e-6,
        layout: str | None = None,
        config: dict[str, Any] | None = None,
        metadata: Mapping[str, str] | None = None,
        sinks: Sequence[str | os.PathLike[str] | Sink] = (),
        max_col_err: float | None = None,
        max_gain: float | None = None,
        stop_on_threshold: bool = False,
        compute_rank: int = 0,
        prefix: str = "hc",
    ) -> None:
        from hcdiag.probes import make_probe

        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise UsageError(f"every must be an integer >= 1, got {every!r}", "every")
        for name, v in (("max_col_err", max_col_err), ("max_gain", max_gain)):
            if v is not None and not (isinstance(v, int | float) and v >= 0 and math.isfinite(v)):
                raise UsageError(f"{name} must be a finite number >= 0, got {v!r}", name)
        self.model = model
        self.every = every
        self.probe = probe if hasattr(probe, "inputs") else make_probe(probe, tokens=tokens, seed=seed)
        self.iters, self.convention, self.dtype, self.tol = iters, convention, dtype, tol
        self.layout = layout
        self.config = config if config is not None else _model_config(model)
        self.metadata = dict(metadata or {})
        self.max_col_err, self.max_gain, self.stop_on_threshold = max_col_err, max_gain, stop_on_threshold
        self.compute_rank = compute_rank
        self.prefix = prefix
        d = _dist()
        self.rank = d.get_rank() if d else 0
        self.sinks: list[Sink] = [sink_for(s) for s in sinks] if self.rank == 0 else []
        self.gathered_keys: list[str] | None = None  # the tensors the layout reads (found on the first call)
        self.last: dict[str, float] = {}
        self.last_summary: Any = None
        self.warned: list[str] = []
        self.should_stop = False

    # -- reading ------------------------------------------------------------------------------------------

    def _state(self) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            return dict(self.model.state_dict())

    def _source(self, tensors: Mapping[str, torch.Tensor], shapes_only: bool = False) -> StateDictSource:
        return StateDictSource(tensors, path=f"<live {type(self.model).__name__}>", config=self.config,
                               metadata=self.metadata, shapes_only=shapes_only)

    def _hc_keys(self, state: Mapping[str, torch.Tensor]) -> list[str]:
        """The keys the layout reads, from shapes alone (same on every rank: no data, no collective)."""
        if self.gathered_keys is None:
            src = self._source(state, shapes_only=True)
            load_tensors(src, layout=self.layout, iters=self.iters, convention=self.convention)
            self.gathered_keys = sorted(src.keys_read)
        return self.gathered_keys

    def _gather(self) -> dict[str, torch.Tensor]:
        """HC tensors only, full (DTensor shards gathered; every rank calls this in the same key order)."""
        from hcdiag.io.source import strip_key

        state = {strip_key(k): v for k, v in self._state().items()}
        out = {}
        with torch.no_grad():
            for k in self._hc_keys(state):
                t = state[k]
                out[k] = _full(t).detach().to("cpu", copy=True)
        return out

    # -- computing ----------------------------------------------------------------------------------------

    def compute(self) -> dict[str, float]:
        """The metrics now, whatever the step (all ranks must call it together under torch.distributed). An
        error on the computing rank (NaN parameters: InputError) is raised on every rank."""
        d = _dist()
        tensors = self._gather() if d else None
        if d is None:
            return self._finish(self._summarize(self._state()))
        box: list[Any] = [None]
        if self.rank == self.compute_rank:
            try:
                box = [self._summarize(tensors or {})]
            except Exception as exc:  # noqa: BLE001 - every rank must leave the broadcast, then all raise it
                box = [exc]
        d.broadcast_object_list(box, src=self.compute_rank)
        if isinstance(box[0], BaseException):
            raise box[0]
        return self._finish(box[0])

    def _summarize(self, tensors: Mapping[str, torch.Tensor]) -> Any:
        from hcdiag.track import summarize_model

        with torch.no_grad():
            src = self._source(tensors)
            loaded = load_tensors(src, layout=self.layout, iters=self.iters, convention=self.convention)
            if self.gathered_keys is None:
                self.gathered_keys = sorted(src.keys_read)
            return summarize_model(loaded, probe=self.probe, iters=self.iters, convention=self.convention,
                                   dtype=self.dtype, tol=self.tol)

    def _finish(self, summary: Any) -> dict[str, float]:
        self.last_summary = summary
        self.last = summary.flat(self.prefix)
        return dict(self.last)

    def step(self, step: int, *, force: bool = False) -> dict[str, float]:
        """Metrics at ``step`` when it is a multiple of ``every`` (or ``force``), written to the sinks on rank 0
        and checked against the thresholds; ``{}`` otherwise."""
        if not force and step % self.every:
            return {}
        metrics = self.compute()
        for sink in self.sinks:
            sink.write(step, metrics)
        self._check(step, metrics)
        return metrics

    def _check(self, step: int, metrics: Mapping[str, float]) -> None:
        p = self.prefix
        checks = []
        if self.max_col_err is not None:
            checks.append(("max_col_err", metrics.get(f"{p}/worst/col_err"), self.max_col_err, "worst column error"))
        if self.max_gain is not None:
            g = [metrics.get(f"{p}/composite/gain_fwd"), metrics.get(f"{p}/composite/gain_bwd")]
            vals = [v for v in g if v is not None]
            checks.append(("max_gain", max(vals) if vals else None, self.max_gain, "composite gain"))
        for name, value, limit, what in checks:
            if value is None or not (math.isnan(value) or value > limit):
                continue
            if self.stop_on_threshold:
                self.should_stop = True
            if name in self.warned:
                continue
            self.warned.append(name)
            action = "; stopping training" if self.stop_on_threshold else ""
            if self.rank == 0:
                warnings.warn(f"hcdiag: step {step}: {what} {value:.3g} exceeds {name}={limit:g}{action}",
                              RuntimeWarning, stacklevel=3)

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()
        self.sinks = []

    def __enter__(self) -> Monitor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

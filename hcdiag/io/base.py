"""Plug-in points for checkpoint readers: a lazy tensor source and a registry of layouts.

A *source* knows how to list a checkpoint's tensors and read one at a time (safely: never unpickling code).
A *layout* knows which keys form hyper-connection sites in some codebase's naming, and builds a
:class:`hcdiag.model.LoadedModel` (paper convention) from them. Detection asks each registered layout in
priority order; ``--layout NAME`` forces one.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from hcdiag.errors import UsageError
from hcdiag.model import LoadedModel, TensorInfo


class TensorSource(Protocol):
    """Lazy, read-only view of a checkpoint's tensors. Keys have wrapper prefixes stripped."""

    path: str
    metadata: dict[str, str]  # safetensors __metadata__ and/or sidecar JSON (string values)
    config: dict[str, Any] | None  # config.json of a model directory, if any
    bytes_read: int  # bytes of tensor data actually read so far
    bytes_total: int  # bytes of tensor data in the whole checkpoint

    def keys(self) -> list[str]: ...

    def info(self, key: str) -> TensorInfo: ...

    def get(self, key: str, dtype: torch.dtype | None = torch.float64) -> torch.Tensor: ...


@dataclass(frozen=True)
class LoadOptions:
    """Settings a reader may need; ``None`` means: take it from the file, else the default."""

    iters: int | None = None
    convention: str | None = None
    layout_file: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Layout:
    """A naming scheme for HC tensors.

    detect(source) returns a one-line reason ("found 16 sites named sites.N.phi_res") when it matches, else None.
    load(source, options) returns the sites in depth order, converted to paper convention.
    """

    name: str
    summary: str
    detect: Callable[[TensorSource], str | None]
    load: Callable[[TensorSource, LoadOptions], LoadedModel]
    priority: int = 100  # lower is asked first


_LAYOUTS: dict[str, Layout] = {}


def register_layout(layout: Layout) -> Layout:
    _LAYOUTS[layout.name] = layout
    return layout


def layouts() -> list[Layout]:
    """Registered layouts in detection order."""
    return sorted(_LAYOUTS.values(), key=lambda lay: (lay.priority, lay.name))


def dtype_summary(infos: Iterable[TensorInfo]) -> str:
    """The stored dtypes of ``infos``, sorted and joined by "+" (``LoadedModel.source_dtype``)."""
    uniq = sorted({i.dtype for i in infos})
    return "+".join(uniq) if uniq else "none (no stored tensors)"


def get_layout(name: str) -> Layout:
    try:
        return _LAYOUTS[name]
    except KeyError:
        known = ", ".join(lay.name for lay in layouts())
        raise UsageError(f"unknown layout {name!r}; choose one of: {known}", option="--layout") from None

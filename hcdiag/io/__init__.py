"""Checkpoint readers: sources (files, directories), layouts (key naming schemes), and :func:`load`."""

from __future__ import annotations

from hcdiag.io.base import Layout, LoadOptions, TensorSource, get_layout, layouts, register_layout
from hcdiag.io.load import load
from hcdiag.io.source import open_source

__all__ = [
    "Layout",
    "LoadOptions",
    "TensorSource",
    "get_layout",
    "layouts",
    "load",
    "open_source",
    "register_layout",
]

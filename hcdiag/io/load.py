"""Open a checkpoint, pick its layout, and return its HC sites in paper convention (:func:`load`).

Dimension letters: n streams, C width of one stream.

Every reader goes through here: :func:`hcdiag.io.source.open_source` gives a lazy tensor source, the layouts
registered in :mod:`hcdiag.io.base` are asked in priority order (or one is forced with ``layout=`` /
``--layout``; ``options.layout_file`` selects the layout-file reader), and the result is validated once:
static tensors finite, every site's outputs the right shape at a static probe (x = 0).
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Iterable
from typing import Any

import torch

from hcdiag.errors import InputError, UsageError
from hcdiag.io.base import Layout, LoadOptions, TensorSource, get_layout, layouts
from hcdiag.io.limits import MAX_SITES, MAX_STREAM_WIDTH, MAX_STREAMS, bounded
from hcdiag.io.source import check_float_dtype, looks_hc, open_source, torch_dtype_of
from hcdiag.model import LoadedModel, Site, TensorInfo

__all__ = ["LAYOUT_FILE", "LAYOUT_MODULES", "detect_layout", "import_layouts", "load", "unmatched_hc_keys"]

#: modules that register layouts when imported (some may not exist in a given build)
LAYOUT_MODULES = (
    "hcdiag.io.native",
    "hcdiag.io.transformers_layout",
    "hcdiag.io.lucidrains_layout",
    "hcdiag.io.nanogpt_layout",
    "hcdiag.io.tokenbender_layout",
    "hcdiag.io.mhc_pytorch_layout",
    "hcdiag.io.qwen4_exp_layout",
    "hcdiag.io.deepseek_v41_layout",
    "hcdiag.io.layout_file",
)
#: name of the layout that reads ``--layout-file``
LAYOUT_FILE = "layout-file"

_HINT = "write a layout file (--layout-file), see docs/layout-file.md"


def import_layouts() -> None:
    """Import every layout module so that it registers; modules not present in this build are skipped."""
    for name in LAYOUT_MODULES:
        try:
            importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name != name:  # a module that exists but fails to import is a bug: surface it
                raise


def unmatched_hc_keys(source: TensorSource, used: Iterable[str]) -> list[TensorInfo]:
    """Keys that look HC-related (hc, hyper*, static_alpha, sinkhorn, comb, h_res, mhc, ...) but are not in
    ``used``: what a layout saw and could not place. Layouts call this to fill ``LoadedModel.unmatched_keys``."""
    used = set(used)
    return [source.info(k) for k in source.keys() if k not in used and looks_hc(k)]


def detect_layout(source: TensorSource) -> tuple[Layout, str] | None:
    """The first registered layout (priority order) whose detect() matches, with its one-line reason."""
    import_layouts()
    for lay in layouts():
        if lay.name == LAYOUT_FILE:
            continue
        reason = lay.detect(source)  # anything but an InputError from a detect() is a bug: exit 4
        if reason:
            return lay, reason
    return None


def _no_layout(source: TensorSource) -> InputError:
    keys = source.keys()
    hc = [k for k in keys if looks_hc(k)]
    if hc:
        shown = ", ".join(f"{k} {list(source.info(k).shape)}" for k in hc[:5])
        more = f" (+{len(hc) - 5} more)" if len(hc) > 5 else ""
        return InputError(
            f"{source.path}: {len(hc)} tensors look HC-related but match no known layout: {shown}{more}; {_HINT}",
            path=source.path,
        )
    return InputError(
        f"{source.path}: no hyper-connection tensors found among {len(keys)} tensors; if the model names them "
        f"differently, {_HINT}",
        path=source.path,
    )


def _check_finite(source: TensorSource, site: Site) -> None:
    tensors = list(site.module.state_dict().values())
    if all(bool(torch.isfinite(t).all()) for t in tensors if t.is_floating_point()):
        return
    for info in site.tensors:  # find the stored tensor to blame
        t = source.get(info.key)
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            bad = int((~torch.isfinite(t)).sum())
            raise InputError(
                f"{source.path}: tensor {info.key} (site {site.name}) holds {bad} NaN/Inf values of "
                f"{t.numel()}; the checkpoint is damaged or was saved after divergence",
                path=source.path,
            )
    raise InputError(f"{source.path}: site {site.name} has NaN/Inf parameters", path=source.path)


def _check_shapes(source: TensorSource, model: LoadedModel, site: Site) -> None:
    n, C = model.n, model.C
    keys = ", ".join(t.key for t in site.tensors) or site.name
    # the layouts check every stored shape they read, so a site that fails to evaluate here is a bug (exit 4)
    with torch.no_grad():
        dtype = next((b.dtype for b in site.module.buffers() if b.is_floating_point()), torch.float64)
        pre, post, res = site.module(torch.zeros(1, n, C, dtype=dtype))
    if tuple(res.shape[-2:]) != (n, n) or tuple(pre.shape[-1:]) != (n,) or tuple(post.shape[-1:]) != (n,):
        raise InputError(
            f"{source.path}: site {site.name} ({keys}) gives H_res {list(res.shape[1:])}, H_pre "
            f"{list(pre.shape[1:])}, H_post {list(post.shape[1:])}; expected a square [{n}, {n}] H_res and "
            f"[{n}] H_pre / H_post",
            path=source.path,
        )


class _HeaderOnlySource:
    """A source seen through its headers alone (``hcdiag inspect``): keys, shapes, dtypes, metadata and config
    are the real ones; ``get`` returns zeros of the stored shape and never reads tensor data, so bytes_read
    stays 0. Layouts identify sites by names and shapes only, so they build the same sites from it."""

    def __init__(self, inner: TensorSource) -> None:
        self._inner = inner

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def get(self, key: str, dtype: torch.dtype | None = torch.float64) -> torch.Tensor:
        info = self._inner.info(key)
        if dtype is not None and dtype.is_floating_point:
            check_float_dtype(self._inner.path, key, info.dtype)  # what a full read would refuse
        dt = dtype or torch_dtype_of(info.dtype) or torch.float32
        return torch.zeros(info.shape, dtype=dt)


def load(
    path: str | os.PathLike[str],
    *,
    layout: str | None = None,
    options: LoadOptions = LoadOptions(),
    trust_pickle: bool = False,
    headers_only: bool = False,
) -> LoadedModel:
    """Read the HC sites of a checkpoint file or model directory, in paper convention.

    layout: force a registered layout by name (``--layout``); else detection in priority order.
    options: iterations / convention overrides, ``layout_file`` (``--layout-file``), ``extra["state_key"]``
    (which state dict of a training checkpoint to read, e.g. ``"ema"``).
    trust_pickle: allow arbitrary pickles (``--trust-pickle``); never needed for safetensors.
    headers_only: build the sites from names and shapes without reading any tensor data (``inspect``); the
    site modules then hold zeros, so only structure, settings and parameter counts are meaningful.
    Raises InputError (unreadable file, no HC tensors, NaN/Inf in stored tensors, inconsistent shapes) and
    UsageError (unknown layout, conflicting options).
    """
    if options.layout_file is not None and layout not in (None, LAYOUT_FILE):
        raise UsageError(f"--layout {layout} and --layout-file conflict: pass one of them", option="--layout")
    state_key = options.extra.get("state_key") if options.extra else None
    source: Any = open_source(path, trust_pickle=trust_pickle, state_key=state_key)
    if headers_only:
        source = _HeaderOnlySource(source)
    import_layouts()

    if options.layout_file is not None or layout == LAYOUT_FILE:
        if options.layout_file is None:
            raise UsageError("--layout layout-file needs --layout-file FILE", option="--layout-file")
        lay = get_layout(LAYOUT_FILE)
        reason = f"layout file {options.layout_file}"
    elif layout is not None:
        lay = get_layout(layout)
        reason = f"forced with --layout {layout}"
    else:
        found = detect_layout(source)
        if found is None:
            raise _no_layout(source)
        lay, reason = found

    # a layout recognises a bad file where it reads it and raises InputError there; any other exception is
    # hcdiag's own bug and reaches the CLI as an internal error (exit 4), never disguised as a bad file
    model = lay.load(source, options)
    if not model.sites:
        raise _no_layout(source)
    # every command's work grows with these; readers bound what a file states, this bounds what shapes imply
    bounded(model.n, MAX_STREAMS, "streams n", source.path)
    bounded(model.n * model.C, MAX_STREAM_WIDTH, "n * C (stream entries per token)", source.path)
    bounded(len(model.sites), MAX_SITES, "the number of HC sites", source.path)

    model.layout = lay.name
    if not model.layout_reason:
        model.layout_reason = reason
    elif layout is not None and options.layout_file is None:
        model.layout_reason = f"{reason}: {model.layout_reason}"
    for site in model.sites:
        _check_finite(source, site)
        _check_shapes(source, model, site)
    model.bytes_read = int(source.bytes_read)
    model.bytes_total = int(source.bytes_total)
    header = int(getattr(source, "header_bytes", 0) or 0)
    if header:
        model.metadata.setdefault("header_bytes", header)
    container = getattr(source, "container", "")
    if container:
        model.metadata.setdefault("state_dict", container)
    for note in getattr(source, "notes", []):
        if note not in model.notes:
            model.notes.append(note)
    return model

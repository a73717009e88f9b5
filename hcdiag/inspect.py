"""``hcdiag inspect``: what a checkpoint holds, as hcdiag reads it (layout, sites, settings, parameter counts).

Dimension letters: n streams, C width of one stream.

Pure compute: :func:`inspect_checkpoint` returns a frozen :class:`InspectReport`; rendering is the CLI's job.
Headers only: sites are built from key names, shapes, metadata and config, and no tensor data is read
(``bytes_read`` is 0; ``hc_bytes`` is what ``stochasticity`` / ``gain-sweep --from`` will read). NaN/Inf values are
therefore not checked here; the analyses check them.
Each site's stored parameter count is checked against the registry formula of its variant (SPEC section 5):
transformers' packed fn / base / scale is the paper form, (n^2 + 2n)(nC + 1) + 3 for mHC and
2(n nC + n + 1) for HY-V4's iHC.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field
from typing import Any

from hcdiag.enums import Form
from hcdiag.errors import HcdiagError
from hcdiag.io.base import LoadOptions
from hcdiag.model import LoadedModel, Site, TensorInfo

__all__ = ["InspectReport", "SiteReport", "inspect_checkpoint", "inspect_model"]


@dataclass(frozen=True)
class SiteReport:
    """One site: its stored tensors, and their parameter count against the registry formula.

    registry_params: form -> count of one site of ``registry_variant`` at the model's n, C (empty when the
    registry has no formula). param_check: one line, e.g. ``"matches mhc paper form"``.
    """

    index: int
    name: str
    block: int
    kind: str
    variant: str
    exactness: str
    tensors: tuple[TensorInfo, ...]
    params: int
    registry_variant: str | None
    registry_params: dict[str, int]
    param_check: str
    param_match: bool | None  # None: no formula to check against


@dataclass(frozen=True)
class InspectReport:
    """What :func:`inspect_checkpoint` found. ``to_dict()`` gives plain JSON-able values."""

    path: str
    layout: str
    layout_reason: str
    n: int
    C: int
    source_dtype: str
    convention: str | None
    iters: int | None
    eps: float | None
    settings_source: dict[str, str]
    sites: tuple[SiteReport, ...]
    total_params: int
    unmatched_keys: tuple[TensorInfo, ...]
    bytes_read: int
    hc_bytes: int
    bytes_total: int
    metadata: dict[str, Any] = field(default_factory=dict)
    notes: tuple[str, ...] = ()

    @property
    def blocks(self) -> int:
        return len({s.block for s in self.sites})

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["blocks"] = self.blocks
        d["bytes_read_fraction"] = self.bytes_read / self.bytes_total if self.bytes_total else None
        for s in d["sites"]:
            s["tensors"] = [{"key": t["key"], "shape": list(t["shape"]), "dtype": t["dtype"]} for t in s["tensors"]]
        d["unmatched_keys"] = [
            {"key": t["key"], "shape": list(t["shape"]), "dtype": t["dtype"]} for t in d["unmatched_keys"]
        ]
        d["metadata"] = {
            k: v if isinstance(v, str | int | float | bool) or v is None else str(v) for k, v in d["metadata"].items()
        }
        d["notes"] = list(d["notes"])
        return d


def _registry_counts(variant: str, n: int, C: int) -> dict[str, int]:
    try:
        from hcdiag import registry
    except ImportError:
        return {}
    try:
        spec = registry.get(variant)
        return {form.value: int(spec.param_count(n, C, form).total) for form in Form}
    except HcdiagError:  # no such variant, or one that needs options (kron factors) we do not know here
        return {}


def _site_report(site: Site, n: int, C: int) -> SiteReport:
    params = sum(math.prod(t.shape) for t in site.tensors)
    module = site.module
    reg = getattr(module, "registry_variant", None) or site.variant.split(":")[-1]
    form = getattr(module, "param_form", None)
    counts = _registry_counts(reg, n, C)
    match: bool | None
    if not counts:
        check, match = f"no registry formula for {reg!r}", None
    else:
        forms = [Form(form).value] if form is not None else [f.value for f in Form]
        hits = [f for f in forms if counts.get(f) == params]
        if hits:
            check, match = f"matches {reg} {hits[0]} form", True
        else:
            want = ", ".join(f"{f} form {counts[f]:,}" for f in forms)
            check, match = f"stored {params:,} differs from {reg} ({want})", False
    exactness = getattr(module, "exactness", None)
    return SiteReport(
        index=site.index,
        name=site.name,
        block=site.block,
        kind=site.kind,
        variant=site.variant,
        exactness=str(getattr(exactness, "value", exactness)),
        tensors=tuple(site.tensors),
        params=params,
        registry_variant=reg if counts else None,
        registry_params=counts,
        param_check=check,
        param_match=match,
    )


def inspect_model(model: LoadedModel) -> InspectReport:
    """The report for an already loaded model."""
    sites = tuple(_site_report(s, model.n, model.C) for s in model.sites)
    spec = next((s.module.sinkhorn for s in model.sites if getattr(s.module, "sinkhorn", None) is not None), None)
    return InspectReport(
        path=model.path,
        layout=model.layout,
        layout_reason=model.layout_reason,
        n=model.n,
        C=model.C,
        source_dtype=model.source_dtype,
        convention=spec.convention.value if spec is not None else None,
        iters=spec.iters if spec is not None else None,
        eps=spec.eps if spec is not None else None,
        settings_source=dict(model.settings_source),
        sites=sites,
        total_params=sum(s.params for s in sites),
        unmatched_keys=tuple(model.unmatched_keys),
        bytes_read=model.bytes_read,
        hc_bytes=sum(_nbytes(t) for site in model.sites for t in site.tensors),
        bytes_total=model.bytes_total,
        metadata=dict(model.metadata),
        notes=tuple(model.notes),
    )


def inspect_checkpoint(
    path: str | os.PathLike[str],
    *,
    layout: str | None = None,
    options: LoadOptions = LoadOptions(),
    trust_pickle: bool = False,
) -> InspectReport:
    """Describe ``path`` from its headers (see :func:`hcdiag.io.load.load` with ``headers_only``); raises
    InputError / UsageError."""
    from hcdiag.io.load import load

    model = load(path, layout=layout, options=options, trust_pickle=trust_pickle, headers_only=True)
    model.notes.append("headers only: no tensor data was read (NaN/Inf checks run in stochasticity and gain-sweep)")
    return inspect_model(model)


def _nbytes(t: TensorInfo) -> int:
    import math

    import torch

    from hcdiag.io.source import torch_dtype_of

    dt = torch_dtype_of(t.dtype)
    size = torch.empty((), dtype=dt).element_size() if dt is not None else 4
    return math.prod(t.shape) * size

"""A checkpoint as hcdiag sees it: hyper-connection sites in depth order, each a live :class:`SiteModule`.

Every reader (hcdiag's native layout, transformers, lucidrains, nanoGPT reference repos, layout files) produces
a :class:`LoadedModel`; the analyses (``stochasticity``, ``gain-sweep --from``, ``inspect``) only consume it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from hcdiag.site import SiteModule


@dataclass(frozen=True)
class TensorInfo:
    """One stored tensor as found in the file (before any conversion)."""

    key: str
    shape: tuple[int, ...]
    dtype: str


@dataclass
class Site:
    """One HC site (one sub-layer), paper convention.

    name: stable label, e.g. ``attn_0``, ``ffn_0`` (depth order attn_0, ffn_0, attn_1, ...; SPEC section 1).
    variant: registry name (``mhc``, ``mhc-lite``, ...) or a layout-specific name (``transformers-mhc``).
    tensors: the stored tensors this site was built from.
    """

    index: int
    name: str
    block: int
    kind: str  # "attn" | "ffn" | "other"
    variant: str
    module: SiteModule
    tensors: list[TensorInfo] = field(default_factory=list)


@dataclass
class LoadedModel:
    """What a reader returns. ``settings_source`` says where n, C, convention, iterations came from."""

    path: str
    layout: str
    layout_reason: str
    sites: list[Site]
    n: int
    C: int
    metadata: dict = field(default_factory=dict)
    settings_source: dict[str, str] = field(default_factory=dict)
    bytes_read: int = 0
    bytes_total: int = 0
    source_dtype: str = "float32"
    unmatched_keys: list[TensorInfo] = field(default_factory=list)  # look HC-related, matched no rule
    notes: list[str] = field(default_factory=list)

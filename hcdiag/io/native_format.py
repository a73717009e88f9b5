"""hcdiag's native checkpoint format: its constants, its writer (:func:`save_native`) and what its metadata
states (:func:`stated`), each field checked.

Dimension letters: n streams, C width of one stream.

Site i (depth order attn_0, ffn_0, attn_1, ...; SPEC section 1) is the registry module's own ``state_dict``
under ``hc.sites.{i}.``; safetensors metadata (string values) says what the tensors are::

    format=hcdiag  format_version=1  variant  n  C  blocks  sites (JSON list)  form (code|paper)
    sinkhorn_convention  sinkhorn_iters  sinkhorn_eps  (Sinkhorn variants)   kron_factors (kromhc, "2,2")
    training (free-form JSON)

The reader is :mod:`hcdiag.io.native`; identification without metadata is :mod:`hcdiag.io.native_identify`.
"""

from __future__ import annotations

import json
import os
import re
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any, TypeVar

import torch

from hcdiag.enums import Convention, Form
from hcdiag.errors import InputError, UsageError
from hcdiag.io.limits import MAX_STREAM_WIDTH, MAX_STREAMS, bounded
from hcdiag.site import SinkhornSpec, SiteModule

_E = TypeVar("_E", bound=Enum)

__all__ = [
    "DEFAULT_CONVENTION",
    "DEFAULT_ITERS",
    "FORMAT",
    "FORMAT_VERSION",
    "KEY_RE",
    "PREFIX",
    "StatedMeta",
    "is_native_meta",
    "meta_enum",
    "meta_float",
    "meta_int",
    "native_metadata",
    "native_tensors",
    "save_native",
    "site_names",
    "stated_meta",
]

FORMAT = "hcdiag"
FORMAT_VERSION = 1
PREFIX = "hc.sites."
DEFAULT_CONVENTION = Convention.PAPER  # mHC Eq. 9
DEFAULT_ITERS = 20  # mHC Sec. 4.1: t_max = 20

# Metadata keys save_native writes itself; a caller's ``metadata`` may not override them.
_RESERVED = (
    "format",
    "format_version",
    "variant",
    "n",
    "C",
    "blocks",
    "sites",
    "form",
    "sinkhorn_convention",
    "sinkhorn_iters",
    "sinkhorn_eps",
    "kron_factors",
)

# hc.sites.{i}.{param}, optionally under one common model prefix (``model.hc.sites.0.phi_res``).
KEY_RE = re.compile(r"^(?P<prefix>(?:.+\.)?)hc\.sites\.(?P<index>\d+)\.(?P<param>.+)$")


def site_names(blocks: int) -> list[str]:
    """attn_0, ffn_0, attn_1, ffn_1, ... (2 sites per block, SPEC section 1)."""
    return [f"{kind}_{b}" for b in range(blocks) for kind in ("attn", "ffn")]


# ------------------------------------------------------------------------------------------------------------
# Writing


def native_tensors(modules: Sequence[SiteModule]) -> dict[str, torch.Tensor]:
    """``hc.sites.{i}.{param}`` -> a contiguous CPU copy of each module's state_dict tensor (dtype kept)."""
    out: dict[str, torch.Tensor] = {}
    for i, module in enumerate(modules):
        for key, value in module.state_dict().items():
            out[f"{PREFIX}{i}.{key}"] = value.detach().to("cpu").contiguous().clone()
    return out


def native_metadata(
    modules: Sequence[SiteModule],
    *,
    variant: str,
    n: int,
    C: int,
    blocks: int,
    sinkhorn: SinkhornSpec | None,
    form: Form | str,
    metadata: Mapping[str, Any] | None = None,
) -> dict[str, str]:
    """The string metadata :func:`save_native` writes (also usable as a ``.pt`` sidecar JSON)."""
    from hcdiag import registry

    spec = registry.get(variant)
    form = Form(form)
    if len(modules) != 2 * blocks:
        raise UsageError(
            f"save_native got {len(modules)} site modules for blocks={blocks}; a block has 2 sites "
            f"(attn, ffn), so pass {2 * blocks} modules or blocks={len(modules) / 2:g}"
        )
    for i, m in enumerate(modules):
        name = getattr(m, "variant_name", variant)
        if name != spec.name or getattr(m, "n", n) != n or getattr(m, "C", C) != C:
            raise UsageError(
                f"site {i} is a {name} module with n={getattr(m, 'n', '?')}, C={getattr(m, 'C', '?')}, but "
                f"save_native was told variant={variant}, n={n}, C={C}; pass the modules' own settings"
            )
        mform = getattr(m, "form", form)
        if Form(mform) is not form:
            raise UsageError(f"site {i} was built with form={mform}, but save_native was told form={form}")
    meta: dict[str, str] = {
        "format": FORMAT,
        "format_version": str(FORMAT_VERSION),
        "variant": spec.name,
        "n": str(n),
        "C": str(C),
        "blocks": str(blocks),
        "sites": json.dumps(site_names(blocks)),
        "form": form.value,
    }
    # the metadata must describe what the modules compute: their own Sinkhorn settings win over a default
    own = getattr(modules[0], "sinkhorn", None) if modules else None
    if own is None and sinkhorn is not None:
        raise UsageError(f"{spec.name} has no Sinkhorn projection; pass sinkhorn=None to save_native")
    if own is not None and sinkhorn is not None and _sk_key(own) != _sk_key(sinkhorn):
        raise UsageError(
            f"sinkhorn={_sk_key(sinkhorn)} differs from the modules' own {_sk_key(own)} (convention, iters, "
            "eps); pass the modules' SinkhornSpec or set module.sinkhorn before saving"
        )
    sinkhorn = sinkhorn if sinkhorn is not None else own
    if sinkhorn is not None:
        meta["sinkhorn_convention"] = Convention(sinkhorn.convention).value
        meta["sinkhorn_iters"] = str(int(sinkhorn.iters))
        meta["sinkhorn_eps"] = repr(float(sinkhorn.eps))
    factors = getattr(modules[0], "factors", None) if modules else None
    if spec.accepts_kron_factors and factors:
        meta["kron_factors"] = ",".join(str(int(f)) for f in factors)
    for key, value in (metadata or {}).items():
        if key in _RESERVED:
            raise UsageError(f"metadata key {key!r} is written by save_native itself; drop it from metadata=")
        meta[str(key)] = value if isinstance(value, str) else json.dumps(value, sort_keys=False)
    return meta


def _sk_key(spec: SinkhornSpec) -> tuple[str, int, float]:
    return Convention(spec.convention).value, int(spec.iters), float(spec.eps)


def save_native(
    path: str | os.PathLike[str],
    modules: Sequence[SiteModule],
    *,
    variant: str,
    n: int,
    C: int,
    blocks: int,
    sinkhorn: SinkhornSpec | None,
    form: Form | str,
    extra_tensors: Mapping[str, torch.Tensor] | None = None,
    metadata: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``modules`` (2 per block, depth order) as a native ``.safetensors`` file, atomically.

    ``sinkhorn``: the settings the modules project H_res with (mhc); None takes them from the modules, and a
    spec that disagrees with the modules' own, or one given for a variant without Sinkhorn, is a UsageError.
    HC tensors keep the modules' dtype. ``extra_tensors`` (the rest of the model) are stored as given under
    their own keys, which must not start with ``hc.sites.``. ``metadata`` values that are not strings are
    JSON-encoded (``training={"loss": [...]}``). The file is written to a temporary name in the same directory
    and renamed into place, so an interrupted write never leaves a partial file under ``path``.
    """
    from safetensors.torch import save

    from hcdiag.fileio import atomic_write

    meta = native_metadata(
        modules, variant=variant, n=n, C=C, blocks=blocks, sinkhorn=sinkhorn, form=form, metadata=metadata
    )
    tensors = native_tensors(modules)
    for key, value in (extra_tensors or {}).items():
        if KEY_RE.match(key) or key in tensors:
            raise UsageError(f"extra tensor {key!r} collides with the native HC keys (hc.sites.*); rename it")
        # clone: safetensors refuses tensors that share storage (tied weights, views)
        tensors[key] = value.detach().to("cpu").contiguous().clone()
    data = _canonical_header(save(tensors, metadata=meta), list(meta))

    def write(tmp: Path) -> None:
        tmp.write_bytes(data)

    return atomic_write(path, write, option="--out")


def _canonical_header(raw: bytes, meta_order: list[str]) -> bytes:
    """Rewrite a safetensors header with ``__metadata__`` first, its keys in ``meta_order``.

    safetensors serialises the metadata from a Rust HashMap, so its key order (and the file's bytes) changes
    from run to run; a fixed order makes equal checkpoints byte-identical. Tensor entries keep their order and
    data offsets (offsets count from the end of the header), and the header is space-padded to 8 bytes as
    safetensors itself does.
    """
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    meta = header.pop("__metadata__", None) or {}
    out: dict[str, Any] = {}
    if meta:
        ordered = {k: meta[k] for k in meta_order if k in meta}
        out["__metadata__"] = ordered | {k: meta[k] for k in sorted(meta) if k not in ordered}
    out.update(header)
    text = json.dumps(out, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + raw[8 + n :]


# ------------------------------------------------------------------------------------------------------------
# What the metadata states


def is_native_meta(meta: Mapping[str, str]) -> bool:
    return str(meta.get("format", "")) == FORMAT


def meta_int(meta: Mapping[str, str], key: str, path: str, minimum: int = 1) -> int | None:
    if key not in meta:
        return None
    try:
        value = int(str(meta[key]))
    except ValueError:
        value = minimum - 1
    if value < minimum:
        raise InputError(
            f"metadata {key}={meta[key]!r} in {path} is not an integer >= {minimum}; fix the file's metadata "
            f"(or its .json sidecar)",
            path=path,
        )
    return value


def meta_float(meta: Mapping[str, str], key: str, path: str) -> float | None:
    if key not in meta:
        return None
    try:
        return float(str(meta[key]))
    except ValueError:
        msg = f"metadata {key}={meta[key]!r} in {path} is not a number; fix the metadata"
        raise InputError(msg, path=path) from None


def _parse_factors(text: str, path: str) -> tuple[int, ...]:
    parts = [p for p in re.split(r"[,\sx\[\]()]+", str(text)) if p]
    try:
        factors = tuple(int(p) for p in parts)
    except ValueError:
        factors = ()
    if not factors:
        raise InputError(
            f'metadata kron_factors={text!r} in {path} is not a list of integers; write e.g. "2,2"', path=path
        )
    return factors


def meta_enum(
    meta: Mapping[str, str], key: str, path: str, kind: type[_E], hint: str = "fix the metadata"
) -> _E | None:
    """metadata ``key`` as a member of the enum ``kind`` (None when absent); InputError naming the values."""
    if key not in meta:
        return None
    try:
        return kind(str(meta[key]))
    except ValueError:
        known = ", ".join(str(e.value) for e in kind)
        raise InputError(f"metadata {key}={meta[key]!r} in {path} is not one of: {known}; {hint}", path=path) from None


@dataclass(frozen=True)
class StatedMeta:
    """What a native file's metadata states about its sites (all None without ``format=hcdiag``)."""

    native: bool = False
    variant: str | None = None
    n: int | None = None
    C: int | None = None
    form: Form | None = None
    factors: tuple[int, ...] | None = None

    @property
    def complete(self) -> bool:
        return self.variant is not None and self.n is not None and self.C is not None


def _check_version(meta: Mapping[str, str], path: str) -> None:
    version = meta_int(meta, "format_version", path)
    if version is not None and version > FORMAT_VERSION:
        raise InputError(
            f"{path} is hcdiag native format_version {version}; this hcdiag reads up to {FORMAT_VERSION}: "
            "upgrade hcdiag",
            path=path,
        )


def _meta_variant(meta: Mapping[str, str], path: str) -> str | None:
    from hcdiag import registry

    if "variant" not in meta:
        return None
    variant = str(meta["variant"])
    try:
        registry.get(variant)
    except UsageError:
        known = ", ".join(registry.names())
        raise InputError(
            f"metadata variant={variant!r} in {path} is not a registry variant; use one of: {known}", path=path
        ) from None
    return variant


def stated_meta(meta: Mapping[str, str], path: str) -> StatedMeta:
    """The metadata's variant, n, C, form and KromHC factors, each checked (and n, n * C bounded)."""
    if not is_native_meta(meta):
        return StatedMeta()
    _check_version(meta, path)
    variant = _meta_variant(meta, path)
    n = meta_int(meta, "n", path)
    C = meta_int(meta, "C", path)
    if n is not None:
        bounded(n, MAX_STREAMS, "metadata n (streams)", path)
    if C is not None:
        bounded(n * C if n is not None else C, MAX_STREAM_WIDTH, "metadata n * C (stream entries per token)", path)
    form = meta_enum(meta, "form", path, Form)
    factors = _parse_factors(meta["kron_factors"], path) if "kron_factors" in meta else None
    return StatedMeta(True, variant, n, C, form, factors)

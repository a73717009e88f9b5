"""hcdiag's own checkpoint layout (``native``): registry site modules saved under ``hc.sites.{i}.{param}``.

Dimension letters: L sites, n streams, C width of one stream.

A native checkpoint stores, for site i (depth order attn_0, ffn_0, attn_1, ...; SPEC section 1), the
registry module's own ``state_dict`` under ``hc.sites.{i}.``, as the module holds it, so loading never
transposes: mHC / TBP logits (``phi_res``, ``W_res``, ``b_res``) are in paper orientation (row = output
stream); HC's ``A_r`` is the HC paper's A_r = H_res^T. Safetensors metadata (string values) says what the
tensors are::

    format=hcdiag  format_version=1  variant  n  C  blocks  sites (JSON list)  form (code|paper)
    sinkhorn_convention  sinkhorn_iters  sinkhorn_eps  (Sinkhorn variants)   kron_factors (kromhc, "2,2")
    training (free-form JSON)

Metadata wins when present. Without it (a ``.pt`` file with no sidecar, a user's own file) each site's
variant, form, n and C are identified by matching the site's key set and shapes against the ``state_dict`` of
every registry variant built on the meta device (:func:`identify_site`). Keys outside ``hc.sites.`` (the rest
of the model) are ignored. docs/native-layout.md has the per-variant key tables.
"""

from __future__ import annotations

import json
import os
import re
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from enum import Enum
from pathlib import Path
from typing import Any, TypeVar

import torch

from hcdiag.enums import Convention, Form
from hcdiag.errors import InputError, UsageError
from hcdiag.io.base import Layout, LoadOptions, TensorSource, dtype_summary, register_layout
from hcdiag.io.limits import MAX_SITES, MAX_STREAM_WIDTH, MAX_STREAMS, bounded
from hcdiag.io.reader import StatedSinkhorn, sinkhorn_settings
from hcdiag.model import LoadedModel, Site, TensorInfo
from hcdiag.site import SinkhornSpec, SiteModule

_E = TypeVar("_E", bound=Enum)

__all__ = [
    "DEFAULT_CONVENTION",
    "DEFAULT_ITERS",
    "FORMAT",
    "FORMAT_VERSION",
    "PREFIX",
    "NATIVE",
    "SiteMatch",
    "identify_site",
    "native_metadata",
    "native_tensors",
    "save_native",
    "site_names",
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
_KEY_RE = re.compile(r"^(?P<prefix>(?:.+\.)?)hc\.sites\.(?P<index>\d+)\.(?P<param>.+)$")

# Identification without metadata: largest n tried, and a cap on candidate builds per site signature.
_MAX_N = 16
_MAX_LITE_N = 8  # variants impractical at n (mHC-lite: n! permutations) are tried only up to this n


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
        if _KEY_RE.match(key) or key in tensors:
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
# Identification without metadata


@dataclass(frozen=True)
class SiteMatch:
    """A registry variant whose state_dict has exactly a site's keys and shapes."""

    variant: str
    form: Form
    n: int
    C: int
    kron_factors: tuple[int, ...] | None = None


def _meta_shapes(
    variant: str, n: int, C: int, form: Form, factors: tuple[int, ...] | None, cache: dict
) -> dict[str, tuple[int, ...]] | None:
    """state_dict shapes of ``variant`` built on the meta device (no memory), or None if it cannot be "
    "built."""
    key = (variant, n, C, form, factors)
    if key not in cache:
        from hcdiag import registry

        try:
            m = registry.get(variant).build(n, C, form=form, kron_factors=factors, device="meta")
            cache[key] = {k: tuple(v.shape) for k, v in m.state_dict().items()}
        except ValueError:  # UsageError: a variant that cannot take these sizes simply does not match
            cache[key] = None
    return cache[key]


def _candidate_sizes(shapes: Mapping[str, tuple[int, ...]]) -> list[tuple[int, int]]:
    """(n, C) pairs worth trying: n among the stored dims (<= 16), C among dims / 1, n, n^2."""
    dims = sorted({d for s in shapes.values() for d in s if d > 0})
    ns = [d for d in dims if 2 <= d <= _MAX_N] or [1]
    pairs: list[tuple[int, int]] = []
    for n in ns:
        cs = set()
        for d in dims:
            for div in (1, n, n * n):
                if d % div == 0:
                    cs.add(d // div)
        pairs.extend((n, c) for c in sorted(cs) if c >= 1)
    return pairs


def _practical(spec: Any, n: int) -> bool:
    try:
        return bool(spec.practical(n))
    except ValueError:  # UsageError: a size the variant rejects is simply not a candidate
        return False


def identify_site(
    shapes: Mapping[str, tuple[int, ...]],
    *,
    variants: Sequence[str] | None = None,
    n: int | None = None,
    C: int | None = None,
    cache: dict | None = None,
) -> list[SiteMatch]:
    """Every (variant, form, n, C) whose freshly built module has exactly ``shapes`` as its state_dict.

    shapes: param name (without ``hc.sites.{i}.``) -> shape. Rule (docs/native-layout.md): candidate n are
    the stored dims in 2..16, candidate C the stored dims divided by 1, n or n^2; each registry variant is
    built on the meta device in both forms (KromHC with its default prime factorisation) and matches when its
    key set and every shape agree. ``n`` / ``C`` restrict the search when known.
    """
    from hcdiag import registry

    cache = {} if cache is None else cache
    names = list(variants) if variants is not None else list(registry.names())
    pairs = _candidate_sizes(shapes)
    if n is not None:
        pairs = [(nn_, c) for nn_, c in pairs if nn_ == n] or [(n, C or 1)]
    if C is not None:
        pairs = [(nn_, c) for nn_, c in pairs if c == C] or [(n or 1, C)]
    want = dict(shapes)
    found: list[SiteMatch] = []
    for name in names:
        spec = registry.get(name)
        for nn_, c in pairs:
            if nn_ > _MAX_LITE_N and not _practical(spec, nn_):
                continue  # mHC-lite past n = 8: building would enumerate n! permutations
            for form in (Form.CODE, Form.PAPER):
                got = _meta_shapes(name, nn_, c, form, None, cache)
                if got is not None and got == want:
                    factors = None
                    if spec.accepts_kron_factors:
                        factors = spec.validate(nn_, c, None)
                    found.append(SiteMatch(name, form, nn_, c, factors))
    return found


# ------------------------------------------------------------------------------------------------------------
# Reading


def _hc_keys(source: TensorSource) -> tuple[str, dict[int, dict[str, str]]]:
    """(common prefix, {site index: {param: full key}}). InputError if HC keys sit under several prefixes."""
    prefixes: set[str] = set()
    sites: dict[int, dict[str, str]] = {}
    for key in source.keys():
        m = _KEY_RE.match(key)
        if m is None:
            continue
        prefixes.add(m["prefix"])
        index = bounded(int(m["index"]), MAX_SITES - 1, f"the site index of key {key}", source.path)
        sites.setdefault(index, {})[m["param"]] = key
    if len(prefixes) > 1:
        shown = ", ".join(sorted(p + "hc.sites." for p in prefixes))
        raise InputError(
            f"native HC keys sit under several prefixes ({shown}) in {source.path}; keep one model's "
            "weights per "
            "file or save the sites with hcdiag.io.native.save_native",
            path=source.path,
        )
    return (prefixes.pop() if prefixes else ""), sites


def _is_native_meta(meta: Mapping[str, str]) -> bool:
    return str(meta.get("format", "")) == FORMAT


def _detect(source: TensorSource) -> str | None:
    meta = source.metadata or {}
    try:
        prefix, sites = _hc_keys(source)
    except InputError:
        return "found hc.sites.N.* keys under several prefixes (native layout; loading will say which)"
    if _is_native_meta(meta):
        return (
            f"metadata format=hcdiag v{meta.get('format_version', '?')}: variant {meta.get('variant', '?')}, "
            f"{len(sites)} stored sites under {prefix}hc.sites.N.*"
        )
    if sites:
        return (
            f"found {len(sites)} sites named {prefix}hc.sites.N.* (no hcdiag metadata: variant, n and C are "
            "identified from the key set and shapes)"
        )
    return None


def _meta_int(meta: Mapping[str, str], key: str, path: str, minimum: int = 1) -> int | None:
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


def _sinkhorn_settings(
    meta: Mapping[str, str], options: LoadOptions, native: bool, path: str
) -> tuple[SinkhornSpec, dict[str, str]]:
    """:func:`sinkhorn_settings` over what hcdiag's metadata states (only in native files)."""
    stated = StatedSinkhorn("metadata", iters_what="metadata sinkhorn_iters")
    if native:
        stated = replace(
            stated,
            convention=_meta_enum(meta, "sinkhorn_convention", path, Convention,
                                  "fix the metadata or override it with --convention"),
            iters=_meta_int(meta, "sinkhorn_iters", path),
            eps=_meta_float(meta, "sinkhorn_eps", path),
        )
    return sinkhorn_settings(options, DEFAULT_CONVENTION, DEFAULT_ITERS, stated, path)


def _meta_float(meta: Mapping[str, str], key: str, path: str) -> float | None:
    if key not in meta:
        return None
    try:
        return float(str(meta[key]))
    except ValueError:
        msg = f"metadata {key}={meta[key]!r} in {path} is not a number; fix the metadata"
        raise InputError(msg, path=path) from None


def _check_site_keys(
    i: int,
    stored: Mapping[str, TensorInfo],
    expected: Mapping[str, tuple[int, ...]],
    prefix: str,
    variant: str,
    n: int,
    C: int,
    path: str,
) -> None:
    """InputError naming the first missing / unexpected / misshapen key of site i."""
    base = f"{prefix}{PREFIX}{i}."
    missing = [k for k in expected if k not in stored]
    if missing:
        raise InputError(
            f"missing key {base}{missing[0]} in {path}: a {variant} site at n={n}, C={C} has "
            f"{', '.join(expected) or 'no tensors'}; re-save the checkpoint with "
            "hcdiag.io.native.save_native "
            "or fix the metadata",
            path=path,
        )
    extra = [k for k in stored if k not in expected]
    if extra:
        raise InputError(
            f"unexpected key {base}{extra[0]} in {path}: a {variant} site at n={n}, C={C} has only "
            f"{', '.join(expected) or 'no tensors'}; fix the metadata variant/n/C or remove the key",
            path=path,
        )
    for k, shape in expected.items():
        if tuple(stored[k].shape) != tuple(shape):
            raise InputError(
                f"key {base}{k} in {path} has shape {list(stored[k].shape)}, expected {list(shape)} for a "
                f"{variant} site at n={n}, C={C}; fix the metadata n/C/variant or re-save the checkpoint",
                path=path,
            )


def _identify_all(
    sites: Mapping[int, Mapping[str, TensorInfo]],
    variant: str | None,
    n: int | None,
    C: int | None,
    form: Form | None,
    path: str,
    prefix: str,
) -> dict[int, SiteMatch]:
    """One SiteMatch per stored site, all with the same n and C (files without complete metadata)."""
    cache: dict = {}
    cands: dict[int, list[SiteMatch]] = {}
    by_sig: dict[tuple, list[SiteMatch]] = {}
    for i, infos in sorted(sites.items()):
        shapes = {p: tuple(t.shape) for p, t in infos.items()}
        sig = tuple(sorted(shapes.items()))
        if sig not in by_sig:
            found = identify_site(shapes, variants=[variant] if variant else None, n=n, C=C, cache=cache)
            found = [m for m in found if form is None or m.form is form]
            # same key set in both forms (hc-static, hc-dynamic): the form is moot, keep code
            both = {(m.variant, m.n, m.C) for m in found if m.form is Form.PAPER} & {
                (m.variant, m.n, m.C) for m in found if m.form is Form.CODE
            }
            by_sig[sig] = [m for m in found if not ((m.variant, m.n, m.C) in both and m.form is Form.PAPER)]
        cands[i] = by_sig[sig]
        if not cands[i]:
            keys = ", ".join(f"{p}{list(s)}" for p, s in sorted(shapes.items()))
            raise InputError(
                f"site {prefix}{PREFIX}{i}.* in {path} ({keys}) matches no registry variant at any n <= "
                f"{_MAX_N}; "
                "add hcdiag metadata (variant, n, C) to the file or a .json sidecar",
                path=path,
            )
    # n and C are one per model: keep the sizes every site admits
    common = set.intersection(*[{(m.n, m.C) for m in found} for found in cands.values()])
    if not common:
        raise InputError(
            f"the sites in {path} fit no single n and C; add hcdiag metadata (variant, n, C) to the file",
            path=path,
        )
    out: dict[int, SiteMatch] = {}
    for i, found in cands.items():
        found = [m for m in found if (m.n, m.C) in common]
        if len(found) != 1:
            shown = "; ".join(f"{m.variant} form={m.form.value} n={m.n} C={m.C}" for m in found[:6])
            raise InputError(
                f"site {prefix}{PREFIX}{i}.* in {path} fits several variants/sizes ({shown}); add hcdiag "
                "metadata (variant, n, C, form) to the file or a .json sidecar",
                path=path,
            )
        out[i] = found[0]
    return out


def _site_names(meta: Mapping[str, str], native: bool, stored: Sequence[int], path: str) -> tuple[list[str], str]:
    """Site names in depth order and where they came from (metadata ``sites``, ``blocks``, or assumed)."""
    blocks = _meta_int(meta, "blocks", path) if native else None
    if blocks is not None:
        bounded(blocks, MAX_SITES // 2, "metadata blocks", path)
    if native and "sites" in meta:
        try:
            names = json.loads(str(meta["sites"]))
        except json.JSONDecodeError:
            names = None
        if not isinstance(names, list) or not names or not all(isinstance(s, str) for s in names):
            raise InputError(
                f"metadata sites={str(meta['sites'])[:60]!r} in {path} is not a JSON list of site names; fix "
                "the metadata",
                path=path,
            )
        bounded(len(names), MAX_SITES, "the number of metadata sites", path)
        if blocks is not None and len(names) != 2 * blocks:
            raise InputError(
                f"metadata of {path} lists {len(names)} sites but blocks={blocks} (2 sites per block); fix "
                "sites or blocks",
                path=path,
            )
        return names, "metadata"
    if blocks is not None:
        return site_names(blocks), "metadata"
    L = max(stored) + 1 if stored else 0
    if L and L % 2 == 0:
        return site_names(L // 2), "assumed"
    return [f"site_{i}" for i in range(L)], "assumed"


def _kind_block(name: str, index: int) -> tuple[str, int]:
    m = re.fullmatch(r"(attn|ffn)_(\d+)", name)
    if m:
        return m[1], int(m[2])
    return "other", index


@dataclass(frozen=True)
class _Stated:
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
    version = _meta_int(meta, "format_version", path)
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


def _meta_enum(
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


def _stated(meta: Mapping[str, str], path: str) -> _Stated:
    """The metadata's variant, n, C, form and KromHC factors, each checked (and n, n * C bounded)."""
    if not _is_native_meta(meta):
        return _Stated()
    _check_version(meta, path)
    variant = _meta_variant(meta, path)
    n = _meta_int(meta, "n", path)
    C = _meta_int(meta, "C", path)
    if n is not None:
        bounded(n, MAX_STREAMS, "metadata n (streams)", path)
    if C is not None:
        bounded(n * C if n is not None else C, MAX_STREAM_WIDTH, "metadata n * C (stream entries per token)", path)
    form = _meta_enum(meta, "form", path, Form)
    factors = _parse_factors(meta["kron_factors"], path) if "kron_factors" in meta else None
    return _Stated(True, variant, n, C, form, factors)


def _named_sites(
    meta: Mapping[str, str], native: bool, site_keys: Mapping[int, Mapping[str, str]], prefix: str, path: str
) -> tuple[list[str], str | None]:
    """The site names in depth order, and the note when they are assumed; InputError for no sites or a stored
    site past the named ones."""
    names, names_src = _site_names(meta, native, sorted(site_keys), path)
    L = len(names)
    if L == 0:
        raise InputError(
            f"no HC sites in {path}: no hc.sites.N.* keys and no metadata sites list; save with "
            "hcdiag.io.native.save_native or pick another --layout",
            path=path,
        )
    beyond = [i for i in site_keys if i >= L]
    if beyond:
        raise InputError(
            f"key {prefix}{PREFIX}{beyond[0]}.* in {path} is beyond the {L} sites named in the metadata; fix "
            "the metadata sites/blocks",
            path=path,
        )
    note = "no hcdiag metadata: site names assume attn/ffn alternation (attn_0, ffn_0, ...)"
    return names, note if names_src == "assumed" else None


def _stated_matches(
    stated: _Stated, infos: Mapping[int, Mapping[str, TensorInfo]], meta: Mapping[str, str], path: str
) -> tuple[dict[int, SiteMatch], dict[str, str]]:
    """Every site as the complete metadata states it (the form, if not stated, from the first stored site's
    keys), and where each setting came from."""
    from hcdiag import registry

    variant, n, C = stated.variant, stated.n, stated.C
    assert variant is not None and n is not None and C is not None
    try:
        factors = registry.get(variant).validate(n, C, stated.factors)
    except UsageError as exc:
        raise InputError(f"metadata of {path} does not describe a valid {variant} site: {exc}", path=path) from None
    form, form_src = stated.form, "metadata"
    if form is None:
        form, form_src = _fitting_form(variant, n, C, factors, infos)
    settings = {"variant": "metadata", "n": "metadata", "C": "metadata", "form": form_src}
    if factors is not None:
        settings["kron_factors"] = "metadata" if "kron_factors" in meta else "default"
    return {i: SiteMatch(variant, form, n, C, factors) for i in infos}, settings


def _fitting_form(
    variant: str, n: int, C: int, factors: tuple[int, ...] | None, infos: Mapping[int, Mapping[str, TensorInfo]]
) -> tuple[Form, str]:
    """No form in the metadata: the one whose keys fit (paper form has no norm_weight); code if both."""
    stored = next((site for site in infos.values() if site), None)
    if stored is not None:
        have = {p: tuple(t.shape) for p, t in stored.items()}
        for f in (Form.CODE, Form.PAPER):
            got = _meta_shapes(variant, n, C, f, factors, {})
            if got is not None and got == have:
                return f, "inferred"
    return Form.CODE, "default"


def _identified_matches(
    stated: _Stated, infos: Mapping[int, Mapping[str, TensorInfo]], prefix: str, path: str
) -> tuple[dict[int, SiteMatch], dict[str, str], str]:
    """Every site identified from its key set and shapes (within what the metadata states), where each setting
    came from, and the note naming what was found."""
    empty = [i for i, site in infos.items() if not site]
    if empty:
        raise InputError(
            f"site {prefix}{PREFIX}{empty[0]}.* in {path} has no tensors, so its variant and sizes cannot be "
            "identified; add hcdiag metadata (variant, n, C)",
            path=path,
        )
    matches = _identify_all(infos, stated.variant, stated.n, stated.C, stated.form, path, prefix)
    settings = {
        "variant": "metadata" if stated.variant else "inferred",
        "n": "metadata" if stated.n is not None else "inferred",
        "C": "metadata" if stated.C is not None else "inferred",
        "form": "metadata" if stated.form else "inferred",
    }
    found = sorted({f"{m.variant} (form {m.form.value})" for m in matches.values()})
    return matches, settings, "identified from key set and shapes: " + ", ".join(found)


def _build_site(
    source: TensorSource,
    i: int,
    name: str,
    match: SiteMatch,
    keys: Mapping[str, str],
    infos: Mapping[str, TensorInfo],
    prefix: str,
    sk_spec: SinkhornSpec,
    shapes_cache: dict,
) -> Site:
    """Site i: its stored keys and shapes checked, then its registry module built in float64 and loaded."""
    from hcdiag import registry

    mt, path = match, source.path
    # the stored keys and shapes are checked against a meta-device build first: metadata that states a huge n
    # or C is refused here, before a real module of that size is allocated
    expected = _meta_shapes(mt.variant, mt.n, mt.C, mt.form, mt.kron_factors, shapes_cache)
    if expected is not None:
        _check_site_keys(i, infos, expected, prefix, mt.variant, mt.n, mt.C, path)
    try:
        module = registry.get(mt.variant).build(
            mt.n, mt.C, layer_index=i, form=mt.form, kron_factors=mt.kron_factors, dtype=torch.float64
        )
    except UsageError as exc:
        raise InputError(f"cannot build site {i} ({mt.variant}) of {path}: {exc}", path=path) from None
    target = module.state_dict()
    _check_site_keys(i, infos, {k: tuple(v.shape) for k, v in target.items()}, prefix, mt.variant, mt.n, mt.C, path)
    state = {p: source.get(k, dtype=torch.float64 if target[p].is_floating_point() else None) for p, k in keys.items()}
    module.load_state_dict(state, strict=True)
    if getattr(module, "sinkhorn", None) is not None:
        module.sinkhorn = sk_spec
    module.eval()
    kind, block = _kind_block(name, i)
    return Site(i, name, block, kind, mt.variant, module, [infos[p] for p in sorted(infos)])


def _load(source: TensorSource, options: LoadOptions) -> LoadedModel:
    path = source.path
    meta = dict(source.metadata or {})
    prefix, site_keys = _hc_keys(source)
    stated = _stated(meta, path)
    names, names_note = _named_sites(meta, stated.native, site_keys, prefix, path)
    notes = [names_note] if names_note else []
    infos = {i: {p: source.info(k) for p, k in site_keys.get(i, {}).items()} for i in range(len(names))}
    if stated.complete:
        matches, settings = _stated_matches(stated, infos, meta, path)
    else:
        matches, settings, found = _identified_matches(stated, infos, prefix, path)
        notes.append(found)
    sk_spec, sk_src = _sinkhorn_settings(meta, options, stated.native, path)
    shapes_cache: dict = {}
    sites = [
        _build_site(source, i, name, matches[i], site_keys.get(i, {}), infos[i], prefix, sk_spec, shapes_cache)
        for i, name in enumerate(names)
    ]
    if any(getattr(s.module, "sinkhorn", None) is not None for s in sites):
        settings.update(sk_src)
    notes.append("native layout stores each registry module's own state_dict: no transpose at load")
    return _native_model(source, meta, sites, matches[0], settings, notes)


def _native_model(
    source: TensorSource,
    meta: dict[str, str],
    sites: list[Site],
    first: SiteMatch,
    settings: dict[str, str],
    notes: list[str],
) -> LoadedModel:
    """The LoadedModel; as unmatched, the keys that look like HC tensors (hc, mhc, static_alpha, ...) but are not
    hc.sites.N.param (e.g. hc.head.*)."""
    from hcdiag.io.load import unmatched_hc_keys  # lazy: load imports every layout

    return LoadedModel(
        path=source.path,
        layout="native",
        layout_reason=_detect(source) or "forced with --layout native",
        sites=sites,
        n=first.n,
        C=first.C,
        metadata=meta,
        settings_source=settings,
        bytes_read=source.bytes_read,
        bytes_total=source.bytes_total,
        source_dtype=dtype_summary(t for s in sites for t in s.tensors),
        unmatched_keys=unmatched_hc_keys(source, [k for k in source.keys() if _KEY_RE.match(k)]),
        notes=notes,
    )


NATIVE = register_layout(
    Layout(
        name="native",
        summary="hcdiag's own layout: registry modules under hc.sites.{i}.{param}, metadata format=hcdiag",
        detect=_detect,
        load=_load,
        priority=10,
    )
)

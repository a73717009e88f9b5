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

The format and its writer are :mod:`hcdiag.io.native_format`. Metadata wins when present. Without it (a
``.pt`` file with no sidecar, a user's own file) each site's variant, form, n and C are identified by matching
the site's key set and shapes against the ``state_dict`` of every registry variant built on the meta device
(:mod:`hcdiag.io.native_identify`). Keys outside ``hc.sites.`` (the rest of the model) are ignored.
docs/native-layout.md has the per-variant key tables.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import replace

import torch

from hcdiag.enums import Convention
from hcdiag.errors import InputError, UsageError
from hcdiag.io.base import Layout, LoadOptions, TensorSource, register_layout
from hcdiag.io.limits import MAX_SITES, bounded
from hcdiag.io.native_format import (
    DEFAULT_CONVENTION,
    DEFAULT_ITERS,
    FORMAT,
    FORMAT_VERSION,
    KEY_RE,
    PREFIX,
    StatedMeta,
    is_native_meta,
    meta_enum,
    meta_float,
    meta_int,
    native_metadata,
    native_tensors,
    save_native,
    site_names,
    stated_meta,
)
from hcdiag.io.native_identify import SiteMatch, fitting_form, identify_all, identify_site, meta_shapes
from hcdiag.io.reader import StatedSinkhorn, assemble, sinkhorn_settings
from hcdiag.model import LoadedModel, Site, TensorInfo
from hcdiag.site import SinkhornSpec

# the format's names stay importable from here (hcdiag.io.native.save_native is the documented entry point)
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


def _hc_keys(source: TensorSource) -> tuple[str, dict[int, dict[str, str]]]:
    """(common prefix, {site index: {param: full key}}). InputError if HC keys sit under several prefixes."""
    prefixes: set[str] = set()
    sites: dict[int, dict[str, str]] = {}
    for key in source.keys():
        m = KEY_RE.match(key)
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


def _detect(source: TensorSource) -> str | None:
    meta = source.metadata or {}
    try:
        prefix, sites = _hc_keys(source)
    except InputError:
        return "found hc.sites.N.* keys under several prefixes (native layout; loading will say which)"
    if is_native_meta(meta):
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


def _sinkhorn_settings(
    meta: Mapping[str, str], options: LoadOptions, native: bool, path: str
) -> tuple[SinkhornSpec, dict[str, str]]:
    """:func:`sinkhorn_settings` over what hcdiag's metadata states (only in native files)."""
    stated = StatedSinkhorn("metadata", iters_what="metadata sinkhorn_iters")
    if native:
        stated = replace(
            stated,
            convention=meta_enum(meta, "sinkhorn_convention", path, Convention,
                                  "fix the metadata or override it with --convention"),
            iters=meta_int(meta, "sinkhorn_iters", path),
            eps=meta_float(meta, "sinkhorn_eps", path),
        )
    return sinkhorn_settings(options, DEFAULT_CONVENTION, DEFAULT_ITERS, stated, path)


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


def _site_names(meta: Mapping[str, str], native: bool, stored: Sequence[int], path: str) -> tuple[list[str], str]:
    """Site names in depth order and where they came from (metadata ``sites``, ``blocks``, or assumed)."""
    blocks = meta_int(meta, "blocks", path) if native else None
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
    stated: StatedMeta, infos: Mapping[int, Mapping[str, TensorInfo]], meta: Mapping[str, str], path: str
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
        form, form_src = fitting_form(variant, n, C, factors, infos)
    settings = {"variant": "metadata", "n": "metadata", "C": "metadata", "form": form_src}
    if factors is not None:
        settings["kron_factors"] = "metadata" if "kron_factors" in meta else "default"
    return {i: SiteMatch(variant, form, n, C, factors) for i in infos}, settings


def _identified_matches(
    stated: StatedMeta, infos: Mapping[int, Mapping[str, TensorInfo]], prefix: str, path: str
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
    matches = identify_all(infos, stated.variant, stated.n, stated.C, stated.form, path, prefix)
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
    expected = meta_shapes(mt.variant, mt.n, mt.C, mt.form, mt.kron_factors, shapes_cache)
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
    stated = stated_meta(meta, path)
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
    # as unmatched, the keys that look like HC tensors (hc, mhc, static_alpha, ...) but are not hc.sites.N.param
    # (e.g. hc.head.*)
    used = [k for k in source.keys() if KEY_RE.match(k)]
    return assemble(source, "native", sites, settings=settings, notes=notes, used=used, metadata=meta,
                    layout_reason=_detect(source) or "forced with --layout native", n=matches[0].n, C=matches[0].C)


NATIVE = register_layout(
    Layout(
        name="native",
        summary="hcdiag's own layout: registry modules under hc.sites.{i}.{param}, metadata format=hcdiag",
        detect=_detect,
        load=_load,
        priority=10,
    )
)

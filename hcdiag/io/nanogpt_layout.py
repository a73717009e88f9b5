"""Layout ``nanogpt``: the nanoGPT-based reference code of mHC-lite, KromHC and TBP-mHC.

Dimension letters: n streams, C width of one stream, v input views (1 in every released config), R H_res
logits (n! for mHC-lite, S = sum_k i_k! for KromHC), T tokens (any leading dims ...).

Sources (read from the repositories; facts, not code, carried over):

* wz1119/KromHC ``hyper_conn/mhc_lite.py`` (``MHCLite``; FFTYYY/mhc-lite itself was not available to
  read, the KromHC repo ships its mHC-lite baseline), ``hyper_conn/Kromhc.py`` (``KromHC``),
  ``hyper_conn/mhc.py`` (``ManifoldConstrainedHyperConnections``, log-domain Sinkhorn).
* alyubinin/tbp-mHC ``hyper_conn/tbp_mhc.py`` (``TBP_MHC``, ``transportation_birkhoff``),
  ``hyper_conn/base.py`` (shared input handling), ``model.py`` (site modules ``transformer.h.N.hc_attn`` /
  ``hc_mlp``, each wrapping ``branch_attn`` / ``branch_mlp``, whose tensors therefore appear twice in the
  state dict: ``hc_attn.branch.*`` is never counted as HC state), ``train.py`` (``model_args`` holds
  ``hyper_conn_type`` and ``hyper_conn_n``). tbp-mHC carries copies of mhc.py, mhc_lite.py, Kromhc.py with
  the same math.

Per site (keys under ``<path>.``; the repos' HC baseline ``hyper_connections.py`` is lucidrains' HC, which
the ``lucidrains`` layout reads):

================= ================== ====================== ================== ========================
key               mHC (mhc.py)       TBP-mHC                mHC-lite           KromHC (n = 2^K)
================= ================== ====================== ================== ========================
static_alpha      [n, v + n]         [n, v + n]             [v n + n!]         [v n + S], S = 2K
dynamic_alpha_fn  [nC, n (v + n)]    [nC, n (v + n)]        [nC, v n + n!]     [nC, v n + S]
delta_logit                          0-dim (make_dse=True)
================= ================== ====================== ================== ========================

plus, at every site: pre_branch_scale [1], residual_scale [1], static_beta [n], dynamic_beta_fn [nC, n],
h_post_scale (0-dim), norm.gamma [nC] (RMSNorm of the *flattened* streams; lucidrains' is per stream).

The forward math of each variant is in :mod:`hcdiag.io.nanogpt_site` (``RefSite``).

The variant is told apart by shapes. Ambiguous cases are settled by ``hyper_conn_type`` from
``LoadOptions.extra``, the source's config / sidecar / metadata (``hyper_conn_type``, also inside
``model_args``), else by the default, which ``settings_source`` names: a 2-D static_alpha without
``delta_logit`` is mHC (TBP with make_dse=False looks the same); with ``delta_logit`` it is TBP-mHC (the
repo's STBP / MSTBP / ... charts store the same keys; they are refused when ``hyper_conn_type`` names them).
Sinkhorn: convention ``log``, 20 iterations (the repos' default, not stored; ``--convention`` / ``--iters``
override).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from hcdiag.enums import Convention
from hcdiag.errors import InputError
from hcdiag.io.base import Layout, LoadOptions, TensorSource, register_layout
from hcdiag.io.limits import MAX_STREAMS
from hcdiag.io.lucidrains_layout import LEAF
from hcdiag.io.nanogpt_site import RefSite, factorize_into_twos
from hcdiag.io.reader import (
    IGNORED_SUBTREES,
    detect_summary,
    group_shapes,
    grouped_model,
    name_sites,
    read_site_tensors,
    sinkhorn_settings,
    site_prefixes,
    unknown_params,
)
from hcdiag.model import LoadedModel, Site
from hcdiag.site import SinkhornSpec

__all__ = ["NANOGPT", "RefPlan", "RefSite", "build_ref_site", "factorize_into_twos", "plan_ref_site"]

DEFAULT_ITERS = 20  # mhc.py sinkhorn_iters default
MAX_LITE_N = 8  # mHC-lite beyond this needs n! >= 362,880 permutation matrices: nothing trained exists
_COMMON = {
    "static_alpha",
    "dynamic_alpha_fn",
    "pre_branch_scale",
    "residual_scale",
    "static_beta",
    "dynamic_beta_fn",
    "h_post_scale",
    "norm.gamma",
}
_MHC_DEFAULT = "default (2-D static_alpha without delta_logit: mHC; TBP with make_dse=False stores the same keys)"
# hyper_conn_type values of the repos' hyper_conn_init_func -> hcdiag variant (None: not this layout)
_TYPES: dict[str, str | None] = {
    "mhc": "mhc",
    "analysis": "mhc",
    "mhc_lite": "mhc-lite",
    "kromhc": "kromhc",
    "tbp_mhc": "tbp",
    "lsb_mhc": "tbp",
    "hc": None,
    "none": None,
}


# ----------------------------------------------------------------------------------------------------------
# Identification


@dataclass(frozen=True)
class RefPlan:
    variant: str
    n: int
    views: int
    C: int
    how: str  # "shapes", "hyper_conn_type", "default (...)"


def _fail(prefix: str, why: str, path: str | None) -> InputError:
    where = prefix.rstrip(".") or "(top level)"
    return InputError(f"reference-repo HC site {where} in {path}: {why}", path=path)


def _lite_krom_candidates(L: int, n_hint: int | None) -> list[tuple[str, int, int]]:
    """(variant, n, v) whose 1-D static_alpha length v n + R equals L; v = 1 candidates first."""
    out = []
    if n_hint is not None and n_hint > MAX_STREAMS:
        return []  # a zero-sized tensor can state any n: never take n! of it
    ns = [n_hint] if n_hint else range(2, 13)
    for n in ns:
        for variant, R in (
            ("mhc-lite", math.factorial(n)),
            ("kromhc", sum(math.factorial(k) for k in factorize_into_twos(n))),
        ):
            if L > R and (L - R) % n == 0:
                out.append((variant, n, (L - R) // n))
    return sorted(out, key=lambda c: (c[2] != 1, c[0] == "kromhc"))


_Shapes = Mapping[str, tuple[int, ...]]


def _check_core(shapes: _Shapes, prefix: str, path: str | None) -> None:
    """InputError unless static_alpha is 1-D or 2-D and dynamic_alpha_fn [nC, K] matches norm.gamma [nC]."""
    sa, W, g = shapes.get("static_alpha"), shapes.get("dynamic_alpha_fn"), shapes.get("norm.gamma")
    if sa is None or W is None or g is None or len(g) != 1 or len(W) != 2 or W[0] != g[0] or len(sa) not in (1, 2):
        raise _fail(
            prefix,
            f"static_alpha {sa}, dynamic_alpha_fn {W}, norm.gamma {g} are not the reference "
            "shapes ([n, v+n] or [v n + R], [nC, K], [nC])",
            path,
        )


def _wanted(hc_type: str | None, prefix: str, path: str | None) -> str | None:
    """The variant ``hyper_conn_type`` names (None without one); InputError for a type this layout does not read."""
    want = _TYPES.get(hc_type) if hc_type is not None else None
    if hc_type is not None and (hc_type not in _TYPES or want is None):
        raise _fail(
            prefix,
            f"hyper_conn_type {hc_type!r} is not supported by the nanogpt layout (supported: "
            f"{', '.join(k for k, v in _TYPES.items() if v)}; 'hc' checkpoints use --layout lucidrains)",
            path,
        )
    return want


def _n_hint(shapes: _Shapes) -> int | None:
    """n as static_beta [n] or dynamic_beta_fn [nC, n] state it, else None."""
    sb, db = shapes.get("static_beta"), shapes.get("dynamic_beta_fn")
    n_hint = sb[0] if sb is not None and len(sb) == 1 else None
    if n_hint is None and db is not None and len(db) == 2:
        n_hint = db[1]
    return n_hint


def _check_streams(shapes: _Shapes, prefix: str, path: str | None) -> None:
    """InputError when the shapes state fewer than 2 streams (static_beta / dynamic_beta_fn, a 2-D static_alpha's
    rows, or norm.gamma's nC)."""
    sa, sb, g = shapes["static_alpha"], shapes.get("static_beta"), shapes["norm.gamma"]
    n_hint = _n_hint(shapes)
    if (n_hint is not None and n_hint < 2) or (len(sa) == 2 and sa[0] < 2) or shapes["dynamic_alpha_fn"][0] < 2:
        raise _fail(prefix, f"static_alpha {sa} / static_beta {sb} / norm.gamma {g}: fewer than 2 streams", path)


def _plan_2d(
    shapes: _Shapes, want: str | None, hc_type: str | None, prefix: str, path: str | None
) -> tuple[str, int, int, str]:
    """(variant, n, v, how) of a 2-D static_alpha [n, v+n]: mHC, or TBP (delta_logit or hyper_conn_type)."""
    sa, W = shapes["static_alpha"], shapes["dynamic_alpha_fn"]
    (n, t), (G, K) = sa, W
    v = t - n
    if v < 1 or K != n * t or G % n:
        raise _fail(
            prefix,
            f"static_alpha {sa} / dynamic_alpha_fn {W} do not factor as [n, v+n] / [nC, n (v+n)]",
            path,
        )
    if want in ("mhc-lite", "kromhc"):
        raise _fail(prefix, f"hyper_conn_type {hc_type!r} but static_alpha is 2-D {sa}", path)
    if "delta_logit" in shapes:
        if want == "mhc":
            raise _fail(prefix, f"hyper_conn_type {hc_type!r} but the site stores delta_logit (TBP)", path)
        return "tbp", n, v, "shapes"
    if want == "tbp":
        return "tbp", n, v, "hyper_conn_type"
    return "mhc", n, v, "hyper_conn_type" if want == "mhc" else _MHC_DEFAULT


def _plan_1d(shapes: _Shapes, want: str | None, prefix: str, path: str | None) -> tuple[str, int, int, str]:
    """(variant, n, v, how) of a 1-D static_alpha [v n + R]: mHC-lite (R = n!) or KromHC (R = sum i_k!)."""
    sa, (G, K), g, n_hint = shapes["static_alpha"], shapes["dynamic_alpha_fn"], shapes["norm.gamma"], _n_hint(shapes)
    if "delta_logit" in shapes:
        raise _fail(prefix, "delta_logit with a 1-D static_alpha", path)
    cands = _lite_krom_candidates(sa[0], n_hint)
    if want is not None:
        cands = [c for c in cands if c[0] == want]
    if not cands or K != sa[0]:
        raise _fail(
            prefix,
            f"static_alpha length {sa[0]} is not v n + n! (mHC-lite) or v n + sum i_k! "
            f"(KromHC){' for n = ' + str(n_hint) if n_hint else ''}",
            path,
        )
    variant, n, v = cands[0]
    if variant == "mhc-lite" and n > MAX_LITE_N:
        raise _fail(prefix, f"mHC-lite with n = {n} would need {math.factorial(n):,} permutation matrices", path)
    if G % n:
        raise _fail(prefix, f"norm.gamma {g} is not a multiple of n = {n}", path)
    return variant, n, v, "hyper_conn_type" if want else "shapes"


def _check_rest(shapes: _Shapes, variant: str, n: int, prefix: str, path: str | None) -> None:
    """InputError unless the beta tensors are [n] / [nC, n], the scales are present scalars and no tensor is
    left that a ``variant`` site does not have."""
    G = shapes["dynamic_alpha_fn"][0]
    sb, db = shapes.get("static_beta"), shapes.get("dynamic_beta_fn")
    if (sb is not None and sb != (n,)) or (db is not None and db != (G, n)):
        raise _fail(prefix, f"static_beta {sb} / dynamic_beta_fn {db} are not [{n}] / [{G}, {n}]", path)
    need = ["pre_branch_scale", "residual_scale"] + (
        ["static_beta", "dynamic_beta_fn", "h_post_scale"] if sb is not None or db is not None else []
    )
    missing = [p for p in need if p not in shapes]
    if missing:
        raise _fail(prefix, f"missing {', '.join(missing)}", path)
    scalars = [p for p in ("pre_branch_scale", "residual_scale", "h_post_scale", "delta_logit") if p in shapes]
    bad = [p for p in scalars if math.prod(shapes[p]) != 1 or len(shapes[p]) > 1]
    if bad:
        raise _fail(prefix, f"{', '.join(bad)} should be scalars", path)
    extra = unknown_params(shapes, _COMMON | ({"delta_logit"} if variant == "tbp" else set()))
    if extra:
        raise _fail(
            prefix,
            f"unexpected tensors {', '.join(extra)} for a {variant} site (a variant hcdiag does not know?)",
            path,
        )


def plan_ref_site(
    shapes: _Shapes,
    *,
    hc_type: str | None = None,
    prefix: str = "",
    path: str | None = None,
) -> RefPlan:
    """Identify a reference-repo site from ``{param: shape}``; InputError if it is not one.

    Steps: the core shapes (static_alpha, dynamic_alpha_fn, norm.gamma), the variant ``hc_type`` asks for, at
    least 2 streams, the variant from static_alpha's rank (2-D: mHC / TBP; 1-D: mHC-lite / KromHC), then the
    other tensors against n.
    """
    _check_core(shapes, prefix, path)
    want = _wanted(hc_type, prefix, path)
    _check_streams(shapes, prefix, path)
    if len(shapes["static_alpha"]) == 2:
        variant, n, v, how = _plan_2d(shapes, want, hc_type, prefix, path)
    else:
        variant, n, v, how = _plan_1d(shapes, want, prefix, path)
    _check_rest(shapes, variant, n, prefix, path)
    return RefPlan(variant, n, v, shapes["dynamic_alpha_fn"][0] // n, how)


def build_ref_site(plan: RefPlan, tensors: Mapping[str, torch.Tensor], spec: SinkhornSpec | None = None) -> RefSite:
    """A :class:`RefSite` from a plan and the site's tensors; mHC's spec defaults to (log, 20 iterations)."""
    keep = {k: v for k, v in tensors.items() if not k.startswith(IGNORED_SUBTREES)}
    if spec is None:
        spec = SinkhornSpec(Convention.LOG, DEFAULT_ITERS, 0.0, source="default")
    return RefSite(
        plan.variant, n=plan.n, views=plan.views, tensors=keep, spec=spec if plan.variant == "mhc" else None
    ).eval()


def _find(obj: Any, key: str, depth: int = 0) -> Any:
    if depth > 3:
        return None
    if isinstance(obj, str) and depth > 0 and obj[:1] == "{":
        try:
            obj = json.loads(obj)
        except ValueError:
            return None
    if isinstance(obj, Mapping):
        if key in obj:
            return obj[key]
        for v in obj.values():
            if isinstance(v, Mapping | str):
                found = _find(v, key, depth + 1)
                if found is not None:
                    return found
    return None


def hyper_conn_type(source: TensorSource, options: LoadOptions) -> tuple[str | None, str]:
    """``hyper_conn_type`` from LoadOptions.extra, the source's config, or its metadata; (value, where)."""
    extra = (options.extra or {}).get("hyper_conn_type")
    if extra is not None:
        return str(extra), "cli"
    for where, obj in (("config", source.config), ("metadata", source.metadata)):
        found = _find(obj or {}, "hyper_conn_type")
        if found is not None:
            return str(found), where
    return None, "default"


def _plans(source: TensorSource, hc_type: str | None) -> dict[str, RefPlan] | None:
    groups = site_prefixes(source.keys(), LEAF)
    if not groups:
        return None
    plans = {}
    for prefix, group in groups.items():
        try:
            plans[prefix] = plan_ref_site(group_shapes(source, group), hc_type=hc_type, prefix=prefix)
        except InputError:
            return None
    return plans


def _detect(source: TensorSource) -> str | None:
    hc_type, _ = hyper_conn_type(source, LoadOptions())
    plans = _plans(source, hc_type)
    if not plans:
        return None
    what, sample = detect_summary({prefix: plan.variant for prefix, plan in plans.items()})
    return (
        f"found {len(plans)} reference-repo HC sites ({what}) with norm.gamma [nC] and static_alpha "
        f"[n, v+n] / [v n + R], e.g. {sample}"
    )


def _load(source: TensorSource, options: LoadOptions) -> LoadedModel:
    path = source.path
    hc_type, type_src = hyper_conn_type(source, options)
    groups = site_prefixes(source.keys(), LEAF)
    if not groups:
        raise InputError(
            f"no *.static_alpha keys in {path}: not a reference-repo (nanoGPT) HC checkpoint; pick another --layout",
            path=path,
        )
    spec, sk_src = sinkhorn_settings(options, Convention.LOG, DEFAULT_ITERS)
    notes: list[str] = []
    settings: dict[str, str] = {"n": "shapes", "C": "shapes", "variant": "shapes"}
    if hc_type is not None:
        settings["hyper_conn_type"] = type_src
    sites: list[Site] = []
    modules: list[RefSite] = []
    defaults: set[str] = set()
    for i, (prefix, name, block, kind) in enumerate(name_sites(groups)):
        group = groups[prefix]
        plan = plan_ref_site(group_shapes(source, group), hc_type=hc_type, prefix=prefix, path=path)
        if plan.how.startswith("default"):
            defaults.add(plan.how)
            settings["variant"] = "default"
        elif plan.how == "hyper_conn_type":
            settings["variant"] = type_src
        params = sorted(p for p in group if not p.startswith(IGNORED_SUBTREES))
        infos, tensors = read_site_tensors(source, group, params, prefix)
        module = build_ref_site(plan, tensors, spec)
        modules.append(module)
        sites.append(Site(i, name, block, kind, plan.variant, module, infos))
    for how in sorted(defaults):
        notes.append(f"variant {how}; set hyper_conn_type if this is wrong")
    if any(s.variant == "mhc" for s in sites):
        settings.update(sk_src)
        if sk_src["convention"] == "default":
            notes.append(
                "reference mhc.py projects with a log-domain Sinkhorn (convention log, 20 iterations); "
                "neither is stored in the checkpoint"
            )
    if any(m.variant_name == "tbp" and m.delta_logit is None for m in modules):
        notes.append("TBP sites without delta_logit: make_dse=False (no uniform smoothing)")
    if any(m.v != 1 for m in modules):
        notes.append("num_input_views > 1: H_pre is [v, n] per token")
    notes.append("reference code stores alpha[input, output]: H_res = alpha_res^T (paper convention)")
    return grouped_model(source, "nanogpt", _detect, groups, sites, settings, notes)


NANOGPT = register_layout(
    Layout(
        name="nanogpt",
        summary="mHC-lite / KromHC / TBP-mHC / log-mHC reference repos (nanoGPT): transformer.h.N.hc_attn "
        "/ hc_mlp with norm.gamma [nC]",
        detect=_detect,
        load=_load,
        priority=45,
    )
)

"""Layout ``lucidrains``: checkpoints of the ``hyper-connections`` PyPI package (v0.4.x, lucidrains).

Dimension letters: s residual streams, f fractions (``num_fracs``), v input views, p dynamic-alpha proposals,
d width per fraction (= C / f), K = (v + s) f columns of the alpha logits, T tokens (any leading dims ...).
hcdiag treats the s * f *fractional streams* of width d as its n streams: n = s f, C = d (f = 1 in practice).

Three classes share the key names (one site = one wrapped branch; keys under ``<path>.``):

================================ ======================== ============================== =====================
key                              ``HyperConnections``      ``ManifoldConstrained...`` (mHC) ``mHCv2``
================================ ======================== ============================== =====================
static_alpha                     [s f, K]                 [s f, K]                       [s f, K]
dynamic_alpha_fn                 [d, K]                   [p, d, K]                      [p, d, K]
static_beta                      [s f]                    [s f]                          [s, f, 1]
dynamic_beta_fn                  [d] (f=1) / [d, f]       [d] (f=1) / [d, f]             [d, f]
scales                           dynamic_alpha_scale,     pre_branch_scale [1],          same as mHC
                                 dynamic_beta_scale (0-d) residual_scale [1],
                                                          h_post_scale (0-d)
norm.gamma                       [d]                      [d]                            [d]
maybe_mix_streams.weight                                                                 [s, s, 1, 1] (opt.)
================================ ======================== ============================== =====================

Forward math (``width_connection`` of hyper_connections.py, manifold_constrained_hyper_connections.py,
mHCv2.py), per token, code orientation alpha[input, output]:

    normed = F.normalize(x, dim=-1) * sqrt(d) * (gamma + 1)         per (fractional) stream: width d, not nC
    HC:   alpha = tanh(normed @ dynamic_alpha_fn) * dynamic_alpha_scale + static_alpha   (``tanh=True``)
          H_res^T = alpha[:, v:] (no constraint), H_pre^T = alpha[:, :v]
          beta = tanh(normed @ dynamic_beta_fn) * dynamic_beta_scale + static_beta         (= H_post)
    mHC:  alpha_p = (normed @ dynamic_alpha_fn[p]) * [pre_branch_scale | residual_scale] + static_alpha
          H_pre^T = mean_p sigmoid(alpha_p[:, :1]), H_res^T = mean_p SK(alpha_p[:, 1:])  (mean after SK)
          beta = 2 sigmoid((normed @ dynamic_beta_fn) * h_post_scale + static_beta)        (= H_post)

SK is ``sinkhorn_knopps`` (hcdiag convention ``lucidrains``) or, with ``log_domain_sinkhorn=True`` (or mHCv2's
triton kernel on CUDA), ``log_domain_sinkhorn_knopps`` (convention ``log``); 20 iterations by default. Neither
the flag nor the iteration count is stored in a state dict: hcdiag assumes the library default (lucidrains,
20) and says so (settings source "default"); ``--convention`` / ``--iters`` override. HC sites are
unconstrained.

Fractions (``num_fracs`` = f > 1): the fractional stream order is (f, s) with f outer for HyperConnections
and mHC (v1), (s, f) with s outer for mHCv2, exactly as the library flattens them. mHC v1 with f > 1 slices
the alpha columns so that Sinkhorn runs on a non-square [s, K - 1] block (a library quirk, reproduced here):
those sites are reported as unconstrained. Class and f are inferred from shapes (``static_beta`` 3-D =>
mHCv2; else v1); without beta tensors v = 1 is assumed (f = K - s f).
``LoadOptions.extra["lucidrains_class"]`` ("hc", "mhc", "mhc-v2") overrides the class, ``extra["tanh"]``
(bool) HC's activation.

The package's three other ``HyperConnections`` modules are HC's maths under other tensor names and shapes
(:data:`FORM_CLASSES`), converted to HC's names when planned and read: ``hyper_connections_channel_first``
(``dynamic_alpha_fn.weight`` [K, d, 1, 1], ``dynamic_beta_fn.0.weight`` [1, d, 1, 1], ``norm.gamma`` [d, 1, 1]),
``hyper_connections_with_multi_input_streams`` (``dynamic_alpha_and_branch_input.proj.weight`` [K, d] with its
``scale``, ``dynamic_beta.proj.weight`` [1, d]; the ``additional_*`` paths feed other branch arguments and are
ignored) and ``hyper_connections_with_multi_branch_inputs`` (HC's names; ``static_beta`` [s, m],
``dynamic_beta_fn`` [d, m] for m branch inputs: v = m views and m branch outputs, so H_post has m rows).

Site names: the module path prefixes, in natural order of the numbers in the path (``layers.2`` before
``layers.10``; at equal numbers attn before ffn); a path with an attn / ffn / mlp word gives kind and block
(``transformer.h.3.hc_attn`` -> ``attn_3``). Everything is converted to paper convention (H_res = alpha^T)
once, here. Site grouping, names, Sinkhorn settings, reading a site and the LoadedModel are
:mod:`hcdiag.io.reader`'s (:func:`~hcdiag.io.reader.site_prefixes`, :func:`~hcdiag.io.reader.name_sites`,
:func:`~hcdiag.io.reader.sinkhorn_settings`, :func:`~hcdiag.io.reader.read_site_tensors`,
:func:`~hcdiag.io.reader.grouped_model`, ...), shared with the other per-module key group layouts.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn

from hcdiag.enums import Convention, Exactness
from hcdiag.errors import InputError, UsageError
from hcdiag.io.base import Layout, LoadOptions, TensorSource, register_layout
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
from hcdiag.site import HCOutput, SinkhornSpec, SiteModule, l2_rms_norm

__all__ = [
    "LUCIDRAINS",
    "LucidrainsSite",
    "SitePlan",
    "ParamHolder",
    "SCALAR_SHAPES",
    "build_site",
    "plan_site",
]

DEFAULT_ITERS = 20  # hyper-connections' sinkhorn_iters default
LEAF = "static_alpha"

_HC_KEYS = {
    "static_alpha",
    "dynamic_alpha_fn",
    "dynamic_alpha_scale",
    "static_beta",
    "dynamic_beta_fn",
    "dynamic_beta_scale",
    "norm.gamma",
}
_MHC_KEYS = {
    "static_alpha",
    "dynamic_alpha_fn",
    "pre_branch_scale",
    "residual_scale",
    "static_beta",
    "dynamic_beta_fn",
    "h_post_scale",
    "norm.gamma",
    "maybe_mix_streams.weight",
}
# scalar parameters and their shape in hyper-connections (and the reference repos, which copy it)
SCALAR_SHAPES: dict[str, tuple[int, ...]] = {
    "pre_branch_scale": (1,),
    "residual_scale": (1,),
    "h_post_scale": (),
    "dynamic_alpha_scale": (),
    "dynamic_beta_scale": (),
    "delta_logit": (),
}
_CLASSES = {"hc": "lucidrains-hc", "mhc": "lucidrains-mhc", "mhc-v2": "lucidrains-mhc-v2"}


# ----------------------------------------------------------------------------------------------------------
# Sinkhorn in code orientation, only for mHC v1 with fractions (non-square block); everything square goes
# through hcdiag.sinkhorn.project.


def _code_sinkhorn(alpha: torch.Tensor, convention: Convention, iters: int) -> torch.Tensor:
    """hyper-connections' sinkhorn_knopps / log_domain_sinkhorn_knopps on code orientation [..., a, b]."""
    if convention is Convention.LOG:
        for _ in range(iters):
            alpha = alpha - torch.logsumexp(alpha, dim=-2, keepdim=True)
            alpha = alpha - torch.logsumexp(alpha, dim=-1, keepdim=True)
        return alpha.exp()
    if convention is not Convention.LUCIDRAINS:
        raise UsageError(
            f"convention {convention.value!r} cannot run on the non-square alpha block of an mHC site with "
            "num_fracs > 1; use lucidrains or log",
            option="--convention",
        )
    alpha = (alpha - alpha.amax(dim=-2, keepdim=True)).exp()
    for _ in range(iters):
        alpha = F.normalize(alpha, p=1, dim=-2)
        alpha = F.normalize(alpha, p=1, dim=-1)
    return alpha


# ----------------------------------------------------------------------------------------------------------
# The site module


class ParamHolder(nn.Module):
    """Holds parameters under a sub-module name, so state_dict keys match the library (``norm.gamma``)."""

    def __init__(self, **tensors: torch.Tensor) -> None:
        super().__init__()
        for name, value in tensors.items():
            setattr(self, name, nn.Parameter(value))

    def param(self, name: str) -> torch.Tensor:
        return cast(torch.Tensor, getattr(self, name))


class LucidrainsSite(SiteModule):
    """One hyper-connections site (HC, mHC or mHCv2), reproducing the library's alpha / beta exactly.

    x: [..., n, C] with n = s f fractional streams in the library's order (see module docstring), C = d.
    forward returns paper convention: H_res [..., n, n] = alpha_res^T; H_pre [..., n] (v f = 1) else
    [..., v f, n] (rows: branch input (view, fraction)); H_post [..., n] (f = 1) else [..., f, n] (rows:
    branch output fraction), zeros when the module has no depth connection
    (``add_branch_out_to_residual=False``).
    Parameters keep the library's names, so ``state_dict()`` keys equal the checkpoint's.
    """

    static_alpha: nn.Parameter
    dynamic_alpha_fn: nn.Parameter
    norm: ParamHolder
    res_params = ("static_alpha", "dynamic_alpha_fn", "residual_scale", "dynamic_alpha_scale")
    maybe_mix_streams: ParamHolder | None

    def __init__(
        self,
        cls: str,
        *,
        streams: int,
        fracs: int,
        views: int,
        tensors: Mapping[str, torch.Tensor],
        tanh: bool = True,
        spec: SinkhornSpec | None = None,
    ) -> None:
        super().__init__()
        if cls not in _CLASSES:
            raise ValueError(f"unknown lucidrains class {cls!r}")
        self.cls = cls
        self.variant_name = _CLASSES[cls]
        self.s, self.f, self.v = streams, fracs, views
        self.n = streams * fracs
        self.tanh = tanh
        t = dict(tensors)
        self.static_alpha = nn.Parameter(t.pop("static_alpha"))
        self.dynamic_alpha_fn = nn.Parameter(t.pop("dynamic_alpha_fn"))
        self.C = int(self.dynamic_alpha_fn.shape[-2])
        self.proposals = 1 if cls == "hc" else int(self.dynamic_alpha_fn.shape[0])
        self.norm = ParamHolder(gamma=t.pop("norm.gamma"))
        mix = t.pop("maybe_mix_streams.weight", None)
        self.maybe_mix_streams = None if mix is None else ParamHolder(weight=mix)
        for name, value in t.items():
            # scales in the library's own shape ([1] or 0-dim), whatever a converter made of them
            setattr(self, name, nn.Parameter(value.reshape(SCALAR_SHAPES[name]) if name in SCALAR_SHAPES else value))
        self.has_beta = "static_beta" in t
        self._spec = spec  # convention + iters for mHC (also the non-square fraction case)
        if cls == "hc":
            self.exactness = Exactness.UNCONSTRAINED
            self.sinkhorn = None
        elif cls == "mhc" and fracs > 1:
            # Sinkhorn on a non-square block: not a projection onto the Birkhoff polytope of the n streams
            self.exactness = Exactness.UNCONSTRAINED
            self.sinkhorn = None
        else:
            self.exactness = Exactness.SINKHORN
            self.sinkhorn = spec

    # ---- pieces -------------------------------------------------------------------------------------------

    def _dtype(self, x: torch.Tensor) -> torch.dtype:
        return self._compute_dtype(x, self.static_alpha)

    def _normed(self, x: torch.Tensor, dt: torch.dtype) -> torch.Tensor:
        """[..., f, s, d] (HC, mHC) or [..., s, f, d] (mHCv2): RMSNorm per fractional stream, width d."""
        lead = x.shape[:-2]
        if self.cls == "mhc-v2":
            xs = x.to(dt).reshape(*lead, self.s, self.f, self.C)
            if self.maybe_mix_streams is not None:
                # Conv2d(s, s, 1) over the stream axis, before the norm (mix_streams_before_norm=True)
                w = self.maybe_mix_streams.param("weight").to(dt)[:, :, 0, 0]
                xs = torch.einsum("oi,...ifd->...ofd", w, xs)
        else:
            xs = x.to(dt).reshape(*lead, self.f, self.s, self.C)
        return l2_rms_norm(xs, self.norm.param("gamma").to(dt))

    def _alpha_logits(self, normed: torch.Tensor, dt: torch.dtype) -> torch.Tensor:
        """Pre-activation alpha logits: HC [..., f, s, K]; mHC [p, ..., f, s, K]; mHCv2 [p, ..., s f, K]."""
        s, f = self.s, self.f
        W = self._param_in("dynamic_alpha_fn", dt)
        static = self._param_in("static_alpha", dt)
        K = static.shape[-1]
        if self.cls == "hc":
            wc = normed @ W
            wc = torch.tanh(wc) if self.tanh else wc
            return wc * self._param_in("dynamic_alpha_scale", dt) + static.reshape(f, s, K)
        wc = torch.einsum("...d,pdk->p...k", normed, W)
        pre_s, res_s = self._param_in("pre_branch_scale", dt), self._param_in("residual_scale", dt)
        scale = torch.cat([pre_s.expand(f), res_s.expand(f * s)])
        if self.cls == "mhc":
            return wc * scale + static.reshape(f, s, K)
        wc = wc.reshape(*wc.shape[:-3], s * f, K)
        return wc * scale + static

    def _alpha(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(pre_code [..., n, v f] input stream -> branch (view, frac), res_code [..., n, n], normed)."""
        dt = self._dtype(x)
        s, f, v, n = self.s, self.f, self.v, self.n
        normed = self._normed(x, dt)
        a = self._alpha_logits(normed, dt)
        lead = x.shape[:-2]
        k = len(lead)
        if self.cls == "hc":
            a = a.reshape(*lead, f, s, f, v + s)  # [..., f1, s, f2, t]
            pre = a[..., :v].permute(*range(k), k, k + 1, k + 3, k + 2)  # [..., f1, s, v, f2]
            return pre.reshape(*lead, n, v * f), a[..., v:].reshape(*lead, n, n), normed
        if self.cls == "mhc-v2":
            pre = a[..., :f].sigmoid().mean(0)  # [..., (s f1), f2]
        elif f == 1:
            pre = a[..., :1].sigmoid().mean(0).reshape(*lead, n, 1)
        else:
            # mHC v1, f > 1: pre = column 0 only, Sinkhorn on the remaining K - 1 columns (non-square block)
            spec = self._spec
            assert spec is not None
            sk = _code_sinkhorn(a[..., 1:], Convention(spec.convention), spec.iters)
            full = torch.cat([a[..., :1].sigmoid(), sk], dim=-1).mean(0).reshape(*lead, f, s, f, 1 + s)
            pre = full[..., :1].permute(*range(k), k, k + 1, k + 3, k + 2).reshape(*lead, n, f)
            return pre, full[..., 1:].reshape(*lead, n, n), normed
        res = self.res_from_logits(self._paper_logits(a)).transpose(-1, -2)
        return pre, res, normed

    def _paper_logits(self, a: torch.Tensor) -> torch.Tensor:
        """[..., n, n] (p = 1) or [..., p, n, n] paper-orientation Sinkhorn logits from alpha logits."""
        res = a[..., 0, :, 1:] if self.cls == "mhc" else a[..., self.f :]  # code [p, ..., n, n]
        res = res.transpose(-1, -2).movedim(0, -3)
        return res if self.proposals > 1 else res.squeeze(-3)

    def _post(self, normed: torch.Tensor, dt: torch.dtype) -> torch.Tensor:
        lead = normed.shape[:-3]
        s, f, n = self.s, self.f, self.n
        if not self.has_beta:
            return torch.zeros(*lead, n, dtype=dt) if f == 1 else torch.zeros(*lead, f, n, dtype=dt)
        Wb = self._param_in("dynamic_beta_fn", dt)
        static = self._param_in("static_beta", dt)
        if self.cls == "mhc-v2":
            # normed [..., s, f1, d] @ [d, f2] + static [s, f1, 1] -> beta [..., s, f1, f2]; out (s, f2) <- f1
            beta = 2 * torch.sigmoid((normed @ Wb) * self._param_in("h_post_scale", dt) + static)
            return beta.movedim(-2, -3).reshape(*lead, f, n) if f > 1 else beta.reshape(*lead, n)
        # o branch outputs: the f fractions, or the m branch inputs of the multi-branch form (f = 1)
        o = int(Wb.shape[-1]) if Wb.ndim == 2 else 1
        dc = normed @ Wb  # [..., f1, s] (o = 1) or [..., f1, s, o]
        if Wb.ndim == 1:
            dc = dc.unsqueeze(-1)
        static = static.reshape(s, o)  # '(s f)': s outer; multi-branch [s, m]
        if self.cls == "hc":
            dc = torch.tanh(dc) if self.tanh else dc
            beta = dc * self._param_in("dynamic_beta_scale", dt) + static
        else:
            beta = 2 * torch.sigmoid(dc * self._param_in("h_post_scale", dt) + static)
        # beta [..., f1, s, o]: output fractional stream (f2 = o, s) <- branch fraction f1; multi-branch
        # (f1 = 1): stream s <- branch output o
        beta = beta.transpose(-1, -2)  # [..., f1, o, s]
        return beta.reshape(*lead, o, n) if o > 1 else beta.reshape(*lead, n)

    # ---- SiteModule API -----------------------------------------------------------------------------------

    def forward(self, x: torch.Tensor) -> HCOutput:
        dt = self._dtype(x)
        pre_code, res_code, normed = self._alpha(x)
        pre = pre_code.transpose(-1, -2)
        if pre.shape[-2] == 1:
            pre = pre.squeeze(-2)
        return HCOutput(pre, self._post(normed, dt), res_code.transpose(-1, -2))

    def res_logits(self, x: torch.Tensor) -> torch.Tensor | None:
        """Paper-orientation Sinkhorn logits [..., n, n], or [..., p, n, n] with p > 1 proposals (H_res is the
        mean over proposals of the projections). None for HC and for mHC v1 with fractions."""
        if self.sinkhorn is None:
            return None
        dt = self._dtype(x)
        return self._paper_logits(self._alpha_logits(self._normed(x, dt), dt))

    def res_from_logits(self, logits: torch.Tensor, spec: SinkhornSpec | None = None) -> torch.Tensor:
        from hcdiag.sinkhorn import project

        spec = spec or self.sinkhorn
        if spec is None:
            raise UsageError(f"{self.variant_name} site has no Sinkhorn logits to project")
        H = project(logits, spec)
        # p > 1 proposals: logits are [..., p, n, n]; the library averages the projected matrices
        return H.mean(dim=-3) if self.proposals > 1 else H

    def extra_repr(self) -> str:
        return (
            f"{self.variant_name}, s={self.s}, f={self.f}, v={self.v}, p={self.proposals}, n={self.n}, "
            f"C={self.C}, tanh={self.tanh}, sinkhorn={self.sinkhorn or self._spec}"
        )


# ----------------------------------------------------------------------------------------------------------
# The package's other HyperConnections classes: HC's math under other tensor names and shapes

#: form -> the class that writes it
FORM_CLASSES = {
    "channel-first": "hyper_connections_channel_first.HyperConnections",
    "multi-input": "hyper_connections_with_multi_input_streams.HyperConnections",
    "multi-branch": "hyper_connections_with_multi_branch_inputs.HyperConnections",
}
_FORM_NOTES = {
    "channel-first": "its 1x1 Conv2d projections and [d, 1, 1] norm gain are HyperConnections' linear maps over "
    "each position's channels, read as such",
    "multi-input": "its ProjActScale projections are HyperConnections' dynamic_alpha_fn / dynamic_beta_fn with "
    "their scales; additional input paths mix other branch arguments, not the residual streams, and are ignored",
    "multi-branch": "num_branch_inputs = m (static_beta [s, m]): H_pre has m rows (one per branch input) and "
    "H_post m rows (branch output i -> the streams)",
}
_Convert = Callable[[torch.Tensor], torch.Tensor]
#: form -> {the class's tensor: (HyperConnections' name for it, how to convert it)}; a form is told by its first key
_RENAMES: dict[str, dict[str, tuple[str, _Convert]]] = {
    "channel-first": {
        "dynamic_alpha_fn.weight": ("dynamic_alpha_fn", lambda w: w[:, :, 0, 0].mT),  # Conv2d(d, K, 1)
        "dynamic_beta_fn.0.weight": ("dynamic_beta_fn", lambda w: w[0, :, 0, 0]),  # Conv2d(d, 1, 1)
        "norm.gamma": ("norm.gamma", lambda g: g.reshape(g.shape[0])),  # [d, 1, 1]
    },
    "multi-input": {
        "dynamic_alpha_and_branch_input.proj.weight": ("dynamic_alpha_fn", lambda w: w.mT),  # Linear(d, K)
        "dynamic_alpha_and_branch_input.scale": ("dynamic_alpha_scale", lambda t: t),
        "dynamic_beta.proj.weight": ("dynamic_beta_fn", lambda w: w[0]),  # Linear(d, 1)
        "dynamic_beta.scale": ("dynamic_beta_scale", lambda t: t),
    },
}
_SIDE_PATHS = ("additional_norms.", "additional_to_dynamic_input.", "additional_static_input.")


def _key_form(names: Mapping[str, Any]) -> str | None:
    return next((form for form, table in _RENAMES.items() if next(iter(table)) in names), None)


def _as_hc(
    form: str | None, items: Mapping[str, torch.Tensor], prefix: str, path: str | None
) -> dict[str, torch.Tensor]:
    """A form's tensors (or meta tensors, for shapes) under HyperConnections' names and shapes; InputError for a
    tensor the conversion would not keep whole (a k x k convolution, a projection with more outputs)."""
    if form not in _RENAMES:  # None, or multi-branch: HC's own names
        return dict(items)
    table = _RENAMES[form]
    out: dict[str, torch.Tensor] = {}
    for key, t in items.items():
        if key.startswith(_SIDE_PATHS):
            continue
        name, convert = table.get(key, (key, lambda v: v))
        try:
            new = convert(t)
        except (IndexError, RuntimeError):
            new = None
        if new is None or new.numel() != t.numel():
            raise _fail(prefix, f"{key} {tuple(t.shape)} is not the shape {FORM_CLASSES[form]} gives it", path)
        out[name] = new
    return out


# ----------------------------------------------------------------------------------------------------------
# Identification from shapes


@dataclass(frozen=True)
class SitePlan:
    """What a key group is: class, streams s, fractions f, views v, and where each came from."""

    cls: str
    streams: int
    fracs: int
    views: int
    C: int
    how: str  # "shapes" or "assumed v=1" ...
    form: str | None = None  # another class of the package with HC's math (FORM_CLASSES), None for the three


def _fail(prefix: str, why: str, path: str | None) -> InputError:
    where = prefix.rstrip(".") or "(top level)"
    return InputError(f"lucidrains site {where} in {path}: {why}; is this a hyper-connections checkpoint?", path=path)


def _alpha_dims(shapes: Mapping[str, tuple[int, ...]], prefix: str, path: str | None) -> tuple[int, int, int]:
    """(R = s f, K, d) from static_alpha [s f, K], dynamic_alpha_fn [d, K] / [p, d, K] and norm.gamma [d];
    InputError when they are not such shapes or disagree."""
    sa = shapes.get("static_alpha")
    W = shapes.get("dynamic_alpha_fn")
    if sa is None or W is None or len(sa) != 2 or len(W) not in (2, 3):
        raise _fail(prefix, f"static_alpha {sa} / dynamic_alpha_fn {W} are not [s f, K] / [d, K] or [p, d, K]", path)
    R, K = sa
    d = W[-2]
    if len(W) == 3 and W[0] < 1:
        raise _fail(prefix, f"dynamic_alpha_fn {W} has no proposals", path)
    if W[-1] != K or K <= R or R < 1 or d < 1:
        raise _fail(prefix, f"static_alpha {sa} and dynamic_alpha_fn {W} disagree (need K > s f)", path)
    if shapes.get("norm.gamma") != (d,):
        raise _fail(prefix, f"norm.gamma is {shapes.get('norm.gamma')}, expected ({d},)", path)
    return R, K, d


def _site_class(
    shapes: Mapping[str, tuple[int, ...]], force_cls: str | None, prefix: str, path: str | None
) -> str:
    """``force_cls``, else the class the shapes say (2-D dynamic_alpha_fn: hc; 3-D static_beta or a stream mix:
    mhc-v2; else mhc); InputError when dynamic_alpha_fn does not fit it."""
    W = shapes["dynamic_alpha_fn"]
    sb = shapes.get("static_beta")
    if force_cls is not None:
        cls = force_cls
    elif len(W) == 2:
        cls = "hc"
    elif (sb is not None and len(sb) == 3) or "maybe_mix_streams.weight" in shapes:
        cls = "mhc-v2"
    else:
        cls = "mhc"
    if (cls == "hc" and len(W) != 2) or (cls != "hc" and len(W) != 3):
        raise _fail(prefix, f"dynamic_alpha_fn {W} does not fit class {cls}", path)
    return cls


def _split_streams(
    cls: str, shapes: Mapping[str, tuple[int, ...]], R: int, K: int, d: int, prefix: str, path: str | None
) -> tuple[int, int, int, str]:
    """(s, f, v, how): streams, fractions and views from the beta shapes (how "shapes"), else assuming v = 1
    (mHC) or f = 1 (HC); InputError when static_alpha [R, K] does not split so or the beta shapes disagree."""
    sa, sb, db = shapes["static_alpha"], shapes.get("static_beta"), shapes.get("dynamic_beta_fn")
    how = "shapes"
    if cls == "mhc-v2":
        if sb is not None:
            if len(sb) != 3 or sb[2] != 1:
                raise _fail(prefix, f"static_beta {sb} is not mHCv2's [s, f, 1]", path)
            s, f = sb[0], sb[1]
        else:
            f = K - R  # v = 1 (mHC needs v = 1: its alpha scale has f + s f entries)
            s = R // f if f > 0 and R % f == 0 else 0
            how = "assumed v=1"
        return s, f, 1, how
    if db is not None:
        f = db[1] if len(db) == 2 else 1
    else:
        f = K - R if cls != "hc" else 1
        how = "assumed v=1" if cls != "hc" else "assumed f=1"
    if f < 1 or R % f or (K - R) % f:
        raise _fail(prefix, f"cannot split static_alpha {sa} into fractions f={f}", path)
    s, v = R // f, (K - R) // f
    if cls != "hc" and v != 1:
        raise _fail(prefix, f"mHC alpha has {K - R} pre columns for f={f}; the library has 1 view", path)
    if sb is not None and sb != (s * f,):
        raise _fail(prefix, f"static_beta {sb} is not [s f] = [{s * f}]", path)
    if db is not None and db not in ((d,), (d, f)):
        raise _fail(prefix, f"dynamic_beta_fn {db} is not [{d}] or [{d}, {f}]", path)
    return s, f, v, how


def _branch_inputs(
    shapes: Mapping[str, tuple[int, ...]], d: int, prefix: str, path: str | None
) -> tuple[int, int, int, str]:
    """hyper_connections_with_multi_branch_inputs: static_alpha [s, m + s], static_beta [s, m], dynamic_beta_fn
    [d, m] -> (s, f = 1, v = m, how)."""
    sa, sb, db = shapes["static_alpha"], shapes["static_beta"], shapes.get("dynamic_beta_fn")
    s, m = sb
    if sa != (s, m + s) or db != (d, m):
        raise _fail(prefix, f"static_beta {sb} with static_alpha {sa} and dynamic_beta_fn {db} is not "
                    f"{FORM_CLASSES['multi-branch']}'s [s, m], [s, m + s], [d, m]", path)
    return s, 1, m, "shapes"


def _check_rest(
    cls: str,
    shapes: Mapping[str, tuple[int, ...]],
    dims: tuple[int, int, int, int, int],
    prefix: str,
    path: str | None,
) -> None:
    """InputError unless static_alpha factors as [s f, (v + s) f] with dims = (s, f, v, K, d), mHCv2's beta and
    the stream mix have their shapes, the class's scales are present and scalar, and no other tensor is there."""
    s, f, v, K, d = dims
    sa, sb, db = shapes["static_alpha"], shapes.get("static_beta"), shapes.get("dynamic_beta_fn")
    if s < 1 or s * f != sa[0] or (v + s) * f != K:
        raise _fail(prefix, f"static_alpha {sa} does not factor as [s f, (v + s) f]", path)
    if cls == "mhc-v2" and db is not None and db != (d, f):
        raise _fail(prefix, f"dynamic_beta_fn {db} is not mHCv2's [{d}, {f}]", path)
    mix = shapes.get("maybe_mix_streams.weight")
    if mix is not None and mix != (s, s, 1, 1):
        raise _fail(prefix, f"maybe_mix_streams.weight {mix} is not [{s}, {s}, 1, 1]", path)
    need = ["dynamic_alpha_scale"] if cls == "hc" else ["pre_branch_scale", "residual_scale"]
    if sb is not None or db is not None:
        need += ["static_beta", "dynamic_beta_fn", "dynamic_beta_scale" if cls == "hc" else "h_post_scale"]
    missing = [p for p in need if p not in shapes]
    if missing:
        raise _fail(prefix, f"missing {', '.join(missing)}", path)
    for p in need:
        if p in SCALAR_SHAPES and (math.prod(shapes[p]) != 1 or len(shapes[p]) > 1):
            raise _fail(prefix, f"{p} has shape {shapes[p]}, expected {SCALAR_SHAPES[p]}", path)
    extra = unknown_params(shapes, _HC_KEYS if cls == "hc" else _MHC_KEYS)
    if extra:
        raise _fail(prefix, f"unexpected tensors {', '.join(extra)} for a {_CLASSES[cls]} site", path)


def plan_site(
    shapes: Mapping[str, tuple[int, ...]],
    *,
    prefix: str = "",
    path: str | None = None,
    force_cls: str | None = None,
) -> SitePlan:
    """Identify a lucidrains site from its parameter shapes ``{param: shape}``; InputError if not one.

    The checks run in this order (the first failing one is reported): alpha and norm shapes
    (:func:`_alpha_dims`), the class (:func:`_site_class`), the split into streams / fractions / views
    (:func:`_split_streams`), then the remaining shapes and tensors (:func:`_check_rest`).
    """
    form = _key_form(shapes)
    meta = {k: torch.empty(v, device="meta") for k, v in shapes.items()}
    shapes = {k: tuple(t.shape) for k, t in _as_hc(form, meta, prefix, path).items()}
    R, K, d = _alpha_dims(shapes, prefix, path)
    cls = _site_class(shapes, force_cls, prefix, path)
    if form is None and cls == "hc" and len(shapes.get("static_beta", ())) == 2:
        form = "multi-branch"
        s, f, v, how = _branch_inputs(shapes, d, prefix, path)
    else:
        s, f, v, how = _split_streams(cls, shapes, R, K, d, prefix, path)
    _check_rest(cls, shapes, (s, f, v, K, d), prefix, path)
    return SitePlan(cls, s, f, v, d, how, form)


def build_site(
    plan: SitePlan,
    tensors: Mapping[str, torch.Tensor],
    *,
    tanh: bool = True,
    spec: SinkhornSpec | None = None,
) -> LucidrainsSite:
    """A :class:`LucidrainsSite` from a plan and the site's tensors (keys relative to the site); the mHC spec
    defaults to the library's (lucidrains, 20 iterations)."""
    keep = {k: v for k, v in tensors.items() if not k.startswith(IGNORED_SUBTREES)}
    keep = _as_hc(plan.form, keep, "", None)
    if spec is None:
        spec = SinkhornSpec(Convention.LUCIDRAINS, DEFAULT_ITERS, 0.0, source="default")
    module = LucidrainsSite(
        plan.cls,
        streams=plan.streams,
        fracs=plan.fracs,
        views=plan.views,
        tensors=keep,
        tanh=tanh,
        spec=None if plan.cls == "hc" else spec,
    )
    return module.eval()


def _is_lucidrains_group(shapes: Mapping[str, tuple[int, ...]]) -> bool:
    try:
        plan_site(shapes)
    except InputError:
        return False
    return True


def _detect(source: TensorSource) -> str | None:
    groups = site_prefixes(source.keys(), LEAF)
    if not groups:
        return None
    kinds: dict[str, str] = {}
    for prefix, group in groups.items():
        shapes = group_shapes(source, group)
        if not _is_lucidrains_group(shapes):
            return None
        kinds[prefix] = _CLASSES[plan_site(shapes).cls]
    what, sample = detect_summary(kinds)
    return f"found {len(groups)} hyper-connections sites ({what}) with {LEAF} [s f, K], e.g. {sample}.{LEAF}"


def _extra(options: LoadOptions, key: str) -> Any:
    return (options.extra or {}).get(key)


def _class_option(options: LoadOptions) -> str | None:
    """``extra["lucidrains_class"]`` (None: from the shapes); UsageError when not one of the classes."""
    force = _extra(options, "lucidrains_class")
    if force is not None and force not in _CLASSES:
        raise UsageError(
            f"lucidrains_class must be one of {', '.join(_CLASSES)}, got {force!r}", option="lucidrains_class"
        )
    return force


def _read_sites(
    source: TensorSource,
    groups: Mapping[str, Mapping[str, str]],
    notes: list[str],
    *,
    force: str | None,
    tanh: bool,
    spec: SinkhornSpec,
) -> tuple[list[Site], list[LucidrainsSite], list[SitePlan]]:
    """Plan, read and build every site in depth order: (sites, their modules, their plans); a note in ``notes``
    for each mHC v1 site with fractions."""
    sites: list[Site] = []
    modules: list[LucidrainsSite] = []
    plans: list[SitePlan] = []
    for i, (prefix, name, block, kind) in enumerate(name_sites(groups)):
        group = groups[prefix]
        plan = plan_site(group_shapes(source, group), prefix=prefix, path=source.path, force_cls=force)
        plans.append(plan)
        params = [p for p in group if not p.startswith(IGNORED_SUBTREES)]
        infos, tensors = read_site_tensors(source, group, params, prefix)
        module = build_site(plan, tensors, tanh=tanh, spec=spec)
        modules.append(module)
        sites.append(Site(i, name, block, kind, module.variant_name, module, infos))
        if plan.cls == "mhc" and plan.fracs > 1:
            notes.append(
                f"{name}: mHC with num_fracs={plan.fracs} runs Sinkhorn on a non-square alpha block "
                "(library behaviour, reproduced); its H_res is reported as unconstrained"
            )
    return sites, modules, plans


def _settings_notes(
    modules: list[LucidrainsSite],
    sk_src: dict[str, str],
    tanh_opt: Any,
    tanh: bool,
    settings: dict[str, str],
    notes: list[str],
) -> None:
    """The Sinkhorn settings' sources (any mHC site) and the HC tanh setting (any HC site), into ``settings``,
    with their notes."""
    if any(m.cls != "hc" for m in modules):
        settings.update(sk_src)
        if sk_src["convention"] == "default":
            notes.append(
                "Sinkhorn convention not stored in the checkpoint: assumed the library default "
                "(sinkhorn_knopps = lucidrains, 20 iterations); log_domain_sinkhorn=True (or mHCv2's "
                "triton kernel on CUDA) is --convention log: the two agree to rounding unless "
                "exp(logit - max) underflows (logit spread above ~87 in float32)"
            )
    if any(m.cls == "hc" for m in modules):
        settings["tanh"] = "cli" if tanh_opt is not None else "default"
        notes.append(
            f"HC sites: tanh {'applied' if tanh else 'not applied'} to the dynamic alpha / beta ("
            + ("--hc-tanh / --no-hc-tanh" if tanh_opt is not None else "the library default; HyperConnections("
               "tanh=...) is not stored in a state dict: --no-hc-tanh for tanh=False")
            + ")"
        )


def _shape_notes(sites: list[Site], modules: list[LucidrainsSite], plans: list[SitePlan], notes: list[str]) -> None:
    """Notes on proposals > 1, the package's other classes, fractions, the assumptions of the stream split, and
    the alpha orientation."""
    multi = [s.name for s, m in zip(sites, modules, strict=True) if m.proposals > 1 and m.sinkhorn is not None]
    if multi:
        notes.append(
            f"{len(multi)} site(s) with num_dynamic_alpha_proposals > 1 (e.g. {multi[0]}): H_res is the mean of "
            "the proposals' Sinkhorn projections, as the library mixes; the logit range is the widest proposal's; "
            "iterations-to-tolerance and convergence curves are not computed for them (no single logit matrix)"
        )
    forms: dict[str, list[str]] = {}
    for s, p in zip(sites, plans, strict=True):
        if p.form is not None:
            forms.setdefault(p.form, []).append(s.name)
    for form, names in forms.items():
        notes.append(f"{FORM_CLASSES[form]} at {len(names)} site(s) (e.g. {names[0]}): {_FORM_NOTES[form]}")
    if any(m.f > 1 for m in modules):
        notes.append("num_fracs > 1: a stream's fractions are treated as separate streams (n = s f, C = d/f)")
    for how in sorted({p.how for p in plans if p.how != "shapes"}):
        notes.append(f"no beta tensors at some sites: {how} when splitting static_alpha")
    notes.append("lucidrains stores alpha[input, output]: H_res = alpha_res^T (paper convention)")


def _load(source: TensorSource, options: LoadOptions) -> LoadedModel:
    """The lucidrains reader: key groups -> options (class, tanh, Sinkhorn) -> per site plan, read, build ->
    settings and notes -> the LoadedModel."""
    path = source.path
    groups = site_prefixes(source.keys(), LEAF)
    if not groups:
        raise InputError(
            f"no *.{LEAF} keys in {path}: not a hyper-connections checkpoint; pick another --layout",
            path=path,
        )
    force = _class_option(options)
    tanh_opt = _extra(options, "tanh")
    tanh = True if tanh_opt is None else bool(tanh_opt)
    spec, sk_src = sinkhorn_settings(options, Convention.LUCIDRAINS, DEFAULT_ITERS)
    notes: list[str] = []
    settings: dict[str, str] = {"n": "shapes", "C": "shapes", "class": "cli" if force else "shapes"}
    sites, modules, plans = _read_sites(source, groups, notes, force=force, tanh=tanh, spec=spec)
    _settings_notes(modules, sk_src, tanh_opt, tanh, settings, notes)
    _shape_notes(sites, modules, plans, notes)
    return grouped_model(source, "lucidrains", _detect, groups, sites, settings, notes)


LUCIDRAINS = register_layout(
    Layout(
        name="lucidrains",
        summary="hyper-connections (PyPI, lucidrains) HC / mHC / mHCv2: <path>.static_alpha [s f, K], "
        "dynamic_alpha_fn [d, K] or [p, d, K]",
        detect=_detect,
        load=_load,
        priority=50,
    )
)

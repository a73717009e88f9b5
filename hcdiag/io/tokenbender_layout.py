"""Layout ``tokenbender``: tokenbender's mHC (github.com/tokenbender/mHC-manifold-constrained-hyper-connections).

Dimension letters: n streams, C width of one stream, ... leading token dims.

The repository forks lucidrains' ``hyper-connections`` and adds a static mHC to it, in two versions that share
the key names (one site = one wrapped branch; keys under ``<path>.``):

* ``hyper_connections/hyper_connections.py``, ``HyperConnections(mhc=True)``: ``H_res_logits`` [n, n] (0 on the
  diagonal, -8 off it at init), ``H_pre_logits`` [n], ``H_post_logits`` [n]; the lucidrains HC tensors
  (static_alpha, dynamic_alpha_fn, ..., norm.gamma) are still created but unused when mhc=True.
* ``hyper_connections/hyper_connections_mhc.py``: ``H_pre_logits`` / ``H_post_logits`` [1, n] and an optional
  ``H_res_alpha_logit`` (``mhc_residual_identity_mix``): h_res = (1 - sigmoid(a)) I + sigmoid(a) S.

Forward (``width_connection``), code orientation logits[input s, output t]:

    S = sinkhorn_log(H_res_logits, iters=10, tau=0.05): Z = logits / tau, u, v = 0;
        iters x [u = -lse_t(Z + v), v = -lse_s(Z + u)];  S = exp(Z + u + v)
    residuals_out[t] = sum_s h_res[s, t] x[s]   ->  paper H_res = h_res^T
    H_pre = softmax(H_pre_logits), H_post = softmax(H_post_logits)  (static, no token dependence)

The u pass normalises each input's outputs (paper columns), the v pass each output's inputs (paper rows): the
pass order of hcdiag's ``paper`` convention (exp, columns then rows; paper rows exact), which hcdiag runs on the
paper-orientation logits H_res_logits^T / tau. The log domain and the exp domain agree to rounding in float64
while the tempered logits stay below ~709 (exp overflow); the temperature is part of the logits hcdiag reports,
so at the default tau the logit range is 8 / 0.05 = 160: far past float32's absorption (16.6) and underflow
(87.3) ranges, which is why an H_res initialised at the identity stays a near-permutation.

Neither tau nor the iteration count nor ``mhc_h_res_proj`` is stored in a state dict: tau comes from
``--temperature`` (``LoadOptions.extra["temperature"]``), else the checkpoint's metadata / config
(``mhc_tau`` / ``sinkhorn_tau``), else the library default 0.05; iterations from ``--iters``, metadata
(``mhc_num_iters`` / ``sinkhorn_iters``), else 10. ``mhc_h_res_proj = "orthostochastic"`` (Newton-Schulz) is
refused by name, stated in the metadata / config (exit 3) or as ``extra["tokenbender_proj"]`` (exit 2), since
hcdiag has no Newton-Schulz projection.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from hcdiag.enums import Convention, Exactness
from hcdiag.errors import InputError, UsageError
from hcdiag.io.base import Layout, LoadOptions, TensorSource, register_layout
from hcdiag.io.limits import MAX_ITERS, bounded
from hcdiag.io.reader import (
    cli_iters,
    cli_temperature,
    detect_groups,
    group_shapes,
    grouped_model,
    name_sites,
    read_site_tensors,
    site_prefixes,
)
from hcdiag.model import LoadedModel, Site
from hcdiag.site import HCOutput, SinkhornSpec, SiteModule

__all__ = ["DEFAULT_ITERS", "DEFAULT_TAU", "TOKENBENDER", "TokenbenderSite"]

DEFAULT_TAU = 0.05  # HyperConnections(sinkhorn_tau=0.05) / mhc_tau=0.05
DEFAULT_ITERS = 10  # sinkhorn_iters=10 / mhc_num_iters=10
LEAF = "H_res_logits"
_MHC_KEYS = {"H_res_logits", "H_pre_logits", "H_post_logits", "H_res_alpha_logit"}
# lucidrains HC parameters that HyperConnections(mhc=True) creates but does not use
_UNUSED_HC_KEYS = {
    "static_alpha", "dynamic_alpha_fn", "dynamic_alpha_scale", "static_beta", "dynamic_beta_fn",
    "dynamic_beta_scale", "norm.gamma",
}  # fmt: skip
_TAU_KEYS = ("mhc_tau", "sinkhorn_tau")
_PROJ_KEYS = ("mhc_h_res_proj",)
_ITER_KEYS = ("mhc_num_iters", "sinkhorn_iters")


class TokenbenderSite(SiteModule):
    """One tokenbender mHC site: static H_res / H_pre / H_post logits, log-domain Sinkhorn of logits / tau."""

    exactness = Exactness.SINKHORN
    res_params = ("H_res_logits", "H_res_alpha_logit")
    H_res_logits: torch.Tensor  # [n, n], [input s, output t]
    H_pre_logits: torch.Tensor  # [n]
    H_post_logits: torch.Tensor | None  # [n]; None when the site adds no branch output
    H_res_alpha_logit: torch.Tensor | None  # []; None without the identity mix

    def __init__(
        self,
        res: torch.Tensor,
        pre: torch.Tensor,
        post: torch.Tensor | None,
        alpha: torch.Tensor | None,
        *,
        C: int,
        tau: float,
        spec: SinkhornSpec,
    ) -> None:
        super().__init__()
        self.n = int(res.shape[-1])
        self.C = int(C)
        self.tau = float(tau)
        self.temperature = self.tau
        self.sinkhorn = spec
        self.register_buffer("H_res_logits", res)
        self.register_buffer("H_pre_logits", pre.reshape(self.n))
        self.register_buffer("H_post_logits", post.reshape(self.n) if post is not None else None)
        self.register_buffer("H_res_alpha_logit", alpha.reshape(()) if alpha is not None else None)

    def res_logits(self, x: torch.Tensor) -> torch.Tensor:
        """Paper-orientation tempered logits H_res_logits^T / tau, broadcast over x [..., n, C]'s leading dims."""
        z = self.H_res_logits.transpose(-1, -2) / self.tau
        return z.expand(*x.shape[:-2], self.n, self.n).to(x.dtype if x.is_floating_point() else z.dtype)

    def res_from_logits(self, logits: torch.Tensor, spec: SinkhornSpec | None = None) -> torch.Tensor:
        """H_res [..., n, n]: Sinkhorn of the tempered logits, then the identity mix when the site has one."""
        from hcdiag.sinkhorn import project  # lazy: keeps the reader light

        S = project(logits, spec if spec is not None else self.sinkhorn)  # type: ignore[arg-type]
        if self.H_res_alpha_logit is None:
            return S
        a = torch.sigmoid(self.H_res_alpha_logit.to(S.dtype))
        eye = torch.eye(self.n, dtype=S.dtype, device=S.device)
        return (1 - a) * eye + a * S

    def forward(self, x: torch.Tensor) -> HCOutput:
        """x [..., n, C] -> H_pre, H_post [..., n] (softmax of the static logits), H_res [..., n, n]."""
        lead = x.shape[:-2]
        dt = self.H_res_logits.dtype
        pre = torch.softmax(self.H_pre_logits, dim=-1).expand(*lead, self.n)
        if self.H_post_logits is None:
            post = torch.zeros(*lead, self.n, dtype=dt)
        else:
            post = torch.softmax(self.H_post_logits, dim=-1).expand(*lead, self.n)
        return HCOutput(pre, post, self.res_from_logits(self.res_logits(x.to(dt))))

    def extra_repr(self) -> str:
        return f"n={self.n}, C={self.C}, tau={self.tau}, identity_mix={self.H_res_alpha_logit is not None}"


def _fail(prefix: str, why: str, path: str) -> InputError:
    return InputError(
        f"{path}: tokenbender mHC site {prefix.rstrip('.') or '(top level)'}: {why}; write a layout file "
        "(--layout-file) if this is another codebase",
        path=path,
    )


def _check_site(shapes: dict[str, tuple[int, ...]], prefix: str, path: str) -> int:
    """n of one site from its shapes; InputError naming the tensor that does not fit."""
    res = shapes[LEAF]
    if len(res) != 2 or res[0] != res[1] or res[0] < 1:
        raise _fail(prefix, f"H_res_logits is {list(res)}, not a square [n, n]", path)
    n = res[0]
    for key, need in (("H_pre_logits", True), ("H_post_logits", False)):
        shape = shapes.get(key)
        if shape is None:
            if need:
                raise _fail(prefix, "has H_res_logits but no H_pre_logits", path)
            continue
        if shape not in ((n,), (1, n)):
            raise _fail(prefix, f"{key} is {list(shape)}, expected [{n}] or [1, {n}]", path)
    alpha = shapes.get("H_res_alpha_logit")
    if alpha is not None and math.prod(alpha) != 1:
        raise _fail(prefix, f"H_res_alpha_logit is {list(alpha)}, expected a scalar", path)
    extra = sorted(k for k in shapes if k not in _MHC_KEYS | _UNUSED_HC_KEYS and not k.startswith("branch."))
    if extra:
        raise _fail(prefix, f"unexpected tensors {', '.join(extra)} next to H_res_logits", path)
    return n


def _groups(source: TensorSource) -> dict[str, dict[str, str]]:
    return site_prefixes(source.keys(), leaf=LEAF)


def _detect(source: TensorSource) -> str | None:
    return detect_groups(source, _groups(source), _check_site,
                         "found {count} tokenbender mHC sites with H_res_logits [n, n], e.g. {first}.H_res_logits")


def _stated(source: TensorSource, keys: tuple[str, ...]) -> tuple[Any, str] | None:
    """The first of ``keys`` in the checkpoint's metadata, else its config (incl. a nanoGPT model_args)."""
    meta = source.metadata or {}
    for k in keys:
        if k in meta:
            return meta[k], f"metadata ({k})"
    cfg: dict[str, Any] = source.config if isinstance(source.config, dict) else {}
    args = cfg.get("model_args")
    for where in (cfg, args if isinstance(args, dict) else {}):
        for k in keys:
            if k in where:
                return where[k], f"config ({k})"
    return None


def _number(value: Any, what: str, where: str, path: str, *, integer: bool) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        v = math.nan
    ok = math.isfinite(v) and v > 0 and (not integer or v.is_integer())
    if not ok:
        raise InputError(f"{path}: {where} gives {what} = {value!r}; expected a positive "
                         f"{'integer' if integer else 'number'}", path=path)
    return v


def _temperature(source: TensorSource, options: LoadOptions) -> tuple[float, str]:
    tau = cli_temperature(options)
    if tau is not None:
        return tau, "cli (--temperature)"
    stated = _stated(source, _TAU_KEYS)
    if stated is not None:
        return _number(stated[0], "tau", stated[1], source.path, integer=False), stated[1]
    return DEFAULT_TAU, f"default (tau={DEFAULT_TAU}, the library's)"


def _spec(source: TensorSource, options: LoadOptions) -> tuple[SinkhornSpec, dict[str, str]]:
    """The library's Sinkhorn (paper pass order, no eps; iterations as stated, else 20), then the options."""
    from hcdiag.sinkhorn import effective_spec

    cli = cli_iters(options)
    src = {"convention": "default (log-domain u/v = paper's pass order)", "eps": "default (no eps)"}
    if (stated := _stated(source, _ITER_KEYS)) is not None:
        iters = int(_number(stated[0], "iterations", stated[1], source.path, integer=True))
        if cli is None:
            bounded(iters, MAX_ITERS, f"{stated[1]} Sinkhorn iterations", source.path, override="--iters")
        src["iters"] = stated[1]
    else:
        iters, src["iters"] = DEFAULT_ITERS, f"default ({DEFAULT_ITERS}, the library's)"
    base = SinkhornSpec(Convention.PAPER, iters, 0.0, source=src["iters"].split(" ")[0])
    return effective_spec(base, iters=cli, convention=options.convention, sources=src, option="--convention")


def _refuse_other_projection(source: TensorSource, options: LoadOptions) -> None:
    """UsageError for ``extra["tokenbender_proj"]``, InputError for a checkpoint whose metadata / config states
    ``mhc_h_res_proj``, when it is not the Sinkhorn projection (Newton-Schulz "orthostochastic")."""
    proj = (options.extra or {}).get("tokenbender_proj")
    if proj not in (None, "sinkhorn"):
        raise UsageError(
            f"mhc_h_res_proj={proj!r} (Newton-Schulz orthostochastic) is not reproduced by hcdiag; only the "
            "Sinkhorn projection is",
            option="tokenbender_proj",
        )
    stated = _stated(source, _PROJ_KEYS)
    if stated is not None and stated[0] != "sinkhorn":
        raise InputError(
            f"{source.path}: {stated[1]} says mhc_h_res_proj={stated[0]!r}: H_res is not a Sinkhorn projection "
            "there (Newton-Schulz orthostochastic), which hcdiag does not reproduce; only Sinkhorn checkpoints "
            "can be analysed",
            path=source.path,
        )


def _load(source: TensorSource, options: LoadOptions) -> LoadedModel:
    path = source.path
    groups = _groups(source)
    if not groups:
        raise InputError(f"{path}: no *.H_res_logits keys: not a tokenbender mHC checkpoint", path=path)
    _refuse_other_projection(source, options)
    tau, tau_src = _temperature(source, options)
    spec, settings = _spec(source, options)
    settings = {"n": "shapes", "C": "shapes (width of the first unused norm.gamma, else 1)", **settings,
                "temperature": tau_src}
    sites: list[Site] = []
    unused = 0
    for i, (prefix, name, block, kind) in enumerate(name_sites(groups)):
        group = groups[prefix]
        shapes = group_shapes(source, group)
        _check_site(shapes, prefix, path)
        params = sorted(p for p in group if p in _MHC_KEYS)
        unused += sum(1 for p in group if p in _UNUSED_HC_KEYS)
        infos, t = read_site_tensors(source, group, params, prefix)
        C = shapes["norm.gamma"][0] if "norm.gamma" in shapes else 1
        module = TokenbenderSite(t[LEAF], t["H_pre_logits"], t.get("H_post_logits"), t.get("H_res_alpha_logit"),
                                 C=C, tau=tau, spec=spec).eval()
        sites.append(Site(i, name, block, kind, "tokenbender-mhc", module, infos))
    notes = [
        f"tokenbender mHC: H_res = Sinkhorn(H_res_logits^T / tau) with tau = {tau:g} ({tau_src}), "
        f"{spec.iters} iterations; the logits hcdiag reports are the tempered ones (logit range = stored range "
        f"/ tau)",
        "tokenbender iterates u / v in the log domain with the pass order of --convention paper (columns, then "
        "rows: paper rows exact); equal to rounding in float64 while the tempered logits stay below ~709",
        "H_res_logits is stored as [input, output]: H_res = h_res^T (paper convention); H_pre / H_post are "
        "softmaxes of static logits (the same at every token)",
    ]
    if any(s.module.H_res_alpha_logit is not None for s in sites):
        notes.append("H_res_alpha_logit: H_res = (1 - sigmoid(a)) I + sigmoid(a) S (identity mix), as the module")
    if unused:
        notes.append(f"{unused} lucidrains HC tensors (static_alpha, dynamic_alpha_fn, ...) are stored next to "
                     "H_res_logits but unused by HyperConnections(mhc=True): ignored")
    if "norm.gamma" not in next(iter(groups.values())):
        notes.append("C is not stored (static mHC has no width-dependent tensor): reported as 1")
    model = grouped_model(source, "tokenbender", _detect, groups, sites, settings, notes)
    model.metadata.setdefault("family", "tokenbender mHC")
    return model


TOKENBENDER = register_layout(
    Layout(
        name="tokenbender",
        summary="tokenbender's mHC (lucidrains fork): <path>.H_res_logits [n, n], H_pre_logits, H_post_logits",
        detect=_detect,
        load=_load,
        priority=40,
    )
)

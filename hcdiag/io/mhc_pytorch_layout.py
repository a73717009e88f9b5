"""Layout ``mhc-pytorch``: ``ManifoldHyperConnections`` of the PyPI package mhc-pytorch (0.2.x, ``mhc/``).

Dimension letters: n streams (``num_streams``), C width (``dim``), ... leading token dims.

Keys per site (one wrapped block; keys under ``<path>.``)::

    phi_pre.{weight [n, nC], bias [n]}   phi_post.{weight [n, nC], bias [n]}   phi_res.{weight [n^2, nC], bias [n^2]}
    alpha_pre / alpha_post / alpha_res [1]   b_pre [n]   b_post [n]   b_res [n, n]
    norm.weight [C]   (an nn.RMSNorm the forward never calls)   block.*  (the wrapped branch, not HC)

Forward (``mhc/hyper_connection.py``; the paper form, mHC Eqs. 7-8, with biases on the phi projections):

    x' = F.rms_norm(vec(x), (nC,))         unweighted, eps = torch's default: finfo(dtype).eps
    H_pre  = sigmoid(alpha_pre (phi_pre(x')) + b_pre)        H_post = 2 sigmoid(alpha_post (phi_post(x')) + b_post)
    H_res  = apply_sinkhorn_knopp(alpha_res phi_res(x').view(n, n) + b_res)
    mixed_streams = H_res @ x_l                              -> already paper convention (row = output stream)

``apply_sinkhorn_knopp``: exp(logits), then 20 x (rows, then columns), no eps, no max subtraction: the last
pass normalises paper columns. hcdiag's ``log`` convention makes the same passes in the same order in the log
domain (equal to rounding while exp does not overflow, logits < 88.7 in float32): its default here.
``--convention paper`` runs columns first and rows last, which moves the whole error to the other axis.

The package expands its single-stream input into n copies at every site and collapses them at the end of the
same site (mean, or ``collapse_mode="weighted"``: H_pre-weighted): its streams never persist across sites, so
the depth products of ``gain-sweep`` describe the maps, not this package's network (a note says so).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from hcdiag.enums import Convention, Exactness
from hcdiag.errors import InputError
from hcdiag.io.base import Layout, LoadOptions, TensorSource, register_layout
from hcdiag.io.reader import (
    detect_groups,
    group_shapes,
    grouped_model,
    name_sites,
    read_site_tensors,
    sinkhorn_settings,
    site_prefixes,
)
from hcdiag.io.source import torch_dtype_of
from hcdiag.model import LoadedModel, Site
from hcdiag.site import HCOutput, SinkhornSpec, SiteModule

__all__ = ["DEFAULT_ITERS", "MHC_PYTORCH", "PARAMS", "MhcPytorchSite"]

DEFAULT_ITERS = 20  # apply_sinkhorn_knopp(iters=20)
LEAF = "phi_res.weight"
PARAMS = (
    "phi_pre.weight", "phi_pre.bias", "phi_post.weight", "phi_post.bias", "phi_res.weight", "phi_res.bias",
    "alpha_pre", "alpha_post", "alpha_res", "b_pre", "b_post", "b_res",
)  # fmt: skip
_IGNORED = ("norm.weight",)  # stored, never used by the forward


class MhcPytorchSite(SiteModule):
    """One ``ManifoldHyperConnections`` site, computing in its buffers' dtype; paper convention throughout."""

    exactness = Exactness.SINKHORN
    res_params = ("phi_res.weight", "phi_res.bias", "alpha_res", "b_res")
    # buffers: the package's parameters, dots as underscores
    phi_pre_weight: torch.Tensor
    phi_pre_bias: torch.Tensor
    phi_post_weight: torch.Tensor
    phi_post_bias: torch.Tensor
    phi_res_weight: torch.Tensor
    phi_res_bias: torch.Tensor
    alpha_pre: torch.Tensor
    alpha_post: torch.Tensor
    alpha_res: torch.Tensor
    b_pre: torch.Tensor
    b_post: torch.Tensor
    b_res: torch.Tensor

    def __init__(self, t: dict[str, torch.Tensor], *, n: int, C: int, norm_eps: float, spec: SinkhornSpec) -> None:
        super().__init__()
        self.n, self.C = int(n), int(C)
        self.norm_eps = float(norm_eps)
        self.sinkhorn = spec
        for key in PARAMS:
            self.register_buffer(key.replace(".", "_"), t[key])

    def _normed(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-2:] != (self.n, self.C):
            raise ValueError(f"expected stream input [..., {self.n}, {self.C}], got {list(x.shape)}")
        flat = x.to(self.phi_res_weight.dtype).flatten(-2)
        return F.rms_norm(flat, (self.n * self.C,), eps=self.norm_eps)

    def res_logits(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., n, C] -> alpha_res phi_res(x') + b_res [..., n, n] (paper orientation, row = output)."""
        z = F.linear(self._normed(x), self.phi_res_weight, self.phi_res_bias)
        return self.alpha_res * z.unflatten(-1, (self.n, self.n)) + self.b_res

    def res_from_logits(self, logits: torch.Tensor, spec: SinkhornSpec | None = None) -> torch.Tensor:
        from hcdiag.sinkhorn import project  # lazy: keeps the reader light

        return project(logits, spec if spec is not None else self.sinkhorn)  # type: ignore[arg-type]

    def forward(self, x: torch.Tensor) -> HCOutput:
        """x [..., n, C] -> H_pre, H_post [..., n], H_res [..., n, n]."""
        xn = self._normed(x)
        pre = torch.sigmoid(self.alpha_pre * F.linear(xn, self.phi_pre_weight, self.phi_pre_bias) + self.b_pre)
        post = 2 * torch.sigmoid(self.alpha_post * F.linear(xn, self.phi_post_weight, self.phi_post_bias) + self.b_post)
        return HCOutput(pre, post, self.res_from_logits(self.res_logits(x)))

    def extra_repr(self) -> str:
        return f"n={self.n}, C={self.C}, norm_eps={self.norm_eps:g}"


def _fail(prefix: str, why: str, path: str) -> InputError:
    return InputError(
        f"{path}: mhc-pytorch site {prefix.rstrip('.') or '(top level)'}: {why}; write a layout file "
        "(--layout-file) if this is another codebase",
        path=path,
    )


def _check_site(shapes: dict[str, tuple[int, ...]], prefix: str, path: str) -> tuple[int, int]:
    """(n, C) of one site from its shapes; InputError naming the tensor that does not fit."""
    missing = [p for p in PARAMS if p not in shapes]
    if missing:
        raise _fail(prefix, f"missing {', '.join(missing)}", path)
    rows, cols = shapes[LEAF] if len(shapes[LEAF]) == 2 else (0, 0)
    n = shapes["b_pre"][0] if len(shapes["b_pre"]) == 1 else 0
    if n < 1 or rows != n * n or cols % n or cols == 0:
        raise _fail(prefix, f"phi_res.weight {list(shapes[LEAF])} and b_pre {list(shapes['b_pre'])} are not "
                    "[n^2, nC] and [n]", path)
    C = cols // n
    want = {
        "phi_pre.weight": (n, n * C), "phi_pre.bias": (n,), "phi_post.weight": (n, n * C), "phi_post.bias": (n,),
        "phi_res.bias": (n * n,), "alpha_pre": (1,), "alpha_post": (1,), "alpha_res": (1,), "b_post": (n,),
        "b_res": (n, n),
    }  # fmt: skip
    for key, shape in want.items():
        if shapes[key] != shape:
            raise _fail(prefix, f"{key} is {list(shapes[key])}, expected {list(shape)}", path)
    extra = sorted(k for k in shapes if k not in PARAMS + _IGNORED and not k.startswith("block."))
    if extra:
        raise _fail(prefix, f"unexpected tensors {', '.join(extra)}", path)
    return n, C


def _groups(source: TensorSource) -> dict[str, dict[str, str]]:
    groups = site_prefixes(source.keys(), leaf=LEAF)
    # phi_res.weight is unique enough only together with the paper-form scalars: a group without them is not ours
    return {p: g for p, g in groups.items() if "alpha_res" in g and "b_res" in g}


def _detect(source: TensorSource) -> str | None:
    return detect_groups(
        source, _groups(source), _check_site,
        "found {count} mhc-pytorch sites with phi_res / alpha_res / b_res, e.g. {first}.phi_res.weight",
    )


def _load(source: TensorSource, options: LoadOptions) -> LoadedModel:
    path = source.path
    groups = _groups(source)
    if not groups:
        raise InputError(f"{path}: no <path>.phi_res.weight with alpha_res and b_res: not an mhc-pytorch "
                         "checkpoint", path=path)
    spec, sk_src = sinkhorn_settings(options, Convention.LOG, DEFAULT_ITERS)
    settings = {"n": "shapes", "C": "shapes", **sk_src}
    sites: list[Site] = []
    for i, (prefix, name, block, kind) in enumerate(name_sites(groups)):
        group = groups[prefix]
        n, C = _check_site(group_shapes(source, group), prefix, path)
        infos, t = read_site_tensors(source, group, list(PARAMS), prefix)
        stored = torch_dtype_of(source.info(group[LEAF]).dtype) or torch.float32
        module = MhcPytorchSite(t, n=n, C=C, norm_eps=torch.finfo(stored).eps, spec=spec).eval()
        sites.append(Site(i, name, block, kind, "mhc-pytorch", module, infos))
    notes = [
        "mhc-pytorch: exp(logits), then rows, then columns (20 passes each, no eps): hcdiag's log convention makes "
        "the same passes in the same order (paper columns exact); --convention paper would run columns first",
        "RMSNorm of the flattened streams with torch's default eps (finfo of the stored dtype); norm.weight is "
        "stored but never used by the package's forward",
        "mhc-pytorch expands its input into n copies and collapses them at the end of every site (mean or "
        "H_pre-weighted): the streams do not persist across sites, so gain-sweep's depth products describe the "
        "sites' maps, not the package's network",
    ]
    if sk_src["convention"] == "default":
        notes.append("Sinkhorn iterations are not stored: assumed the package's 20")
    model = grouped_model(source, "mhc-pytorch", _detect, groups, sites, settings, notes)
    model.metadata.setdefault("family", "mhc-pytorch")
    return model


MHC_PYTORCH = register_layout(
    Layout(
        name="mhc-pytorch",
        summary="mhc-pytorch (PyPI) ManifoldHyperConnections: <path>.phi_{pre,post,res}, alpha_*, b_*",
        detect=_detect,
        load=_load,
        priority=40,
    )
)

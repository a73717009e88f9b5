"""The interface every hyper-connection site module implements.

Dimension letters used throughout hcdiag:
    L  sites (HC sub-layers; a block has two: attn, ffn)     n  streams
    C  width of one stream                                   T  tokens (any leading dims ...)

Everything a site returns is in *paper convention* (SPEC section 1): row i of H_res says how output stream i
is made from the input streams; x_{l+1} = H_res x_l + H_post^T F(H_pre x_l).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import NamedTuple

import torch

from hcdiag.enums import Convention, Exactness


class HCOutput(NamedTuple):
    """H_pre [..., n], H_post [..., n], H_res [..., n, n], paper convention."""

    pre: torch.Tensor
    post: torch.Tensor
    res: torch.Tensor


class SiteEval(NamedTuple):
    """One evaluation of a site on tokens (:meth:`SiteModule.evaluate`): H_pre [..., n], H_post [..., n], the
    H_res logits (:meth:`SiteModule.res_logits`' output, None where the site has none) and H_res [..., n, n]
    itself where it came at no extra cost (None only when ``logits`` is given: project them)."""

    pre: torch.Tensor
    post: torch.Tensor
    logits: torch.Tensor | None
    res: torch.Tensor | None


@dataclass(frozen=True)
class LinearRead:
    """How a site reads its input, when it does so only through z = RMSNorm(vec(x)) W^T: ``weight`` W [k, nC]
    (in the site's dtype) and the unweighted RMSNorm's ``eps``, RMSNorm(v) = v rsqrt(mean(v^2) + eps) over the
    nC entries of vec(x). Then H_pre, H_post and H_res are functions of z alone
    (:meth:`SiteModule.evaluate_read`), which lets a probe draw z directly (:mod:`hcdiag.probes`)."""

    weight: torch.Tensor
    eps: float


@dataclass(frozen=True)
class SinkhornSpec:
    """How a Sinkhorn site projects its logits, and where each setting came from."""

    convention: Convention
    iters: int
    eps: float = 0.0  # transformers' hc_eps; 0 for conventions without eps
    source: str = "default"  # "default", "metadata", "config", "cli", ...


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None = None, eps: float = 1e-6) -> torch.Tensor:
    """x * rsqrt(mean(x^2) + eps) * weight over the last dim (mHC Eq. 7's RMSNorm; unweighted if no weight).

    The one RMSNorm of the sites that normalise by hand (the registry variants, the transformers family's
    flattened norm, Qwen4-Exp's grouped norm, layout files): the same ops, in the same order, as those
    libraries' own. eps = 1e-6 as transformers' DeepSeek-V4 ``rms_norm_eps``; x = 0 maps to 0, so a zero probe
    leaves the biases alone.
    """
    y = x * torch.rsqrt(x.square().mean(-1, keepdim=True) + eps)
    return y if weight is None else y * weight


def l2_rms_norm(x: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
    """hyper-connections' (lucidrains) RMSNorm over the last dim, width d: F.normalize(x) sqrt(d) (gamma + 1), the
    same ops as the library's ``RMSNorm`` (per stream there, over vec(x) in the nanoGPT reference repos)."""
    return torch.nn.functional.normalize(x, dim=-1) * (x.shape[-1] ** 0.5) * (gamma + 1)


def res_tensor_keys(module: SiteModule, keys: list[str]) -> list[str]:
    """The stored keys among ``keys`` (one site's tensors) behind ``module.res_params``: a key matches a name
    when its last dotted part is the name or ends in ``_<name>`` (``hc_attn_fn`` for ``fn``)."""
    names = module.res_params
    out = []
    for k in keys:
        last = k.rsplit(".", 1)[-1]
        if any(last == p or last.endswith("_" + p) for p in names):
            out.append(k)
    return out


class SiteModule(torch.nn.Module):
    """Base class of every variant / layout module.

    Subclasses set ``n``, ``C``, ``exactness`` (an :class:`Exactness`), ``sinkhorn`` (a :class:`SinkhornSpec`
    for Sinkhorn sites, else None) and implement :meth:`forward` and :meth:`res_logits`.
    """

    n: int
    C: int
    exactness: Exactness = Exactness.UNCONSTRAINED
    sinkhorn: SinkhornSpec | None = None
    #: Logits per :meth:`res_from_logits` call that suit this projection when many matrices are built at once
    #: (gain-sweep): small enough that the temporaries of elementwise passes (Sinkhorn) stay in cache and are
    #: recycled by the allocator; a projection that loops in Python over entries wants larger calls.
    projection_batch: int = 1 << 18
    #: Names of this module's own parameters / buffers that the H_res logits are computed from, so that reports
    #: can name the checkpoint's stored tensors behind a finding (see :func:`res_tensor_keys`).
    res_params: tuple[str, ...] = ()
    #: Sinkhorn temperature tau that :meth:`res_logits` already divides by (tokenbender's mHC: logits / tau), so
    #: reports can say where a logit range comes from; None where the codebase has no temperature.
    temperature: float | None = None

    def forward(self, x: torch.Tensor) -> HCOutput:  # x: [..., n, C]
        raise NotImplementedError

    @staticmethod
    def _compute_dtype(x: torch.Tensor, like: torch.Tensor) -> torch.dtype:
        """The dtype a site computes x in: x's promoted with its parameters' (``like``), float64 for integer x."""
        dt = torch.promote_types(x.dtype, like.dtype)
        return dt if dt.is_floating_point else torch.float64

    def _param_in(self, name: str, dt: torch.dtype) -> torch.Tensor:
        """Parameter / buffer ``name`` in ``dt``."""
        return getattr(self, name).to(dt)

    def in_dtype(self, dtype: torch.dtype) -> SiteModule:
        """This site computing in ``dtype``: itself when every floating parameter and buffer already has that
        dtype, else a converted deep copy, so a loaded model is never modified. The one cast path of every
        command (stochasticity, gain-sweep --from, ...). Subclasses compute in their parameters' dtype; one
        without floating parameters computes in its input's dtype."""
        floats = [t for t in (*self.parameters(), *self.buffers()) if t.is_floating_point()]
        if all(t.dtype == dtype for t in floats):
            return self
        return copy.deepcopy(self).to(dtype)

    def evaluate(self, x: torch.Tensor) -> SiteEval:
        """H_pre, H_post and the H_res logits (or H_res) of x [..., n, C] in one call: what a command that needs
        all three asks for. This default calls :meth:`res_logits` and :meth:`forward`; a site that normalises and
        projects x once for all three overrides it."""
        logits = self.res_logits(x)
        out = self.forward(x)
        return SiteEval(out.pre, out.post, logits, out.res)

    def branch_input(self, x: torch.Tensor, pre: torch.Tensor) -> torch.Tensor:
        """The input the layer's branch F reads, [..., C], for streams x [..., n, C] and this site's H_pre
        [..., n] of x: H_pre x (mHC Eq. 3). A site whose branch input is not a stream-weighted sum overrides it
        (``verify`` compares it with the branch input a live module produced)."""
        return (pre.unsqueeze(-1) * x).sum(-2)

    def linear_read(self) -> LinearRead | None:
        """W and eps where this site reads x only through z = RMSNorm(vec(x)) W^T (:class:`LinearRead`), else
        None (the default: no such structure is claimed)."""
        return None

    def evaluate_read(self, z: torch.Tensor) -> SiteEval:
        """:meth:`evaluate` from the read values z = RMSNorm(vec(x)) W^T [..., k] instead of x, for a site whose
        :meth:`linear_read` is not None: ``evaluate_read(z(x)) == evaluate(x)``."""
        raise NotImplementedError(f"{type(self).__name__} has no linear read")

    def res_logits(self, x: torch.Tensor) -> torch.Tensor | None:
        """Pre-projection logits that H_res is computed from, for x [..., n, C].

        Sinkhorn sites: [..., n, n] in paper orientation (row = output stream), before any exp/softmax.
        mHC-lite / KromHC: the permutation-weight logits [..., k]. TBP: the chart logits [..., n-1, n-1].
        Identity / unconstrained static: None.
        """
        return None

    def res_from_logits(self, logits: torch.Tensor, spec: SinkhornSpec | None = None) -> torch.Tensor:
        """H_res [..., n, n] (paper convention) from :meth:`res_logits`' output.

        Sinkhorn sites project with ``spec`` (default: ``self.sinkhorn``); other sites ignore ``spec``.
        """
        raise NotImplementedError

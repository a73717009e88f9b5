"""The site module of the nanoGPT-based reference code of mHC-lite, KromHC and TBP-mHC (read by the ``nanogpt``
layout, :mod:`hcdiag.io.nanogpt_layout`, which documents the keys and how the variant is told apart).

Dimension letters: n streams, C width of one stream, v input views (1 in every released config), R H_res
logits (n! for mHC-lite, S = sum_k i_k! for KromHC), T tokens (any leading dims ...).

Forward math, per token (code orientation alpha[input, output]; paper H_res = alpha_res^T):

    x' = F.normalize(vec(x)) * sqrt(nC) * (gamma + 1);   w = x' @ dynamic_alpha_fn
    mHC / TBP: alpha = mat_{n x (v+n)}(w) * [pre_branch_scale x v | residual_scale x n] + static_alpha
        H_pre^T = sigmoid(alpha[:, :v]);  logits = alpha[:, v:]
        mHC:  alpha_res = log-domain Sinkhorn(logits) (lse over dim -2 = input, then -1; 20 iterations)
        TBP:  alpha_res = (1 - d) chart(logits[:n-1, :n-1]) + d J/n,  d = sigmoid(delta_logit) if stored
    mHC-lite / KromHC: w = [w_pre (v n) | w_res (R)],  static_alpha = [b_pre | b_res]
        H_pre^T = sigmoid(pre_branch_scale * w_pre + b_pre) as [n, v];  c = residual_scale * w_res + b_res
        mHC-lite: alpha_res = sum_k softmax(c)_k P_k, P_k = eye[perm_k] (itertools order),
                  so H_res = sum_k a_k P_k^T
        KromHC:   alpha_res = U_0 (x) U_1 (x) ... (factor 0 leftmost), 2x2 U_k = [[p, 1-p], [1-p, p]],
                  p = softmax(c[2k:2k+2])_0  (symmetric, so H_res = alpha_res); computed here as every
                  factor is, sum_j softmax(c)_j Q_j, whose 1 - p entry is softmax(c)_1 (equal up to rounding)
    H_post = 2 sigmoid(h_post_scale * (x' @ dynamic_beta_fn) + static_beta)
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import nn

from hcdiag.enums import Exactness
from hcdiag.errors import UsageError
from hcdiag.io.lucidrains_layout import SCALAR_SHAPES, ParamHolder
from hcdiag.site import HCOutput, SinkhornSpec, SiteModule, l2_rms_norm
from hcdiag.variants import tbp_chart, tbp_smooth
from hcdiag.variants._common import batched_kron
from hcdiag.variants.mhc_lite import bvn_combination

__all__ = ["VARIANTS", "RefSite", "factorize_into_twos"]

VARIANTS = ("mhc", "mhc-lite", "kromhc", "tbp")


# ----------------------------------------------------------------------------------------------------------
# H_res constructions: the variants' own (hcdiag.variants), which follow the same reference code


def factorize_into_twos(n: int) -> tuple[int, ...]:
    """KromHC's ``factorize_into_twos``: all factors 2, then the odd remainder (> 1) if any; () for n = 1.
    (Not hcdiag's default KromHC factors, the prime factorisation: they differ for odd n with several primes.)"""
    out = []
    while n % 2 == 0 and n > 1:
        out.append(2)
        n //= 2
    if n > 1:
        out.append(n)
    return tuple(out)


# ----------------------------------------------------------------------------------------------------------
# The site module


class RefSite(SiteModule):
    """One site of the nanoGPT reference repos (mHC, mHC-lite, KromHC, TBP-mHC), reproducing their H_res.

    x: [..., n, C]. forward returns paper convention: H_res [..., n, n] = alpha_res^T, H_pre [..., n] (v = 1)
    or [..., v, n], H_post [..., n] (zeros without beta tensors). Parameters keep the reference names.
    res_logits: mHC [..., n, n] Sinkhorn logits (paper orientation); TBP [..., n-1, n-1] chart logits (paper
    orientation, i.e. the transposed block: the chart commutes with transposition); mHC-lite [..., n!] and
    KromHC [..., S] permutation-weight logits.
    """

    static_alpha: nn.Parameter
    dynamic_alpha_fn: nn.Parameter
    norm: ParamHolder
    delta_logit: nn.Parameter | None
    res_params = ("static_alpha", "dynamic_alpha_fn", "residual_scale")

    def __init__(
        self,
        variant: str,
        *,
        n: int,
        views: int,
        tensors: Mapping[str, torch.Tensor],
        spec: SinkhornSpec | None = None,
    ) -> None:
        super().__init__()
        if variant not in VARIANTS:
            raise ValueError(f"unknown reference variant {variant!r}")
        self.variant_name = variant
        self.n, self.v = n, views
        t = dict(tensors)
        self.norm = ParamHolder(gamma=t.pop("norm.gamma"))
        self.C = int(self.norm.param("gamma").numel()) // n
        delta = t.pop("delta_logit", None)
        self.delta_logit = None if delta is None else nn.Parameter(delta.reshape(()))
        for name, value in t.items():
            setattr(self, name, nn.Parameter(value.reshape(SCALAR_SHAPES[name]) if name in SCALAR_SHAPES else value))
        self.has_beta = "static_beta" in t
        self.factors = list(factorize_into_twos(n)) if variant == "kromhc" else []
        if variant == "mhc":
            self.exactness, self.sinkhorn = Exactness.SINKHORN, spec
        else:
            self.exactness, self.sinkhorn = Exactness.EXACT, None

    def _dtype(self, x: torch.Tensor) -> torch.dtype:
        return self._compute_dtype(x, self.dynamic_alpha_fn)

    def _normed(self, x: torch.Tensor, dt: torch.dtype) -> torch.Tensor:
        flat = x.to(dt).reshape(*x.shape[:-2], self.n * self.C)
        return l2_rms_norm(flat, self.norm.param("gamma").to(dt))

    def _logits(self, normed: torch.Tensor, dt: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(pre logits [..., n, v], H_res logits: code [..., n, n] (mHC, TBP) or weights logits [..., R])."""
        n, v = self.n, self.v
        w = normed @ self._param_in("dynamic_alpha_fn", dt)
        static = self._param_in("static_alpha", dt)
        pre_s, res_s = self._param_in("pre_branch_scale", dt), self._param_in("residual_scale", dt)
        if static.ndim == 2:
            w = w.reshape(*w.shape[:-1], n, v + n)
            alpha = w * torch.cat([pre_s.expand(v), res_s.expand(n)]) + static
            return alpha[..., :v], alpha[..., v:]
        pre = pre_s * w[..., : v * n] + static[: v * n]
        return pre.reshape(*pre.shape[:-1], n, v), res_s * w[..., v * n :] + static[v * n :]

    def _paper_res(self, logits: torch.Tensor) -> torch.Tensor:
        """Paper H_res from the reference's non-Sinkhorn logits: TBP code [..., n, n] (the chart of the
        code-orientation block, transposed), mHC-lite / KromHC weights logits [..., R]."""
        n = self.n
        if self.variant_name == "tbp":
            X = tbp_chart(logits[..., : n - 1, : n - 1])
            if self.delta_logit is not None:
                X = tbp_smooth(X, self.delta_logit.to(logits.dtype))
            return X.transpose(-1, -2)
        if self.variant_name == "mhc-lite":
            return bvn_combination(torch.softmax(logits, dim=-1), n)
        # KromHC: (U_0 (x) U_1 (x) ...)^T = U_0^T (x) U_1^T (x) ..., factor 0 leftmost
        chunks = logits.split([math.factorial(k) for k in self.factors], dim=-1)
        mats = [bvn_combination(torch.softmax(c, dim=-1), k) for c, k in zip(chunks, self.factors, strict=True)]
        if not mats:
            return torch.ones(*logits.shape[:-1], 1, 1, dtype=logits.dtype, device=logits.device)
        out = mats[0]
        for m in mats[1:]:
            out = batched_kron(out, m)
        return out

    def forward(self, x: torch.Tensor) -> HCOutput:
        dt = self._dtype(x)
        normed = self._normed(x, dt)
        pre_logits, res_logits = self._logits(normed, dt)
        pre = torch.sigmoid(pre_logits).transpose(-1, -2)  # [..., v, n]
        pre = pre.squeeze(-2) if self.v == 1 else pre
        if self.variant_name == "mhc":
            res = self.res_from_logits(res_logits.transpose(-1, -2))
        else:
            res = self._paper_res(res_logits)
        if self.has_beta:
            beta = normed @ self._param_in("dynamic_beta_fn", dt)
            post = 2 * torch.sigmoid(beta * self._param_in("h_post_scale", dt) + self._param_in("static_beta", dt))
        else:
            post = torch.zeros(*x.shape[:-2], self.n, dtype=dt, device=x.device)
        return HCOutput(pre, post, res)

    def res_logits(self, x: torch.Tensor) -> torch.Tensor | None:
        dt = self._dtype(x)
        logits = self._logits(self._normed(x, dt), dt)[1]
        if self.variant_name == "mhc":
            return logits.transpose(-1, -2)
        if self.variant_name == "tbp":
            return logits[..., : self.n - 1, : self.n - 1].transpose(-1, -2)
        return logits

    def res_from_logits(self, logits: torch.Tensor, spec: SinkhornSpec | None = None) -> torch.Tensor:
        if self.variant_name == "mhc":
            from hcdiag.sinkhorn import project

            use = spec or self.sinkhorn
            if use is None:
                raise UsageError("mhc site has no Sinkhorn settings")
            return project(logits, use)
        if self.variant_name == "tbp":
            n = self.n
            code = torch.zeros(*logits.shape[:-2], n, n, dtype=logits.dtype, device=logits.device)
            code[..., : n - 1, : n - 1] = logits.transpose(-1, -2)
            return self._paper_res(code)
        return self._paper_res(logits)

    def extra_repr(self) -> str:
        extra = f", factors={self.factors}" if self.factors else ""
        dse = f", delta_logit={'yes' if self.delta_logit is not None else 'no'}" if self.variant_name == "tbp" else ""
        return f"{self.variant_name}, n={self.n}, C={self.C}, v={self.v}{extra}{dse}, sinkhorn={self.sinkhorn}"

"""TBP-mHC: exactly doubly stochastic H_res from a transportation-polytope chart (SPEC section 2).

Dimension letters: n streams, C width of one stream, ... leading (token / batch) dims.

    logits = a_res * mat(x' W_res) + b_res              W_res [nC, n^2], b_res [n, n] (allocated)  [..., n, n]
    t      = logits[..., :n-1, :n-1]                    the (n-1)^2 chart logits actually used
    X      = chart(t)                                   row-major over the (n-1) x (n-1) block:
             L = max(0, r_i - sum_{j'>j} c_j', c_j - sum_{i'>i} r_i'), U = min(r_i, c_j),
             X_ij = L + max(U - L, 1e-7) sigma(t_ij); r_i -= X_ij; c_j -= X_ij;
             last column = remaining r_i, last row = remaining c_j                               [..., n, n]
    H_res  = (1 - d) X + d J/n,  d = sigma(delta_logit), delta_logit init -8  ("DSE" smoothing)

Reference: alyubinin/tbp-mHC ``hyper_conn/tbp_mhc.py`` (``transportation_birkhoff``), which charts the
top-left block of its code-orientation logits alpha[input, output] and uses X as alpha. The chart commutes
with transposition (chart(t^T) = chart(t)^T: each X_ij depends on t only through the block above-left of (i,
j), which transposition maps onto itself), so charting the paper-orientation logits here gives the reference's
H_res = X_code^T exactly; b_res / W_res are therefore stored in paper orientation, like mHC's.
"""

from __future__ import annotations

from typing import Any

import torch

from hcdiag.enums import Exactness
from hcdiag.registry import register
from hcdiag.site import SinkhornSpec
from hcdiag.variants._common import MHCResSite

#: Floor on the feasible-interval width (reference ``eps``): entries can dip to about -1e-7 by rounding.
CHART_EPS = 1e-7


def tbp_chart(t: torch.Tensor, eps: float = CHART_EPS) -> torch.Tensor:
    """Chart logits t [..., n-1, n-1] -> X [..., n, n] with exact unit row / column sums (SPEC section 2).

    Row-major over the top-left block with remaining row mass r and column mass c (both start at 1); see the
    module docstring for the formula. n = 1 (t of shape [..., 0, 0]) gives [[1]].
    """
    m = t.shape[-1]
    n = m + 1
    lead = t.shape[:-2]
    one = torch.ones(lead, dtype=t.dtype, device=t.device)
    zero = torch.zeros(lead, dtype=t.dtype, device=t.device)
    r = [one] * n  # remaining mass of row i
    c = [one] * n  # remaining mass of column j
    rows = []
    for i in range(m):
        entries = []
        ri = r[i]
        r_tail = sum(r[i + 1 :], zero)  # rows below are untouched until their turn
        for j in range(m):
            c_tail = sum(c[j + 1 :], zero)
            L = torch.clamp(torch.maximum(ri - c_tail, c[j] - r_tail), min=0.0)
            U = torch.minimum(ri, c[j])
            x = L + (U - L).clamp_min(eps) * torch.sigmoid(t[..., i, j])
            entries.append(x)
            ri = ri - x
            c[j] = c[j] - x
        entries.append(ri)  # last column takes the rest of row i
        c[m] = c[m] - ri
        r[i] = zero
        rows.append(torch.stack(entries, dim=-1))
    rows.append(torch.stack(c, dim=-1))  # last row takes the rest of every column
    return torch.stack(rows, dim=-2)


def tbp_smooth(X: torch.Tensor, delta_logit: torch.Tensor) -> torch.Tensor:
    """(1 - d) X + d J/n with d = sigma(delta_logit): pulls X toward uniform, keeping the sums exact."""
    d = torch.sigmoid(delta_logit).to(X.dtype)
    return (1.0 - d) * X + d / X.shape[-1]


@register("tbp")
class TBP(MHCResSite):
    """TBP-mHC site: H_pre / H_post as mHC; W_res [nC, n^2], b_res [n, n] (allocated; only the top-left
    (n-1) x (n-1) block is used), a_res, delta_logit; norm_weight [nC] in code form.

    Init as the reference: W_res = 0, b_res = 0 (so H_res starts at the chart of 0, SPEC's rank-3 matrix at
    n = 4, not at I), a_res = 0.01, delta_logit = -8.
    """

    exactness = Exactness.EXACT
    # the chart is a Python loop over (n-1)^2 entries: fewer, larger calls (bench/bench_gain_sweep.py: at
    # 2048 sites x 256 seeds x n = 16, building took 2.8 s in calls of 2^20 logits, 5.1 s in calls of 2^18)
    projection_batch = 1 << 20

    def __init__(self, n: int, C: int, **kw: Any) -> None:
        super().__init__(n, C, **kw)
        self._init_pre_post()
        self._init_res(torch.zeros(n, n, dtype=torch.float64))
        self.delta_logit = self._scalar(-8.0)

    def _res_logits_h(self, h: torch.Tensor) -> torch.Tensor:
        """x' [..., nC] -> chart logits t [..., n-1, n-1] (paper orientation, row = output stream)."""
        return super()._res_logits_h(h)[..., : self.n - 1, : self.n - 1]

    def res_from_logits(self, logits: torch.Tensor, spec: SinkhornSpec | None = None) -> torch.Tensor:
        """t [..., n-1, n-1] -> H_res [..., n, n] = smoothed chart (``spec`` ignored: no Sinkhorn)."""
        return tbp_smooth(tbp_chart(logits), self.delta_logit)

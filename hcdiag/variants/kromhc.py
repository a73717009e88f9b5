"""KromHC: H_res as a Kronecker product of small mHC-lite factors (SPEC section 2).

Dimension letters: n streams, C width of one stream, K factors of sizes i_1..i_K with prod i_k = n,
S = sum_k i_k! permutation logits, ... leading (token / batch) dims.

    logits = a_res * x' W_res + b_res             W_res [nC, S], b_res [S], one shared a_res     [..., S]
    U_k    = sum_j softmax(logits[slice k])_j Q_j over the i_k! permutations (see mhc_lite)   [..., i_k, i_k]
    H_res  = U_1 (x) U_2 (x) ... (x) U_K          factor 0 leftmost                             [..., n, n]

The reference code (wz1119/KromHC ``hyper_conn/Kromhc.py``) builds the factors in code orientation and takes
the Kronecker product there; since (A (x) B)^T = A^T (x) B^T, transposing each factor gives the paper H_res.
Its 2 x 2 factors are [[p, 1-p], [1-p, p]] with p the weight of the identity (symmetric either way).
The reference code needs n = 2^K with 2 x 2 factors; any factorisation works here (e.g. (2, 3) for n = 6).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from hcdiag.counts import kromhc_factors
from hcdiag.enums import Exactness
from hcdiag.registry import register
from hcdiag.site import SinkhornSpec
from hcdiag.variants._common import MHCResSite, batched_kron
from hcdiag.variants.mhc_lite import bvn_combination, perm_logit_bias_init


@register("kromhc")
class KromHC(MHCResSite):
    """KromHC site: H_pre / H_post as mHC; W_res [nC, S], b_res [S], a_res (shared by all factors, as in the
    reference code); norm_weight [nC] in code form. ``factors``: sizes i_k (default: prime factorisation of n,
    all 2s for n = 2^K like the reference). Init per factor: identity logit 0, the others -8 (reference code).
    res_logits: concatenated factor permutation logits [..., S] (factor 0 first).
    """

    exactness = Exactness.EXACT
    accepts_kron_factors = True

    def __init__(self, n: int, C: int, *, factors: tuple[int, ...] | None = None, **kw: Any) -> None:
        super().__init__(n, C, **kw)
        self.factors = kromhc_factors(n, factors)
        self._sizes = [math.factorial(f) for f in self.factors]
        self._init_pre_post()
        bias = [perm_logit_bias_init(k) for k in self._sizes]
        self._init_res(torch.cat(bias) if bias else torch.zeros(0, dtype=torch.float64))

    def factor_matrices(self, logits: torch.Tensor) -> list[torch.Tensor]:
        """[..., S] -> [U_1 [..., i_1, i_1], ...] (paper orientation), softmax per factor."""
        out = []
        for f, chunk in zip(self.factors, logits.split(self._sizes, dim=-1), strict=True):
            out.append(bvn_combination(torch.softmax(chunk, dim=-1), f))
        return out

    def res_from_logits(self, logits: torch.Tensor, spec: SinkhornSpec | None = None) -> torch.Tensor:
        """[..., S] -> H_res = U_1 (x) ... (x) U_K [..., n, n] (``spec`` ignored: no Sinkhorn)."""
        mats = self.factor_matrices(logits)
        if not mats:  # n = 1: no factors, H_res = [[1]]
            return torch.ones((*logits.shape[:-1], 1, 1), dtype=logits.dtype, device=logits.device)
        res = mats[0]
        for m in mats[1:]:
            res = batched_kron(res, m)
        return res

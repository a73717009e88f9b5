"""mHC-lite: H_res as a convex combination of all n! permutation matrices (Birkhoff-von Neumann; SPEC sec. 2).

Dimension letters: n streams, C width of one stream, k = n! permutations, ... leading (token / batch) dims.

    a     = softmax(a_res * x' W_res + b_res)     W_res [nC, n!], b_res [n!], a_res scalar        [..., n!]
    H_res = sum_k a_k Q_k                          Q_k = P_k^T, P_k[i, perm_k[i]] = 1              [..., n, n]

perm_k runs over itertools.permutations(range(n)) (k = 0 is the identity). The reference code (mhc-lite /
KromHC ``get_all_permutations``) builds P_k = eye[perm_k], i.e. P_k[i, perm_k[i]] = 1, and uses sum_k a_k P_k
as alpha[input, output]; the paper orientation is its transpose, Q_k[perm_k[i], i] = 1: permutation k sends
input stream i to output stream perm_k[i]. Exactly doubly stochastic and non-negative. Logit index k follows
the reference checkpoints' order.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from hcdiag.counts import MAX_PRACTICAL_PERMS
from hcdiag.enums import Exactness
from hcdiag.registry import register
from hcdiag.site import SinkhornSpec
from hcdiag.variants._common import MHCResSite, bvn_matrices

__all__ = ["MAX_PRACTICAL_PERMS", "MHCLite", "bvn_combination", "perm_logit_bias_init"]


def perm_logit_bias_init(k: int) -> torch.Tensor:
    """Static permutation logits [k]: 0 for the identity (index 0), -8 for the others (float64).

    Source: mhc-lite reference code (vendored in wz1119/KromHC ``hyper_conn/mhc_lite.py``: ``init_alpha1``).
    At n = 4 the identity gets weight 1 / (1 + 23 e^-8) = 0.99923.
    """
    b = torch.full((k,), -8.0, dtype=torch.float64)
    b[0] = 0.0
    return b


def bvn_combination(weights: torch.Tensor, n: int) -> torch.Tensor:
    """sum_k w_k Q_k: weights [..., n!] (itertools order) -> [..., n, n] paper orientation."""
    Q = bvn_matrices(n, weights.dtype, weights.device)
    return torch.einsum("...k,kij->...ij", weights, Q)


@register("mhc-lite")
class MHCLite(MHCResSite):
    """mHC-lite site: H_pre / H_post as mHC; W_res [nC, n!], b_res [n!], a_res; norm_weight [nC] in code form.

    Init: W_res = 0, a_res = 0.01, b_res = :func:`perm_logit_bias_init`. Building refuses sizes whose
    parameters exceed the registry's memory limit unless ``device="meta"``. res_logits: permutation logits
    [..., n!] (before the softmax).
    """

    exactness = Exactness.EXACT

    def __init__(self, n: int, C: int, **kw: Any) -> None:
        super().__init__(n, C, **kw)
        k = math.factorial(n)
        self._init_pre_post()
        self._init_res(perm_logit_bias_init(k))

    def res_from_logits(self, logits: torch.Tensor, spec: SinkhornSpec | None = None) -> torch.Tensor:
        """[..., n!] -> H_res [..., n, n] = sum_k softmax(logits)_k Q_k (``spec`` ignored: no Sinkhorn)."""
        return bvn_combination(torch.softmax(logits, dim=-1), self.n)

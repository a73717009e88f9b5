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

from hcdiag.enums import Exactness, Form
from hcdiag.errors import UsageError
from hcdiag.registry import ParamCount, register
from hcdiag.site import SinkhornSpec
from hcdiag.variants._common import MHCResSite, batched_kron, mhc_pre_post_norm_count, prime_factors
from hcdiag.variants.mhc_lite import MAX_PRACTICAL_PERMS, bvn_combination, perm_logit_bias_init


def _fmt(factors: tuple[int, ...]) -> str:
    return ",".join(str(f) for f in factors)


@register(
    "kromhc",
    summary="KromHC: Kronecker product of small mHC-lite factors, exactly doubly stochastic",
    growth="O(nC sum_k i_k!)",
    order=50,
)
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
        self.factors = self.resolve_factors(n, factors)
        self._sizes = [math.factorial(f) for f in self.factors]
        self._init_pre_post()
        bias = [perm_logit_bias_init(k) for k in self._sizes]
        self._init_res(torch.cat(bias) if bias else torch.zeros(0, dtype=torch.float64))

    @classmethod
    def resolve_factors(cls, n: int, kron_factors: tuple[int, ...] | None) -> tuple[int, ...]:
        """kron_factors checked (each >= 2, product n) or, when None, the prime factorisation of n."""
        default = prime_factors(n)
        if kron_factors is None:
            return default
        example = _fmt(default) if len(default) > 1 else f"{n} (a single factor)"
        factors = tuple(kron_factors)
        for f in factors:
            if isinstance(f, bool) or not isinstance(f, int) or f < 2:
                raise UsageError(
                    f"--kron-factors {_fmt(factors)} has factor {f!r}; every factor must be an integer >= 2 "
                    f"and their product n = {n}, e.g. {example}",
                    option="--kron-factors",
                )
        if math.prod(factors) != n:
            raise UsageError(
                f"--kron-factors {_fmt(factors)} multiplies to {math.prod(factors)}, not n = {n}; "
                f"give factors whose product is n, e.g. {example}",
                option="--kron-factors",
            )
        return factors

    @classmethod
    def count(cls, n: int, C: int, form: Form, factors: tuple[int, ...] | None) -> ParamCount:
        """H_res: S nC + S + 1 with S = sum_k i_k! (SPEC section 5); pre / post / norm as mHC code form."""
        factors = cls.resolve_factors(n, factors)
        pre, post, norm = mhc_pre_post_norm_count(n, C, form)
        S = sum(math.factorial(f) for f in factors)
        notes = [f"factors {_fmt(factors) or '(none, n = 1)'}"]
        if any(f != 2 for f in factors):
            notes.append("reference code supports only 2x2 factors (n = 2^K)")
        if not cls.practical(n, factors):
            big = max(factors)
            notes.append(f"impractical: a factor of size {big} has {math.factorial(big):,} permutations")
        return ParamCount(pre=pre, post=post, res=S * n * C + S + 1, norm=norm, notes=tuple(notes))

    @classmethod
    def practical(cls, n: int, factors: tuple[int, ...] | None) -> bool:
        factors = cls.resolve_factors(n, factors)
        return all(math.factorial(f) <= MAX_PRACTICAL_PERMS for f in factors)

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

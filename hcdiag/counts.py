"""Parameter counts of every variant in closed form (SPEC section 5). Imports neither torch nor numpy.

Dimension letters: n streams, C width of one stream, S = sum_k i_k! (KromHC permutation logits of factors i_k).
Every count is an exact Python int, so mHC-lite at n = 12 (12! permutations) is counted, never built. The
variant modules in :mod:`hcdiag.variants` build the parameters these formulas count; tests compare each formula
with ``sum(p.numel())`` of the real module.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from hcdiag.enums import Form
from hcdiag.errors import UsageError

__all__ = [
    "MAX_PRACTICAL_PERMS",
    "ParamCount",
    "hc_dynamic",
    "hc_static",
    "identity",
    "ihc",
    "kromhc",
    "kromhc_factors",
    "kromhc_practical",
    "mhc",
    "mhc_lite",
    "mhc_lite_practical",
    "mhc_pre_post_norm",
    "prime_factors",
    "tbp",
]

#: mHC-lite is flagged impractical above this many permutations (n! > 720, i.e. n >= 7): SPEC sec. 2 calls it
#: impractical beyond n ~ 6; at n = 7 every token needs 5,040 logits, at n = 8 40,320.
MAX_PRACTICAL_PERMS = 720

Factors = tuple[int, ...] | None


@dataclass(frozen=True)
class ParamCount:
    """Parameters of one HC site, split by what they produce (SPEC section 5).

    pre / post / res: projection + bias + scale(s) of H_pre, H_post, H_res; norm: RMSNorm gain (nC in code
    form, 0 in paper form). ``effective`` (TBP-mHC only): the entries the forward pass actually uses, where
    the module allocates more. ``notes``: one-line remarks (shared parameters, factorisation used, ...).
    """

    pre: int
    post: int
    res: int
    norm: int
    effective: ParamCount | None = None
    notes: tuple[str, ...] = ()

    @property
    def total(self) -> int:
        return self.pre + self.post + self.res + self.norm

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "pre": self.pre,
            "post": self.post,
            "res": self.res,
            "norm": self.norm,
            "total": self.total,
        }
        if self.effective is not None:
            d["effective"] = self.effective.to_dict()
        if self.notes:
            d["notes"] = list(self.notes)
        return d


def prime_factors(n: int) -> tuple[int, ...]:
    """Prime factorisation of n in ascending order; () for n = 1. The default KromHC factorisation."""
    out: list[int] = []
    p = 2
    while p * p <= n:
        while n % p == 0:
            out.append(p)
            n //= p
        p += 1
    if n > 1:
        out.append(n)
    return tuple(out)


def _fmt(factors: tuple[int, ...]) -> str:
    return ",".join(str(f) for f in factors)


def kromhc_factors(n: int, kron_factors: Factors) -> tuple[int, ...]:
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


def mhc_pre_post_norm(n: int, C: int, form: Form) -> tuple[int, int, int]:
    """(pre, post, norm) of an mHC-style site: projection nC x n + bias n + scale 1 each (mHC Eqs. 7-8),
    plus the RMSNorm gain nC in code form (SPEC section 5)."""
    nC = n * C
    pre = nC * n + n + 1
    return pre, pre, (nC if form is Form.CODE else 0)


# ---- one closed form per variant: (n, C, form, factors) -> ParamCount ---------------------------------------


def identity(n: int, C: int, form: Form, factors: Factors) -> ParamCount:
    """The plain pre-norm residual: no parameters."""
    return ParamCount(0, 0, 0, 0)


def hc_static(n: int, C: int, form: Form, factors: Factors) -> ParamCount:
    """n^2 + 2n per site (HC Eq. 21), in both forms (no norm parameters)."""
    return ParamCount(pre=n, post=n, res=n * n, norm=0)


def hc_dynamic(n: int, C: int, form: Form, factors: Factors) -> ParamCount:
    """C(n+2) + n(n+2) + 2 per site (HC Eq. 25), in both forms (no norm parameters)."""
    return ParamCount(
        pre=C + n,  # W_m, A_m
        post=C + n + 1,  # W_b, B, s_b
        res=C * n + n * n + 1,  # W_r, A_r, s_a
        norm=0,
        notes=("s_a is shared by A_m and A_r; counted under res",),
    )


def mhc(n: int, C: int, form: Form, factors: Factors) -> ParamCount:
    """Paper form (n^2 + 2n)(nC + 1) + 3; code form adds the RMSNorm gain nC (SPEC section 5)."""
    pre, post, norm = mhc_pre_post_norm(n, C, form)
    return ParamCount(pre=pre, post=post, res=n * C * n * n + n * n + 1, norm=norm)


def mhc_lite_practical(n: int, factors: Factors) -> bool:
    return math.factorial(n) <= MAX_PRACTICAL_PERMS


def mhc_lite(n: int, C: int, form: Form, factors: Factors) -> ParamCount:
    """H_res: n! nC + n! + 1 (SPEC section 5); pre / post / norm as mHC."""
    pre, post, norm = mhc_pre_post_norm(n, C, form)
    k = math.factorial(n)
    notes: tuple[str, ...] = ()
    if not mhc_lite_practical(n, None):
        notes = (f"impractical: {k:,} permutation logits per token (n! > {MAX_PRACTICAL_PERMS})",)
    return ParamCount(pre=pre, post=post, res=k * n * C + k + 1, norm=norm, notes=notes)


def kromhc_practical(n: int, factors: Factors) -> bool:
    return all(math.factorial(f) <= MAX_PRACTICAL_PERMS for f in kromhc_factors(n, factors))


def kromhc(n: int, C: int, form: Form, factors: Factors) -> ParamCount:
    """H_res: S nC + S + 1 with S = sum_k i_k! (SPEC section 5); pre / post / norm as mHC."""
    factors = kromhc_factors(n, factors)
    pre, post, norm = mhc_pre_post_norm(n, C, form)
    S = sum(math.factorial(f) for f in factors)
    notes = [f"factors {_fmt(factors) or '(none, n = 1)'}"]
    if any(f != 2 for f in factors):
        notes.append("reference code supports only 2x2 factors (n = 2^K)")
    if not kromhc_practical(n, factors):
        big = max(factors)
        notes.append(f"impractical: a factor of size {big} has {math.factorial(big):,} permutations")
    return ParamCount(pre=pre, post=post, res=S * n * C + S + 1, norm=norm, notes=tuple(notes))


def tbp(n: int, C: int, form: Form, factors: Factors) -> ParamCount:
    """Allocated H_res: n^3 C + n^2 + 2; effective: (n-1)^2 nC + (n-1)^2 + 2 (SPEC section 5).

    +2 = a_res and delta_logit.
    """
    pre, post, norm = mhc_pre_post_norm(n, C, form)
    m2 = (n - 1) ** 2
    eff = ParamCount(pre=pre, post=post, res=m2 * n * C + m2 + 2, norm=norm)
    return ParamCount(
        pre=pre,
        post=post,
        res=n * n * n * C + n * n + 2,
        norm=norm,
        effective=eff,
        notes=(f"allocates W_res [nC, n^2]; the chart uses (n-1)^2 = {m2} of its n^2 = {n * n} columns",),
    )


def ihc(n: int, C: int, form: Form, factors: Factors) -> ParamCount:
    """mHC's H_pre / H_post, H_res = I (no H_res parameters)."""
    pre, post, norm = mhc_pre_post_norm(n, C, form)
    return ParamCount(pre=pre, post=post, res=0, norm=norm)

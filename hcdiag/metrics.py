"""Metrics of H_res matrices and their depth composites (SPEC sec. 4).

Dimension letters: L sites (depth), T tokens, n streams, ``...`` any other leading dims (seeds, tokens).
Every matrix M is [..., n, n] in *paper convention* (mHC Eq. 3: row i = output stream i;
x_{l+1} = H_res x_l + ...).
Metrics compute in float64 whatever the input dtype (a bfloat16 matrix is measured exactly as stored); the
composite products accumulate in the dtype given, so a model's own precision can be reproduced.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from hcdiag.errors import UsageError

__all__ = [
    "ABSORPTION_RANGE_BF16",
    "ABSORPTION_RANGE_F32",
    "ABSORPTION_RANGE_F64",
    "LOGIT_RANGE_WARN",
    "UNDERFLOW_RANGE_F32",
    "UNDERFLOW_RANGE_F64",
    "ZERO_RANGE_F32",
    "DSError",
    "NearestDS",
    "backward_composites",
    "dist_identity",
    "dist_uniform",
    "ds_error",
    "forward_composites",
    "gain_backward",
    "gain_forward",
    "logit_range",
    "nearest_ds",
    "nearest_ds_distance",
    "percentiles",
    "sigma2",
    "spectral_norm",
]

# ------------------------------------------------------------------------------------------------------------
# Logit-range thresholds. After max subtraction (softmax, lucidrains' exp(l - max)) the smallest entry of a
# row or column is exp(-R) times the largest, R = logit range. Two limits follow from the float format:
#   absorption: exp(-R) < u (unit roundoff, eps/2) => 1 + exp(-R) == 1: the entry no longer changes the sums
#     Sinkhorn normalises by, and its gradient ~ exp(-R) is below rounding of the largest one.
#     float32: R > 24 ln 2 = 16.64; bfloat16 (common training dtype): 8 ln 2 = 5.55; float64: 53 ln 2 = 36.74.
#   underflow: exp(-R) < smallest normal => subnormal with lost precision (float32: R > 126 ln 2 = 87.34),
#     exactly 0 past R > 150 ln 2 = 103.97; a zero entry stays zero through every Sinkhorn pass.
# LOGIT_RANGE_WARN uses absorption: it is where float32 starts treating the small entries as absent (the
# near-permutation, vanishing-gradient regime the mhc-lite analysis describes); underflow is far beyond it.
# (SPEC sec. 4's "above ~30 exp() underflows in float32" is off: exp(-30) = 9e-14 is a normal float32.)
ABSORPTION_RANGE_F32 = -math.log(torch.finfo(torch.float32).eps / 2)  # 16.6355
ABSORPTION_RANGE_BF16 = -math.log(torch.finfo(torch.bfloat16).eps / 2)  # 5.5452
ABSORPTION_RANGE_F64 = -math.log(torch.finfo(torch.float64).eps / 2)  # 36.7368
UNDERFLOW_RANGE_F32 = -math.log(torch.finfo(torch.float32).tiny)  # 87.3365
UNDERFLOW_RANGE_F64 = -math.log(torch.finfo(torch.float64).tiny)  # 708.3964
ZERO_RANGE_F32 = 150 * math.log(2)  # 103.9721: exp(-x) rounds to 0 below half the smallest subnormal 2^-149
LOGIT_RANGE_WARN = ABSORPTION_RANGE_F32


def _square(M: torch.Tensor, name: str = "M") -> torch.Tensor:
    if not isinstance(M, torch.Tensor) or M.ndim < 2 or M.shape[-1] != M.shape[-2]:
        shape = tuple(M.shape) if isinstance(M, torch.Tensor) else type(M).__name__
        raise UsageError(f"{name} must be a [..., n, n] tensor, got {shape}", option=name)
    return M.to(torch.float64)


@dataclass(frozen=True)
class DSError:
    """Doubly-stochastic error of M [..., n, n] (SPEC sec. 4; mHC Sec. 4: H_res on the Birkhoff polytope).

    row_err_max / row_err_mean [...]: max_i / mean_i |sum_j M_ij - 1|.
    col_err_max / col_err_mean [...]: max_j / mean_j |sum_i M_ij - 1|.
    min_entry [...]: min_ij M_ij (< 0: outside the polytope). row_sums, col_sums [..., n]. All float64.
    """

    row_err_max: torch.Tensor
    row_err_mean: torch.Tensor
    col_err_max: torch.Tensor
    col_err_mean: torch.Tensor
    min_entry: torch.Tensor
    row_sums: torch.Tensor
    col_sums: torch.Tensor


def ds_error(M: torch.Tensor) -> DSError:
    """Row / column sum errors and min entry of M [..., n, n] (paper convention), in float64."""
    M = _square(M)
    rs, cs = M.sum(dim=-1), M.sum(dim=-2)
    re, ce = (rs - 1).abs(), (cs - 1).abs()
    return DSError(
        row_err_max=re.amax(dim=-1),
        row_err_mean=re.mean(dim=-1),
        col_err_max=ce.amax(dim=-1),
        col_err_mean=ce.mean(dim=-1),
        min_entry=M.amin(dim=(-2, -1)),
        row_sums=rs,
        col_sums=cs,
    )


def gain_forward(M: torch.Tensor) -> torch.Tensor:
    """Forward Amax Gain Magnitude (mHC Sec. 3.1): G_f(M) = max_i |sum_j M_ij|. [..., n, n] -> [...] float64.

    The absolute value of the signed row sum (what a constant signal gains going forward), not the induced
    infinity-norm max_i sum_j |M_ij|.
    """
    return _square(M).sum(dim=-1).abs().amax(dim=-1)


def gain_backward(M: torch.Tensor) -> torch.Tensor:
    """Backward Amax Gain Magnitude (mHC Sec. 3.1): G_b(M) = max_j |sum_i M_ij|. [..., n, n] -> [...] f64."""
    return _square(M).sum(dim=-2).abs().amax(dim=-1)


def spectral_norm(M: torch.Tensor) -> torch.Tensor:
    """Largest singular value sigma_1(M) = ||M||_2. [..., n, n] -> [...] f64; 1 for doubly stochastic M."""
    return torch.linalg.matrix_norm(_square(M), ord=2)


def sigma2(M: torch.Tensor) -> torch.Tensor:
    """Second singular value sigma_2(M). [..., n, n] -> [...] float64 (0 for n = 1).

    For a doubly stochastic composite, sigma_2 -> 0 means the product approaches J/n (stream collapse,
    SPEC sec. 4).
    """
    s = torch.linalg.svdvals(_square(M))
    return s[..., 1] if s.shape[-1] > 1 else torch.zeros(s.shape[:-1], dtype=s.dtype)


def dist_uniform(M: torch.Tensor) -> torch.Tensor:
    """||M - J/n||_F, J the all-ones matrix (distance to uniform averaging). [..., n, n] -> [...] float64."""
    M = _square(M)
    n = M.shape[-1]
    return torch.linalg.matrix_norm(M - 1.0 / n)


def dist_identity(M: torch.Tensor) -> torch.Tensor:
    """||M - I||_F (distance to the plain residual). [..., n, n] -> [...] float64."""
    M = _square(M)
    return torch.linalg.matrix_norm(M - torch.eye(M.shape[-1], dtype=M.dtype))


def logit_range(logits: torch.Tensor, dims: Sequence[int] = (-2, -1)) -> torch.Tensor:
    """max - min of pre-projection logits over ``dims`` (default the matrix dims [..., n, n] -> [...]).

    Use ``dims=(-1,)`` for vector logits (mHC-lite permutation weights [..., n!]). Compare with
    :data:`LOGIT_RANGE_WARN` (float32 absorption, 16.64) and :data:`UNDERFLOW_RANGE_F32` (87.34). float64.
    """
    x = logits.to(torch.float64)
    d = tuple(dims)
    return x.amax(dim=d) - x.amin(dim=d)


def _stack(H: torch.Tensor) -> torch.Tensor:
    if not isinstance(H, torch.Tensor) or H.ndim < 3 or H.shape[-1] != H.shape[-2]:
        shape = tuple(H.shape) if isinstance(H, torch.Tensor) else type(H).__name__
        raise UsageError(f"H must be an [L, ..., n, n] stack of matrices, got {shape}", option="H")
    return H


def forward_composites(H: torch.Tensor) -> torch.Tensor:
    """Forward composites out[l] = H_l ... H_1 (later layers on the left; SPEC sec. 1, mHC Sec. 3.1 Fig. 3).

    H [L, ..., n, n] paper convention -> [L, ..., n, n] in H's dtype (bfloat16 products accumulate in
    bfloat16, as a bf16 model would). One batched matmul per site.
    """
    H = _stack(H)
    out = torch.empty_like(H)
    if H.shape[0] == 0:
        return out
    acc = H[0]
    out[0] = acc
    for layer in range(1, H.shape[0]):
        acc = H[layer] @ acc
        out[layer] = acc
    return out


def backward_composites(H: torch.Tensor) -> torch.Tensor:
    """Backward composites out[l] = H_L ... H_l (the product a gradient at the top sees down to site l).

    H [L, ..., n, n] paper convention -> [L, ..., n, n] in H's dtype. out[0] is the whole-depth product.
    """
    H = _stack(H)
    out = torch.empty_like(H)
    L = H.shape[0]
    if L == 0:
        return out
    acc = H[L - 1]
    out[L - 1] = acc
    for layer in range(L - 2, -1, -1):
        acc = acc @ H[layer]
        out[layer] = acc
    return out


@dataclass(frozen=True)
class NearestDS:
    """Frobenius projection of M onto the Birkhoff polytope (SPEC sec. 4, optional metric).

    matrix [..., n, n] float64 (entries >= 0 exactly, sums 1 to ``tol``), distance [...] = ||M - matrix||_F,
    iters_used, converged (every matrix met ``tol``).
    """

    matrix: torch.Tensor
    distance: torch.Tensor
    iters_used: int
    converged: bool


def _project_affine(X: torch.Tensor) -> torch.Tensor:
    # Orthogonal projection onto {Y : Y 1 = 1, Y^T 1 = 1}: Y = X + u 1^T + 1 v^T with
    # u = (1 - r)/n - (n - s)/(2 n^2), v = (1 - c)/n - (n - s)/(2 n^2) (r, c row/col sums, s the total).
    n = X.shape[-1]
    r, c = X.sum(dim=-1), X.sum(dim=-2)
    shift = (n - r.sum(dim=-1, keepdim=True)) / (2 * n * n)
    u = (1 - r) / n - shift
    v = (1 - c) / n - shift
    return X + u.unsqueeze(-1) + v.unsqueeze(-2)


def nearest_ds(M: torch.Tensor, *, tol: float = 1e-12, max_iters: int = 100_000) -> NearestDS:
    """argmin ||M - X||_F over doubly stochastic X, by Dykstra's alternating projections (batched, float64).

    Alternates the closed-form projection onto the affine set {X 1 = 1, X^T 1 = 1} with the clamp onto X >= 0;
    Dykstra's correction terms make the limit the true projection onto the intersection (a QP), not merely a
    feasible point. Stops when the iterate moves by <= tol (max abs) and its sums are within tol of 1.
    M [..., n, n] -> :class:`NearestDS`.
    """
    M = _square(M)
    if not (math.isfinite(tol) and tol > 0):
        raise UsageError(f"tol must be finite and > 0, got {tol!r}", option="tol")
    if isinstance(max_iters, bool) or not isinstance(max_iters, int) or max_iters < 1:
        raise UsageError(f"max_iters must be an integer >= 1, got {max_iters!r}", option="max_iters")
    x = M.clone()
    p = torch.zeros_like(M)  # correction for the affine set
    q = torch.zeros_like(M)  # correction for the orthant
    converged = False
    k = 0
    for k in range(1, max_iters + 1):  # noqa: B007 (k is read after the loop)
        y = _project_affine(x + p)
        p = x + p - y
        x_new = (y + q).clamp_min(0)
        q = y + q - x_new
        moved = (x_new - x).abs().amax()
        x = x_new
        sums = torch.maximum((x.sum(-1) - 1).abs().amax(), (x.sum(-2) - 1).abs().amax())
        if bool(moved <= tol) and bool(sums <= tol):
            converged = True
            break
    return NearestDS(matrix=x, distance=torch.linalg.matrix_norm(M - x), iters_used=k, converged=converged)


def nearest_ds_distance(M: torch.Tensor, *, tol: float = 1e-12, max_iters: int = 100_000) -> torch.Tensor:
    """||M - Proj_Birkhoff(M)||_F, [..., n, n] -> [...] float64 (see :func:`nearest_ds`)."""
    return nearest_ds(M, tol=tol, max_iters=max_iters).distance


def percentiles(values: torch.Tensor, qs: Sequence[float] = (50, 99)) -> dict[str, torch.Tensor]:
    """Distribution over the first dim (tokens): values [T, ...] -> {"p50": [...], "p99", "max", "mean"}.

    Percentiles use linear interpolation between order statistics (numpy's default ``method="linear"``): for
    q, position h = (T - 1) q / 100, value = v_(floor h) + (h - floor h)(v_(floor h + 1) - v_(floor h)).
    Keys are ``f"p{q:g}"``. float64. Sorting instead of torch.quantile avoids its 2^24-element limit.
    """
    v = values.to(torch.float64)
    if v.ndim < 1 or v.shape[0] == 0:
        raise UsageError("percentiles need at least one value along dim 0", option="values")
    T = v.shape[0]
    s = v.sort(dim=0).values
    out: dict[str, torch.Tensor] = {}
    for q in qs:
        if not 0 <= q <= 100:
            raise UsageError(f"percentile {q!r} is outside [0, 100]", option="qs")
        h = (T - 1) * float(q) / 100.0
        lo = math.floor(h)
        hi = min(lo + 1, T - 1)
        out[f"p{q:g}"] = s[lo] + (h - lo) * (s[hi] - s[lo])
    out["max"] = s[-1]
    out["mean"] = v.mean(dim=0)
    return out

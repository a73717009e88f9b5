"""Sinkhorn-Knopp projection of H_res logits, in each convention that published mHC code uses (SPEC sec. 3).

Dimension letters: ``...`` any leading (batch) dims (tokens T, sites L, seeds, ...), n streams.
Matrices are [..., n, n]. Inputs and outputs are in *paper orientation* (mHC Eq. 3: row i = output
stream i, so ``H_res @ x`` mixes the streams). Code orientation (lucidrains, mhc-lite, KromHC, DeepSeek-V4
``comb``) is the transpose: ``alpha[s, t]`` = (input s, output t) = ``H_res^T``. Conventions defined on the
code orientation transpose on the way in and on the way out, and run the reference code's exact tensor
operations in between, so that float32 results match the reference implementations bit for bit.

A convention is a set of choices, not only a name (SPEC sec. 3):

============ ===================== ==================================================== ===== ==========
name         start                 one iteration (on the tensor named)                  eps   exact axis
============ ===================== ==================================================== ===== ==========
paper        exp(logits)           H: columns, then rows (mHC Eq. 9)                    none  rows
log          logits (log domain)   alpha: -lse over input axis, then output axis; exp   none  columns
transformers softmax(comb) + eps   comb: iteration 1 columns only; then rows, columns   +eps  rows
lucidrains   exp(alpha - max_in)   alpha: L1 over input axis, then output axis          clamp columns
============ ===================== ==================================================== ===== ==========

"exact axis" is the paper axis whose sums the last pass sets to 1 (to rounding); the whole doubly-stochastic
error of a finite number of iterations sits in the other axis.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from hcdiag.enums import Convention
from hcdiag.errors import InputError, UsageError
from hcdiag.site import SinkhornSpec

__all__ = [
    "TRANSFORMERS_DEFAULT_EPS",
    "SinkhornResult",
    "check_finite",
    "exact_axis",
    "iters_to_tol",
    "parse_convention",
    "project",
    "sinkhorn",
]

#: ``hc_eps`` of DeepSeek-V4 / GLM-5-Next configs (transformers 5.2x). ``sinkhorn(..., eps=0.0)`` does NOT
#: apply it: pass the model's value (``SinkhornSpec.eps``) to reproduce the model.
TRANSFORMERS_DEFAULT_EPS = 1.0e-6

# lucidrains' l1norm is F.normalize(p=1), whose denominator is clamped at this value (torch default).
_L1_CLAMP = 1e-12


@dataclass(frozen=True)
class SinkhornResult:
    """Outcome of :func:`sinkhorn`.

    matrix: [..., n, n] paper orientation, in the compute dtype (the input's; float32 for bf16/f16 input).
    iters_used: iterations performed (= ``iters`` unless ``tol`` stopped the loop early).
    converged: with ``tol``: whether both axes' max error over the whole batch reached ``tol``; else None.
    row_err_history / col_err_history: [k, ...] with k = iters_used; entry [k-1] is, per matrix,
        max_i |sum_j M_ij - 1| (rows) or max_j |sum_i M_ij - 1| (columns) after iteration k. None unless
        ``record=True``.
    """

    matrix: torch.Tensor
    iters_used: int
    converged: bool | None
    row_err_history: torch.Tensor | None = None
    col_err_history: torch.Tensor | None = None


# ------------------------------------------------------------------------------------------------------------
# Conventions. Each is three functions: start (paper logits -> state), step (state, k -> state after
# iteration k, k = 1..iters) and to_paper (state -> paper-orientation matrix). The state is whatever the
# reference code loops on (a matrix, a log-matrix, code orientation or not).


@dataclass(frozen=True)
class _Impl:
    start: Callable[[torch.Tensor, float], torch.Tensor]
    step: Callable[[torch.Tensor, int, float], torch.Tensor]
    to_paper: Callable[[torch.Tensor], torch.Tensor]
    exact_axis: str  # paper axis the last pass of every iteration makes exact
    has_eps: bool


def _to_code(logits: torch.Tensor) -> torch.Tensor:
    # contiguous so that reductions see the same memory layout as the reference code's own tensors
    return logits.transpose(-1, -2).contiguous()


def _from_code(state: torch.Tensor) -> torch.Tensor:
    return state.transpose(-1, -2)


# paper (mHC Eq. 9): M(0) = exp(H~res), M(t) = T_r(T_c(M(t-1))). No max subtraction, as written in the paper:
# exp overflows for logits above ~88.7 (float32) / ~709.8 (float64); check logit_range before trusting it.
def _paper_start(logits: torch.Tensor, eps: float) -> torch.Tensor:
    return logits.exp()


def _paper_step(m: torch.Tensor, k: int, eps: float) -> torch.Tensor:
    m = m / m.sum(dim=-2, keepdim=True)  # T_c: columns
    return m / m.sum(dim=-1, keepdim=True)  # T_r: rows (exact)


# log (KromHC / mhc-lite hyper_conn/mhc.py `sinkhorn_knopps`): on alpha = H^T,
# alpha -= lse(alpha, dim=-2) (input axis), alpha -= lse(alpha, dim=-1) (output axis); exp at the end.
# lucidrains' log_domain_sinkhorn_knopps is the same iteration written with F.log_softmax (equal to rounding).
def _log_start(logits: torch.Tensor, eps: float) -> torch.Tensor:
    return _to_code(logits)


def _log_step(a: torch.Tensor, k: int, eps: float) -> torch.Tensor:
    a = a - torch.logsumexp(a, dim=-2, keepdim=True)
    return a - torch.logsumexp(a, dim=-1, keepdim=True)


def _log_to_paper(a: torch.Tensor) -> torch.Tensor:
    return _from_code(a.exp())


# transformers (DeepseekV4HyperConnection.forward, transformers 5.24): on comb = H^T,
# comb = softmax(comb_logits, -1) + eps; comb /= comb.sum(-2) + eps;
# (iters - 1) x [comb /= comb.sum(-1) + eps; comb /= comb.sum(-2) + eps].
# Iteration 1 is the softmax plus the first column pass; iteration k >= 2 is one (row, column) pair.
def _tf_start(logits: torch.Tensor, eps: float) -> torch.Tensor:
    return torch.softmax(_to_code(logits), dim=-1) + eps


def _tf_step(c: torch.Tensor, k: int, eps: float) -> torch.Tensor:
    if k > 1:
        c = c / (c.sum(dim=-1, keepdim=True) + eps)
    return c / (c.sum(dim=-2, keepdim=True) + eps)


# lucidrains (hyper-connections 0.4.x `sinkhorn_knopps`): on alpha = H^T,
# alpha = exp(alpha - alpha.amax(-2).detach()); iters x [l1norm(dim=-2), l1norm(dim=-1)] with
# l1norm = F.normalize(p=1), i.e. t / max(sum|t|, 1e-12). The library casts to float32 first (and back
# after); here the compute dtype is the input's: float32 input reproduces it exactly, float64 is more precise.
def _lr_start(logits: torch.Tensor, eps: float) -> torch.Tensor:
    a = _to_code(logits)
    return (a - a.amax(dim=-2, keepdim=True).detach()).exp()


def _lr_step(a: torch.Tensor, k: int, eps: float) -> torch.Tensor:
    a = F.normalize(a, p=1, dim=-2, eps=_L1_CLAMP)
    return F.normalize(a, p=1, dim=-1, eps=_L1_CLAMP)


_CONVENTIONS: dict[Convention, _Impl] = {
    Convention.PAPER: _Impl(_paper_start, _paper_step, lambda m: m, "rows", has_eps=False),
    Convention.LOG: _Impl(_log_start, _log_step, _log_to_paper, "columns", has_eps=False),
    Convention.TRANSFORMERS: _Impl(_tf_start, _tf_step, _from_code, "rows", has_eps=True),
    Convention.LUCIDRAINS: _Impl(_lr_start, _lr_step, _from_code, "columns", has_eps=False),
}


# ------------------------------------------------------------------------------------------------------------
# Validation helpers


def parse_convention(convention: Convention | str) -> Convention:
    """The :class:`Convention` named by ``convention``; UsageError(option="convention") if there is none."""
    if isinstance(convention, Convention):
        return convention
    try:
        return Convention(str(convention).strip().lower())
    except ValueError:
        names = ", ".join(c.value for c in Convention)
        raise UsageError(
            f"unknown Sinkhorn convention {convention!r}; choose one of: {names}", option="convention"
        ) from None


def check_finite(t: torch.Tensor, what: str) -> None:
    """Raise :class:`InputError` if ``t`` holds NaN or +-Inf (one line: how many, where the first is)."""
    bad = ~torch.isfinite(t)
    if bool(bad.any()):
        n_nan = int(torch.isnan(t).sum())
        n_inf = int(torch.isinf(t).sum())
        first = tuple(int(i) for i in bad.nonzero()[0])
        raise InputError(
            f"{what} has {n_nan} NaN and {n_inf} Inf values of {t.numel()} (first at index {first}); "
            "check the checkpoint or the probe inputs"
        )


def _check_iters(iters: int, option: str) -> int:
    if isinstance(iters, bool) or not isinstance(iters, int) or iters < 1:
        raise UsageError(f"{option} must be an integer >= 1, got {iters!r}", option=option)
    return iters


def _prepare(logits: torch.Tensor, conv: Convention, eps: float) -> torch.Tensor:
    if not isinstance(logits, torch.Tensor) or logits.ndim < 2 or logits.shape[-1] != logits.shape[-2]:
        shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise UsageError(f"Sinkhorn logits must be a [..., n, n] tensor, got {shape}", option="logits")
    if not math.isfinite(eps) or eps < 0:
        raise UsageError(f"eps must be finite and >= 0, got {eps!r}", option="eps")
    if eps != 0 and not _CONVENTIONS[conv].has_eps:
        # refusing beats silently ignoring a value the user (or a config) asked for
        raise UsageError(
            f"convention {conv.value!r} has no eps (got eps={eps!r}); only 'transformers' uses one",
            option="eps",
        )
    if logits.dtype in (torch.bfloat16, torch.float16):
        return logits.float()  # half-precision input: compute in float32
    if logits.dtype not in (torch.float32, torch.float64):
        raise UsageError(f"Sinkhorn logits must be floating point, got {logits.dtype}", option="logits")
    return logits


def _axis_errors(m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per matrix: max_i |sum_j m_ij - 1| and max_j |sum_i m_ij - 1|, each [...]."""
    return (m.sum(dim=-1) - 1).abs().amax(dim=-1), (m.sum(dim=-2) - 1).abs().amax(dim=-1)


def _iterate(logits: torch.Tensor, impl: _Impl, eps: float, iters: int) -> Iterator[tuple[int, torch.Tensor]]:
    """Yield (k, state after iteration k) for k = 1..iters: the one loop every public function consumes."""
    state = impl.start(logits, eps)
    for k in range(1, iters + 1):
        state = impl.step(state, k, eps)
        yield k, state


# ------------------------------------------------------------------------------------------------------------
# Public API


def sinkhorn(
    logits: torch.Tensor,
    convention: Convention | str,
    iters: int,
    *,
    eps: float = 0.0,
    tol: float | None = None,
    record: bool = False,
) -> SinkhornResult:
    """Project ``logits`` [..., n, n] (paper orientation) towards the Birkhoff polytope (mHC Eq. 9).

    Conventions: SPEC sec. 3 and the module table. ``iters`` means what the convention's reference code means
    by it: ``paper``/``log``/``lucidrains``: that many (column, row)-type pass pairs; ``transformers``:
    ``hc_sinkhorn_iters`` (softmax + one column pass, then iters-1 pairs). ``eps`` is only valid for
    ``transformers`` (DeepSeek-V4 ``hc_eps``, 1e-6 there; the default 0.0 here does not reproduce the model,
    see :data:`TRANSFORMERS_DEFAULT_EPS`); with eps > 0 the exact axis sums to s / (s + eps) ~ 1 - eps.

    Computes in the input dtype (float32 or float64); bfloat16 / float16 input is computed in float32 and the
    returned matrix is float32. With ``tol``, ``iters`` is a maximum: the loop stops after the first iteration
    at which both axes' max error over the whole batch is <= tol. With ``record``, per-matrix errors after
    every iteration are kept (computed in the same loop). Gradients flow through every convention.

    Returns :class:`SinkhornResult`. Raises UsageError for an unknown convention, iters < 1, bad eps or tol.
    NaN/Inf logits are not checked here (use :func:`check_finite`); they propagate as NaN.
    """
    conv = parse_convention(convention)
    _check_iters(iters, "iters")
    if tol is not None and not (math.isfinite(tol) and tol >= 0):
        raise UsageError(f"tol must be finite and >= 0, got {tol!r}", option="tol")
    impl = _CONVENTIONS[conv]
    x = _prepare(logits, conv, eps)

    rows: list[torch.Tensor] = []
    cols: list[torch.Tensor] = []
    converged: bool | None = None if tol is None else False
    state = x
    k = 0
    for k, state in _iterate(x, impl, eps, iters):  # noqa: B007 (k is read after the loop)
        if record or tol is not None:
            with torch.no_grad():
                r, c = _axis_errors(impl.to_paper(state))
            if record:
                rows.append(r)
                cols.append(c)
            if tol is not None and bool((r <= tol).all()) and bool((c <= tol).all()):
                converged = True
                break
    return SinkhornResult(
        matrix=impl.to_paper(state).contiguous(),
        iters_used=k,
        converged=converged,
        row_err_history=torch.stack(rows) if record else None,
        col_err_history=torch.stack(cols) if record else None,
    )


def project(logits: torch.Tensor, spec: SinkhornSpec) -> torch.Tensor:
    """H_res [..., n, n] (paper orientation) from paper-orientation logits [..., n, n] as ``spec`` says."""
    return sinkhorn(logits, spec.convention, spec.iters, eps=spec.eps).matrix


def exact_axis(convention: Convention | str) -> str:
    """``"rows"`` or ``"columns"``: the paper axis whose sums the convention's last pass sets to 1.

    paper, transformers: rows (comb's final dim=-2 pass is paper rows). log, lucidrains: columns.
    """
    return _CONVENTIONS[parse_convention(convention)].exact_axis


def iters_to_tol(
    logits: torch.Tensor,
    convention: Convention | str,
    tol: float,
    *,
    eps: float = 0.0,
    max_iters: int = 1000,
) -> torch.Tensor:
    """Per matrix, the first iteration count k (in the convention's own meaning of ``iters``) after which both
    max row error and max column error are <= ``tol``; -1 where ``max_iters`` iterations never got there.

    logits [..., n, n] paper orientation -> int64 [...]. The loop stops as soon as every matrix has arrived.
    Uses the same loop as :func:`sinkhorn`, so ``sinkhorn(x, c, k).matrix`` for the returned k meets ``tol``.
    With ``eps > 0`` (transformers) the reachable tolerance is limited to about eps.
    """
    conv = parse_convention(convention)
    _check_iters(max_iters, "max_iters")
    if not (math.isfinite(tol) and tol >= 0):
        raise UsageError(f"tol must be finite and >= 0, got {tol!r}", option="tol")
    impl = _CONVENTIONS[conv]
    x = _prepare(logits, conv, eps)
    out = torch.full(x.shape[:-2], -1, dtype=torch.int64)
    with torch.no_grad():
        for k, state in _iterate(x.detach(), impl, eps, max_iters):
            r, c = _axis_errors(impl.to_paper(state))
            arrived = (r <= tol) & (c <= tol) & (out < 0)
            out[arrived] = k
            if bool((out >= 0).all()):
                break
    return out

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
transformers sigmoid(H) + eps      H: rows, then columns (every iteration)              +eps  columns
-sigmoid
lucidrains   exp(alpha - max_in)   alpha: L1 over input axis, then output axis          clamp columns
============ ===================== ==================================================== ===== ==========

"exact axis" is the paper axis whose sums the last pass sets to 1 (to rounding); the whole doubly-stochastic
error of a finite number of iterations sits in the other axis.
"""

from __future__ import annotations

import contextlib
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
    "ItersToTol",
    "SinkhornResult",
    "PAPER_DEFAULT",
    "check_finite",
    "default_eps",
    "effective_spec",
    "eps_floor",
    "exact_axis",
    "has_eps",
    "iters_to_tol",
    "iters_to_tol_detail",
    "one_thread",
    "parse_convention",
    "project",
    "sinkhorn",
]

#: ``hc_eps`` of DeepSeek-V4 / GLM-5-Next configs (transformers 5.2x). ``sinkhorn(..., eps=0.0)`` does NOT
#: apply it: pass the model's value (``SinkhornSpec.eps``) to reproduce the model.
TRANSFORMERS_DEFAULT_EPS = 1.0e-6
#: what a site without Sinkhorn settings of its own is projected with: mHC Eq. 9, t_max = 20
PAPER_DEFAULT = SinkhornSpec(Convention.PAPER, 20, 0.0, "default")

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


# transformers-sigmoid: the earlier transformers DeepSeek-V4 code (DeepseekV4HyperConnection._sinkhorn in
# src/transformers/models/deepseek_v4/modular_deepseek_v4.py as stored in the search index, file id 53747464290;
# the commit could not be pinned: `fetch` of huggingface/transformers was refused, 1.33 GB > 500 MB cap). On comb:
# comb = sigmoid(comb_logits) + eps; iters x [comb /= comb.sum(-1) + eps; comb /= comb.sum(-2) + eps].
# Its layer applies torch.matmul(comb, residual): output stream i = sum_j comb[i, j] x_j, so comb IS paper H_res
# (unlike 5.8.0 and later, which apply comb^T): no transpose, and the last (column) pass makes paper columns exact.
# No transformers release on PyPI ships it (5.7.0 .. 5.24.0 have the softmax start): it was the draft-PR code.
def _sig_start(logits: torch.Tensor, eps: float) -> torch.Tensor:
    return torch.sigmoid(logits.contiguous()) + eps  # contiguous: the reference's comb logits are a fresh tensor


def _sig_step(c: torch.Tensor, k: int, eps: float) -> torch.Tensor:
    return _tf_step(c, 2, eps)  # every iteration is one (row, column) pair


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
    Convention.TRANSFORMERS_SIGMOID: _Impl(_sig_start, _sig_step, lambda m: m, "columns", has_eps=True),
    Convention.LUCIDRAINS: _Impl(_lr_start, _lr_step, _from_code, "columns", has_eps=False),
}


# ------------------------------------------------------------------------------------------------------------
# Validation helpers


def parse_convention(convention: Convention | str, option: str = "convention") -> Convention:
    """The :class:`Convention` named by ``convention``; UsageError naming ``option`` if there is none."""
    if isinstance(convention, Convention):
        return convention
    try:
        return Convention(str(convention).strip().lower())
    except ValueError:
        names = ", ".join(c.value for c in Convention)
        raise UsageError(
            f"unknown Sinkhorn convention {convention!r}; choose one of: {names}", option=option
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
            f"convention {conv.value!r} has no eps (got eps={eps!r}); only "
            f"{', '.join(repr(c.value) for c in _CONVENTIONS if _CONVENTIONS[c].has_eps)} use one",
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
# The engine: batch-last blocks, in place, one cache-sized chunk at a time.
#
# A chunk of b matrices is held as one [n, n, b] block (the b matrices last, so every elementwise op and every
# sum runs over long contiguous rows of b values), in the orientation the convention's reference code iterates
# on. All iterations run in place on the block while it sits in cache; memory is touched only by the start
# (logits in) and the end (matrices out). Nothing is allocated per iteration.
#
# The results are bit for bit those of the step functions above. Elementwise ops are the same IEEE operations
# (exp, log, divide, subtract give one value whatever the layout), and every sum adds the same terms in the same
# order as torch's CPU sum does on the batch-first tensor (aten/src/ATen/native/cpu/SumKernel.cpp, cascade_sum):
# that order depends on whether the summed dim is the innermost one, on n, and on the kernel's vector width w,
# so it is modelled below as a plan of additions (several lanes per op) and checked against torch.sum once per
# (dtype, n) before use. Where the check fails (another build, another device, n > 16), where autograd needs a
# graph, or for paper logits not in row-major memory, the reference loop runs.

_Ref = tuple[str, int, int, int]  # ("t", 0, lo, hi): terms lo..hi-1; ("r", i, lo, hi): lanes of register i
_Op = tuple[_Ref, _Ref, "_Ref | None"]  # dst = a + b (b None: dst = a, a copy)

_MAX_N = 16  # up to here every cascade of SumKernel is a plain left-to-right sum (it changes order past 16)
_DIRECT_N = 4  # up to here every order torch uses is the plain left-to-right one: one torch.sum does it
_BLOCK_ELEMS = 1 << 17  # entries per block (512 KiB of float32): ops big enough to amortise their call, in L2
_SEARCH_ELEMS = 1 << 19  # iters_to_tol's blocks: its per-iteration bookkeeping ops, not the data, set the cost
_CYCLE_EVERY = 16  # iters_to_tol compares the state of iteration 16 j with those of 16 j + 1, 16 j + 2
_GIVE_UP_MARGIN = 1.25  # iters_to_tol gives a matrix up only if even its optimistic estimate exceeds this x cap


class _Plan:
    """Additions that sum n terms in one of SumKernel's orders, several lanes (terms k, k + w, ...) per op.

    Values are ranges of lanes: ``term(lo, hi)`` is terms lo..hi-1 side by side; a register holds the lanes
    an addition produced. Each value is used once, so additions update their left register in place.
    """

    def __init__(self) -> None:
        self.ops: list[_Op] = []
        self.widths: list[int] = []

    @staticmethod
    def term(lo: int, hi: int) -> _Ref:
        return ("t", 0, lo, hi)

    @staticmethod
    def lanes(v: _Ref, lo: int, hi: int) -> _Ref:
        kind, i, base, _ = v
        return (kind, i, base + lo, base + hi)

    def plus(self, a: _Ref | None, b: _Ref | None) -> _Ref | None:
        """a + b (None is the zero an accumulator starts from: 0 + x == x for the sums here)."""
        if a is None or b is None:
            return b if a is None else a
        if a[0] == "r":
            dst = a
        elif b[0] == "r":
            dst = b  # x + y == y + x, bit for bit
        else:
            self.widths.append(a[3] - a[2])
            dst = ("r", len(self.widths) - 1, 0, a[3] - a[2])
        self.ops.append((dst, a, b))
        return dst

    def fold(self, values: list[_Ref | None]) -> _Ref | None:
        acc = None
        for v in values:
            acc = self.plus(acc, v)
        return acc

    def ilp(self, lo: int, items: int, k: int) -> _Ref | None:
        """SumKernel's row_sum over ``items`` values of k lanes each (item j = terms lo + j k ..): four
        interleaved sums (items j, j + 4, ...: one op on 4 k lanes per step), the leftover items into the first,
        then the four added left to right."""
        q = items // 4
        acc = self.fold([self.term(lo + 4 * r * k, lo + 4 * (r + 1) * k) for r in range(q)])
        parts = [self.lanes(acc, j * k, (j + 1) * k) if acc else None for j in range(4)]
        parts[0] = self.fold([parts[0], *(self.term(lo + j * k, lo + (j + 1) * k) for j in range(4 * q, items))])
        return self.fold(parts)

    def finish(self, total: _Ref | None) -> list[_Op]:
        """The additions, the last one writing the output ("o")."""
        assert total is not None
        out: _Ref = ("o", 0, 0, 1)
        if self.ops and self.ops[-1][0] == total:
            _, a, b = self.ops[-1]
            return [*self.ops[:-1], (out, a, b)]
        return [*self.ops, (out, total, None)]


def _inner_plan(n: int, w: int) -> _Plan:
    """torch.sum over the innermost dim: vectorized_inner_sum for n >= w (row_sum over vectors of w lanes,
    then the leftover terms and the lanes left to right), else scalar row_sum."""
    p = _Plan()
    if n < w:
        p.ops = p.finish(p.ilp(0, n, 1))
        return p
    v = n // w
    vec = p.ilp(0, v, w)
    tail = [p.term(t, t + 1) for t in range(v * w, n)]
    p.ops = p.finish(p.fold([*tail, *(p.lanes(vec, k, k + 1) for k in range(w))]))  # type: ignore[arg-type]
    return p


def _outer_plans(n: int, w: int) -> list[tuple[int, int, _Plan]]:
    """torch.sum over a dim that is not innermost: outputs in whole groups of 4 vectors (4 scalars below w)
    get multi_row_sum (left to right, n <= 16), the others row_sum. [(first output, end, plan)]."""
    group = 4 * w if n >= w else 4
    split = n // group * group
    out = []
    if split:
        p = _Plan()
        p.ops = p.finish(p.fold([p.term(t, t + 1) for t in range(n)]))
        out.append((0, split, p))
    if split < n:
        p = _Plan()
        p.ops = p.finish(p.ilp(0, n, 1))
        out.append((split, n, p))
    return out


def _fold_plan(n: int) -> _Plan:
    """Left to right (lucidrains' F.normalize: the p=1 norm adds term after term)."""
    p = _Plan()
    p.ops = p.finish(p.fold([p.term(t, t + 1) for t in range(n)]))
    return p


class _Sum:
    """out[g, :] = sum over ``axis`` of src for one [n, n, b] block, additions as the plans say.

    src: [n, n, b]; out: [n, b]; regs: [R, K, n, b] scratch. plans: [(first output, end, plan)], or None for
    one torch.sum (n <= _DIRECT_N: every order is left to right).
    """

    def __init__(self, src: torch.Tensor, axis: int, out: torch.Tensor, regs: torch.Tensor,
                 plans: list[tuple[int, int, _Plan]] | None) -> None:
        self.src, self.axis, self.out = src, axis, out
        self.calls: list[tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]] = []
        for g0, g1, plan in plans or []:
            def view(ref: _Ref, g0: int = g0, g1: int = g1) -> torch.Tensor:  # [lanes, outputs, b]
                kind, i, lo, hi = ref
                if kind == "o":
                    return out[g0:g1].unsqueeze(0)
                if kind == "r":
                    return regs[i, lo:hi, g0:g1]
                return src[lo:hi, g0:g1] if axis == 0 else src[g0:g1, lo:hi].transpose(0, 1)

            for dst, a, b in plan.ops:
                self.calls.append((view(a), None if b is None else view(b), view(dst)))

    def __call__(self) -> torch.Tensor:
        if not self.calls:
            return torch.sum(self.src, dim=self.axis, out=self.out)
        for a, b, dst in self.calls:
            if b is None:
                dst.copy_(a)
            else:
                torch.add(a, b, out=dst)
        return self.out


@dataclass(frozen=True)
class _Orders:
    """Addition plans for one (n, vector width w): torch.sum over batch-first dim -2 and dim -1, and the left
    to right order of lucidrains' normalisation. None: one torch.sum does it (n <= _DIRECT_N)."""

    dim_m2: list[tuple[int, int, _Plan]] | None
    dim_m1: list[tuple[int, int, _Plan]] | None
    fold: list[tuple[int, int, _Plan]] | None

    @staticmethod
    def build(n: int, w: int) -> _Orders:
        if n <= _DIRECT_N:
            return _Orders(None, None, None)
        return _Orders(_outer_plans(n, w), [(0, n, _inner_plan(n, w))], [(0, n, _fold_plan(n))])

    def registers(self) -> tuple[int, int]:
        """(registers, widest) the plans need (at least 1 x 1, so the buffer always exists)."""
        widths = [wd for g in (self.dim_m2, self.dim_m1, self.fold) for _, _, p in g or [] for wd in p.widths]
        return max(1, len(widths)), max([1, *widths])


_ORDERS: dict[tuple[torch.dtype, int], _Orders | None] = {}


def _orders(dtype: torch.dtype, n: int) -> _Orders | None:
    """The addition orders that reproduce torch.sum for [B, n, n] of ``dtype`` on this build, or None.

    torch's CPU sum kernel works on 32-byte vectors on this build (w = 8 float32, 4 float64); other widths are
    tried too, and the first whose orders reproduce torch.sum bit for bit on a probe batch is kept. n > 16:
    None (the plans assume SumKernel's cascade is a plain running sum, true up to 16 terms)."""
    key = (dtype, n)
    if n > _MAX_N:
        return None
    if key not in _ORDERS:
        g = torch.Generator().manual_seed(n)
        probe = (torch.rand(64, n, n, generator=g, dtype=torch.float64) * 20).exp().to(dtype)
        want0, want1 = probe.sum(dim=-2), probe.sum(dim=-1)
        blk = probe.permute(1, 2, 0).contiguous()
        found = None
        for width in (32, 64, 16):
            orders = _Orders.build(n, max(1, width // probe.element_size()))
            regs = torch.empty(*orders.registers(), n, 64, dtype=dtype)
            s0, s1 = torch.empty(n, 64, dtype=dtype), torch.empty(n, 64, dtype=dtype)
            got0 = _Sum(blk, 0, s0, regs, orders.dim_m2)().t()
            got1 = _Sum(blk, 1, s1, regs, orders.dim_m1)().t()
            if torch.equal(got0, want0) and torch.equal(got1, want1):
                found = orders
                break
        _ORDERS[key] = found
    return _ORDERS[key]


class _Block:
    """One chunk of b matrices, batch-last [n, n, b], with its scratch buffers and bound sums.

    x: the iterated state in the orientation the reference code iterates on (paper: H; the others: H^T), so
    state axis 0 is the batch-first dim -2 and axis 1 is dim -1. e: the log domain's exp terms.
    """

    def __init__(self, conv: Convention, n: int, b: int, dtype: torch.dtype, orders: _Orders,
                 x: torch.Tensor | None = None) -> None:
        def buf(*shape: int) -> torch.Tensor:
            return torch.empty(*shape, dtype=dtype)

        self.conv, self.n, self.b = conv, n, b
        self.x = buf(n, n, b) if x is None else x
        self.e = buf(n, n, b) if conv is Convention.LOG else None
        self.s01, self.m = buf(2 * n, b), buf(n, b)
        self.s0, self.s1 = self.s01[:n], self.s01[n:]  # one buffer, so that worst_error reduces both at once
        self.orders = orders
        regs = buf(*orders.registers(), n, b)
        src = self.e if self.e is not None else self.x
        self.sum0 = _Sum(src, 0, self.s0, regs, orders.dim_m2)  # torch.sum(dim=-2)
        self.sum1 = _Sum(src, 1, self.s1, regs, orders.dim_m1)  # torch.sum(dim=-1)
        if conv is Convention.LUCIDRAINS:  # the p=1 norm's order for the steps, torch.sum's for the errors
            self.norm0 = _Sum(src, 0, self.s0, regs, orders.fold)
            self.norm1 = _Sum(src, 1, self.s1, regs, orders.fold)
        # paper rows are state axis 1 for paper and transformers-sigmoid (H itself), axis 0 for the
        # code-orientation conventions
        self.paper_rows_axis = 1 if conv in _PAPER_STATE else 0

    def load(self, logits: torch.Tensor, eps: float) -> None:
        """State after start, from paper-orientation logits [b, n, n] (the same ops as the _*_start functions);
        transformers-sigmoid: from its start state [b, n, n] (paper orientation), see :func:`_whole_start`."""
        x = self.x
        if self.conv is Convention.TRANSFORMERS_SIGMOID:
            x.copy_(logits.permute(1, 2, 0))
        elif self.conv is Convention.PAPER:
            x.copy_(logits.permute(1, 2, 0)).exp_()
        elif self.conv is Convention.LOG:
            x.copy_(logits.permute(2, 1, 0))
        elif self.conv is Convention.LUCIDRAINS:
            x.copy_(logits.permute(2, 1, 0))
            x.sub_(torch.amax(x, dim=0, out=self.m).unsqueeze(0)).exp_()
        else:  # softmax as the reference computes it (batch-first rows), then into the block
            x.copy_(_tf_start(logits, eps).permute(1, 2, 0))

    def step(self, k: int, eps: float) -> None:
        """Iteration k in place (the same ops, in the same order, as the convention's _*_step)."""
        x, conv = self.x, self.conv
        if conv is Convention.PAPER:
            x.div_(self.sum0().unsqueeze(0))
            x.div_(self.sum1().unsqueeze(1))
        elif conv in (Convention.TRANSFORMERS, Convention.TRANSFORMERS_SIGMOID):
            if k > 1 or conv is Convention.TRANSFORMERS_SIGMOID:
                x.div_(self._plus_eps(self.sum1(), eps).unsqueeze(1))
            x.div_(self._plus_eps(self.sum0(), eps).unsqueeze(0))
        elif conv is Convention.LUCIDRAINS:
            x.div_(self.norm0().clamp_min_(_L1_CLAMP).unsqueeze(0))
            x.div_(self.norm1().clamp_min_(_L1_CLAMP).unsqueeze(1))
        else:
            self._sub_lse(0, self.sum0)
            self._sub_lse(1, self.sum1)

    @staticmethod
    def _plus_eps(s: torch.Tensor, eps: float) -> torch.Tensor:
        return s.add_(eps) if eps != 0 else s  # s + 0.0 == s for the non-negative sums here

    def _sub_lse(self, axis: int, total: _Sum) -> None:
        """x -= logsumexp(x, axis) as torch computes it: max (+-inf -> 0), exp(x - max), sum, log, + max."""
        assert self.e is not None
        mx = torch.amax(self.x, dim=axis, out=self.m).nan_to_num_(nan=math.nan, posinf=0.0, neginf=0.0)
        torch.sub(self.x, mx.unsqueeze(axis), out=self.e).exp_()
        lse = total().log_().add_(mx)
        self.x.sub_(lse.unsqueeze(axis))

    def paper_matrix(self) -> torch.Tensor:
        """The block holding the paper matrix's entries (state orientation): x, or exp(x) for the log domain."""
        if self.e is None:
            return self.x
        return torch.exp(self.x, out=self.e)

    def errors(self, row_out: torch.Tensor, col_out: torch.Tensor) -> None:
        """Per matrix max_i |sum_j H_ij - 1| -> row_out [b], max_j |sum_i H_ij - 1| -> col_out [b]."""
        self.paper_matrix()
        by_axis = (self.sum0, self.sum1)
        rows, cols = (1, 0) if self.paper_rows_axis == 1 else (0, 1)
        for axis, out in ((rows, row_out), (cols, col_out)):
            torch.amax(by_axis[axis]().sub_(1).abs_(), dim=0, out=out)

    def worst_error(self, out: torch.Tensor) -> None:
        """Per matrix max(row error, column error) -> out [b]: the larger of :meth:`errors`' two, bit for bit
        (a max of the same values), in one reduction over both axes' sums."""
        self.paper_matrix()
        self.sum0()
        self.sum1()
        torch.amax(self.s01.sub_(1).abs_(), dim=0, out=out)

    def paper_into(self, out: torch.Tensor) -> None:
        """The paper-orientation matrices [b, n, n] into ``out``."""
        src = self.paper_matrix()
        out.copy_(src.permute(2, 0, 1) if self.conv in _PAPER_STATE else src.permute(2, 1, 0))

    def keep(self, cols: torch.Tensor) -> _Block:
        """A block of only the matrices ``cols`` (indices into this block), carrying their state."""
        x = self.x.index_select(2, cols)
        return _Block(self.conv, self.n, x.shape[2], x.dtype, self.orders, x=x)


#: conventions whose engine state is the paper matrix itself (the others loop on its transpose)
_PAPER_STATE = (Convention.PAPER, Convention.TRANSFORMERS_SIGMOID)


def _whole_start(flat: torch.Tensor, conv: Convention, eps: float) -> torch.Tensor:
    """What the blocks load from: the logits [B, n, n], or for transformers-sigmoid its start state computed on
    the whole batch at once, at the caller's thread count, as the reference does (torch's float32 sigmoid
    differs by an ulp between its vector loop and the scalar tail of each parallel chunk, so only the same
    tensor, split the same way, gives the same bits)."""
    return _sig_start(flat, eps) if conv is Convention.TRANSFORMERS_SIGMOID else flat


def _engine_orders(x: torch.Tensor, conv: Convention) -> _Orders | None:
    """The orders for the engine on ``x`` [..., n, n], or None where the reference loop must run instead:
    autograd recording (the engine works in place), a non-CPU device, an empty batch, sums it cannot match,
    paper-convention logits whose memory is not in row-major order (the reference's exp keeps that layout,
    and torch's sums then add in another order)."""
    if x.device.type != "cpu" or x.numel() == 0 or (x.requires_grad and torch.is_grad_enabled()):
        return None
    if conv is Convention.PAPER and not _row_major(x):
        return None
    return _orders(x.dtype, x.shape[-1])


def _row_major(x: torch.Tensor) -> bool:
    """Whether the dims of ``x`` longer than 1 have strictly decreasing strides (row-major, gaps allowed)."""
    strides = [st for size, st in zip(x.shape, x.stride(), strict=True) if size > 1]
    return all(a > b for a, b in zip(strides, strides[1:], strict=False))


def _block_width(n: int, total: int) -> int:
    """Matrices per block of :func:`sinkhorn` (the engine runs on one thread, see :func:`one_thread`)."""
    return max(1, min(total, _BLOCK_ELEMS // (n * n)))


def _search_width(n: int, total: int) -> int:
    """Matrices per block of :func:`iters_to_tol_detail`: 4x :func:`_block_width`'s entries. Each iteration of the
    search is some 15 small ops whatever the block (step, errors, stops), so larger blocks pay them fewer times
    (measured, 352K 4 x 4 float64 at DeepSeek-V4's settings: 1.9 s at 2^15 entries, 1.1 s at 2^17, 0.6 s at 2^19)."""
    return max(1, min(total, _SEARCH_ELEMS // (n * n)))


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """torch on one intra-op thread for the duration (restored after; nothing changes where it already is 1).

    The engine is many small ops on cache-sized blocks. With intra-op threads each op that crosses torch's
    parallel grain pays a fork/join, and on a shared machine a barrier waits for a descheduled thread; below the
    grain the blocks get 4x smaller. Measured (2 shared cores, iters_to_tol on 352K 4 x 4 float64 matrices):
    2 threads 2.1x the time of one thread at equal blocks. The engine's bits do not depend on it (its ops are
    elementwise or reductions that torch splits by outputs; tests: engine on one thread == reference on two)."""
    prev = torch.get_num_threads()
    if prev == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(prev)


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
    every iteration are kept (computed in the same loop). Gradients flow through every convention (with
    autograd recording, the out-of-place reference loop runs; otherwise the in-place engine, same bits).

    Returns :class:`SinkhornResult`. Raises UsageError for an unknown convention, iters < 1, bad eps or tol.
    NaN/Inf logits are not checked here (use :func:`check_finite`); they propagate as NaN.
    """
    conv = parse_convention(convention)
    _check_iters(iters, "iters")
    if tol is not None and not (math.isfinite(tol) and tol >= 0):
        raise UsageError(f"tol must be finite and >= 0, got {tol!r}", option="tol")
    x = _prepare(logits, conv, eps)
    orders = _engine_orders(x, conv)
    if orders is None:
        return _reference_sinkhorn(x, _CONVENTIONS[conv], eps, iters, tol, record)
    n, lead = x.shape[-1], x.shape[:-2]
    src = _whole_start(x.reshape(-1, n, n), conv, eps)
    B = src.shape[0]
    out = torch.empty(B, n, n, dtype=x.dtype)
    rows = torch.empty(iters if record else 1, B, dtype=x.dtype)
    cols = torch.empty_like(rows)
    with one_thread():
        k, converged = _engine_run(src, conv, orders, eps, iters, tol, record, out, rows, cols)
    return SinkhornResult(
        matrix=out.reshape(*lead, n, n),
        iters_used=k,
        converged=converged,
        row_err_history=rows[:k].reshape(k, *lead) if record else None,
        col_err_history=cols[:k].reshape(k, *lead) if record else None,
    )


def _engine_run(
    src: torch.Tensor, conv: Convention, orders: _Orders, eps: float, iters: int, tol: float | None, record: bool,
    out: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor,
) -> tuple[int, bool | None]:
    """sinkhorn's engine loop over blocks: matrices into ``out`` [B, n, n], errors into rows / cols [k, B] with
    ``record`` (else [1, B] scratch where ``tol`` needs them); returns (iterations run, converged)."""
    B, n = src.shape[0], src.shape[-1]
    track = record or tol is not None
    # with tol the whole batch stops at one iteration, so it is one block; otherwise cache-sized blocks
    width = B if tol is not None else _block_width(n, B)
    converged: bool | None = None if tol is None else False
    blk: _Block | None = None
    k = 0
    for lo in range(0, B, width):
        hi = min(B, lo + width)
        if blk is None or blk.b != hi - lo:
            blk = _Block(conv, n, hi - lo, src.dtype, orders)
        blk.load(src[lo:hi], eps)
        for k in range(1, iters + 1):
            blk.step(k, eps)
            if track:
                h = k - 1 if record else 0
                blk.errors(rows[h, lo:hi], cols[h, lo:hi])
                if tol is not None and bool((rows[h] <= tol).all()) and bool((cols[h] <= tol).all()):
                    converged = True
                    break
        blk.paper_into(out[lo:hi])
    return k, converged


def _reference_sinkhorn(
    x: torch.Tensor, impl: _Impl, eps: float, iters: int, tol: float | None, record: bool
) -> SinkhornResult:
    """:func:`sinkhorn` by the reference step functions, out of place (autograd, other devices)."""
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


def effective_spec(
    module_spec: SinkhornSpec | None,
    *,
    iters: int | None = None,
    convention: Convention | str | None = None,
    eps: float | None = None,
    sources: dict[str, str] | None = None,
    option: str = "convention",
) -> tuple[SinkhornSpec, dict[str, str]]:
    """The Sinkhorn spec a site is analysed with, and where each setting came from.

    Precedence: the options (``iters`` / ``convention`` / ``eps``, sources "cli (--iters)", "cli (--convention)",
    "api (eps=)") > the site's spec as loaded (its ``source``: "metadata", "config", ...) > the paper default
    (``paper``, 20 iterations, source "default"). eps: the site's own while the convention is the site's, or
    another convention with an eps (the model's hc_eps holds for both transformers conventions); otherwise
    :func:`default_eps` (0 for the conventions without one). ``option``: the name a bad ``convention`` is
    refused under.
    ``sources``: the loader's per-setting sources (``LoadedModel.settings_source``), used where the site's
    spec carries one source for all settings.
    Returns (spec, {"convention": source, "iters": source, "eps": source}); the spec's own ``source`` is "cli"
    when an option replaced any setting, else the loaded spec's. The one place that lays the options over a
    spec: every reader (through :func:`hcdiag.io.reader.sinkhorn_settings` or directly) and every command.
    """
    base = module_spec if module_spec is not None else PAPER_DEFAULT
    known = dict(sources or {}) if module_spec is not None else {}

    def base_src(key: str) -> str:
        return str(known.get(key, base.source))

    base_conv = parse_convention(base.convention)
    conv = parse_convention(convention, option) if convention is not None else base_conv
    conv_src = CLI_SOURCE["convention"] if convention is not None else base_src("convention")
    if iters is not None:
        if isinstance(iters, bool) or not isinstance(iters, int) or iters < 1:
            raise UsageError(f"--iters must be an integer >= 1, got {iters!r}", option="--iters")
        it, it_src = iters, CLI_SOURCE["iters"]
    else:
        it, it_src = int(base.iters), base_src("iters")
    if eps is not None:
        e, e_src = float(eps), CLI_SOURCE["eps"]
    elif conv is base_conv or (has_eps(conv) and has_eps(base_conv)):
        e, e_src = float(base.eps), base_src("eps")
    else:
        e, e_src = default_eps(conv)
    used = {"convention": conv_src, "iters": it_src, "eps": e_src}
    by_option = any(src in CLI_SOURCE.values() for src in used.values())
    return SinkhornSpec(conv, it, e, "cli" if by_option else base.source), used


#: the source a setting gets when an option sets it (no command has an --eps option: eps is set only through the
#: Python API's ``eps=``)
CLI_SOURCE = {"convention": "cli (--convention)", "iters": "cli (--iters)", "eps": "api (eps=)"}


def default_eps(convention: Convention | str) -> tuple[float, str]:
    """(eps, source) of a convention whose eps nobody stated: DeepSeek-V4's hc_eps for the conventions that
    have one (:func:`has_eps`), else 0."""
    if has_eps(convention):
        return TRANSFORMERS_DEFAULT_EPS, "default (transformers hc_eps)"
    return 0.0, "default"


def has_eps(convention: Convention | str) -> bool:
    """Whether the convention takes an eps (transformers, transformers-sigmoid: DeepSeek-V4's ``hc_eps``)."""
    return _CONVENTIONS[parse_convention(convention)].has_eps


def exact_axis(convention: Convention | str) -> str:
    """``"rows"`` or ``"columns"``: the paper axis whose sums the convention's last pass sets to 1.

    paper, transformers: rows (comb's final dim=-2 pass is paper rows). log, lucidrains: columns.
    """
    return _CONVENTIONS[parse_convention(convention)].exact_axis


@dataclass(frozen=True)
class ItersToTol:
    """Outcome of :func:`iters_to_tol_detail`; tensors are [...] (the leading dims of the logits).

    iters: int64, per matrix the first iteration count after which both axes are within ``tol``; -1 where it
        did not get there within ``max_iters`` (or was stopped early because it cannot, see below).
    estimate: float64, for the -1 entries: about how many iterations ``tol`` needs (measured contraction rate
        extrapolated; inf: never, e.g. below the eps floor or the error settles above tol; NaN: no estimate,
        e.g. the error was not decaying steadily by the cap). NaN where ``iters`` >= 0.
    rate: float64, for the -1 entries with an estimate: the error's measured contraction per iteration
        (e_k - e_inf ~ rate^k). NaN elsewhere.
    reason: why no matrix was iterated at all (tol below the convention's eps floor), else None.
    matrix_iters: matrix-iterations computed (the cost; B * max_iters without early stops).
    """

    iters: torch.Tensor
    estimate: torch.Tensor
    rate: torch.Tensor
    reason: str | None
    matrix_iters: int


def eps_floor(convention: Convention | str, n: int, eps: float) -> float:
    """A lower bound on max(row error, column error) after any number of iterations, in exact arithmetic.

    transformers with eps > 0: every pass divides by (sum + eps), so after iteration k the exact axis sums to
    s_i / (s_i + eps) with sum_i s_i <= n (1 + n eps) (the softmax mass plus eps per entry at k = 1, less than n
    after a row pass); by convexity the other axis then misses 1 by at least eps / (1 + (n + 1) eps) somewhere,
    and so does the exact axis. 0 for the conventions without eps (sums can round to exactly 1).
    """
    conv = parse_convention(convention)
    if not _CONVENTIONS[conv].has_eps or eps <= 0:
        return 0.0
    return eps / (1 + (n + 1) * eps)


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

    logits [..., n, n] paper orientation -> int64 [...]. Each matrix stops as soon as it arrives, or as soon as
    it provably or measurably cannot within ``max_iters`` (see :func:`iters_to_tol_detail`, which also says how
    many iterations those would need). Uses the same engine as :func:`sinkhorn`, so
    ``sinkhorn(x, c, k).matrix`` for the returned k meets ``tol``.
    With ``eps > 0`` (transformers) the reachable tolerance is limited to about eps (:func:`eps_floor`).
    """
    return iters_to_tol_detail(logits, convention, tol, eps=eps, max_iters=max_iters).iters


def iters_to_tol_detail(
    logits: torch.Tensor,
    convention: Convention | str,
    tol: float,
    *,
    eps: float = 0.0,
    max_iters: int = 1000,
) -> ItersToTol:
    """:func:`iters_to_tol` with, for the matrices that do not get there, an estimate and the reason.

    A matrix stops when it reaches ``tol`` (its count, exactly as a full run would give it); when its state
    repeats bit for bit (a fixed point or a 2-cycle of the iteration, typical where eps holds the error just
    above tol: count -1, estimate inf, proven); when its error has been shrinking geometrically and steadily
    long enough that even the fastest rate seen (or sigma_2^2 of the current matrix, if faster) extrapolates past
    1.25 x ``max_iters`` (count -1, estimate and rate; a measured rule: on random batches the counts of every
    matrix that arrives equal the full search's, see tests); or, for the whole batch at once, when ``tol`` is
    below :func:`eps_floor` (reason says so). Matrices still running at ``max_iters`` get an estimate too where
    their last iterations show a steady rate.
    """
    conv = parse_convention(convention)
    _check_iters(max_iters, "max_iters")
    if not (math.isfinite(tol) and tol >= 0):
        raise UsageError(f"tol must be finite and >= 0, got {tol!r}", option="tol")
    x = _prepare(logits, conv, eps).detach()
    n, lead = x.shape[-1], x.shape[:-2]
    flat = x.reshape(-1, n, n)
    B = flat.shape[0]
    iters = torch.full((B,), -1, dtype=torch.int64)
    estimate = torch.full((B,), math.nan, dtype=torch.float64)
    rate = torch.full((B,), math.nan, dtype=torch.float64)
    floor = eps_floor(conv, n, eps)
    # computed sums carry rounding of a few units in the last place; only a clear gap proves the point
    if tol < floor - 4 * n * torch.finfo(x.dtype).eps:
        estimate.fill_(math.inf)
        reason = (
            f"tol {tol:.3g} is below the {conv.value} convention's eps floor {floor:.6g} (eps = {eps:g}, n = {n}): "
            "no number of iterations reaches it"
        )
        return ItersToTol(iters.reshape(lead), estimate.reshape(lead), rate.reshape(lead), reason, 0)
    orders = _engine_orders(x, conv)
    cost = 0
    if orders is None:
        cost = _reference_iters_to_tol(flat, _CONVENTIONS[conv], eps, tol, max_iters, iters)
    else:
        src = _whole_start(flat, conv, eps)
        width = _search_width(n, B)
        with one_thread():
            for lo in range(0, B, width):
                hi = min(B, lo + width)
                blk = _Block(conv, n, hi - lo, x.dtype, orders)
                blk.load(src[lo:hi], eps)
                cost += _block_iters_to_tol(blk, eps, tol, max_iters, iters[lo:hi], estimate[lo:hi], rate[lo:hi])
    return ItersToTol(iters.reshape(lead), estimate.reshape(lead), rate.reshape(lead), None, cost)


def _reference_iters_to_tol(
    flat: torch.Tensor, impl: _Impl, eps: float, tol: float, max_iters: int, out: torch.Tensor
) -> int:
    """The whole batch, iteration after iteration, until every matrix has arrived (other devices)."""
    k = 0
    for k, state in _iterate(flat, impl, eps, max_iters):
        r, c = _axis_errors(impl.to_paper(state))
        out[(r <= tol) & (c <= tol) & (out < 0)] = k
        if bool((out >= 0).all()):
            break
    return k * flat.shape[0]


def _block_iters_to_tol(
    blk: _Block, eps: float, tol: float, max_iters: int, out: torch.Tensor, estimate: torch.Tensor,
    rate: torch.Tensor,
) -> int:
    """iters_to_tol for one loaded block: out / estimate / rate [b] are filled in; returns matrix-iterations.

    A matrix leaves when it arrives, when its state repeats bit for bit (a fixed point or a 2-cycle of the
    iteration: its errors can never change again, so a matrix still above tol never arrives), or when the
    contraction bound of :class:`_RateWatch` puts its arrival past the cap. Matrices that left keep iterating,
    harmlessly, until at most half the block is live; the block then shrinks to the live ones, so the work
    follows the matrices still running."""
    where = torch.arange(blk.b)  # position in ``out`` of each block column
    alive = torch.ones(blk.b, dtype=torch.bool)
    watch = _RateWatch(blk.b, tol, blk.x.dtype, blk.n)
    err = torch.empty(blk.b, dtype=blk.x.dtype)  # max(row, col) error: both <= tol iff it is (NaN: neither)
    stop = torch.empty(blk.b, dtype=torch.bool)
    snap: torch.Tensor | None = None  # state at iteration k0, compared at k0 + 1 and k0 + 2
    repeats = torch.zeros(blk.b, dtype=torch.bool)
    cost, live = 0, blk.b
    for k in range(1, max_iters + 1):
        blk.step(k, eps)
        cost += blk.b
        blk.worst_error(err)
        torch.le(err, tol, out=stop).logical_and_(alive)  # compared in the block's dtype, as errors() were
        changed = bool(stop.any())
        if changed:
            out[where[stop]] = k
            alive.logical_xor_(stop)  # stop is within alive
        watch.record(k, err)
        if snap is not None:  # k = k0 + 1 or k0 + 2
            repeats |= torch.eq(blk.x, snap).flatten(0, 1).all(0)
            if k % _CYCLE_EVERY == 2:
                settled = repeats & alive
                estimate[where[settled]] = math.inf
                alive &= ~settled
                snap, changed = None, True
        elif k % _CYCLE_EVERY == 0 and k >= _CYCLE_EVERY:
            snap = blk.x.clone()
            repeats.zero_()
        if watch.ready() and k % _CYCLE_EVERY == 4:
            est, rt, bound = watch.model(_sigma2_sq(blk, alive))
            slow = alive & (bound > _GIVE_UP_MARGIN * max_iters)
            if bool(slow.any()):
                estimate[where[slow]], rate[where[slow]] = est[slow], rt[slow]
                alive &= ~slow
                changed = True
        if changed:
            live = int(alive.sum())
        if live == 0:
            break
        if 2 * live <= blk.b and snap is None:
            keep = alive.nonzero().squeeze(1)
            blk, where, alive, watch = blk.keep(keep), where[keep], alive[keep], watch.keep(keep)
            err, stop, repeats = err[keep], stop[keep], repeats[keep]
    else:
        est, rt, _ = watch.model()
        estimate[where[alive]], rate[where[alive]] = est[alive], rt[alive]
    return cost

def _sigma2_sq(blk: _Block, which: torch.Tensor) -> torch.Tensor:
    """sigma_2(H)^2 per matrix of the block, for the finite matrices in ``which`` (NaN for the rest)."""
    out = torch.full((blk.b,), math.nan, dtype=torch.float64)
    if blk.n < 2:
        return out
    H = blk.paper_matrix().permute(2, 0, 1).to(torch.float64)
    ok = which & torch.isfinite(H).flatten(1).all(1)
    if bool(ok.any()):
        out[ok] = torch.linalg.svdvals(H[ok])[:, 1].square()
    return out


class _RateWatch:
    """Per matrix, the worst error max(row, col) of the last few iterations, and from it a lower bound on the
    iteration count at which the matrix could reach ``tol``.

    Near its limit Sinkhorn converges linearly: e_k - e_inf ~ A q^k (q about sigma_2^2, Knight 2008; e_inf > 0
    only where eps keeps the sums below 1). Over a window of _WINDOW differences d_t = e_{t-1} - e_t the ratios
    d_t / d_{t-1} measure q; the window counts only where every difference is clear of rounding and the ratios
    agree. Since e_inf >= 0, reaching tol takes at least log((tol + noise) / e_k) / log(q) more iterations
    (noise: how far rounding can move a computed error). The measured ratio can still fall later (an early
    phase slower than the asymptotic rate), so the bound uses the smaller of the fastest ratio seen and
    sigma_2(H_k)^2, the rate the iteration tends to (measured: sigma_2^2 of the current matrix is within about
    1e-3 of the final rate by iteration 100 and mostly below it before); a matrix is given up only when that
    bound exceeds _GIVE_UP_MARGIN x cap.
    """

    _WINDOW = 8
    _FIRST = 32  # no decision before this many iterations (the early, non-asymptotic phase)

    def __init__(self, b: int, tol: float, dtype: torch.dtype, n: int, hist: torch.Tensor | None = None) -> None:
        self.tol, self.n, self.dtype = tol, n, dtype
        self.noise = 64 * n * torch.finfo(dtype).eps  # computed errors are |fl(sum) - 1|: a few ulp of 1 off
        self.hist = torch.zeros(self._WINDOW + 1, b, dtype=torch.float64) if hist is None else hist
        self.k = 0

    def keep(self, cols: torch.Tensor) -> _RateWatch:
        w = _RateWatch(0, self.tol, self.dtype, self.n, hist=self.hist.index_select(1, cols))
        w.k = self.k
        return w

    def record(self, k: int, worst: torch.Tensor) -> None:
        """The error max(row, col) [b] after iteration k."""
        self.k = k
        self.hist[k % len(self.hist)].copy_(worst)

    def ready(self) -> bool:
        return self.k >= self._FIRST

    def model(self, sigma2_sq: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(estimate, rate, lower bound) of the iteration count reaching tol, per matrix; NaN where the window
        does not show steady geometric decay. estimate and rate: the window's mean ratio or, if slower,
        ``sigma2_sq`` [b] (sigma_2(H_k)^2); the lower bound: the fastest of the ratios seen and sigma2_sq."""
        H = len(self.hist)
        order = torch.tensor([(self.k - self._WINDOW + t) % H for t in range(H)])
        e = self.hist.index_select(0, order)  # oldest first
        d = e[:-1] - e[1:]  # decrease per iteration
        q = d[1:] / d[:-1]
        q_lo, q_hi = q.amin(0), q.amax(0)
        steady = (d > self.noise).all(0) & (q_hi < 1) & (q_hi - q_lo <= 0.1 * (1 - q_hi))
        q_mid = (d[-1] / d[0]).pow(1 / (self._WINDOW - 1))
        gap = math.log(self.tol + self.noise) - e[-1].log()  # < 0 while the error is above tol

        def needed(qq: torch.Tensor) -> torch.Tensor:
            k_tol = self.k + (gap / qq.log()).clamp_min(0)
            return torch.where(steady, k_tol, torch.full_like(k_tol, math.nan))

        fastest = q_lo if sigma2_sq is None else torch.minimum(q_lo, sigma2_sq)
        # the estimate: the slower of the measured and the asymptotic rate (brute force: median estimate /
        # true count 1.00, 80% within +-15%, on random 4 x 4 and 8 x 8 paper logits given up at cap 200)
        likely = q_mid if sigma2_sq is None else torch.fmax(q_mid, sigma2_sq)
        nan = torch.full_like(q_mid, math.nan)
        return needed(likely), torch.where(steady, likely, nan), needed(fastest)

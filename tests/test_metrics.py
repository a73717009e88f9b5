"""Metrics against published figures (mHC Fig. 8, SPEC sec. 6), closed forms, numpy and scipy."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hcdiag.errors import UsageError
from hcdiag.metrics import (
    ABSORPTION_RANGE_BF16,
    ABSORPTION_RANGE_F32,
    ABSORPTION_RANGE_F64,
    LOGIT_RANGE_WARN,
    UNDERFLOW_RANGE_F32,
    UNDERFLOW_RANGE_F64,
    ZERO_RANGE_F32,
    backward_composites,
    dist_identity,
    dist_uniform,
    ds_error,
    forward_composites,
    gain_backward,
    gain_forward,
    logit_range,
    nearest_ds,
    nearest_ds_distance,
    percentiles,
    sigma2,
    spectral_norm,
)

# mHC Fig. 8 (27B, n = 4, token-averaged; entries rounded to 2 decimals => sums good to about +-0.02)
HC_H1 = [[5.43, 4.43, 4.43, 4.43], [-4.07, -3.07, -4.07, -4.07], [-3.95, -3.95, -2.95, -3.95],
         [-4.22, -4.22, -4.22, -3.22]]  # fmt: skip
MHC_H1 = [[0.67, 0.09, 0.03, 0.22], [0.26, 0.48, 0.26, 0.00], [0.03, 0.24, 0.00, 0.73],
          [0.03, 0.20, 0.69, 0.09]]  # fmt: skip
MHC_COMPOSITE = [[0.35, 0.28, 0.17, 0.20], [0.03, 0.62, 0.29, 0.07], [0.01, 0.17, 0.80, 0.02],
                 [0.02, 0.42, 0.25, 0.31]]  # fmt: skip
ROUNDING = 0.02  # four entries each rounded by <= 0.005


def _t(rows: list[list[float]]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float64)


# ---------------------------------------------------------------------------------- published figures


def test_fig8_hc_h_res_1() -> None:
    e = ds_error(_t(HC_H1))
    np.testing.assert_allclose(e.row_sums.numpy(), [18.73, -15.29, -14.79, -15.88], atol=ROUNDING)
    np.testing.assert_allclose(e.col_sums.numpy(), [-6.81] * 4, atol=ROUNDING)
    assert gain_forward(_t(HC_H1)).item() == pytest.approx(18.73, abs=ROUNDING)
    assert gain_backward(_t(HC_H1)).item() == pytest.approx(6.81, abs=ROUNDING)
    assert e.row_err_max.item() == pytest.approx(17.73, abs=ROUNDING)
    assert e.col_err_max.item() == pytest.approx(7.81, abs=ROUNDING)
    assert e.min_entry.item() == -4.22


def test_fig8_mhc_h_res_1() -> None:
    e = ds_error(_t(MHC_H1))
    np.testing.assert_allclose(e.row_sums.numpy(), [1.00] * 4, atol=ROUNDING)
    np.testing.assert_allclose(e.col_sums.numpy(), [0.98, 1.00, 0.98, 1.04], atol=ROUNDING)
    assert e.min_entry.item() == 0.0


def test_fig8_mhc_composite() -> None:
    M = _t(MHC_COMPOSITE)
    e = ds_error(M)
    np.testing.assert_allclose(e.col_sums.numpy(), [0.41, 1.50, 1.50, 0.60], atol=ROUNDING)
    np.testing.assert_allclose(e.row_sums.numpy(), [1.00] * 4, atol=ROUNDING)  # exact rows survive products
    assert gain_backward(M).item() == pytest.approx(1.50, abs=ROUNDING)  # "at or below about 1.6"
    assert gain_forward(M).item() == pytest.approx(1.00, abs=ROUNDING)


# --------------------------------------------------------------------------------------- closed forms


def test_gain_is_signed_sum_not_induced_norm() -> None:
    M = _t([[1.0, -1.0], [0.0, 0.5]])
    assert gain_forward(M).item() == 0.5  # induced inf-norm would be 2
    assert gain_backward(M).item() == 1.0  # |1 + 0|, |-1 + 0.5| ; induced 1-norm would be 1.5
    M2 = -torch.eye(3, dtype=torch.float64) * 2
    assert gain_forward(M2).item() == 2.0 and gain_backward(M2).item() == 2.0


@pytest.mark.parametrize("a", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("n", [2, 4, 8])
def test_spectral_closed_forms(n: int, a: float) -> None:
    """M = (1-a) I + a J/n: singular values 1 and (1-a) (n-1 times); ||M-J/n|| = (1-a) sqrt(n-1)."""
    I, J = torch.eye(n, dtype=torch.float64), torch.ones(n, n, dtype=torch.float64)
    M = (1 - a) * I + a * J / n
    assert spectral_norm(M).item() == pytest.approx(1.0, abs=1e-14)
    assert sigma2(M).item() == pytest.approx(1 - a, abs=1e-14)
    assert dist_uniform(M).item() == pytest.approx((1 - a) * math.sqrt(n - 1), abs=1e-14)
    assert dist_identity(M).item() == pytest.approx(a * math.sqrt(n - 1), abs=1e-14)
    e = ds_error(M)
    assert e.row_err_max.item() < 1e-15 and e.col_err_max.item() < 1e-15


def test_spectral_matches_numpy_batched() -> None:
    g = torch.Generator().manual_seed(0)
    M = torch.randn(3, 5, 4, 4, generator=g, dtype=torch.float64)
    s = np.linalg.svd(M.numpy(), compute_uv=False)
    np.testing.assert_allclose(spectral_norm(M).numpy(), s[..., 0], rtol=1e-13)
    np.testing.assert_allclose(sigma2(M).numpy(), s[..., 1], rtol=1e-13)
    np.testing.assert_allclose(
        dist_uniform(M).numpy(), np.linalg.norm(M.numpy() - 0.25, axis=(-2, -1)), rtol=1e-14
    )
    assert sigma2(torch.ones(2, 1, 1)).tolist() == [0.0, 0.0]


def test_ds_error_matches_loops() -> None:
    g = torch.Generator().manual_seed(1)
    M = torch.rand(6, 3, 3, generator=g, dtype=torch.float64)
    e = ds_error(M.float())  # float32 in, float64 out
    assert e.row_err_max.dtype == torch.float64
    Mn = M.float().double().numpy()
    for b in range(6):
        r = [abs(sum(Mn[b, i, j] for j in range(3)) - 1) for i in range(3)]
        c = [abs(sum(Mn[b, i, j] for i in range(3)) - 1) for j in range(3)]
        assert e.row_err_max[b].item() == pytest.approx(max(r), abs=1e-15)
        assert e.row_err_mean[b].item() == pytest.approx(sum(r) / 3, abs=1e-15)
        assert e.col_err_max[b].item() == pytest.approx(max(c), abs=1e-15)
        assert e.col_err_mean[b].item() == pytest.approx(sum(c) / 3, abs=1e-15)
        assert e.min_entry[b].item() == Mn[b].min()


def test_logit_range() -> None:
    x = torch.tensor([[[0.0, 3.0], [-2.0, 1.0]], [[5.0, 5.0], [5.0, 5.0]]])
    assert logit_range(x).tolist() == [5.0, 0.0]
    assert logit_range(x, dims=(-1,)).tolist() == [[3.0, 3.0], [0.0, 0.0]]


def test_threshold_constants_are_where_float_formats_break() -> None:
    """Each threshold R is where exp(-R) crosses the float-format limit it is named after."""
    d = 1e-3

    def rounded_sum(x: float, dtype: torch.dtype) -> float:
        # 1 + exp(-x) exactly (the float64 sum is exact enough here), then rounded once to the format
        return torch.tensor(1 + math.exp(-x), dtype=torch.float64).to(dtype).item()

    for R, dtype in [
        (ABSORPTION_RANGE_F32, torch.float32),
        (ABSORPTION_RANGE_BF16, torch.bfloat16),
    ]:
        assert rounded_sum(R + d, dtype) == 1.0  # absorbed: the sum does not see the entry
        assert rounded_sum(R - d, dtype) > 1.0
    assert 1.0 + math.exp(-(ABSORPTION_RANGE_F64 + d)) == 1.0  # python floats are float64
    assert 1.0 + math.exp(-(ABSORPTION_RANGE_F64 - d)) > 1.0
    tiny32 = torch.finfo(torch.float32).tiny
    assert torch.exp(torch.tensor(-(UNDERFLOW_RANGE_F32 + d))) < tiny32
    assert torch.exp(torch.tensor(-(UNDERFLOW_RANGE_F32 - d))) >= tiny32
    assert torch.exp(torch.tensor(-(ZERO_RANGE_F32 + d))) == 0
    assert torch.exp(torch.tensor(-(ZERO_RANGE_F32 - d))) > 0
    assert math.exp(-(UNDERFLOW_RANGE_F64 + d)) < torch.finfo(torch.float64).tiny
    assert LOGIT_RANGE_WARN == ABSORPTION_RANGE_F32
    assert (round(ABSORPTION_RANGE_F32, 2), round(UNDERFLOW_RANGE_F32, 2)) == (16.64, 87.34)


# ----------------------------------------------------------------------------------------- composites


def _np_forward(H: np.ndarray) -> np.ndarray:
    L, S = H.shape[:2]
    out = np.empty_like(H)
    for s in range(S):
        acc = np.eye(H.shape[-1])
        for layer in range(L):
            acc = H[layer, s] @ acc
            out[layer, s] = acc
    return out


def _np_backward(H: np.ndarray) -> np.ndarray:
    L, S = H.shape[:2]
    out = np.empty_like(H)
    for s in range(S):
        for layer in range(L):
            acc = np.eye(H.shape[-1])
            for m in range(layer, L):  # H_L ... H_l: later layers on the left
                acc = H[m, s] @ acc
            out[layer, s] = acc
    return out


@pytest.mark.parametrize("n", [2, 4])
@pytest.mark.parametrize("L", [1, 2, 7])
def test_composites_match_brute_force(L: int, n: int) -> None:
    g = torch.Generator().manual_seed(L * 10 + n)
    H = torch.randn(L, 3, n, n, generator=g, dtype=torch.float64)
    np.testing.assert_allclose(forward_composites(H).numpy(), _np_forward(H.numpy()), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(
        backward_composites(H).numpy(), _np_backward(H.numpy()), rtol=1e-12, atol=1e-12
    )
    # the whole-depth product is the last forward composite and the first backward one
    torch.testing.assert_close(forward_composites(H)[-1], backward_composites(H)[0], rtol=1e-12, atol=1e-12)


def test_composites_bfloat16_accumulate_in_bfloat16() -> None:
    g = torch.Generator().manual_seed(3)
    H = torch.eye(4, dtype=torch.float64) + 0.1 * torch.randn(12, 2, 4, 4, generator=g, dtype=torch.float64)
    f16 = forward_composites(H.bfloat16())
    assert f16.dtype == torch.bfloat16
    ref = _np_forward(H.bfloat16().double().numpy())
    np.testing.assert_allclose(f16.double().numpy(), ref, rtol=0.05, atol=0.05)
    # but it is not the float64 product: rounding accumulated in bf16
    assert not np.allclose(f16.double().numpy(), ref, rtol=0, atol=1e-6)


def test_composites_reject_bad_shape() -> None:
    with pytest.raises(UsageError):
        forward_composites(torch.zeros(4, 4))
    with pytest.raises(UsageError):
        ds_error(torch.zeros(3, 4))


PERMS4 = [torch.eye(4, dtype=torch.float64)[list(p)] for p in itertools.permutations(range(4))]


@st.composite
def ds_stacks(draw: st.DrawFn) -> torch.Tensor:
    """[L, n, n] stacks of exactly doubly stochastic matrices: convex combinations of permutation matrices."""
    L = draw(st.integers(1, 6))
    mats = []
    for _ in range(L):
        idx = draw(st.lists(st.integers(0, 23), min_size=1, max_size=4))
        w = draw(st.lists(st.floats(0.01, 1.0), min_size=len(idx), max_size=len(idx)))
        total = sum(w)
        mats.append(sum((wi / total) * PERMS4[i] for wi, i in zip(w, idx, strict=True)))
    return torch.stack(mats)


@settings(max_examples=60, deadline=None)
@given(ds_stacks())
def test_products_of_doubly_stochastic_stay_doubly_stochastic(H: torch.Tensor) -> None:
    for comp in (forward_composites(H), backward_composites(H)):
        e = ds_error(comp)
        assert e.row_err_max.max() < 1e-13 and e.col_err_max.max() < 1e-13
        assert e.min_entry.min() >= 0
        assert (gain_forward(comp) - 1).abs().max() < 1e-13 and (gain_backward(comp) - 1).abs().max() < 1e-13
        assert (spectral_norm(comp) - 1).abs().max() < 1e-12  # Birkhoff: ||M||_2 = 1


# ----------------------------------------------------------------------------------------- nearest DS


def _bvls_projection(m: np.ndarray) -> np.ndarray:
    """Independent oracle: bounded-variable least squares (active set, finite termination) on
    min ||x - m||^2 + W^2 ||A x - b||^2, x >= 0, with the sum constraints as a heavy penalty (W = 1e6).
    SLSQP was tried first: it fails on about 1 in 10 of these QPs ('Positive directional derivative')."""
    from scipy.optimize import lsq_linear

    n = m.shape[0]
    A = np.zeros((2 * n - 1, n * n))  # one column constraint is implied by the others
    for i in range(n):
        A[i, i * n : (i + 1) * n] = 1
    for j in range(n - 1):
        A[n + j, j::n] = 1
    W = 1e6
    lhs = np.vstack([np.eye(n * n), W * A])
    rhs = np.concatenate([m.ravel(), W * np.ones(2 * n - 1)])
    res = lsq_linear(lhs, rhs, bounds=(0, np.inf), method="bvls", tol=1e-15)
    assert res.status > 0, res.message
    return res.x.reshape(n, n)


@pytest.mark.parametrize("n", [3, 4])
def test_nearest_ds_matches_bvls_qp(n: int) -> None:
    g = torch.Generator().manual_seed(n)
    M = torch.randn(6, n, n, generator=g, dtype=torch.float64) * 0.5 + 1 / n
    res = nearest_ds(M)
    assert res.converged
    assert (res.matrix >= 0).all() and ds_error(res.matrix).row_err_max.max() < 1e-12
    for b in range(6):
        X = _bvls_projection(M[b].numpy())
        np.testing.assert_allclose(res.matrix[b].numpy(), X, rtol=0, atol=1e-8)
        assert res.distance[b].item() == pytest.approx(np.linalg.norm(M[b].numpy() - X), abs=1e-9)


def test_nearest_ds_closed_forms() -> None:
    # a doubly stochastic matrix is its own projection
    D = _t(MHC_COMPOSITE) * 0 + 0.25
    assert nearest_ds_distance(D).item() < 1e-12
    # a zero-sum perturbation keeping entries >= 0 stays on the polytope
    E = _t([[1, -1, 0, 0], [-1, 1, 0, 0], [0, 0, 1, -1], [0, 0, -1, 1]])
    assert nearest_ds_distance(D + 0.1 * E).item() < 1e-12
    # interior point plus t u 1^T (orthogonal to the affine hull): projection removes it;
    # distance t ||u|| sqrt(n)
    u = torch.tensor([1.0, -1.0, 0.0, 0.0], dtype=torch.float64)
    P = D + 0.05 * u[:, None] * torch.ones(4, dtype=torch.float64)
    assert nearest_ds_distance(P).item() == pytest.approx(0.05 * math.sqrt(2) * 2, abs=1e-12)
    # the HC matrix of Fig. 8 is far from the polytope
    assert nearest_ds_distance(_t(HC_H1)).item() > 15


# ---------------------------------------------------------------------------------------- percentiles


@pytest.mark.parametrize("T", [1, 2, 101, 1000])
def test_percentiles_match_numpy(T: int) -> None:
    g = torch.Generator().manual_seed(T)
    v = torch.randn(T, 3, 2, generator=g, dtype=torch.float64)
    out = percentiles(v, qs=(0, 50, 99, 99.9))
    assert set(out) == {"p0", "p50", "p99", "p99.9", "max", "mean"}
    for q in (0, 50, 99, 99.9):
        np.testing.assert_allclose(out[f"p{q:g}"].numpy(), np.percentile(v.numpy(), q, axis=0), rtol=1e-14)
    np.testing.assert_array_equal(out["max"].numpy(), v.numpy().max(0))
    np.testing.assert_allclose(out["mean"].numpy(), v.numpy().mean(0), rtol=0, atol=1e-15)
    with pytest.raises(UsageError):
        percentiles(v, qs=(101,))

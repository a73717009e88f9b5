"""Sinkhorn engine against independent oracles: POT, reference loops written here, and the real library code.

Orientation: hcdiag takes and returns paper orientation H [..., n, n] (row = output stream); the reference
libraries work on code orientation alpha = comb = H^T.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from hcdiag.enums import Convention
from hcdiag.errors import InputError, UsageError
from hcdiag.sinkhorn import (
    TRANSFORMERS_DEFAULT_EPS,
    SinkhornResult,
    check_finite,
    exact_axis,
    iters_to_tol,
    project,
    sinkhorn,
)
from hcdiag.site import SinkhornSpec

ALL = list(Convention)


def _logits(seed: int, shape: tuple[int, ...], scale: float = 1.0, dtype=torch.float64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g, dtype=torch.float64) * scale).to(dtype)


def _errs(m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-matrix max |row sum - 1|, max |col sum - 1| (paper orientation), written out independently."""
    row = torch.stack([(m[..., i, :].sum(-1) - 1).abs() for i in range(m.shape[-1])], -1).amax(-1)
    col = torch.stack([(m[..., :, j].sum(-1) - 1).abs() for j in range(m.shape[-1])], -1).amax(-1)
    return row, col


# ------------------------------------------------------------------------------------ reference loops


def ref_paper(logits: torch.Tensor, k: int) -> torch.Tensor:
    """mHC Eq. 9 as written: M0 = exp(H~), M_t = T_r(T_c(M_{t-1})); paper orientation throughout."""
    m = torch.exp(logits)
    for _ in range(k):
        m = m / m.sum(dim=-2, keepdim=True)
        m = m / m.sum(dim=-1, keepdim=True)
    return m


def ref_transformers(logits: torch.Tensor, k: int, eps: float) -> torch.Tensor:
    """The lines of DeepseekV4HyperConnection.forward on comb = H^T; returns paper orientation."""
    comb = torch.softmax(logits.transpose(-1, -2).contiguous(), dim=-1) + eps
    comb = comb / (comb.sum(dim=-2, keepdim=True) + eps)
    for _ in range(k - 1):
        comb = comb / (comb.sum(dim=-1, keepdim=True) + eps)
        comb = comb / (comb.sum(dim=-2, keepdim=True) + eps)
    return comb.transpose(-1, -2)


def ref_log_kromhc(logits: torch.Tensor, k: int) -> torch.Tensor:
    """KromHC hyper_conn/mhc.py sinkhorn_knopps (log domain) on alpha = H^T; returns paper orientation."""
    a = logits.transpose(-1, -2).contiguous()
    for _ in range(k):
        a = a - torch.logsumexp(a, dim=-2, keepdim=True)
        a = a - torch.logsumexp(a, dim=-1, keepdim=True)
    return a.exp().transpose(-1, -2)


# ------------------------------------------------------------------------------------------------ POT


@pytest.mark.parametrize("n", [3, 4, 8])
@pytest.mark.parametrize("convention", ALL)
def test_converged_limit_matches_pot(convention: Convention, n: int) -> None:
    """All four conventions converge to the unique doubly stochastic scaling diag(a) exp(L) diag(b)."""
    from ot.batch import bregman_log_projection_batch

    logits = _logits(n, (6, n, n), scale=1.5)
    ones = np.ones((6, n))
    pot = bregman_log_projection_batch(logits.numpy(), a=ones, b=ones, max_iter=20000, tol=1e-15)["T"]
    res = sinkhorn(logits, convention, 5000, tol=1e-15)
    assert res.converged is True and res.iters_used < 5000
    np.testing.assert_allclose(res.matrix.numpy(), pot, rtol=0, atol=1e-10)


# --------------------------------------------------------------------------------- exact reproduction


@pytest.mark.parametrize("k", [1, 5, 20])
@pytest.mark.parametrize("n", [2, 4])
def test_paper_equals_reference_loop(n: int, k: int) -> None:
    logits = _logits(10 + n, (5, n, n), scale=2.0)
    torch.testing.assert_close(sinkhorn(logits, "paper", k).matrix, ref_paper(logits, k), rtol=0, atol=1e-15)


@pytest.mark.parametrize("eps", [0.0, 1e-6, 1e-3])
@pytest.mark.parametrize("k", [1, 5, 20])
@pytest.mark.parametrize("n", [2, 4])
def test_transformers_equals_reference_loop(n: int, k: int, eps: float) -> None:
    logits = _logits(20 + n, (5, n, n), scale=2.0)
    out = sinkhorn(logits, "transformers", k, eps=eps).matrix
    torch.testing.assert_close(out, ref_transformers(logits, k, eps), rtol=0, atol=1e-15)


@pytest.mark.parametrize("k", [1, 5, 20])
def test_log_equals_kromhc_reference_loop(k: int) -> None:
    logits = _logits(30, (5, 4, 4), scale=3.0)
    torch.testing.assert_close(
        sinkhorn(logits, "log", k).matrix, ref_log_kromhc(logits, k), rtol=0, atol=1e-15
    )


@pytest.mark.parametrize("iters", [1, 3, 20])
@pytest.mark.parametrize("hc_mult", [2, 4])
def test_transformers_matches_deepseek_v4_module(hc_mult: int, iters: int) -> None:
    """Instantiate the real DeepseekV4HyperConnection: its comb, transposed, is our output."""
    from transformers.models.deepseek_v4.configuration_deepseek_v4 import DeepseekV4Config
    from transformers.models.deepseek_v4.modeling_deepseek_v4 import DeepseekV4HyperConnection

    n, D = hc_mult, 8
    cfg = DeepseekV4Config(hidden_size=D, hc_mult=n, hc_sinkhorn_iters=iters, hc_eps=1e-6)
    mod = DeepseekV4HyperConnection(cfg)
    g = torch.Generator().manual_seed(iters * 10 + n)
    with torch.no_grad():
        mod.fn.copy_(torch.randn(mod.fn.shape, generator=g))
        mod.base.copy_(torch.randn(mod.base.shape, generator=g))
        mod.scale.copy_(torch.tensor([0.5, 0.7, 1.3]))
        x = torch.randn(2, 3, n, D, generator=g)
        _, comb, _ = mod(x)
        # the comb logits exactly as the module forms them (code orientation [input, output])
        flat = mod.input_norm(x.view(2, 3, -1).float())
        w = F.linear(flat, mod.fn.float())[..., 2 * n :].view(2, 3, n, n)
        comb_logits = w * mod.scale[2] + mod.base[2 * n :].view(n, n)
    ours = sinkhorn(comb_logits.transpose(-1, -2), "transformers", iters, eps=cfg.hc_eps).matrix
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours, comb.transpose(-1, -2), rtol=0, atol=1e-6)
    assert torch.equal(ours, comb.transpose(-1, -2))  # same ops, same order: bit for bit
    spec = SinkhornSpec(Convention.TRANSFORMERS, iters, eps=TRANSFORMERS_DEFAULT_EPS)
    assert torch.equal(project(comb_logits.transpose(-1, -2), spec), ours)


@pytest.mark.parametrize("iters", [1, 5, 20])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_lucidrains_matches_hyper_connections(dtype: torch.dtype, iters: int) -> None:
    from hyper_connections.manifold_constrained_hyper_connections import sinkhorn_knopps

    logits = _logits(40 + iters, (7, 4, 4), scale=3.0, dtype=dtype)
    lib = sinkhorn_knopps(logits.transpose(-1, -2).contiguous(), iters=iters).transpose(-1, -2)
    ours = sinkhorn(logits, "lucidrains", iters).matrix
    assert ours.dtype == dtype
    # the library computes in float32 whatever the input; float32 input reproduces it bit for bit
    torch.testing.assert_close(ours, lib, rtol=0, atol=1e-6)
    if dtype == torch.float32:
        assert torch.equal(ours, lib)


@pytest.mark.parametrize("iters", [1, 5, 20])
def test_log_matches_hyper_connections_log_domain(iters: int) -> None:
    from hyper_connections.manifold_constrained_hyper_connections import log_domain_sinkhorn_knopps

    logits = _logits(50 + iters, (7, 4, 4), scale=3.0, dtype=torch.float32)
    lib = log_domain_sinkhorn_knopps(logits.transpose(-1, -2).contiguous(), iters=iters).transpose(-1, -2)
    # F.log_softmax vs x - logsumexp: same iteration, different rounding
    torch.testing.assert_close(sinkhorn(logits, "log", iters).matrix, lib, rtol=0, atol=1e-6)


@pytest.mark.parametrize("k", [1, 2, 7])
@pytest.mark.parametrize(("a", "b"), [("transformers", "paper"), ("lucidrains", "log")])
def test_conventions_with_same_passes_agree(a: str, b: str, k: int) -> None:
    """softmax = exp + one column normalisation, and the max subtraction cancels: with eps = 0, transformers
    after k iterations is paper after k, and lucidrains after k is log after k (checks iters, orientation)."""
    logits = _logits(60 + k, (9, 4, 4), scale=2.0)
    torch.testing.assert_close(
        sinkhorn(logits, a, k).matrix, sinkhorn(logits, b, k).matrix, rtol=0, atol=1e-13
    )


# ----------------------------------------------------------------------------------------- exact axis


def test_exact_axis_table() -> None:
    assert {c.value: exact_axis(c) for c in Convention} == {
        "paper": "rows",
        "log": "columns",
        "transformers": "rows",
        "lucidrains": "columns",
    }
    assert exact_axis("PAPER") == "rows"


@pytest.mark.parametrize("k", [1, 3, 10])
@pytest.mark.parametrize("convention", ALL)
def test_exact_axis_is_exact(convention: Convention, k: int) -> None:
    logits = _logits(70 + k, (50, 4, 4), scale=2.0)
    row, col = _errs(sinkhorn(logits, convention, k).matrix)
    exact, other = (row, col) if exact_axis(convention) == "rows" else (col, row)
    assert exact.max() < 2e-15
    if k == 1:  # one iteration leaves a visible error on the other axis for generic logits
        assert other.max() > 1e-3


def test_transformers_eps_offsets_exact_axis_by_eps() -> None:
    """Division by (sum + eps): the exact axis sums to s/(s+eps), i.e. 1 - eps to first order."""
    eps = 1e-6
    logits = _logits(80, (20, 4, 4))
    m = sinkhorn(logits, "transformers", 20, eps=eps).matrix
    row_sums = m.sum(-1)
    torch.testing.assert_close(1 - row_sums, torch.full_like(row_sums, eps), rtol=1e-2, atol=0)


# --------------------------------------------------------------------------------------- record / tol


@pytest.mark.parametrize("convention", ALL)
def test_record_equals_separate_runs(convention: Convention) -> None:
    logits = _logits(90, (3, 2, 4, 4), scale=2.0)
    K = 6
    res = sinkhorn(logits, convention, K, record=True)
    assert res.row_err_history is not None and res.col_err_history is not None
    assert res.row_err_history.shape == (K, 3, 2) and res.iters_used == K and res.converged is None
    for k in range(1, K + 1):
        row, col = _errs(sinkhorn(logits, convention, k).matrix)
        torch.testing.assert_close(res.row_err_history[k - 1], row, rtol=0, atol=1e-15)
        torch.testing.assert_close(res.col_err_history[k - 1], col, rtol=0, atol=1e-15)


@pytest.mark.parametrize("tol", [1e-6, 1e-10])
@pytest.mark.parametrize("convention", ALL)
def test_tol_stops_at_first_iteration_meeting_it(convention: Convention, tol: float) -> None:
    logits = _logits(100, (8, 4, 4), scale=1.5)
    res = sinkhorn(logits, convention, 1000, tol=tol, record=True)
    assert res.converged is True
    k = res.iters_used
    assert res.row_err_history is not None and res.col_err_history is not None
    assert res.row_err_history.shape[0] == k
    worst = torch.maximum(res.row_err_history, res.col_err_history).amax(-1)
    assert worst[-1] <= tol and (worst[:-1] > tol).all()
    # iters_to_tol: per matrix, the first k at which that matrix meets tol; the batch needs the max of them
    per = iters_to_tol(logits, convention, tol)
    assert per.max().item() == k
    both = torch.maximum(
        sinkhorn(logits, convention, 1000, record=True).row_err_history,
        sinkhorn(logits, convention, 1000, record=True).col_err_history,
    )[:k]
    first = (both <= tol).int().argmax(0) + 1
    assert torch.equal(per, first)


def test_tol_not_reached() -> None:
    logits = _logits(110, (4, 4), scale=3.0)
    res = sinkhorn(logits, "paper", 2, tol=1e-12)
    assert res.converged is False and res.iters_used == 2
    assert iters_to_tol(logits, "paper", 1e-12, max_iters=2).item() == -1
    assert iters_to_tol(logits, "paper", 1e-12).item() > 2


# ----------------------------------------------------------------------------------- dtypes, batching


@pytest.mark.parametrize("convention", ALL)
def test_bfloat16_computes_in_float32(convention: Convention) -> None:
    logits = _logits(120, (3, 4, 4), dtype=torch.bfloat16)
    out = sinkhorn(logits, convention, 7).matrix
    assert out.dtype == torch.float32
    assert torch.equal(out, sinkhorn(logits.float(), convention, 7).matrix)


@pytest.mark.parametrize("convention", ALL)
def test_batch_equals_single(convention: Convention) -> None:
    logits = _logits(130, (2, 3, 4, 4), scale=2.0)
    batch = sinkhorn(logits, convention, 9).matrix
    single = torch.stack([sinkhorn(logits[i, j], convention, 9).matrix for i in range(2) for j in range(3)])
    torch.testing.assert_close(batch.reshape(6, 4, 4), single, rtol=0, atol=1e-15)


def test_result_is_frozen() -> None:
    res = sinkhorn(_logits(1, (4, 4)), "paper", 1)
    assert isinstance(res, SinkhornResult)
    with pytest.raises(AttributeError):
        res.iters_used = 3  # type: ignore[misc]


# --------------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("kwargs", "option"),
    [
        (dict(convention="sinkhorn"), "convention"),
        (dict(iters=0), "iters"),
        (dict(iters=2.0), "iters"),
        (dict(eps=1e-6), "eps"),  # paper has no eps
        (dict(convention="transformers", eps=-1.0), "eps"),
        (dict(tol=-1.0), "tol"),
        (dict(logits=torch.zeros(3, 4)), "logits"),
        (dict(logits=torch.zeros(4, 4, dtype=torch.int64)), "logits"),
    ],
)
def test_usage_errors(kwargs: dict, option: str) -> None:
    args = dict(logits=torch.zeros(4, 4), convention="paper", iters=3) | kwargs
    logits, convention, iters = args.pop("logits"), args.pop("convention"), args.pop("iters")
    with pytest.raises(UsageError) as info:
        sinkhorn(logits, convention, iters, **args)
    assert info.value.option == option


def test_check_finite() -> None:
    check_finite(torch.zeros(2, 4, 4), "logits")
    bad = torch.zeros(2, 4, 4)
    bad[1, 2, 3] = float("nan")
    bad[0, 0, 0] = float("inf")
    with pytest.raises(InputError, match=r"1 NaN and 1 Inf .*\(0, 0, 0\)"):
        check_finite(bad, "site 3 logits")

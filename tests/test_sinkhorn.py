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


def ref_transformers_sigmoid(logits: torch.Tensor, k: int, eps: float) -> torch.Tensor:
    """The earlier transformers DeepSeek-V4 _sinkhorn (sigmoid + eps start, k x (rows, columns)) on comb, which its
    layer applies as torch.matmul(comb, residual): comb = paper H, no transpose."""
    comb = torch.sigmoid(logits) + eps
    for _ in range(k):
        comb = comb / (comb.sum(dim=-1, keepdim=True) + eps)
        comb = comb / (comb.sum(dim=-2, keepdim=True) + eps)
    return comb


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
    """The exp-start conventions converge to the unique doubly stochastic scaling diag(a) exp(L) diag(b); the
    sigmoid start to diag(a) sigmoid(L) diag(b), POT's projection of the log-kernel logsigmoid(L)."""
    from ot.batch import bregman_log_projection_batch

    logits = _logits(n, (6, n, n), scale=1.5)
    ones = np.ones((6, n))
    kernel = F.logsigmoid(logits) if convention is Convention.TRANSFORMERS_SIGMOID else logits
    pot = bregman_log_projection_batch(kernel.numpy(), a=ones, b=ones, max_iter=20000, tol=1e-15)["T"]
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


@pytest.mark.parametrize("eps", [0.0, 1e-6, 1e-3])
@pytest.mark.parametrize("k", [1, 5, 20])
@pytest.mark.parametrize("n", [2, 4])
def test_transformers_sigmoid_equals_reference_loop(n: int, k: int, eps: float) -> None:
    logits = _logits(25 + n, (5, n, n), scale=2.0)
    out = sinkhorn(logits, "transformers-sigmoid", k, eps=eps).matrix
    torch.testing.assert_close(out, ref_transformers_sigmoid(logits, k, eps), rtol=0, atol=1e-15)


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
        "transformers-sigmoid": "columns",
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


# ------------------------------------------------------------------------------ the engine vs the plain loop
# A frozen copy of the batch-first, out-of-place algorithm hcdiag ran before the batch-last engine, written
# plainly here: the engine must give the same bits (torch.equal) for every convention, dtype, n, iteration
# count and eps, across block boundaries (the block size is made small), for matrices, error histories and
# iters_to_tol counts.


def frozen_loop(logits: torch.Tensor, convention: str, iters: int, eps: float = 0.0):
    """Yield (k, paper-orientation H after iteration k) for k = 1..iters."""
    x = logits.float() if logits.dtype in (torch.bfloat16, torch.float16) else logits
    if convention == "paper":
        m = x.exp()
    elif convention == "log":
        m = x.transpose(-1, -2).contiguous()
    elif convention == "transformers":
        m = torch.softmax(x.transpose(-1, -2).contiguous(), dim=-1) + eps
    elif convention == "transformers-sigmoid":  # on comb = paper H (the earlier code applies comb @ x)
        m = torch.sigmoid(x.contiguous()) + eps
    else:
        a = x.transpose(-1, -2).contiguous()
        m = (a - a.amax(dim=-2, keepdim=True)).exp()
    for k in range(1, iters + 1):
        if convention == "paper":
            m = m / m.sum(dim=-2, keepdim=True)
            m = m / m.sum(dim=-1, keepdim=True)
            yield k, m
            continue
        if convention == "log":
            m = m - torch.logsumexp(m, dim=-2, keepdim=True)
            m = m - torch.logsumexp(m, dim=-1, keepdim=True)
            yield k, m.exp().transpose(-1, -2)
            continue
        if convention in ("transformers", "transformers-sigmoid"):
            if k > 1 or convention == "transformers-sigmoid":
                m = m / (m.sum(dim=-1, keepdim=True) + eps)
            m = m / (m.sum(dim=-2, keepdim=True) + eps)
            if convention == "transformers-sigmoid":
                yield k, m
                continue
        else:
            m = F.normalize(m, p=1, dim=-2, eps=1e-12)
            m = F.normalize(m, p=1, dim=-1, eps=1e-12)
        yield k, m.transpose(-1, -2)


def frozen_errors(m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return (m.sum(dim=-1) - 1).abs().amax(dim=-1), (m.sum(dim=-2) - 1).abs().amax(dim=-1)


def frozen_iters_to_tol(logits: torch.Tensor, convention: str, tol: float, eps: float, cap: int) -> torch.Tensor:
    out = torch.full(logits.shape[:-2], -1, dtype=torch.int64)
    for k, m in frozen_loop(logits, convention, cap, eps):
        r, c = frozen_errors(m)
        out[(r <= tol) & (c <= tol) & (out < 0)] = k
        if bool((out >= 0).all()):
            break
    return out


ENGINE_CASES = [
    (conv, eps) for conv in ("paper", "log", "lucidrains") for eps in (0.0,)
] + [(c, eps) for c in ("transformers", "transformers-sigmoid") for eps in (0.0, 1e-6, 1e-3)]


@pytest.fixture
def small_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Four blocks per batch, the last one partial, so that every test crosses block boundaries."""
    import hcdiag.sinkhorn as sk

    monkeypatch.setattr(sk, "_block_width", lambda n, total: max(1, total // 4 + 1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n", [2, 3, 4, 5, 8, 16])
@pytest.mark.parametrize(("convention", "eps"), ENGINE_CASES)
def test_engine_bit_identical_to_frozen_loop(small_blocks, convention: str, eps: float, n: int, dtype) -> None:
    logits = _logits(1000 + n, (3, 37, n, n), scale=3.0, dtype=dtype)
    K = 20
    res = sinkhorn(logits, convention, K, eps=eps, record=True)
    assert res.row_err_history is not None and res.col_err_history is not None
    for k, m in frozen_loop(logits, convention, K, eps):
        r, c = frozen_errors(m)
        assert torch.equal(res.row_err_history[k - 1], r) and torch.equal(res.col_err_history[k - 1], c)
        if k in (1, 2, 7, K):
            got = sinkhorn(logits, convention, k, eps=eps).matrix
            assert got.dtype == dtype and got.is_contiguous()
            assert torch.equal(got, m), (k, (got - m).abs().max().item())
    assert torch.equal(res.matrix, m)


@pytest.mark.parametrize("n", [3, 4, 16, 17])
@pytest.mark.parametrize(("convention", "eps"), ENGINE_CASES)
def test_engine_bit_identical_odd_inputs(small_blocks, convention: str, eps: float, n: int) -> None:
    """bfloat16 input (computed in float32), a transposed (non-contiguous) view, one matrix, large logits;
    n = 17 and transposed paper logits take the reference loop (the engine's sum plans stop at 16)."""
    base = _logits(2000 + n, (29, n, n), scale=3.0)
    for logits in (base.to(torch.bfloat16), base.transpose(-1, -2), base[0], base * 12):
        want = list(frozen_loop(logits, convention, 9, eps))[-1][1]
        assert torch.equal(sinkhorn(logits, convention, 9, eps=eps).matrix, want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n", [2, 4, 16])
@pytest.mark.parametrize(("convention", "eps"), ENGINE_CASES)
def test_engine_iters_to_tol_equals_frozen_search(small_blocks, convention: str, eps: float, n: int, dtype) -> None:
    """Matrices that arrive get exactly the full search's count; -1 stays -1 (mixed easy and hard logits)."""
    logits = _logits(3000 + n, (60, n, n), dtype=dtype) * torch.linspace(0.2, 6.0, 60, dtype=dtype)[:, None, None]
    tol = 1e-6 if dtype == torch.float64 else 1e-4
    cap = 200
    want = frozen_iters_to_tol(logits, convention, tol, eps, cap)
    got = iters_to_tol(logits, convention, tol, eps=eps, max_iters=cap)
    assert torch.equal(got, want)


# ------------------------------------------------------------------ iters_to_tol: early stops and estimates


@pytest.mark.parametrize("n", [2, 4, 8])
def test_eps_floor_bounds_every_iteration(n: int) -> None:
    """No iteration of the frozen transformers loop gets max(row, col) error below eps_floor."""
    from hcdiag.sinkhorn import eps_floor

    eps = 1e-3
    logits = _logits(4000 + n, (200, n, n), scale=2.0) * torch.linspace(0, 3, 200, dtype=torch.float64)[:, None, None]
    floor = eps_floor("transformers", n, eps)
    assert floor == pytest.approx(eps / (1 + (n + 1) * eps), rel=1e-15)
    worst = min(torch.maximum(*frozen_errors(m)).min().item() for _, m in frozen_loop(logits, "transformers", 300, eps))
    # the bound holds up to rounding (uniform logits, the first matrix, attain it at iteration 1) and is not
    # loose by more than about (n + 1) eps
    assert floor - 4 * n * torch.finfo(torch.float64).eps <= worst < 1.01 * eps
    assert eps_floor("paper", n, 0.0) == 0.0


def test_tol_below_eps_floor_stops_at_once() -> None:
    from hcdiag.sinkhorn import iters_to_tol_detail

    logits = _logits(4100, (5, 4, 4))
    d = iters_to_tol_detail(logits, "transformers", 1e-4, eps=1e-3)
    assert d.matrix_iters == 0 and d.reason is not None and "eps floor" in d.reason
    assert (d.iters == -1).all() and torch.isinf(d.estimate).all()
    assert torch.equal(d.iters, frozen_iters_to_tol(logits, "transformers", 1e-4, 1e-3, 300))


def test_settled_matrices_stop_early_and_never_arrive() -> None:
    """tol = eps = 1e-6 (the DeepSeek-V4 default): most matrices settle just above tol. They are stopped once
    their state repeats (fixed point or 2-cycle); the counts equal the full 1000-iteration search."""
    from hcdiag.sinkhorn import iters_to_tol_detail

    logits = _logits(4200, (400, 4, 4), scale=1.5)
    want = frozen_iters_to_tol(logits, "transformers", 1e-6, 1e-6, 1000)
    d = iters_to_tol_detail(logits, "transformers", 1e-6, eps=1e-6)
    assert torch.equal(d.iters, want)
    never = want < 0
    assert never.sum() > 200  # the case this is about
    assert torch.isinf(d.estimate[never]).float().mean() > 0.9
    assert d.matrix_iters < 0.2 * 400 * 1000  # instead of 1000 iterations each


def test_slow_matrices_get_an_estimate_close_to_their_true_count() -> None:
    """Matrices given up for their contraction rate: the reported estimate against the count a search with a
    5x larger cap finds (brute force), and the counts of all others unchanged."""
    from hcdiag.sinkhorn import iters_to_tol_detail

    logits = _logits(4300, (300, 4, 4), scale=4.0)
    cap, tol = 200, 1e-9
    truth = frozen_iters_to_tol(logits, "paper", tol, 0.0, 5 * cap)  # -1: more than 1000 (not compared)
    d = iters_to_tol_detail(logits, "paper", tol, max_iters=cap)
    assert torch.equal(d.iters, torch.where(truth <= cap, truth, -1))
    est = torch.isfinite(d.estimate)
    slow = est & (truth > 0)
    assert slow.sum() >= 10
    ratio = d.estimate[slow] / truth[slow].double()  # "about N iterations": mostly within 20%, all within 2x
    assert 0.9 < ratio.median() < 1.1 and ((ratio - 1).abs() < 0.2).float().mean() > 0.75
    assert ratio.min() > 0.5 and ratio.max() < 2
    assert ((d.rate[est] > 0) & (d.rate[est] < 1)).all()
    assert d.matrix_iters < 300 * cap

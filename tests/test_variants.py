"""Variant modules: parameter counts against real modules, doubly-stochastic properties, closed forms at
init, the TBP chart against SPEC's hand-computed matrix, KromHC against torch.kron, shapes, validation,
perturbation.

Oracles are written here independently of hcdiag: scalar loops, itertools permutations built the way the
reference code builds them (eye[perm], code orientation, then transposed), torch.kron, closed forms.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hcdiag import registry
from hcdiag.enums import Convention, Exactness, Form
from hcdiag.errors import UsageError
from hcdiag.variants import tbp_chart

ALL = ["identity", "hc-static", "hc-dynamic", "mhc", "mhc-lite", "kromhc", "tbp", "ihc"]
EXACT = ["mhc-lite", "kromhc", "tbp"]
F64 = torch.float64

# SPEC section 5: per-site totals (n = 4, C = 2560) and (n = 8, C = 4096), read off the published table.
SPEC_TOTALS = {
    ("mhc", Form.PAPER): (245_787, 2_621_523),
    ("mhc", Form.CODE): (256_027, 2_654_291),
    ("mhc-lite", Form.CODE): (337_955, 1_321_803_155),
    ("kromhc", Form.CODE): (133_135, 753_689),
    ("tbp", Form.CODE): (256_028, 2_654_292),
    ("hc-static", Form.CODE): (24, 80),
    ("hc-dynamic", Form.CODE): (15_386, 41_042),
}


def numel(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def ref_paper_sinkhorn(logits: torch.Tensor, iters: int = 20) -> torch.Tensor:
    """mHC Eq. 9 as written: M = exp(logits), then iters x (normalise columns, normalise rows)."""
    M = logits.exp()
    for _ in range(iters):
        M = M / M.sum(-2, keepdim=True)
        M = M / M.sum(-1, keepdim=True)
    return M


def ref_bvn(weights: torch.Tensor, n: int) -> torch.Tensor:
    """Reference-code mHC-lite: alpha = sum_k w_k eye[perm_k] (code orientation [in, out]), paper alpha^T."""
    perms = list(itertools.permutations(range(n)))
    eye = torch.eye(n, dtype=weights.dtype)
    P = torch.stack([eye[list(p)] for p in perms])
    alpha = (weights[..., :, None, None] * P).sum(-3)
    return alpha.transpose(-1, -2)


def ref_chart(t: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """SPEC section 2's chart with Python floats, one matrix t [n-1, n-1] at a time."""
    m = t.shape[-1]
    n = m + 1
    X = [[0.0] * n for _ in range(n)]
    r, c = [1.0] * n, [1.0] * n
    for i in range(m):
        for j in range(m):
            L = max(0.0, r[i] - sum(c[j + 1 :]), c[j] - sum(r[i + 1 :]))
            U = min(r[i], c[j])
            x = L + max(U - L, eps) / (1.0 + math.exp(-float(t[i, j])))
            X[i][j] = x
            r[i] -= x
            c[j] -= x
        X[i][n - 1] = r[i]
        c[n - 1] -= r[i]
        r[i] = 0.0
    X[n - 1] = list(c)
    return torch.tensor(X, dtype=F64)


def build(name: str, n: int, C: int, **kw):
    return registry.get(name).build(n, C, **kw)


def perturbed(name: str, n: int, C: int, seed: int, dtype=F64, scale: float = 2.0, kron_factors=None):
    """A site with every perturbable part moved and its dynamic scales raised to 4, so tokens differ a lot."""
    g = torch.Generator().manual_seed(seed)
    m = build(name, n, C, dtype=dtype, kron_factors=kron_factors, layer_index=seed % 5)
    m.perturb_(scale, g, parts=("res", "pre", "post", "dynamic"))
    with torch.no_grad():
        for pname in ("a_res", "a_pre", "a_post", "s_a", "s_b"):
            if hasattr(m, pname):
                getattr(m, pname).fill_(4.0)
    return m


# ---- parameter counts: analytic == real module -------------------------------------------------------------


def _cases():
    for name in ALL:
        for n in (1, 2, 3, 4, 6, 8):
            if name == "mhc-lite" and n == 8:
                yield name, n, None, "meta"
            else:
                yield name, n, None, None
    yield "kromhc", 6, (2, 3), None
    yield "kromhc", 6, (3, 2), None
    yield "kromhc", 8, (2, 4), None
    yield "kromhc", 8, (8,), None


@pytest.mark.parametrize("form", [Form.CODE, Form.PAPER])
@pytest.mark.parametrize(("name", "n", "factors", "device"), list(_cases()))
def test_count_matches_module(name, n, factors, device, form):
    spec = registry.get(name)
    C = 3
    m = spec.build(n, C, form=form, kron_factors=factors, device=device)
    assert numel(m) == spec.param_count(n, C, form, kron_factors=factors).total


@pytest.mark.parametrize("col", [0, 1])
@pytest.mark.parametrize(("name", "form"), list(SPEC_TOTALS))
def test_meta_module_matches_spec_table(name, form, col):
    # the real module at the published sizes, built on the meta device, has the published parameter count
    n, C = [(4, 2560), (8, 4096)][col]
    m = build(name, n, C, form=form, device="meta")
    assert numel(m) == SPEC_TOTALS[(name, form)][col]


@pytest.mark.parametrize("n", [2, 4, 8])
@pytest.mark.parametrize("name", ["mhc", "mhc-lite", "kromhc", "tbp", "ihc"])
def test_paper_form_drops_only_norm_gain(name, n):
    C = 5
    code = build(name, n, C, form=Form.CODE, device="meta")
    paper = build(name, n, C, form=Form.PAPER, device="meta")
    assert numel(code) - numel(paper) == n * C
    assert tuple(code.norm_weight.shape) == (n * C,)
    assert paper.norm_weight is None


def test_tbp_uses_only_the_counted_effective_entries():
    # gradient of H_res w.r.t. W_res / b_res is nonzero on exactly (n-1)^2 columns: the "effective" count
    n, C = 4, 3
    m = perturbed("tbp", n, C, seed=3)
    x = torch.randn(5, n, C, dtype=F64, generator=torch.Generator().manual_seed(0))
    m(x).res.pow(2).sum().backward()
    used_cols = int((m.W_res.grad.abs().sum(0) > 0).sum())
    used_bias = int((m.b_res.grad.abs() > 0).sum())
    assert used_cols == used_bias == (n - 1) ** 2
    eff = registry.get("tbp").param_count(n, C).effective
    pre_post_norm = 2 * (n * C * n + n + 1) + n * C
    assert eff.total == pre_post_norm + used_cols * n * C + used_bias + 2


# ---- doubly stochastic properties --------------------------------------------------------------------------


def _check_ds(res: torch.Tensor, tol: float) -> None:
    res = res.detach()
    ones = torch.ones(res.shape[:-1], dtype=res.dtype)
    assert torch.allclose(res.sum(-1), ones, atol=tol, rtol=0)
    assert torch.allclose(res.sum(-2), ones, atol=tol, rtol=0)
    assert float(res.min()) >= -tol


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize(
    ("name", "n", "factors"),
    [(v, n, None) for v in EXACT for n in (2, 3, 4)]
    + [("mhc-lite", 6, None), ("kromhc", 8, None), ("kromhc", 6, (2, 3)), ("tbp", 6, None), ("tbp", 8, None)]
    + [("identity", 4, None), ("ihc", 4, None)],
)
def test_exact_variants_are_doubly_stochastic(name, n, factors, seed, dtype):
    C = 4
    m = perturbed(name, n, C, seed, dtype=dtype, kron_factors=factors)
    x = 3.0 * torch.randn(16, n, C, generator=torch.Generator().manual_seed(seed + 10), dtype=dtype)
    res = m(x).res.detach()
    assert res.dtype == dtype
    _check_ds(res, 1e-6)
    # the perturbation really moved H_res away from a constant (else the test could not fail)
    if name not in ("identity", "ihc"):
        assert float((res - res[0]).abs().max()) > 1e-2


@settings(max_examples=12, deadline=None)
@given(
    name=st.sampled_from(EXACT),
    n=st.integers(2, 5),
    seed=st.integers(0, 2**16),
    scale=st.floats(0.0, 8.0),
)
def test_hypothesis_exact_variants_doubly_stochastic(name, n, seed, scale):
    m = perturbed(name, n, 3, seed, scale=scale)  # kromhc: prime factors, so n = 3, 5 are single factors
    x = torch.randn(4, n, 3, generator=torch.Generator().manual_seed(seed), dtype=F64)
    _check_ds(m(x).res, 1e-9)


@pytest.mark.parametrize("n", [2, 3, 4])
@pytest.mark.parametrize("form", [Form.CODE, Form.PAPER])
def test_mhc_forward_matches_independent_computation(n, form):
    C = 5
    m = perturbed("mhc", n, C, seed=n)
    if form is Form.CODE:
        with torch.no_grad():
            m.norm_weight.copy_(
                1 + 0.5 * torch.randn(n * C, dtype=F64, generator=torch.Generator().manual_seed(1))
            )
    x = torch.randn(3, 2, n, C, dtype=F64, generator=torch.Generator().manual_seed(2))
    flat = x.reshape(3, 2, n * C)
    h = flat / torch.sqrt(flat.pow(2).mean(-1, keepdim=True) + 1e-6)
    if m.norm_weight is not None:
        h = h * m.norm_weight
    pre = torch.sigmoid(m.a_pre * (h @ m.phi_pre) + m.b_pre)
    post = 2 * torch.sigmoid(m.a_post * (h @ m.phi_post) + m.b_post)
    logits = m.a_res * (h @ m.phi_res).reshape(3, 2, n, n) + m.b_res
    out = m(x)
    torch.testing.assert_close(out.pre, pre)
    torch.testing.assert_close(out.post, post)
    torch.testing.assert_close(out.res, ref_paper_sinkhorn(logits))
    torch.testing.assert_close(m.res_logits(x), logits)
    # paper convention ends with a row pass: rows exact
    assert torch.allclose(out.res.sum(-1), torch.ones(3, 2, n, dtype=F64), atol=1e-12, rtol=0)


def test_mhc_declares_paper_sinkhorn():
    m = build("mhc", 4, 2)
    assert m.sinkhorn.convention is Convention.PAPER and m.sinkhorn.iters == 20
    assert m.exactness is Exactness.SINKHORN


@pytest.mark.parametrize("n", [2, 3, 4, 5])
def test_mhc_lite_matches_reference_construction(n):
    m = perturbed("mhc-lite", n, 3, seed=n)
    x = torch.randn(6, n, 3, dtype=F64, generator=torch.Generator().manual_seed(n))
    logits = m.res_logits(x)
    assert logits.shape == (6, math.factorial(n))
    torch.testing.assert_close(m(x).res, ref_bvn(torch.softmax(logits, -1), n))


def test_mhc_lite_permutation_orientation():
    # weight only on perm (1, 2, 0): the reference sends input stream i to output perm[i],
    # so paper H_res[perm[i], i] = 1
    n = 3
    perms = list(itertools.permutations(range(n)))
    k = perms.index((1, 2, 0))
    logits = torch.full((math.factorial(n),), -1e4, dtype=F64)
    logits[k] = 0.0
    res = build("mhc-lite", n, 1, dtype=F64).res_from_logits(logits)
    expected = torch.zeros(n, n, dtype=F64)
    for i, p in enumerate((1, 2, 0)):
        expected[p, i] = 1.0
    torch.testing.assert_close(res, expected)


# ---- KromHC ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [2, 4, 8])
def test_kromhc_2x2_matches_explicit_kron(n):
    m = perturbed("kromhc", n, 3, seed=n)
    x = torch.randn(5, n, 3, dtype=F64, generator=torch.Generator().manual_seed(n))
    logits = m.res_logits(x)  # [T, 2K]: (identity, swap) per factor
    K = int(math.log2(n))
    assert logits.shape == (5, 2 * K)
    res = m(x).res
    for t in range(5):
        expected = torch.ones(1, 1, dtype=F64)
        for k in range(K):
            p = torch.softmax(logits[t, 2 * k : 2 * k + 2], -1)[0]
            expected = torch.kron(expected, torch.stack([torch.stack([p, 1 - p]), torch.stack([1 - p, p])]))
        torch.testing.assert_close(res[t], expected)
    torch.testing.assert_close(res, res.transpose(-1, -2))


@pytest.mark.parametrize("factors", [(2, 3), (3, 2)])
def test_kromhc_general_factors_match_kron_of_bvn(factors):
    n = math.prod(factors)
    m = perturbed("kromhc", n, 2, seed=7, kron_factors=factors)
    x = torch.randn(4, n, 2, dtype=F64, generator=torch.Generator().manual_seed(3))
    logits = m.res_logits(x)
    sizes = [math.factorial(f) for f in factors]
    assert logits.shape == (4, sum(sizes))
    U = [
        ref_bvn(torch.softmax(chunk, -1), f)
        for f, chunk in zip(factors, logits.split(sizes, -1), strict=True)
    ]
    res = m(x).res
    for t in range(4):
        torch.testing.assert_close(res[t], torch.kron(U[0][t], U[1][t]))


def test_kromhc_default_factorisation_is_prime():
    assert build("kromhc", 6, 2).factors == (2, 3)
    assert build("kromhc", 8, 2).factors == (2, 2, 2)
    assert build("kromhc", 12, 1, device="meta").factors == (2, 2, 3)


# ---- TBP ---------------------------------------------------------------------------------------------------

SPEC_TBP_N4 = [
    [0.5, 0.25, 0.125, 0.125],
    [0.25, 0.375, 0.1875, 0.1875],
    [0.125, 0.1875, 0.34375, 0.34375],
    [0.125, 0.1875, 0.34375, 0.34375],
]


def test_tbp_chart_at_zero_is_spec_matrix():
    expected = torch.tensor(SPEC_TBP_N4, dtype=F64)
    torch.testing.assert_close(tbp_chart(torch.zeros(3, 3, dtype=F64)), expected, atol=1e-15, rtol=0)
    # the module at init probed with x = 0: d = sigmoid(-8) smoothing; with d -> 0, exactly SPEC's matrix
    m = build("tbp", 4, 3, dtype=F64)
    res0 = m(torch.zeros(4, 3, dtype=F64)).res
    d = 1.0 / (1.0 + math.exp(8.0))
    torch.testing.assert_close(res0, (1 - d) * expected + d / 4, atol=1e-15, rtol=0)
    with torch.no_grad():
        m.delta_logit.fill_(-1e4)
    torch.testing.assert_close(m(torch.zeros(4, 3, dtype=F64)).res, expected, atol=1e-15, rtol=0)
    assert torch.linalg.matrix_rank(expected) == 3


@pytest.mark.parametrize("n", [2, 3, 4, 6])
def test_tbp_chart_matches_scalar_loop_and_commutes_with_transpose(n):
    g = torch.Generator().manual_seed(n)
    t = 3.0 * torch.randn(5, n - 1, n - 1, dtype=F64, generator=g)
    X = tbp_chart(t)
    for b in range(5):
        torch.testing.assert_close(X[b], ref_chart(t[b]), atol=1e-14, rtol=0)
        # the reference charts code-orientation logits and uses X as alpha = H^T; equal to charting t^T
        torch.testing.assert_close(ref_chart(t[b].T).T, X[b], atol=1e-14, rtol=0)


# ---- static variants and init ------------------------------------------------------------------------------


@pytest.mark.parametrize("k", [0, 1, 5])
@pytest.mark.parametrize("name", ["hc-static", "hc-dynamic"])
def test_hc_init_is_prenorm(name, k):
    n = 4
    m = build(name, n, 3, layer_index=k, dtype=F64)
    out = m(torch.randn(7, n, 3, dtype=F64, generator=torch.Generator().manual_seed(k)))
    torch.testing.assert_close(out.res, torch.eye(n, dtype=F64).expand(7, n, n))
    torch.testing.assert_close(out.pre, torch.eye(n, dtype=F64)[k % n].expand(7, n))
    torch.testing.assert_close(out.post, torch.ones(7, n, dtype=F64))


def test_hc_static_res_is_transpose_of_A_r():
    m = build("hc-static", 3, 2, dtype=F64)
    with torch.no_grad():
        m.A_r.copy_(torch.arange(9, dtype=F64).reshape(3, 3))
    res = m(torch.zeros(3, 2, dtype=F64)).res
    torch.testing.assert_close(res, torch.arange(9, dtype=F64).reshape(3, 3).T)


def test_hc_dynamic_matches_hc_equations():
    n, C = 3, 4
    m = perturbed("hc-dynamic", n, C, seed=5)
    x = torch.randn(6, n, C, dtype=F64, generator=torch.Generator().manual_seed(8))
    hbar = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
    A_r = m.s_a * torch.tanh(hbar @ m.W_r) + m.A_r  # HC Eq. 12, [T, n, n] (input, output)
    A_m = m.s_a * torch.tanh(hbar @ m.W_m).squeeze(-1) + m.A_m
    B = m.s_b * torch.tanh(hbar @ m.W_b).squeeze(-1) + m.B
    out = m(x)
    torch.testing.assert_close(out.res, A_r.transpose(-1, -2))
    torch.testing.assert_close(out.pre, A_m)
    torch.testing.assert_close(out.post, B)
    assert float((out.res.detach().sum(-1) - 1).abs().max()) > 1e-2  # unconstrained


@pytest.mark.parametrize("n", [2, 4, 6])
def test_mhc_family_init_closed_forms(n):
    e8 = math.exp(-8.0)
    zero = torch.zeros(n, 2, dtype=F64)
    # mHC: symmetric logits (0 diag, -8 off) are already balanced: diag = 1 / (1 + (n-1) e^-8)
    res = build("mhc", n, 2, dtype=F64)(zero).res
    torch.testing.assert_close(torch.diagonal(res), torch.full((n,), 1 / (1 + (n - 1) * e8), dtype=F64))
    # mHC-lite: H_ii = (1 + ((n-1)! - 1) e^-8) / (1 + (n! - 1) e^-8)
    res = build("mhc-lite", n, 2, dtype=F64)(zero).res
    diag = (1 + (math.factorial(n - 1) - 1) * e8) / (1 + (math.factorial(n) - 1) * e8)
    torch.testing.assert_close(torch.diagonal(res), torch.full((n,), diag, dtype=F64))
    # H_pre / H_post at site k: sigma(+1) at k mod n, sigma(-1) elsewhere; post twice that
    out = build("ihc", n, 2, layer_index=n + 1, dtype=F64)(zero)
    s_hi, s_lo = 1 / (1 + math.exp(-1)), 1 / (1 + math.exp(1))
    expected = torch.full((n,), s_lo, dtype=F64)
    expected[(n + 1) % n] = s_hi
    torch.testing.assert_close(out.pre, expected)
    torch.testing.assert_close(out.post, 2 * expected)
    torch.testing.assert_close(out.res, torch.eye(n, dtype=F64))


def test_identity_site():
    out = build("identity", 4, 3)(torch.randn(2, 4, 3))
    torch.testing.assert_close(out.pre, torch.full((2, 4), 0.25))
    torch.testing.assert_close(out.post, torch.ones(2, 4))
    torch.testing.assert_close(out.res, torch.eye(4).expand(2, 4, 4))
    assert numel(build("identity", 4, 3)) == 0


# ---- shapes, consistency, validation, perturbation ---------------------------------------------------------


@pytest.mark.parametrize("lead", [(5,), (2, 3)])
@pytest.mark.parametrize("name", ALL)
def test_output_shapes_and_logit_roundtrip(name, lead):
    n, C = 4, 3
    m = perturbed(name, n, C, seed=1)
    x = torch.randn(*lead, n, C, dtype=F64, generator=torch.Generator().manual_seed(0))
    out = m(x)
    assert out.pre.shape == (*lead, n)
    assert out.post.shape == (*lead, n)
    assert out.res.shape == (*lead, n, n)
    logits = m.res_logits(x)
    if logits is not None:
        torch.testing.assert_close(m.res_from_logits(logits), out.res)


def test_wrong_input_shape_is_a_usage_error():
    with pytest.raises(UsageError, match=r"n=4, C=3"):
        build("mhc", 4, 3)(torch.zeros(5, 3, 4))


def test_build_validation_names_options():
    with pytest.raises(UsageError) as e:
        build("mhc", 0, 3)
    assert e.value.option == "--n"
    with pytest.raises(UsageError) as e:
        build("mhc", 4, 0)
    assert e.value.option == "--C"
    with pytest.raises(UsageError) as e:
        build("mhc", 4, 3, kron_factors=(2, 2))
    assert e.value.option == "--kron-factors"
    with pytest.raises(UsageError, match="multiplies to 9, not n = 8.*2,2,2") as e:
        build("kromhc", 8, 3, kron_factors=(3, 3))
    assert e.value.option == "--kron-factors"
    with pytest.raises(UsageError, match="factor 1"):
        build("kromhc", 8, 3, kron_factors=(1, 8))
    with pytest.raises(UsageError, match="choose one of: identity, hc-static") as e:
        registry.get("mhc-heavy")
    assert e.value.option == "--variant"


def test_mhc_lite_refuses_huge_builds_unless_meta():
    with pytest.raises(UsageError, match="GB") as e:
        build("mhc-lite", 8, 4096)
    assert e.value.option == "--n"
    m = build("mhc-lite", 8, 4096, device="meta")
    assert m.W_res.shape == (8 * 4096, 40320)


def test_registry_lists_all_variants_in_order():
    assert registry.names() == tuple(ALL)
    assert {s.name: s.exactness for s in registry.specs()} == {
        "identity": Exactness.IDENTITY,
        "hc-static": Exactness.UNCONSTRAINED,
        "hc-dynamic": Exactness.UNCONSTRAINED,
        "mhc": Exactness.SINKHORN,
        "mhc-lite": Exactness.EXACT,
        "kromhc": Exactness.EXACT,
        "tbp": Exactness.EXACT,
        "ihc": Exactness.IDENTITY,
    }


@pytest.mark.parametrize("name", ALL)
def test_perturb_is_seeded_and_targets_res(name):
    a = build(name, 4, 3, dtype=F64).perturb_(0.5, torch.Generator().manual_seed(9))
    b = build(name, 4, 3, dtype=F64).perturb_(0.5, torch.Generator().manual_seed(9))
    fresh = build(name, 4, 3, dtype=F64)
    changed = set()
    for (pname, pa), pb, pf in zip(a.named_parameters(), b.parameters(), fresh.parameters(), strict=True):
        torch.testing.assert_close(pa, pb)
        if not torch.equal(pa, pf):
            changed.add(pname)
    expected = {"hc-static": {"A_r"}, "hc-dynamic": {"A_r"}, "identity": set(), "ihc": set()}.get(
        name, {"b_res"}
    )
    assert changed == expected
    with pytest.raises(UsageError):
        a.perturb_(1.0, parts=("bogus",))


@pytest.mark.parametrize("name", ["hc-static", "hc-dynamic", "mhc", "mhc-lite", "kromhc", "tbp", "ihc"])
def test_dtype_conversion_after_build_keeps_forward_working(name):
    # a module built in float32 and converted with .double() must compute in float64, like torch modules do
    m32 = registry.get(name).build(4, 8, layer_index=1, dtype=torch.float32)
    m64 = registry.get(name).build(4, 8, layer_index=1, dtype=torch.float32).double()
    m64.load_state_dict(m32.state_dict())
    x = torch.randn(5, 4, 8, generator=torch.Generator().manual_seed(3))
    out = m64(x)
    assert out.res.dtype == torch.float64
    torch.testing.assert_close(out.res.float(), m32(x).res, atol=1e-6, rtol=0)

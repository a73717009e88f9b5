"""Parameter counts against SPEC section 5's table and published whole-model figures (HC App. B, mHC 27B)."""

from __future__ import annotations

import json
import math

import pytest

from hcdiag import registry
from hcdiag.enums import Exactness, Form
from hcdiag.errors import UsageError
from hcdiag.params import compute_params

# SPEC section 5, both columns, as published: (row, form) -> (n=4 C=2560, n=8 C=4096)
TABLE = {
    ("mhc", Form.PAPER): (245_787, 2_621_523),
    ("mhc", Form.CODE): (256_027, 2_654_291),
    ("mhc-lite", Form.CODE): (337_955, 1_321_803_155),
    ("kromhc", Form.CODE): (133_135, 753_689),
    ("tbp", Form.CODE): (256_028, 2_654_292),
    ("hc-static", Form.CODE): (24, 80),
    ("hc-dynamic", Form.CODE): (15_386, 41_042),
}
TBP_EFFECTIVE = (184_341, 2_162_757)
COLS = [(4, 2560), (8, 4096)]


def spec_parts(variant: str, n: int, C: int) -> tuple[int, int, int, int]:
    """SPEC section 5's per-part formulas (code form), typed in from the table."""
    nC = n * C
    pre = n * n * C + n + 1
    res = {
        "mhc": n**3 * C + n * n + 1,
        "mhc-lite": math.factorial(n) * nC + math.factorial(n) + 1,
        "kromhc": (S := 2 * int(math.log2(n))) * nC + S + 1,
        "tbp": n**3 * C + n * n + 2,
    }[variant]
    return pre, pre, res, nC


@pytest.mark.parametrize("col", [0, 1])
@pytest.mark.parametrize(("variant", "form"), list(TABLE))
def test_spec_table_totals(variant, form, col):
    n, C = COLS[col]
    report = compute_params(n, C, variants=[variant], form=form)
    (row,) = report.rows
    assert row.per_site == TABLE[(variant, form)][col]
    assert row.per_model == 2 * row.per_site  # layers = 1: two sites
    assert row.pre + row.post + row.res + row.norm == row.per_site


@pytest.mark.parametrize("col", [0, 1])
@pytest.mark.parametrize("variant", ["mhc", "mhc-lite", "kromhc", "tbp"])
def test_spec_table_parts(variant, col):
    n, C = COLS[col]
    (row,) = compute_params(n, C, variants=[variant]).rows
    assert (row.pre, row.post, row.res, row.norm) == spec_parts(variant, n, C)


@pytest.mark.parametrize("col", [0, 1])
def test_tbp_effective(col):
    n, C = COLS[col]
    (row,) = compute_params(n, C, variants=["tbp"]).rows
    assert row.effective.per_site == TBP_EFFECTIVE[col]
    assert row.effective.res == (n - 1) ** 2 * n * C + (n - 1) ** 2 + 2
    assert row.per_site - row.effective.per_site == (2 * n - 1) * (n * C + 1)  # unused columns + biases


@pytest.mark.parametrize("col", [0, 1])
def test_paper_form_closed_form_and_dhc_shc(col):
    n, C = COLS[col]
    rows = {r.variant: r for r in compute_params(n, C, form=Form.PAPER).rows}
    assert rows["mhc"].per_site == (n * n + 2 * n) * (n * C + 1) + 3  # SPEC section 5, paper form
    assert rows["hc-static"].per_site == n * n + 2 * n  # HC Eq. 21
    assert rows["hc-dynamic"].per_site == C * (n + 2) + n * (n + 2) + 2  # HC Eq. 25
    assert rows["identity"].per_site == 0
    for v in ("mhc", "mhc-lite", "kromhc", "tbp", "ihc"):
        code = compute_params(n, C, variants=[v]).rows[0]
        assert code.per_site - rows[v].per_site == n * C  # only the RMSNorm gain differs
    for v in ("hc-static", "hc-dynamic"):
        assert compute_params(n, C, variants=[v]).rows[0].per_site == rows[v].per_site


def test_mhc_27b_paper_form():
    # mHC 27B: C = 2560, 30 blocks, n = 4 -> 60 sites x 245,787 = 14,747,220 (SPEC section 5)
    r = compute_params(4, 2560, layers=30, variants=["mhc"], form=Form.PAPER)
    assert r.inputs.sites == 60
    assert r.rows[0].per_model == 14_747_220
    assert r.rows[0].overhead == pytest.approx(14_747_220 / (12 * 2560**2 * 30), rel=1e-15)


def test_olmo_1b_hc_app_b():
    # HC App. B: OLMo-1B (C = 2048, 16 blocks), n = 4: SHC 768, DHC 394,048
    rows = {
        r.variant: r for r in compute_params(4, 2048, layers=16, variants=["hc-static", "hc-dynamic"]).rows
    }
    assert rows["hc-static"].per_model == 768
    assert rows["hc-dynamic"].per_model == 394_048


@pytest.mark.parametrize(("n", "C"), [(12, 2048), (20, 4096)])
def test_mhc_lite_huge_n_exact_without_allocating(n, C):
    (row,) = compute_params(n, C, variants=["mhc-lite"]).rows
    k = math.factorial(n)
    assert row.res == k * n * C + k + 1
    assert isinstance(row.per_site, int)
    assert row.per_site == 2 * (n * n * C + n + 1) + k * n * C + k + 1 + n * C
    assert not row.practical
    assert any("impractical" in note for note in row.notes)
    # JSON keeps the exact integer (n = 20: ~2e21, far past float precision)
    assert (
        json.loads(json.dumps(compute_params(n, C, variants=["mhc-lite"]).to_dict()))["rows"][0]["per_site"]
        == row.per_site
    )


@pytest.mark.parametrize(("n", "practical"), [(4, True), (6, True), (7, False), (8, False)])
def test_mhc_lite_practical_threshold(n, practical):
    assert registry.get("mhc-lite").practical(n) is practical


def test_kromhc_factorisations():
    # default = prime factorisation: n = 6 -> (2, 3), S = 2! + 3! = 8
    (row,) = compute_params(6, 100, variants=["kromhc"]).rows
    assert row.kron_factors == (2, 3)
    assert row.res == 8 * 600 + 8 + 1
    (row,) = compute_params(8, 100, variants=["kromhc"], kron_factors=(2, 4)).rows
    assert row.res == (2 + 24) * 800 + 26 + 1
    # n = 14 = 2 x 7: a 7 x 7 factor (5,040 permutations) is impractical
    (row,) = compute_params(14, 10, variants=["kromhc"]).rows
    assert row.kron_factors == (2, 7) and not row.practical


def test_report_shape_and_json():
    r = compute_params(4, 256, layers=2)
    assert [row.variant for row in r.rows] == list(registry.names())
    d = json.loads(json.dumps(r.to_dict()))
    assert d["inputs"] == {
        "n": 4,
        "C": 256,
        "layers": 2,
        "form": "code",
        "sites": 4,
        "baseline_params": 12 * 256**2 * 2,
    }
    by = {row["variant"]: row for row in d["rows"]}
    assert by["mhc"]["exactness"] == Exactness.SINKHORN.value
    assert by["tbp"]["effective"]["per_model"] == 4 * by["tbp"]["effective"]["per_site"]
    assert by["kromhc"]["kron_factors"] == [2, 2]
    assert "12 C^2" in d["baseline"]


@pytest.mark.parametrize(
    ("kwargs", "option", "pattern"),
    [
        ({"n": 0, "C": 8}, "--n", "--n 0"),
        ({"n": 4, "C": 0}, "--C", "--C 0"),
        ({"n": 4, "C": 8, "layers": 0}, "--layers", "--layers 0"),
        ({"n": 4, "C": 8, "variants": ["mhc", "hc-turbo"]}, "--variants", "hc-turbo.*identity, hc-static"),
        ({"n": 4, "C": 8, "variants": []}, "--variants", "empty"),
        (
            {"n": 8, "C": 8, "kron_factors": (3, 3)},
            "--kron-factors",
            "3,3 multiplies to 9, not n = 8.*e.g. 2,2,2",
        ),
        ({"n": 8, "C": 8, "kron_factors": (1, 8)}, "--kron-factors", "factor 1"),
        ({"n": 8, "C": 8, "variants": ["mhc"], "kron_factors": (2, 4)}, "--kron-factors", "only to kromhc"),
        ({"n": 4, "C": 8, "form": "fancy"}, "--form", "fancy"),
        ({"n": 2.5, "C": 8}, "--n", "integer"),
    ],
)
def test_validation_errors_name_the_option(kwargs, option, pattern):
    with pytest.raises(UsageError, match=pattern) as e:
        compute_params(**kwargs)
    assert e.value.option == option
    assert "\n" not in str(e.value)


def test_parse_kron_factors():
    assert registry.parse_kron_factors("2,3") == (2, 3)
    assert registry.parse_kron_factors(" 2, 2 ,2 ") == (2, 2, 2)
    with pytest.raises(UsageError) as e:
        registry.parse_kron_factors("2,a")
    assert e.value.option == "--kron-factors"

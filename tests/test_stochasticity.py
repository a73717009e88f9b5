"""hcdiag.stochasticity / plot_stochasticity against independent oracles.

Oracles: the published mHC Fig. 8 numbers (SPEC sec. 6), and a brute-force recomputation written here from the
checkpoint's raw tensors: RMSNorm + projection in numpy, plain-loop Sinkhorn per convention (SPEC sec. 3), numpy
row/column sums.
"""

from __future__ import annotations

import glob
import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

from hcdiag import registry
from hcdiag.enums import Convention, Exactness
from hcdiag.errors import InputError, UsageError
from hcdiag.fileio import to_json
from hcdiag.io import load
from hcdiag.io.native import save_native
from hcdiag.model import LoadedModel, Site
from hcdiag.probes import make_probe
from hcdiag.site import SinkhornSpec
from hcdiag.stochasticity import (
    SCHEMA_VERSION,
    VERDICT_NA,
    VERDICT_OK,
    analyze_matrices,
    analyze_stochasticity,
)

N, C, BLOCKS = 4, 8, 2
ROOT = Path(__file__).resolve().parents[1]

# --------------------------------------------------------------------------------------------------------------
# mHC Fig. 8 (SPEC sec. 6): entries rounded to 2 decimals, so sums are good to about +-0.02

HC_1 = [[5.43, 4.43, 4.43, 4.43], [-4.07, -3.07, -4.07, -4.07], [-3.95, -3.95, -2.95, -3.95],
        [-4.22, -4.22, -4.22, -3.22]]
MHC_1 = [[0.67, 0.09, 0.03, 0.22], [0.26, 0.48, 0.26, 0.00], [0.03, 0.24, 0.00, 0.73], [0.03, 0.20, 0.69, 0.09]]
MHC_COMPOSITE = [[0.35, 0.28, 0.17, 0.20], [0.03, 0.62, 0.29, 0.07], [0.01, 0.17, 0.80, 0.02],
                 [0.02, 0.42, 0.25, 0.31]]


def test_fig8_published_sums_and_gains() -> None:
    Hs = torch.tensor([HC_1, MHC_1, MHC_COMPOSITE], dtype=torch.float64)
    r = analyze_matrices(Hs, ["hc_1", "mhc_1", "mhc_31_60"])
    hc, m1, comp = r.sites
    assert hc.row_sums_of_mean == pytest.approx([18.73, -15.29, -14.79, -15.88], abs=0.02)
    assert hc.col_sums_of_mean == pytest.approx([-6.81] * 4, abs=0.01)
    assert hc.gain_f_of_mean == pytest.approx(18.73, abs=0.02)
    assert hc.gain_b_of_mean == pytest.approx(6.81, abs=0.01)
    assert m1.row_sums_of_mean == pytest.approx([1.00] * 4, abs=0.02)
    assert m1.col_sums_of_mean == pytest.approx([0.98, 1.00, 0.98, 1.04], abs=0.02)
    assert comp.col_sums_of_mean == pytest.approx([0.41, 1.50, 1.50, 0.60], abs=0.02)
    assert comp.gain_b_of_mean == pytest.approx(1.50, abs=0.02)  # mHC composites stay below ~1.6 (Figs. 3, 7)
    # errors are |sum - 1| of the same sums, computed independently in numpy
    for s, M in zip(r.sites, (HC_1, MHC_1, MHC_COMPOSITE), strict=True):
        A = np.array(M)
        assert s.row_err.max == pytest.approx(np.abs(A.sum(1) - 1).max(), abs=1e-12)
        assert s.col_err.max == pytest.approx(np.abs(A.sum(0) - 1).max(), abs=1e-12)
        assert s.row_err_mean == pytest.approx(np.abs(A.sum(1) - 1).mean(), abs=1e-12)
        assert s.min_entry == pytest.approx(A.min())
        assert s.spectral_norm_of_mean == pytest.approx(np.linalg.norm(A, 2), rel=1e-12)
    assert r.summary.worst_site == "hc_1"
    assert r.summary.worst_axis == "rows"
    assert len(r.heatmaps) == 3 and r.curves == ()
    # marked unconstrained, the HC matrix has no doubly-stochastic error at all
    r2 = analyze_matrices(Hs[:1], ["hc_1"], exactness=Exactness.UNCONSTRAINED)
    assert r2.sites[0].verdict == VERDICT_NA and r2.sites[0].row_err is None and r2.exceeds(0.0) == []


def test_matrices_token_distribution() -> None:
    # [L, T, n, n]: p50 / p99 / max over tokens, and both averaging modes of the gain differ
    H = torch.stack([torch.eye(3) * (1 + t) for t in range(5)]).unsqueeze(0).double()  # row sums 1..5
    r = analyze_matrices(H)
    s = r.sites[0]
    errs = np.arange(5.0)  # |t + 1 - 1|
    assert s.row_err.max == 4.0 and s.row_err.p50 == 2.0
    assert s.row_err.p99 == pytest.approx(np.percentile(errs, 99))
    assert s.gain_f_mean == pytest.approx(3.0) and s.gain_f_of_mean == pytest.approx(3.0)
    assert s.gain_f_max == pytest.approx(5.0)
    assert r.exceeds(3.9) == ["H_1"] and r.exceeds(4.0) == []


def test_matrices_bad_shape() -> None:
    with pytest.raises(InputError):
        analyze_matrices(torch.zeros(2, 3, 4))


# --------------------------------------------------------------------------------------------------------------
# Synthetic native checkpoints


def _modules(variant: str, seed: int = 0, scale: float = 1.5, **kw) -> list:
    g = torch.Generator().manual_seed(seed)
    mods = []
    for k in range(2 * BLOCKS):
        m = registry.get(variant).build(N, C, layer_index=k, dtype=torch.float32, **kw)
        m.perturb_(scale, g, parts=("res", "dynamic"))
        with torch.no_grad():  # a visible dynamic part, so tokens differ (a_res = 0.01 at init)
            for name in ("a_res",):
                if hasattr(m, name):
                    getattr(m, name).fill_(0.5)
        mods.append(m)
    return mods


def _save(tmp_path: Path, variant: str, **kw) -> Path:
    spec = kw.pop("sinkhorn", None)
    extra = {"sinkhorn": spec} if spec is not None else {}
    mods = _modules(variant, **kw, **extra)
    p = tmp_path / f"{variant}.safetensors"
    save_native(p, mods, variant=variant, n=N, C=C, blocks=BLOCKS, sinkhorn=spec, form="code")
    return p


@pytest.fixture(scope="module")
def mhc_ckpt(tmp_path_factory) -> Path:
    return _save(tmp_path_factory.mktemp("mhc"), "mhc", sinkhorn=SinkhornSpec(Convention.PAPER, 20))


# ---- brute force, from the raw tensors ----


def _bf_logits(raw: dict, i: int, x: np.ndarray) -> np.ndarray:
    """mHC Eqs. 7-8 from the stored tensors: x [T, n, C] -> logits [T, n, n] (paper orientation)."""
    p = f"hc.sites.{i}."
    v = x.reshape(x.shape[0], -1).astype(np.float64)
    h = v / np.sqrt((v**2).mean(-1, keepdims=True) + 1e-6) * raw[p + "norm_weight"].astype(np.float64)
    lin = h @ raw[p + "phi_res"].astype(np.float64)
    return float(raw[p + "a_res"]) * lin.reshape(-1, N, N) + raw[p + "b_res"].astype(np.float64)


def _bf_sinkhorn(L: np.ndarray, convention: str, iters: int, eps: float = 0.0) -> np.ndarray:
    """Plain per-matrix loops, written from SPEC sec. 3 (not from hcdiag.sinkhorn)."""
    out = np.empty_like(L)
    for t in range(L.shape[0]):
        if convention == "paper":  # exp; columns then rows
            M = np.exp(L[t])
            for _ in range(iters):
                M = M / M.sum(axis=0, keepdims=True)
                M = M / M.sum(axis=1, keepdims=True)
        elif convention == "log":  # on alpha = H^T: lse over input axis, then output axis; exp at the end
            a = L[t].T.copy()
            for _ in range(iters):
                a = a - np.log(np.exp(a).sum(axis=0, keepdims=True))
                a = a - np.log(np.exp(a).sum(axis=1, keepdims=True))
            M = np.exp(a).T
        elif convention == "lucidrains":  # alpha = H^T, exp(l - max_in); inputs then outputs
            a = L[t].T
            a = np.exp(a - a.max(axis=0, keepdims=True))
            for _ in range(iters):
                a = a / np.maximum(a.sum(axis=0, keepdims=True), 1e-12)
                a = a / np.maximum(a.sum(axis=1, keepdims=True), 1e-12)
            M = a.T
        elif convention == "transformers":  # comb = H^T: softmax rows + eps, one column pass, (iters-1) pairs
            c = np.exp(L[t].T - L[t].T.max(axis=1, keepdims=True))
            c = c / c.sum(axis=1, keepdims=True) + eps
            c = c / (c.sum(axis=0, keepdims=True) + eps)
            for _ in range(iters - 1):
                c = c / (c.sum(axis=1, keepdims=True) + eps)
                c = c / (c.sum(axis=0, keepdims=True) + eps)
            M = c.T
        else:
            raise AssertionError(convention)
        out[t] = M
    return out


def _bf_errors(H: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return np.abs(H.sum(axis=2) - 1).max(axis=1), np.abs(H.sum(axis=1) - 1).max(axis=1)


def _bf_iters_to_tol(L: np.ndarray, tol: float, limit: int = 1000) -> list[int]:
    """paper convention: first k after which both axes are within tol (one incremental loop per matrix)."""
    out = []
    for t in range(L.shape[0]):
        M = np.exp(L[t])
        for k in range(1, limit + 1):
            M = M / M.sum(axis=0, keepdims=True)
            M = M / M.sum(axis=1, keepdims=True)
            if np.abs(M.sum(1) - 1).max() <= tol and np.abs(M.sum(0) - 1).max() <= tol:
                out.append(k)
                break
        else:
            out.append(-1)
    return out


def _close(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-13)


@pytest.mark.parametrize(
    ("convention", "exact", "eps"),
    [("paper", "rows", None), ("log", "columns", None), ("lucidrains", "columns", None),
     ("transformers", "rows", 0.0)],
)
def test_sinkhorn_sites_match_brute_force(mhc_ckpt: Path, convention: str, exact: str, eps: float | None) -> None:
    model = load(mhc_ckpt)
    override = None if convention == "paper" else convention
    r = analyze_stochasticity(model, probe="random", tokens=24, seed=3, convention=override, eps=eps)
    raw = load_file(str(mhc_ckpt))
    probe = make_probe("random", tokens=24, seed=3)
    assert r.summary.exact_axis == exact
    assert r.summary.conventions == (convention,)
    for site, row in zip(model.sites, r.sites, strict=True):
        x = probe.inputs(site).numpy()
        H = _bf_sinkhorn(_bf_logits(raw, site.index, x), convention, 20, eps or 0.0)
        re, ce = _bf_errors(H)
        assert row.convention == convention and row.iters == 20 and row.tokens == 24
        assert _close(row.row_err.max, re.max()) and _close(row.col_err.max, ce.max())
        assert _close(row.row_err.p50, float(np.percentile(re, 50)))
        assert _close(row.col_err.p99, float(np.percentile(ce, 99)))
        assert _close(row.min_entry, H.min())
        hm = H.mean(axis=0)
        assert row.gain_f_of_mean == pytest.approx(np.abs(hm.sum(1)).max(), rel=1e-9)
        assert row.gain_b_mean == pytest.approx(np.abs(H.sum(1)).max(1).mean(), rel=1e-9)
        assert row.sigma2_max == pytest.approx(np.linalg.svd(H, compute_uv=False)[:, 1].max(), rel=1e-9)
        exact_err, other_err = (row.row_err.max, row.col_err.max) if exact == "rows" else (
            row.col_err.max, row.row_err.max)
        assert exact_err < 1e-14, (site.name, exact_err)  # float64 rounding
        assert other_err > 1e-4, (site.name, other_err)  # the whole error sits in the other axis
        assert row.verdict != VERDICT_OK
        assert row.convention_source == ("metadata" if override is None else "cli (--convention)")
    assert r.summary.over_tol == 2 * BLOCKS
    worst = max(r.sites, key=lambda s: s.worst_error)
    assert r.summary.worst_site == worst.name
    assert r.exceeds(1e-9) == [s.name for s in model.sites]
    assert any(f"after 20 iterations ({convention} convention" in a for a in r.summary.advice)


def test_transformers_eps_floor(mhc_ckpt: Path) -> None:
    # switching to transformers without eps takes DeepSeek-V4's hc_eps = 1e-6: sums settle ~1e-6 below 1
    r = analyze_stochasticity(load(mhc_ckpt), probe="static", convention="transformers", iters=200)
    raw = load_file(str(mhc_ckpt))
    for row in r.sites:
        assert row.eps == 1e-6
        b = raw[f"hc.sites.{row.index}.b_res"].astype(np.float64)[None]
        re, ce = _bf_errors(_bf_sinkhorn(b, "transformers", 200, 1e-6))
        assert _close(row.row_err.max, re.max()) and _close(row.col_err.max, ce.max())
        assert 1e-7 < row.row_err.max < 1e-5
    assert any("eps = 1e-06" in a for a in r.summary.advice)


def test_iters_override_and_iters_to_tol(mhc_ckpt: Path) -> None:
    model = load(mhc_ckpt)
    r = analyze_stochasticity(model, probe="random", tokens=6, seed=1, iters=7, tol=1e-3)
    raw = load_file(str(mhc_ckpt))
    probe = make_probe("random", tokens=6, seed=1)
    for site, row in zip(model.sites, r.sites, strict=True):
        assert (row.iters, row.iters_source, row.convention_source) == (7, "cli (--iters)", "metadata")
        L = _bf_logits(raw, site.index, probe.inputs(site).numpy())
        re, ce = _bf_errors(_bf_sinkhorn(L, "paper", 7))
        assert _close(row.col_err.max, ce.max())
        need = _bf_iters_to_tol(L, 1e-3)
        reached = [k for k in need if k > 0]
        if len(reached) == len(need):
            assert row.iters_to_tol_max == max(need)
            assert row.iters_to_tol_p50 == sorted(need)[(len(need) - 1) // 2]
        assert row.iters_to_tol_unreached == len(need) - len(reached)
    assert r.settings["iters"] == {"value": 7, "source": "cli (--iters)"}
    assert r.settings["convention"] == {"value": "paper", "source": "metadata"}
    d = analyze_stochasticity(model, probe="static")
    assert {s.iters_source for s in d.sites} == {"metadata"} and {s.iters for s in d.sites} == {20}


def test_curves_and_heatmaps(mhc_ckpt: Path) -> None:
    model = load(mhc_ckpt)
    r = analyze_stochasticity(model, probe="random", tokens=8)
    assert len(r.curves) == 3
    ranked = sorted(r.sites, key=lambda s: -s.worst_error)[:3]
    assert [c.name for c in r.curves] == [s.name for s in ranked]
    for c in r.curves:
        row = next(s for s in r.sites if s.name == c.name)
        assert len(c.col_err_max) == 100 and len(c.row_err_max) == 100
        assert c.col_err_max[19] == pytest.approx(row.col_err.max, rel=1e-9)  # after iteration 20
        assert max(c.row_err_max) < 1e-14
        assert c.col_err_max[99] < c.col_err_max[0]
    assert [h.index for h in r.heatmaps] == [0, BLOCKS, 2 * BLOCKS - 1]
    # token-mean matrix recomputed by brute force
    raw = load_file(str(mhc_ckpt))
    probe = make_probe("random", tokens=8)
    site = model.sites[BLOCKS]
    H = _bf_sinkhorn(_bf_logits(raw, site.index, probe.inputs(site).numpy()), "paper", 20).mean(axis=0)
    np.testing.assert_allclose(np.array(r.heatmaps[1].matrix), H, rtol=0, atol=1e-12)
    np.testing.assert_allclose(r.heatmaps[1].col_sums, H.sum(0), rtol=0, atol=1e-12)


def test_json_document(mhc_ckpt: Path) -> None:
    r = analyze_stochasticity(load(mhc_ckpt), probe="random", tokens=4)
    doc = json.loads(to_json(r.to_dict()))
    assert doc["schema_version"] == SCHEMA_VERSION == 1
    assert len(doc["sites"]) == 2 * BLOCKS
    s0 = doc["sites"][0]
    for key in ("row_err_p50", "row_err_p99", "row_err_max", "col_err_max", "iters_to_tol_p50", "gain_f_mean",
                "gain_f_of_mean", "logit_range_max", "over_underflow_f32", "verdict", "iters_source"):
        assert key in s0
    assert all(not isinstance(v, dict) for v in s0.values())  # flat rows for CSV
    assert doc["summary"]["exact_axis"] == "rows"


@pytest.mark.parametrize("variant", ["mhc-lite", "kromhc", "tbp"])
def test_exact_variants_float32(tmp_path: Path, variant: str) -> None:
    model = load(_save(tmp_path, variant, scale=3.0))
    r = analyze_stochasticity(model, probe="random", tokens=64, dtype="float32")
    assert r.dtype == "float32"
    for row in r.sites:
        assert row.exactness == "exact" and row.verdict == VERDICT_OK
        assert row.worst_error < 1e-5, (row.name, row.worst_error)
        assert row.min_entry > -1e-6
        assert row.iters is None and row.logit_range_max is None
    assert r.curves == ()
    assert not any("bug" in a for a in r.summary.advice)
    r64 = analyze_stochasticity(model, probe="random", tokens=16)
    assert max(s.worst_error for s in r64.sites) < 1e-13


def test_exact_variant_bug_is_called_out() -> None:
    m = registry.get("mhc-lite").build(N, C, layer_index=0)

    class Broken(type(m)):  # a model-code bug: an un-normalised weight vector
        def res_from_logits(self, logits, spec=None):
            return super().res_from_logits(logits) * 1.001

    m.__class__ = Broken
    model = LoadedModel("<mem>", "test", "", [Site(0, "attn_0", 0, "attn", "mhc-lite", m)], N, C)
    r = analyze_stochasticity(model, probe="static", dtype="float32")
    assert r.sites[0].verdict != VERDICT_OK
    assert any("bug in the model code" in a and "attn_0" in a for a in r.summary.advice)


@pytest.mark.parametrize("variant", ["hc-static", "hc-dynamic"])
def test_hc_sites_not_applicable(tmp_path: Path, variant: str) -> None:
    p = _save(tmp_path, variant)
    model = load(p)
    r = analyze_stochasticity(model, probe="static")
    raw = load_file(str(p))
    for row in r.sites:
        assert row.verdict == VERDICT_NA and row.worst_error is None
        H = raw[f"hc.sites.{row.index}.A_r"].astype(np.float64).T  # A_r = H_res^T (HC Eq. 1)
        # how far an unconstrained H_res is from doubly stochastic is reported, though no verdict applies
        assert row.row_err.max == pytest.approx(np.abs(H.sum(1) - 1).max(), rel=1e-6)
        assert row.col_err.max == pytest.approx(np.abs(H.sum(0) - 1).max(), rel=1e-6)
        assert row.gain_f_of_mean == pytest.approx(np.abs(H.sum(1)).max(), rel=1e-6)
        assert row.gain_b_of_mean == pytest.approx(np.abs(H.sum(0)).max(), rel=1e-6)
        assert row.spectral_norm_of_mean == pytest.approx(np.linalg.norm(H, 2), rel=1e-6)
    assert r.exceeds(0.0) == [] and r.summary.applicable == 0
    assert any("unconstrained" in a for a in r.summary.advice)


def test_identity_sites(tmp_path: Path) -> None:
    r = analyze_stochasticity(load(_save(tmp_path, "ihc")), probe="random", tokens=4)
    assert all(s.worst_error == 0.0 and s.verdict == VERDICT_OK and s.gain_f_mean == 1.0 for s in r.sites)


def test_nan_logits_name_the_site() -> None:
    sites = []
    for k in range(4):
        m = registry.get("mhc").build(N, C, layer_index=k)
        if k == 3:
            with torch.no_grad():
                m.b_res[1, 2] = float("nan")
        sites.append(Site(k, ["attn_0", "ffn_0", "attn_1", "ffn_1"][k], k // 2, "x", "mhc", m))
    model = LoadedModel("bad.safetensors", "native", "", sites, N, C)
    with pytest.raises(InputError, match="ffn_1") as ei:
        analyze_stochasticity(model, probe="static")
    assert ei.value.path == "bad.safetensors"
    assert "\n" not in str(ei.value)


def test_bad_options(mhc_ckpt: Path) -> None:
    model = load(mhc_ckpt)
    with pytest.raises(UsageError) as e1:
        analyze_stochasticity(model, tol=0)
    assert e1.value.option == "--tol"
    with pytest.raises(UsageError) as e2:
        analyze_stochasticity(model, iters=0)
    assert e2.value.option == "--iters"
    with pytest.raises(UsageError) as e3:
        analyze_stochasticity(model, probe="random", tokens=0)
    assert e3.value.option == "--tokens"
    with pytest.raises(UsageError):
        analyze_stochasticity(model, convention="nope")
    r = analyze_stochasticity(model)
    with pytest.raises(UsageError):
        r.exceeds(float("nan"))


def test_logit_range_advice() -> None:
    m = registry.get("mhc").build(N, C, layer_index=0)
    with torch.no_grad():
        m.b_res.copy_(torch.tensor([[0.0, -40, -40, -40], [-40, 0, -40, -40], [-40, -40, 0, -40],
                                    [-40, -40, -41, 0]]))
    model = LoadedModel("<mem>", "test", "", [Site(0, "ffn_7", 7, "ffn", "mhc", m)], N, C)
    r = analyze_stochasticity(model, probe="static")
    s = r.sites[0]
    assert s.logit_range_max == pytest.approx(41.0) and s.over_absorption_f32 == 1 and s.over_underflow_f32 == 0
    assert any("logit range up to 41 at site ffn_7" in a for a in r.summary.advice)


@pytest.mark.parametrize("spread, convention, suggests_log", [
    (41.0, None, False),  # absorption: the log domain rounds the same way
    (100.0, None, True),  # underflow under the mHC default (an exp-domain convention)
    (100.0, "lucidrains", True),
    (100.0, "log", False),  # already the log domain
])
def test_log_domain_is_suggested_only_where_it_helps(spread: float, convention: str | None,
                                                     suggests_log: bool) -> None:
    m = registry.get("mhc").build(N, C, layer_index=0)
    with torch.no_grad():
        m.b_res.copy_(torch.full((N, N), -spread).fill_diagonal_(0.0))
    model = LoadedModel("<mem>", "test", "", [Site(0, "ffn_7", 7, "ffn", "mhc", m)], N, C)
    r = analyze_stochasticity(model, probe="static", convention=convention)
    line = next(a for a in r.summary.advice if a.startswith(f"logit range up to {spread:.3g}"))
    assert ("log domain (hcdiag: --convention log)" in line) == suggests_log, line
    assert "shrink the scale of the H_res logits" in line


def test_overflow_is_reported_not_hidden() -> None:
    # paper convention has no max subtraction: exp(800) overflows even float64 -> NaN H_res
    m = registry.get("mhc").build(N, C, layer_index=0)
    with torch.no_grad():
        m.b_res[0, 0] = 800.0
    model = LoadedModel("<mem>", "test", "", [Site(0, "attn_0", 0, "attn", "mhc", m)], N, C)
    r = analyze_stochasticity(model, probe="static")
    s = r.sites[0]
    assert s.verdict == "non-finite H_res" and s.worst_error == math.inf
    assert r.exceeds(1e9) == ["attn_0"]
    assert json.loads(to_json(r.to_dict()))["sites"][0]["row_err_max"] is None  # strict JSON: inf -> null
    assert any("NaN/Inf" in a for a in r.summary.advice)
    ok = analyze_stochasticity(model, probe="static", convention="log")  # log domain survives
    assert ok.sites[0].verdict != "non-finite H_res" and math.isfinite(ok.sites[0].worst_error)


# --------------------------------------------------------------------------------------------------------------
# Plots


def test_plots_are_valid_pngs(mhc_ckpt: Path, tmp_path: Path) -> None:
    import matplotlib.image

    from hcdiag.plot_stochasticity import plot_stochasticity

    r = analyze_stochasticity(load(mhc_ckpt), probe="random", tokens=8)
    out = tmp_path / "plots"
    out.mkdir()
    files = plot_stochasticity(r, out)
    assert [f.name for f in files] == ["stochasticity_error_per_site.png", "stochasticity_convergence.png",
                                       "stochasticity_heatmaps.png"]
    for f in files:
        img = matplotlib.image.imread(f)
        assert img.ndim == 3 and img.shape[0] > 300 and img.shape[1] > 300
    assert sorted(os.listdir(out)) == sorted(f.name for f in files)  # no temporary files left
    # given matrices: no logits, so no convergence figure; HC-only: only heatmaps
    r2 = analyze_matrices(torch.tensor([HC_1, MHC_1, MHC_COMPOSITE], dtype=torch.float64))
    assert len(plot_stochasticity(r2, out)) == 2
    r3 = analyze_matrices(torch.tensor([HC_1], dtype=torch.float64), exactness="unconstrained")
    assert [f.name for f in plot_stochasticity(r3, out)] == ["stochasticity_heatmaps.png"]
    with pytest.raises(UsageError):
        plot_stochasticity(r, tmp_path / "missing")


# --------------------------------------------------------------------------------------------------------------
# Trained sample checkpoints (samples/*.safetensors), when present

SAMPLES = sorted(glob.glob(str(ROOT / "samples" / "*.safetensors")))


@pytest.mark.skipif(not SAMPLES, reason="no samples/*.safetensors in this checkout")
@pytest.mark.parametrize("path", SAMPLES, ids=[Path(p).stem for p in SAMPLES])
def test_samples(path: str) -> None:
    model = load(path)
    r = analyze_stochasticity(model, probe="random", tokens=32, dtype="float32")
    for row in r.sites:
        if row.exactness in (Exactness.EXACT.value, Exactness.IDENTITY.value):
            assert row.worst_error < 1e-5, (row.name, row.worst_error)
        elif row.exactness == Exactness.UNCONSTRAINED.value:
            assert row.verdict == VERDICT_NA
    if any(s.exactness == Exactness.SINKHORN.value for s in r.sites):
        rp = analyze_stochasticity(model, probe="random", tokens=32, convention="paper")
        assert max(s.row_err.max for s in rp.sites) < 1e-13

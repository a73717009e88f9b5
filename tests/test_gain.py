"""gain-sweep against independent oracles: closed forms and brute-force numpy products written here.

Paper convention throughout (mHC Eq. 3): x_{l+1} = H_l x_l, so the forward composite at site l is
H_l ... H_1 (later sites on the left) and the backward composite is H_L ... H_l. G_f = max |row sum|,
G_b = max |column sum| (mHC Sec. 3.1). The brute-force loops below never call hcdiag.metrics or hcdiag.gain
helpers: they multiply the stored H_res stack with numpy.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from hcdiag import registry
from hcdiag.enums import Convention, DType
from hcdiag.errors import UsageError
from hcdiag.gain import METRICS, GainReport, depth_metrics, gain_from_model, gain_sweep
from hcdiag.site import SinkhornSpec

# ------------------------------------------------------------------------------------------ numpy oracles


def np_forward(H: np.ndarray) -> np.ndarray:
    """H [L, n, n] -> [L, n, n] with out[l] = H_l ... H_1 (plain loop, later sites on the left)."""
    out = np.empty_like(H)
    P = np.eye(H.shape[-1])
    for layer in range(H.shape[0]):
        P = H[layer] @ P
        out[layer] = P
    return out


def np_backward(H: np.ndarray) -> np.ndarray:
    """H [L, n, n] -> [L, n, n] with out[l] = H_L ... H_l."""
    out = np.empty_like(H)
    Q = np.eye(H.shape[-1])
    for layer in range(H.shape[0] - 1, -1, -1):
        Q = Q @ H[layer]
        out[layer] = Q
    return out


def g_f(M: np.ndarray) -> np.ndarray:
    return np.abs(M.sum(axis=-1)).max(axis=-1)


def g_b(M: np.ndarray) -> np.ndarray:
    return np.abs(M.sum(axis=-2)).max(axis=-1)


def brute_gains(stack: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """stack [L, S, n, n] -> (G_f(H_l..H_1), G_b(H_L..H_l)) each [L, S], one numpy loop per seed."""
    L, S = stack.shape[:2]
    gf, gb = np.empty((L, S)), np.empty((L, S))
    for s in range(S):
        gf[:, s] = g_f(np_forward(stack[:, s]))
        gb[:, s] = g_b(np_backward(stack[:, s]))
    return gf, gb


# ------------------------------------------------------------------------------------------ exact variants


@pytest.mark.parametrize("variant", ["identity", "mhc-lite", "kromhc", "tbp", "ihc"])
def test_exact_variants_composites_stay_doubly_stochastic(variant: str) -> None:
    r = gain_sweep(layers=12, variants=[variant], n=4, C=8, init="perturb", logit_scale=1.5, seeds=3,
                   keep_stacks=True)
    v = r.variant(variant)
    H = v.stack.numpy()[:, :, 0]  # [L, S, n, n]
    assert H.shape == (24, 3, 4, 4)
    if variant not in ("identity", "ihc"):
        assert np.ptp(H, axis=(0, 1)).max() > 1e-2  # the perturbation really moved H_res
    for s in range(3):
        for comp in (np_forward(H[:, s]), np_backward(H[:, s])):
            np.testing.assert_allclose(comp.sum(-1), 1.0, atol=1e-6)  # rows, every depth
            np.testing.assert_allclose(comp.sum(-2), 1.0, atol=1e-6)  # columns, every depth
    for m in ("gain_fwd", "gain_bwd", "fwd_gain_bwd", "bwd_gain_fwd", "site_gain_fwd", "site_gain_bwd"):
        for st in ("median", "min", "max"):
            np.testing.assert_allclose(v.curves[m][st], 1.0, atol=1e-6)
    assert v.curves["row_err"]["max"].max() < 1e-6 and v.curves["col_err"]["max"].max() < 1e-6


@pytest.mark.parametrize("n", [4, 8])
def test_kromhc_composite_matches_closed_form(n: int) -> None:
    # SPEC sec. 2: 2x2 factors U = [[p, 1-p], [1-p, p]] (factor 0 leftmost); they all commute, and the composite
    # over sites has factor parameters (2 q_k - 1) = prod_l (2 p_{l,k} - 1).
    K = int(math.log2(n))
    r = gain_sweep(layers=10, variants=["kromhc"], n=n, C=4, init="perturb", logit_scale=2.0, keep_stacks=True)
    v = r.variant("kromhc")
    H = v.stack.numpy()[:, 0, 0]  # [L, n, n], seeds = tokens = 1
    L = H.shape[0]
    # p_{l,k} = marginal of row 0 over the columns whose k-th binary digit (factor 0 = most significant) is 0
    bits = (np.arange(n)[:, None] >> (K - 1 - np.arange(K))[None, :]) & 1  # [n, K]
    p = np.stack([H[:, 0, bits[:, k] == 0].sum(-1) for k in range(K)], axis=1)  # [L, K]

    def kron_of(params: np.ndarray) -> np.ndarray:
        M = np.ones((1, 1))
        for q in params:
            M = np.kron(M, np.array([[q, 1 - q], [1 - q, q]]))
        return M

    for layer in range(L):  # the stack really is a Kronecker product of such factors
        np.testing.assert_allclose(H[layer], kron_of(p[layer]), atol=1e-13)

    def closed(sl: slice) -> np.ndarray:
        return kron_of((1 + np.prod(2 * p[sl] - 1, axis=0)) / 2)

    h = L // 2
    np.testing.assert_allclose(v.heatmaps["first_half"], closed(slice(0, h)), atol=1e-10)
    np.testing.assert_allclose(v.heatmaps["second_half"], closed(slice(h, L)), atol=1e-10)
    np.testing.assert_allclose(v.heatmaps["all"], closed(slice(0, L)), atol=1e-10)
    # and the composites approach J/n, as prod |2p - 1| shrinks: sigma_2 = max_k |2 q_k - 1|
    q_all = (1 + np.prod(2 * p - 1, axis=0)) / 2
    assert v.curves["sigma2"]["median"][-1] == pytest.approx(np.abs(2 * q_all - 1).max(), abs=1e-10)


# ------------------------------------------------------------------------------------------ HC


def test_hc_static_at_init_every_gain_exactly_one() -> None:
    # HC init (HC Sec. 2.3): A_r = I, so H_res = I and HC equals pre-norm.
    r = gain_sweep(layers=6, variants=["hc-static"], n=4, C=8, seeds=3)
    v = r.variant("hc-static")
    for m in ("gain_fwd", "gain_bwd", "site_gain_fwd", "site_gain_bwd", "spectral_norm", "fwd_gain_bwd"):
        for st in ("median", "min", "max"):
            assert np.all(v.curves[m][st] == 1.0), m
    assert np.all(v.curves["dist_identity"]["max"] == 0.0)
    assert any("every gain is exactly 1" in note for note in v.notes)
    assert np.array_equal(v.heatmaps["all"], np.eye(4))


def test_hc_static_perturbed_gain_grows_and_equals_brute_force() -> None:
    r = gain_sweep(layers=20, variants=["hc-static"], n=4, C=8, init="perturb", logit_scale=0.3, seeds=5,
                   keep_stacks=True)
    v = r.variant("hc-static")
    H = v.stack.numpy()[:, :, 0]
    gf, gb = brute_gains(H)
    for st, fn in (("median", np.median), ("min", np.min), ("max", np.max)):
        np.testing.assert_allclose(v.curves["gain_fwd"][st], fn(gf, axis=1), rtol=1e-12)
        np.testing.assert_allclose(v.curves["gain_bwd"][st], fn(gb, axis=1), rtol=1e-12)
    # single sites and the composite's other numbers, also by brute force (seed 0)
    F = np_forward(H[:, 0])
    np.testing.assert_allclose(v.curves["site_gain_fwd"]["max"], g_f(H).max(axis=1), rtol=1e-12)
    sv = np.linalg.svd(F, compute_uv=False)
    one = gain_sweep(layers=20, variants=["hc-static"], n=4, C=8, init="perturb", logit_scale=0.3, seeds=5)
    assert np.array_equal(one.variant("hc-static").curves["gain_fwd"]["median"], v.curves["gain_fwd"]["median"])
    dm = depth_metrics(torch.from_numpy(H[:, :1].copy()))
    np.testing.assert_allclose(dm.values["sigma2"][:, 0], sv[:, 1], rtol=1e-9)
    np.testing.assert_allclose(dm.values["dist_uniform"][:, 0], np.linalg.norm(F - 0.25, axis=(1, 2)), rtol=1e-12)
    np.testing.assert_allclose(dm.values["dist_identity"][:, 0], np.linalg.norm(F - np.eye(4), axis=(1, 2)),
                               rtol=1e-12)
    # unconstrained products grow with depth: the last quarter's median gain far above the first quarter's
    med = v.curves["gain_fwd"]["median"]
    assert med[-10:].mean() > 5 * med[:10].mean()
    assert med[-1] > 10


# ------------------------------------------------------------------------------------------ mHC orientation


def test_mhc_paper_sinkhorn_rows_exact_columns_drift() -> None:
    # Paper convention (mHC Eq. 9): M_t = T_r(T_c(M_{t-1})), the row pass is last, so every H_l is exactly row
    # stochastic (H 1 = 1). Then H_l ... H_1 1 = 1 too: the forward gain G_f (row sums) of every composite is 1
    # to rounding, while the column sums 1^T H_l ... H_1 carry the whole Sinkhorn error, so the backward gain
    # G_b departs from 1. This is what the paper reports: mHC Sec. 5.4, "as shown in Fig. 7(a), the backward
    # gradient gain deviates slightly from 1 ... in the composite case (Fig. 7(b)) ... a maximum value of
    # approximately 1.6"; and SPEC sec. 6 (mHC Fig. 8, y labels = row sums, x labels = column sums): the 27B
    # composite of sites 31-60 has rows 1.00 and columns 0.41, 1.50, 1.50, 0.60.
    r = gain_sweep(layers=16, variants=["mhc"], n=4, C=8, init="perturb", logit_scale=4.0, seeds=4, iters=20,
                   convention="paper", keep_stacks=True)
    v = r.variant("mhc")
    assert v.sinkhorn == {"convention": "paper", "iters": 20, "eps": 0.0, "source": "cli", "exact_axis": "rows"}
    for st in ("median", "min", "max"):
        np.testing.assert_allclose(v.curves["gain_fwd"][st], 1.0, atol=1e-12)
        np.testing.assert_allclose(v.curves["site_gain_fwd"][st], 1.0, atol=1e-12)
    assert v.curves["site_col_err"]["max"].max() > 1e-3  # Sinkhorn is inexact at this logit scale
    assert abs(v.curves["gain_bwd"]["max"] - 1).max() > 1e-2
    gf, gb = brute_gains(v.stack.numpy()[:, :, 0])
    np.testing.assert_allclose(v.curves["gain_bwd"]["max"], gb.max(axis=1), rtol=1e-12)
    np.testing.assert_allclose(v.curves["fwd_gain_bwd"]["median"],
                               np.median([g_b(np_forward(v.stack.numpy()[:, s, 0])) for s in range(4)], axis=0),
                               rtol=1e-12)

    # lucidrains ends with the input-stream (paper column) pass: the roles swap
    r2 = gain_sweep(layers=16, variants=["mhc"], n=4, C=8, init="perturb", logit_scale=4.0, seeds=4,
                    convention=Convention.LUCIDRAINS)
    v2 = r2.variant("mhc")
    assert v2.sinkhorn["exact_axis"] == "columns"
    np.testing.assert_allclose(v2.curves["gain_bwd"]["max"], 1.0, atol=1e-12)
    assert abs(v2.curves["gain_fwd"]["max"] - 1).max() > 1e-2


# ------------------------------------------------------------------------------------------ tokens


def test_both_token_averaging_modes_equal_brute_force() -> None:
    r = gain_sweep(layers=5, variants=["hc-dynamic", "mhc"], n=4, C=8, init="perturb", logit_scale=2.0, seeds=3,
                   tokens=4, keep_stacks=True)
    for v in r.variants:
        H = v.stack.numpy()  # [L, S, T, n, n]
        L, S, T = H.shape[:3]
        assert np.ptp(H, axis=2).max() > 1e-6  # per-token matrices really differ
        # mode 1: metrics of per-token products H_{l,t} ... H_{1,t}, averaged over tokens, then over seeds
        gf = np.empty((L, S, T))
        gb = np.empty((L, S, T))
        for s in range(S):
            for t in range(T):
                gf[:, s, t] = g_f(np_forward(H[:, s, t]))
                gb[:, s, t] = g_b(np_backward(H[:, s, t]))
        np.testing.assert_allclose(v.curves["gain_fwd"]["median"], np.median(gf.mean(2), axis=1), rtol=1e-12)
        np.testing.assert_allclose(v.curves["gain_bwd"]["max"], gb.mean(2).max(axis=1), rtol=1e-12)
        np.testing.assert_allclose(v.curves["gain_fwd"]["token_max"], gf.max(axis=(1, 2)), rtol=1e-12)
        # mode 2: the token-mean matrix per site, then its products
        Hbar = H.mean(axis=2)
        gf2 = np.stack([g_f(np_forward(Hbar[:, s])) for s in range(S)], axis=1)
        gb2 = np.stack([g_b(np_backward(Hbar[:, s])) for s in range(S)], axis=1)
        np.testing.assert_allclose(v.token_mean_curves["gain_fwd"]["median"], np.median(gf2, axis=1), rtol=1e-12)
        np.testing.assert_allclose(v.token_mean_curves["gain_bwd"]["min"], gb2.min(axis=1), rtol=1e-12)
        if v.name == "hc-dynamic":  # unconstrained: the two readings really differ
            assert np.abs(v.curves["gain_fwd"]["median"] - v.token_mean_curves["gain_fwd"]["median"]).max() > 1e-6


# ------------------------------------------------------------------------------------------ checkpoints


def test_gain_from_model_equals_brute_force_product(tmp_path) -> None:
    from hcdiag.io.load import load
    from hcdiag.io.native import save_native
    from hcdiag.probes import make_probe

    n, C, blocks = 4, 8, 3
    spec = registry.get("mhc")
    g = torch.Generator().manual_seed(7)
    mods = [spec.build(n, C, layer_index=i, dtype=torch.float64).perturb_(3.0, g, parts=("res", "dynamic"))
            for i in range(2 * blocks)]
    path = save_native(tmp_path / "m.safetensors", mods, variant="mhc", n=n, C=C, blocks=blocks,
                       sinkhorn=SinkhornSpec(Convention.PAPER, 20), form="code")
    model = load(path)
    probe = make_probe("random", tokens=5, seed=3)
    for iters in (None, 3):
        r = gain_from_model(model, probe=probe, iters=iters)
        v = r.variants[0]
        assert r.site_names == ("attn_0", "ffn_0", "attn_1", "ffn_1", "attn_2", "ffn_2")
        # brute force from the in-memory modules (not the loaded ones), same probe tokens per site
        with torch.no_grad():
            Hs = []
            for i, m in enumerate(mods):
                x = torch.from_numpy(probe.draw(i, n, C))
                z = m.res_logits(x)
                sk = SinkhornSpec(Convention.PAPER, iters) if iters else m.sinkhorn
                Hs.append(m.res_from_logits(z, sk).numpy())
        H = np.stack(Hs)  # [L, T, n, n]
        gf = np.stack([g_f(np_forward(H[:, t])) for t in range(5)], axis=1)
        gb = np.stack([g_b(np_backward(H[:, t])) for t in range(5)], axis=1)
        np.testing.assert_allclose(v.curves["gain_fwd"]["median"], gf.mean(1), rtol=1e-12)
        np.testing.assert_allclose(v.curves["gain_bwd"]["median"], gb.mean(1), rtol=1e-12)
        Hbar = H.mean(1)
        np.testing.assert_allclose(v.token_mean_curves["gain_bwd"]["median"], g_b(np_backward(Hbar)), rtol=1e-12)
        np.testing.assert_allclose(v.heatmaps["all"], np_forward(Hbar)[-1], rtol=1e-12, atol=1e-15)
        assert abs(v.curves["gain_bwd"]["max"] - 1).max() > 1e-3  # inexact columns, as for the synthetic mhc
    assert r.inputs["iters"] == 3 and v.sinkhorn["source"] == "cli"


# ------------------------------------------------------------------------------------------ precision


def test_bfloat16_products_round_every_step() -> None:
    r64 = gain_sweep(layers=20, variants=["hc-static"], init="perturb", logit_scale=0.2, seeds=2, keep_stacks=True)
    r16 = gain_sweep(layers=20, variants=["hc-static"], init="perturb", logit_scale=0.2, seeds=2,
                     dtype=DType.BFLOAT16)
    H = r64.variant("hc-static").stack[:, :, 0]
    P = H[0].to(torch.bfloat16)
    want = [P.double().sum(-1).abs().amax(-1)]
    for layer in range(1, H.shape[0]):
        P = H[layer].to(torch.bfloat16) @ P  # a bf16 model: every product rounded to bf16
        want.append(P.double().sum(-1).abs().amax(-1))
    want_med = np.median(torch.stack(want).numpy(), axis=1)
    np.testing.assert_array_equal(r16.variant("hc-static").curves["gain_fwd"]["median"], want_med)
    f64 = r64.variant("hc-static").curves["gain_fwd"]["median"]
    assert not np.array_equal(want_med, f64)
    np.testing.assert_allclose(want_med, f64, rtol=0.1)
    assert any("bfloat16" in note for note in r16.notes)


# ------------------------------------------------------------------------------------------ report plumbing


def test_report_json_table_rows_and_skips() -> None:
    r = gain_sweep(layers=4, variants=["mhc", "mhc-lite", "hc-static"], n=7, C=4, init="perturb", logit_scale=0.5,
                   seeds=2)
    assert isinstance(r, GainReport)
    assert r.variant("mhc-lite").status == "skipped" and "impractical" in r.variant("mhc-lite").reason
    doc = json.loads(json.dumps(r.to_dict()))
    assert doc["schema_version"] == 1 and doc["sites"] == 8
    mhc = next(d for d in doc["variants"] if d["name"] == "mhc")
    assert set(mhc["curves"]) == set(METRICS) and len(mhc["curves"]["gain_fwd"]["median"]) == 8
    assert mhc["token_mean_curves"] is None and len(mhc["heatmaps"]["all"]) == 7
    rows = r.table_rows(3)
    hc = [row for row in rows if row["variant"] == "hc-static"]
    sites = [row["site"] for row in hc]
    assert sites == sorted(sites) and {1, 3, 6, 8} <= set(sites) and len(sites) <= 5
    assert hc[0]["tag"].startswith("first") and "last" in hc[-1]["tag"]
    worst = next(row for row in hc if "worst" in row["tag"])
    assert set(sites) - {1, 3, 6, 8} <= {worst["site"]}
    g = r.variant("hc-static").curves
    dev = np.max([np.abs(np.log(g[m][s])) for m in ("gain_fwd", "gain_bwd") for s in ("median", "min", "max")], 0)
    assert worst["site"] == int(np.argmax(dev)) + 1
    assert {row["variant"] for row in rows} == {"mhc", "hc-static"}


@pytest.mark.parametrize(
    ("kwargs", "option"),
    [
        ({"layers": 0}, "--layers"),
        ({"seeds": 0}, "--seeds"),
        ({"n": 0}, "--n"),
        ({"tokens": 0}, "--tokens"),
        ({"iters": 0}, "--iters"),
        ({"init": "xavier"}, "--init"),
        ({"init": "perturb"}, "--logit-scale"),
        ({"init": "perturb", "logit_scale": -1.0}, "--logit-scale"),
        ({"logit_scale": 1.0}, "--logit-scale"),
        ({"variants": ["nope"]}, "--variants"),
        ({"variants": []}, "--variants"),
        ({"variants": ["kromhc"], "kron_factors": (3, 3)}, "--kron-factors"),
        ({"variants": ["mhc"], "kron_factors": (2, 2)}, "--kron-factors"),
        ({"dtype": "float16"}, "--dtype"),
        ({"convention": "sideways"}, "--convention"),
        ({"variants": ["mhc-lite"], "n": 8}, "--n"),
        ({"layers": 10**6, "seeds": 10**3}, "--seeds"),
    ],
)
def test_validation_errors_name_the_option(kwargs: dict, option: str) -> None:
    with pytest.raises(UsageError) as err:
        gain_sweep(**{"layers": 2, "C": 4, **kwargs})
    assert err.value.option == option
    assert "\n" not in str(err.value)


def test_plots_are_written(tmp_path) -> None:
    pytest.importorskip("matplotlib")
    from hcdiag.plot_gain import plot_gain

    r = gain_sweep(layers=4, variants=["mhc", "hc-static"], C=4, init="perturb", logit_scale=0.5, seeds=3)
    files = plot_gain(r, tmp_path)
    names = sorted(f.name for f in files)
    assert names == ["gain-collapse.png", "gain-composite.png", "gain-heatmap-hc-static.png",
                     "gain-heatmap-mhc.png", "gain-sites.png"]
    for f in files:
        assert f.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_results_do_not_depend_on_threads_or_chunking(monkeypatch) -> None:
    import hcdiag.gain as gain_mod
    from hcdiag.site import SiteModule
    from hcdiag.variants.tbp import TBP

    kw = dict(layers=6, variants=["hc-static", "mhc", "kromhc", "tbp"], n=4, C=4, init="perturb", logit_scale=1.0,
              seeds=3)
    a = gain_sweep(threads=1, **kw)
    monkeypatch.setattr(gain_mod, "_CHUNK_ELEMS", 3 * 16)  # one site per metrics chunk
    for cls in (SiteModule, TBP):  # two sites per projection call
        monkeypatch.setattr(cls, "projection_batch", 2 * 3 * 16)
    b = gain_sweep(threads=3, **kw)
    for va, vb in zip(a.variants, b.variants, strict=True):
        for m in METRICS:
            for st in ("median", "min", "max"):
                np.testing.assert_array_equal(va.curves[m][st], vb.curves[m][st])
        np.testing.assert_array_equal(va.heatmaps["all"], vb.heatmaps["all"])
    assert torch.get_num_threads() >= 1
    # tokens > 1: (site, seed) module states, sites spread over threads, each with its own module copy
    kw = dict(layers=5, variants=["hc-dynamic", "mhc", "kromhc"], n=4, C=4, init="perturb", logit_scale=1.0,
              seeds=3, tokens=4, keep_stacks=True)
    one, many = gain_sweep(threads=1, **kw), gain_sweep(threads=3, **kw)
    for va, vb in zip(one.variants, many.variants, strict=True):
        assert torch.equal(va.stack, vb.stack)
        assert not torch.equal(va.stack[:, :, 0], va.stack[:, :, 1])  # the tokens differ


def test_deeper_sweep_extends_the_shallower_one() -> None:
    # every site draws from its own stream (child i of the variant's seed), so sites 1..12 of a 12-block sweep are
    # the 6-block sweep's sites, and so are its forward composites; the backward ones start from another top
    kw = dict(variants=["hc-static", "mhc"], n=4, C=4, init="perturb", logit_scale=0.5, seeds=3, keep_stacks=True)
    short, deep = gain_sweep(layers=6, **kw), gain_sweep(layers=12, **kw)
    for vs, vd in zip(short.variants, deep.variants, strict=True):
        torch.testing.assert_close(vd.stack[:12], vs.stack, rtol=0, atol=0)
        np.testing.assert_array_equal(vd.curves["gain_fwd"]["max"][:12], vs.curves["gain_fwd"]["max"])
        assert not np.array_equal(vd.curves["gain_bwd"]["max"][:12], vs.curves["gain_bwd"]["max"])
    # and another --seed gives other draws
    other = gain_sweep(layers=6, seed=1, **kw)
    assert not torch.equal(other.variants[0].stack, short.variants[0].stack)


def test_cli_threads_option_changes_nothing_but_the_speed() -> None:
    from cli_runner import run_cli

    args = ["gain-sweep", "--layers", "5", "--n", "4", "--C", "4", "--logit-scale", "0.5", "--seeds", "3",
            "--variants", "hc-static,mhc,tbp", "--json"]
    one, two = run_cli(*args, "--threads", "1"), run_cli(*args, "--threads", "2")
    assert one.returncode == two.returncode == 0, one.stderr + two.stderr
    a, b = json.loads(one.stdout), json.loads(two.stdout)
    for va, vb in zip(a["variants"], b["variants"], strict=True):
        assert va["curves"] == vb["curves"] and va["heatmaps"] == vb["heatmaps"]
    # and the same numbers as the library call
    ref = gain_sweep(layers=5, n=4, C=4, init="perturb", logit_scale=0.5, seeds=3, variants=["hc-static", "mhc", "tbp"])
    mhc = a["variants"][1]
    assert mhc["name"] == "mhc"
    np.testing.assert_array_equal(mhc["curves"]["gain_bwd"]["max"], ref.variant("mhc").curves["gain_bwd"]["max"])
    bad = run_cli(*args, "--threads", "0")
    assert bad.returncode == 2 and "--threads" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1


def test_cli_ctrl_c_says_interrupted_and_exits_130(monkeypatch, tmp_path) -> None:
    from cli_runner import run_cli

    import hcdiag.gain as gain_mod

    def interrupted(**kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(gain_mod, "gain_sweep", interrupted)
    r = run_cli("gain-sweep", "--layers", "2", "-o", tmp_path / "out", "--json")
    assert r.returncode == 130
    assert r.stderr.strip() == "hcdiag: interrupted" and r.stdout == ""
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_overflowing_composites_are_inf_with_a_warning_never_a_crash(dtype: str) -> None:
    # hc-static at logit scale 3 grows ~x2.4 a site: float32 overflows within ~60 sites, float64 within ~500
    L = 800 if dtype == "float64" else 80
    r = gain_sweep(layers=L // 2, variants=["hc-static"], n=4, C=4, init="perturb", logit_scale=3.0, seeds=3,
                   dtype=dtype, keep_stacks=True)
    v = r.variant("hc-static")
    # brute force: the same products one rounded matmul at a time in that dtype (torch, as a model computes them)
    tdt = getattr(torch, dtype)
    H = v.stack[:, :, 0].to(tdt)
    P, first_bad, F_all = H[0], None, []
    for layer in range(L):
        P = H[0] if layer == 0 else torch.matmul(H[layer], P)
        F_all.append(P.to(torch.float64))
        if first_bad is None and not bool(torch.isfinite(P).all()):
            first_bad = layer
    assert first_bad is not None and 0 < first_bad < L - 1
    gf = v.curves["gain_fwd"]["max"]
    assert np.isfinite(gf[:first_bad]).all() and np.isinf(gf[first_bad:]).all()
    F = torch.stack(F_all)[:first_bad].numpy()
    np.testing.assert_allclose(gf[:first_bad], np.abs(F.sum(-1)).max(-1).max(-1), rtol=1e-12)
    for m in ("spectral_norm", "dist_uniform", "row_err"):
        assert np.isinf(v.curves[m]["max"][first_bad:]).all()
    assert np.isnan(v.curves["sigma2"]["max"][first_bad:]).all()
    assert len(v.warnings) == 1 and f"overflow {dtype}" in v.warnings[0]
    assert f"forward from site {first_bad + 1}" in v.warnings[0]
    doc = json.loads(json.dumps(r.to_dict()))  # the warning travels in the JSON document too
    assert doc["variants"][0]["warnings"] == list(v.warnings)


def test_cli_overflow_prints_the_warning_and_exits_0(tmp_path) -> None:
    pytest.importorskip("matplotlib")
    from cli_runner import run_cli

    args = ["gain-sweep", "--layers", "40", "--variants", "hc-static", "--logit-scale", "3", "--seeds", "2",
            "--dtype", "float32"]
    r = run_cli(*args, "--n", "4")
    assert r.returncode == 0, r.stderr
    assert "hcdiag: hc-static: composites overflow float32" in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1  # one line, not wrapped at the console width
    js = run_cli(*args, "--n", "4", "--json")
    assert js.returncode == 0 and "composites overflow" in js.stderr
    assert json.loads(js.stdout)["variants"][0]["warnings"]
    # the figures of an overflowed stack are still drawn (non-finite composites marked in the heatmap titles)
    p = run_cli(*args, "--n", "12", "--plot", "-o", tmp_path)
    assert p.returncode == 0, p.stderr
    pngs = sorted(tmp_path.glob("*.png"))
    assert len(pngs) == 4 and all(f.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for f in pngs)

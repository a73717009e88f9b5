"""The random probe's ``projected`` draw: z = RMSNorm(vec(x)) W^T drawn directly for sites with a linear read.

Checked against an explicit x built from the same g and chi^2 numbers (the site's own full forward on it, to
1e-12 in float64) and, in distribution, against the ``full`` draw (two-sample KS on single logit entries, with
two deliberately wrong variants that the same test rejects).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import ks_2samp

from hcdiag import registry
from hcdiag.errors import UsageError
from hcdiag.io.transformers_layout import TransformersIHCSite, TransformersMHCSite
from hcdiag.model import LoadedModel, Site
from hcdiag.probes import AUTO_MIN_RATIO, RandomProbe, make_probe, random_probe_bytes
from hcdiag.stochasticity import analyze_stochasticity

N = 4
K = (N + 2) * N  # rows of fn


def _mhc(C: int, seed: int = 0, dtype: torch.dtype = torch.float64) -> TransformersMHCSite:
    g = torch.Generator().manual_seed(seed)
    # rows of different norms, so that a wrong covariance shows in single entries
    fn = torch.randn(K, N * C, generator=g, dtype=torch.float64) * torch.linspace(0.2, 1.5, K).unsqueeze(-1)
    fn[-1] = fn[0] + 0.2 * fn[-1]  # nearly in the span of the other rows: R_kk small, R R^T far from W W^T there
    base = torch.randn(K, generator=g, dtype=torch.float64)
    scale = torch.tensor([0.7, 1.3, 2.0], dtype=torch.float64)
    return TransformersMHCSite(fn.to(dtype), base.to(dtype), scale.to(dtype), n=N, C=C, norm_eps=1e-6)


def _ihc(C: int) -> TransformersIHCSite:
    g = torch.Generator().manual_seed(5)
    fn = torch.randn(2 * N, N * C, generator=g, dtype=torch.float64)
    return TransformersIHCSite(fn, torch.randn(2 * N, generator=g, dtype=torch.float64),
                               torch.tensor([0.9, 1.1], dtype=torch.float64), n=N, C=C, magnitude=1.5)


def _site(module: torch.nn.Module, index: int = 3) -> Site:
    variant = "ihc" if isinstance(module, TransformersIHCSite) else "mhc"
    return Site(index, f"attn_{index}", index, "attn", variant, module)


def _explicit_x(probe: RandomProbe, index: int, W: torch.Tensor, C: int) -> torch.Tensor:
    """x [T, n, C] = g Q^T + x_perp with x_perp orthogonal to W's rows and ||x_perp||^2 = the chi^2 draw."""
    k, width = W.shape
    g_np, s_np = probe.draw_projected(index, k, width)
    Q = torch.linalg.qr(W.T.to(torch.float64), mode="reduced").Q  # [nC, k]
    v = torch.randn(probe.tokens, width, generator=torch.Generator().manual_seed(11), dtype=torch.float64)
    perp = v - (v @ Q) @ Q.T
    perp = perp / perp.norm(dim=-1, keepdim=True) * torch.from_numpy(s_np).sqrt().unsqueeze(-1)
    assert (perp @ Q).abs().max() < 1e-12
    return (torch.from_numpy(g_np) @ Q.T + perp).reshape(probe.tokens, N, C)


@pytest.mark.parametrize("C", [16, 200])
def test_projected_draw_equals_the_forward_on_an_explicit_x(C: int) -> None:
    m = _mhc(C)
    probe = RandomProbe(tokens=64, seed=4, draw_mode="projected")
    site = _site(m)
    assert probe.site_draw(site) == "projected"
    x = _explicit_x(probe, site.index, m.fn, C)
    with torch.no_grad():
        ref = m(x)  # the site's own RMSNorm over nC + projection + Sinkhorn
        ev = probe.evaluate(site, m)
        H = m.res_from_logits(ev.logits)
    assert ev.res is None and ev.logits is not None
    for got, want in ((ev.pre, ref.pre), (ev.post, ref.post), (H, ref.res)):
        assert got.shape == want.shape and (got - want).abs().max() < 1e-12


def test_projected_draw_ihc_pre_post_equal_the_forward_on_an_explicit_x() -> None:
    C = 16
    m = _ihc(C)
    probe = RandomProbe(tokens=32, seed=1, draw_mode="projected")
    site = _site(m, index=0)
    x = _explicit_x(probe, 0, m.fn, C)
    with torch.no_grad():
        ref, ev = m(x), probe.evaluate(site, m)
    assert (ev.pre - ref.pre).abs().max() < 1e-12 and (ev.post - ref.post).abs().max() < 1e-12
    assert ev.res is not None and torch.equal(ev.res, ref.res)


def test_one_pass_evaluate_equals_forward_and_res_logits() -> None:
    m = _mhc(16)
    x = torch.randn(9, N, 16, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    with torch.no_grad():
        ev, out, z = m.evaluate(x), m(x), m.res_logits(x)
    assert torch.equal(ev.pre, out.pre) and torch.equal(ev.post, out.post) and torch.equal(ev.logits, z)


def _entries(module: TransformersMHCSite, z: torch.Tensor) -> dict[str, np.ndarray]:
    ev = module.evaluate_read(z)
    assert ev.logits is not None
    # the last read row (comb code [3, 3]) has a small R_kk: a transposed R shrinks its variance there
    return {"pre0": ev.pre[:, 0].numpy(), "logit33": ev.logits[:, 3, 3].numpy(), "logit01": ev.logits[:, 0, 1].numpy()}


def test_projected_draw_has_the_full_draws_distribution_and_wrong_variants_do_not() -> None:
    C, T = 16, 4000  # nC = 64, k = 24
    m = _mhc(C, seed=3)
    site = _site(m, index=0)
    full = RandomProbe(tokens=T, seed=1, draw_mode="full")
    proj = RandomProbe(tokens=T, seed=2, draw_mode="projected")
    with torch.no_grad():
        ref = full.evaluate(site, m)
        assert ref.logits is not None
        want = {"pre0": ref.pre[:, 0].numpy(), "logit33": ref.logits[:, 3, 3].numpy(),
                "logit01": ref.logits[:, 0, 1].numpy()}
        got = _entries(m, proj.read_values(0, m.linear_read()))
        # deliberately wrong: R^T for R (covariance R R^T, not W W^T), and the norm without the chi^2 part
        g_np, s_np = proj.draw_projected(0, K, N * C)
        g = torch.from_numpy(g_np)
        R = torch.linalg.qr(m.fn.T, mode="reduced").R
        right_scale = torch.rsqrt((g.square().sum(-1) + torch.from_numpy(s_np)) / (N * C) + 1e-6).unsqueeze(-1)
        transposed = _entries(m, (g @ R.T) * right_scale)
        no_chi2 = _entries(m, (g @ R) * torch.rsqrt(g.square().sum(-1) / (N * C) + 1e-6).unsqueeze(-1))
        assert torch.allclose((g @ R) * right_scale, proj.read_values(0, m.linear_read()), rtol=0, atol=1e-14)
    for key in want:
        assert ks_2samp(got[key], want[key]).pvalue > 1e-3, key
    assert ks_2samp(transposed["logit33"], want["logit33"]).pvalue < 1e-8
    assert ks_2samp(no_chi2["pre0"], want["pre0"]).pvalue < 1e-8
    assert ks_2samp(no_chi2["logit01"], want["logit01"]).pvalue < 1e-8


def test_projected_draw_is_seeded_per_site_and_identical_across_dtypes() -> None:
    m64, m32 = _mhc(16), _mhc(16, dtype=torch.float32)
    p = RandomProbe(tokens=50, seed=9, draw_mode="projected")
    g1, s1 = p.draw_projected(2, K, 64)
    g2, s2 = p.draw_projected(2, K, 64)
    assert np.array_equal(g1, g2) and np.array_equal(s1, s2)
    assert not np.array_equal(g1, p.draw_projected(3, K, 64)[0])
    assert not np.array_equal(g1, RandomProbe(tokens=50, seed=10).draw_projected(2, K, 64)[0])
    with torch.no_grad():
        e64 = p.evaluate(_site(m64, 2), m64, torch.float64)
        e32 = p.evaluate(_site(m32, 2), m32, torch.float32)
    assert e32.pre.dtype == torch.float32
    assert (e32.logits.double() - e64.logits).abs().max() < 1e-4  # same tokens, float32 rounding of fn and z


def test_auto_draws_projected_only_where_it_saves_work() -> None:
    narrow = _site(_mhc(16))  # nC = 64 < 32 x 24
    wide_C = -(-AUTO_MIN_RATIO * K // N)  # the narrowest width auto projects
    wide = _site(_mhc(wide_C))
    reg = Site(0, "s0", 0, "attn", "mhc", registry.get("mhc").build(N, wide_C, layer_index=0, dtype=torch.float64))
    auto = RandomProbe(tokens=4)
    assert auto.site_draw(narrow) == "full" and auto.site_draw(wide) == "projected"
    assert auto.site_draw(reg) == "full"  # no linear read claimed
    assert RandomProbe(tokens=4, draw_mode="full").site_draw(wide) == "full"
    assert RandomProbe(tokens=4, df=3.0).site_draw(wide) == "full"  # Student-t is not rotation invariant
    assert RandomProbe(tokens=4, draw_mode="projected").site_draw(narrow) == "projected"
    assert auto.to_dict([wide])["draw"] == "projected" and auto.to_dict([narrow])["draw"] == "full"
    mixed = auto.to_dict([narrow, wide])
    assert mixed["draw"] == "mixed" and mixed["draw_projected_sites"] == [wide.name]
    assert "drawn as RMSNorm(x) fn^T" in auto.describe([wide]) and "drawn" not in auto.describe([narrow])
    with pytest.raises(UsageError, match="draw 'half' is unknown"):
        make_probe("random", draw="half")
    # memory bound: projected inputs g [k], s, z and its cast (4 x 8 (k + 1)) + kept logits and H_res
    assert random_probe_bytes(10, [wide]) == 10 * (4 * 8 * (K + 1) + 2 * 8 * N * N)
    assert random_probe_bytes(10, [wide], RandomProbe(draw_mode="full")) == 10 * (3 * 8 * N * wide_C + 2 * 8 * N * N)


def test_stochasticity_uses_the_projected_draw_and_says_so() -> None:
    C = 16
    mods = [_mhc(C, seed=i) for i in range(2)]
    sites = [_site(m, index=i) for i, m in enumerate(mods)]
    model = LoadedModel(path="<mem>", layout="transformers", layout_reason="", sites=sites, n=N, C=C)
    probe = make_probe("random", tokens=40, seed=6, draw="projected")
    doc = analyze_stochasticity(model, probe=probe).to_dict()
    assert doc["probe"]["draw"] == "projected" and doc["probe"]["draw_mode"] == "projected"
    for row, m in zip(doc["sites"], mods, strict=True):
        x = _explicit_x(probe, row["index"], m.fn, C)
        with torch.no_grad():
            ref = m(x)
        H = ref.res
        np.testing.assert_allclose(row["h_pre_mean"], ref.pre.mean(0).numpy(), rtol=0, atol=1e-12)
        np.testing.assert_allclose(row["h_post_mean"], ref.post.mean(0).numpy(), rtol=0, atol=1e-12)
        assert abs(row["row_err_max"] - float((H.sum(-1) - 1).abs().max())) < 1e-12
        assert abs(row["col_err_max"] - float((H.sum(-2) - 1).abs().max())) < 1e-12


@pytest.mark.parametrize("layout", ["dsv4", "glm5-next"])
def test_cli_projected_draw_matches_the_libraries_module_on_an_explicit_x(layout: str, tmp_path) -> None:
    """End to end: a checkpoint written by transformers, ``stochasticity --probe random --draw projected``; every
    site's errors and H_pre / H_post means equal the library's own HyperConnection module on the explicit x that
    the documented (g, chi^2) numbers stand for (x = g Q^T + x_perp)."""
    import json

    from cli_runner import run_cli
    from e2e_layouts import BUILDERS

    case = BUILDERS[layout](tmp_path)
    assert case.read_weight is not None
    tokens, seed = 24, 3
    r = run_cli("stochasticity", case.path, "--probe", "random", "--tokens", str(tokens), "--seed", str(seed),
                "--draw", "projected", "--json")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["probe"]["draw"] == "projected"
    probe = RandomProbe(tokens=tokens, seed=seed)
    checked = 0
    for row in doc["sites"]:
        W = case.read_weight(row["index"])
        n = row["n"]
        C = W.shape[1] // n
        k, width = W.shape
        g_np, s_np = probe.draw_projected(row["index"], k, width)
        Q = torch.linalg.qr(W.T, mode="reduced").Q
        v = torch.randn(tokens, width, generator=torch.Generator().manual_seed(row["index"]), dtype=torch.float64)
        perp = v - (v @ Q) @ Q.T
        perp = perp / perp.norm(dim=-1, keepdim=True) * torch.from_numpy(s_np).sqrt().unsqueeze(-1)
        x = (torch.from_numpy(g_np) @ Q.T + perp).reshape(tokens, n, C)
        H = case.oracle(row["index"], x)
        assert H is not None
        assert abs(row["row_err_max"] - float((H.sum(-1) - 1).abs().max())) < 1e-5
        assert abs(row["col_err_max"] - float((H.sum(-2) - 1).abs().max())) < 1e-5
        checked += 1
    assert checked == len(doc["sites"]) >= 4

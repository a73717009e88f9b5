"""--layout-file: the worked example of docs/layout-file.md, read back and checked against Braid's own forward pass
written out here independently (numpy, float64), plus other layouts and the file's error messages."""

from __future__ import annotations

import json
import re
import tomllib
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from hcdiag.errors import InputError, UsageError
from hcdiag.io import load
from hcdiag.io.base import LoadOptions
from hcdiag.io.transformers_layout import TransformersMHCSite

DOC = Path(__file__).resolve().parents[1] / "docs" / "layout-file.md"
N, C, BLOCKS = 4, 4, 3


def _doc_toml() -> str:
    blocks = re.findall(r"```toml\n(.*?)```", DOC.read_text(), flags=re.S)
    assert len(blocks) == 1
    return blocks[0]


def _braid_sd(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    sd = {"trunk.embed.weight": torch.randn(10, C, generator=g)}
    for b in range(BLOCKS):
        for kind in ("attn", "mlp"):
            p = f"trunk.blocks.{b}.{kind}_braid."
            sd[p + "norm.weight"] = 1 + 0.3 * torch.randn(N * C, generator=g)
            sd[p + "proj"] = 0.5 * torch.randn(N * C, N * N + 2 * N, generator=g)
            sd[p + "static"] = torch.randn(N * N + 2 * N, generator=g)
            for part in ("res", "pre", "post"):
                sd[p + f"alpha_{part}"] = torch.tensor(float(torch.rand((), generator=g)) + 0.2)
            sd[f"trunk.blocks.{b}.{kind}.weight"] = torch.randn(C, C, generator=g)
    return sd


def _braid_reference(sd: dict[str, torch.Tensor], prefix: str, x: np.ndarray):
    """Braid's BraidMixer.weights (docs/layout-file.md) in numpy float64; returns paper-convention H's."""
    t = {k[len(prefix) :]: v.double().numpy() for k, v in sd.items() if k.startswith(prefix)}
    flat = x.reshape(x.shape[0], N * C)
    h = flat / np.sqrt((flat**2).mean(-1, keepdims=True) + 1e-6) * t["norm.weight"]
    y = h @ t["proj"]
    res, pre, post = y[:, : N * N], y[:, N * N : N * N + N], y[:, N * N + N :]
    s = t["static"]
    mix = (t["alpha_res"] * res + s[: N * N]).reshape(-1, N, N)  # [T, input, output]
    m = np.exp(mix)
    for _ in range(10):
        m = m / m.sum(-1, keepdims=True)
        m = m / m.sum(-2, keepdims=True)
    h_pre = 1 / (1 + np.exp(-(t["alpha_pre"] * pre + s[N * N : N * N + N])))
    h_post = 2 / (1 + np.exp(-(t["alpha_post"] * post + s[N * N + N :])))
    return h_pre, h_post, np.swapaxes(m, -1, -2)  # paper H_res = mix^T


@pytest.fixture
def braid(tmp_path):
    sd = _braid_sd()
    f = tmp_path / "braid.safetensors"
    save_file(sd, str(f))
    lay = tmp_path / "braid.toml"
    lay.write_text(_doc_toml())
    return sd, f, lay


@pytest.mark.parametrize("fmt", ["toml", "json"])
def test_doc_example_matches_independent_forward(braid, tmp_path, fmt):
    sd, f, lay = braid
    if fmt == "json":
        j = tmp_path / "braid.json"
        j.write_text(json.dumps(tomllib.loads(lay.read_text())))
        lay = j
    model = load(f, options=LoadOptions(layout_file=str(lay)))
    assert model.layout == "layout-file" and (model.n, model.C) == (N, C)
    assert [s.name for s in model.sites] == [f"{k}_{b}" for b in range(BLOCKS) for k in ("attn", "ffn")]
    assert model.settings_source["C"] == "inferred from the projection's input width"
    spec = model.sites[0].module.sinkhorn
    assert (spec.convention.value, spec.iters, spec.eps) == ("paper", 10, 0.0)
    assert len(model.sites[0].tensors) == 6 and model.unmatched_keys == []
    g = np.random.default_rng(1)
    for site in model.sites:
        kind = "attn" if site.kind == "attn" else "mlp"
        x = g.normal(size=(5, N, C)) * 3
        pre_r, post_r, res_r = _braid_reference(sd, f"trunk.blocks.{site.block}.{kind}_braid.", x)
        pre, post, res = site.module(torch.from_numpy(x))
        np.testing.assert_allclose(res.numpy(), res_r, rtol=0, atol=1e-6)
        np.testing.assert_allclose(pre.numpy(), pre_r, rtol=0, atol=1e-12)
        np.testing.assert_allclose(post.numpy(), post_r, rtol=0, atol=1e-12)
        # paper convention: last pass normalises paper rows
        np.testing.assert_allclose(res.numpy().sum(-1), 1.0, atol=1e-12)


def test_cli_overrides_iters(braid):
    sd, f, lay = braid
    model = load(f, options=LoadOptions(layout_file=str(lay), iters=3))
    assert model.sites[0].module.sinkhorn.iters == 3 and model.settings_source["iters"] == "cli (--iters)"


def test_transformers_layout_as_a_layout_file(tmp_path):
    """A layout file describing DeepSeek-V4's packing gives what the transformers reader gives."""
    g = torch.Generator().manual_seed(3)
    n, c = 3, 5
    sd = {}
    for b in range(2):
        for kind in ("attn", "ffn"):
            sd[f"layers.{b}.hc_{kind}_fn"] = torch.randn((n + 2) * n, n * c, generator=g)
            sd[f"layers.{b}.hc_{kind}_base"] = torch.randn((n + 2) * n, generator=g)
            sd[f"layers.{b}.hc_{kind}_scale"] = torch.randn(3, generator=g) * 2
    f = tmp_path / "m.safetensors"
    save_file(sd, str(f))
    lay = tmp_path / "dsv4.toml"
    lay.write_text(
        """
n = 3
[sites]
pattern = '^layers\\.(?P<block>\\d+)\\.hc_(?P<kind>attn|ffn)_'
[norm]
eps = 1e-6
[projection]
weight = "fn"
split = ["n", "n", "n^2"]
names = ["pre", "post", "res"]
[bias]
tensor = "base"
[scale]
tensor = "scale"
[pre]
eps = 1e-6
[res]
orientation = "code"
[sinkhorn]
convention = "transformers"
"""
    )
    a = load(f)
    b = load(f, options=LoadOptions(layout_file=str(lay)))
    assert isinstance(a.sites[0].module, TransformersMHCSite)
    # the convention is the file's (so the spec's source), iters and eps the defaults: 20 and hc_eps 1e-6
    assert b.sites[0].module.sinkhorn == a.sites[0].module.sinkhorn.__class__(
        a.sites[0].module.sinkhorn.convention, 20, 1e-6, "layout file"
    )
    assert (b.settings_source["iters"], b.settings_source["eps"]) == ("default", "default (transformers hc_eps)")
    x = torch.randn(7, n, c, dtype=torch.float64, generator=g)
    for sa, sb in zip(a.sites, b.sites, strict=True):
        for ta, tb in zip(sa.module(x), sb.module(x), strict=True):
            torch.testing.assert_close(ta, tb, atol=1e-12, rtol=0)


def test_static_per_stream_unconstrained(tmp_path):
    """Static HC (lucidrains-like): static_alpha [n, 1+n] = [pre | res in code orientation], static_beta [n]."""
    g = torch.Generator().manual_seed(4)
    n = 3
    sd = {f"h.{i}.hc.static_alpha": torch.randn(n, 1 + n, generator=g) for i in range(2)}
    sd.update({f"h.{i}.hc.static_beta": torch.randn(n, generator=g) for i in range(2)})
    f = tmp_path / "s.safetensors"
    save_file(sd, str(f))
    lay = tmp_path / "s.toml"
    lay.write_text(
        """
n = 3
[sites]
pattern = '^h\\.(?P<block>\\d+)\\.hc\\.'
[bias]
tensor = "static_alpha"
split = [1, "n"]
names = ["pre", "res"]
post = "static_beta"
[pre]
activation = "identity"
[post]
activation = "identity"
[res]
orientation = "code"
constraint = "none"
"""
    )
    model = load(f, options=LoadOptions(layout_file=str(lay)))
    assert [s.name for s in model.sites] == ["site_0", "site_1"] and model.C == 1
    assert model.sites[0].module.exactness.value == "unconstrained"
    for i, site in enumerate(model.sites):
        pre, post, res = site.module(torch.zeros(2, n, 1))
        alpha = sd[f"h.{i}.hc.static_alpha"].double()
        torch.testing.assert_close(res[0], alpha[:, 1:].T)
        torch.testing.assert_close(pre[1], alpha[:, 0])
        torch.testing.assert_close(post[0], sd[f"h.{i}.hc.static_beta"].double())


def test_explicit_site_list_identity_and_nan_pre(tmp_path):
    sd = {"enc.mixA.b_post": torch.ones(2), "enc.mixB.b_post": torch.zeros(2)}
    f = tmp_path / "e.safetensors"
    save_file(sd, str(f))
    lay = tmp_path / "e.toml"
    lay.write_text(
        """
n = 2
[[sites.list]]
prefix = "enc.mixB."
block = 1
kind = "attn"
[[sites.list]]
prefix = "enc.mixA."
block = 0
kind = "mlp"
[bias]
post = "b_post"
[res]
constraint = "identity"
"""
    )
    model = load(f, options=LoadOptions(layout_file=str(lay)))
    assert [s.name for s in model.sites] == ["ffn_0", "attn_1"]
    pre, post, res = model.sites[0].module(torch.zeros(3, 2, 1))
    assert torch.isnan(pre).all() and any("NaN" in note for note in model.notes)
    torch.testing.assert_close(post, torch.full((3, 2), 2 / (1 + np.exp(-1.0)), dtype=torch.float64))
    torch.testing.assert_close(res, torch.eye(2, dtype=torch.float64).expand(3, 2, 2))


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (lambda t: t.replace('gain = "norm.weight"', 'gain = "norm.scale"'), r"expects norm gain tensor "
         r"'trunk\.blocks\.0\.attn_braid\.norm\.scale'"),
        (lambda t: t.replace("(?P<block>", "(?P<blk>"), r"needs a named group"),
        (lambda t: t.replace("[norm]", "[norm]\nepsilon = 1"), r"unknown key\(s\) \['epsilon'\] in \[norm\]"),
        (lambda t: t.replace("n = 4   ", "# n = 4"), r"n \(number of streams\) is required"),
        (lambda t: t.replace('"n*n", "n", "n"', '"n*n", "n", "sqrt(n)"'), r"split size 'sqrt\(n\)'"),
        (lambda t: t.replace('convention = "paper"', 'convention = "mine"'), r"choose one of"),
        (lambda t: t.replace("[sites]", "[sites"), r"not valid TOML"),
        (lambda t: t.replace("_braid", "_plait"), r"no key matches pattern"),
        (lambda t: t.replace('"n*n", "n", "n"', '"n", "n", "n"'), r"has 24 outputs, but .* sums to 12"),
    ],
)  # fmt: skip
def test_layout_file_errors(braid, edit, match):
    _, f, lay = braid
    lay.write_text(edit(lay.read_text()))
    with pytest.raises(InputError, match=match) as info:
        load(f, options=LoadOptions(layout_file=str(lay)))
    assert "\n" not in str(info.value)


def test_layout_and_layout_file_conflict(braid):
    _, f, lay = braid
    with pytest.raises(UsageError, match="conflict"):
        load(f, layout="transformers", options=LoadOptions(layout_file=str(lay)))
    with pytest.raises(InputError, match="cannot read the layout file"):
        load(f, options=LoadOptions(layout_file=str(lay) + ".missing"))


def test_per_part_weights_match_registry_mhc(tmp_path):
    """mHC paper form (Eqs. 7-9) with separate phi_pre / phi_post / phi_res [nC, .] against hcdiag's own mhc."""
    from hcdiag import registry

    n, c = 3, 4
    g = torch.Generator().manual_seed(7)
    mods, sd = [], {}
    for b in range(2):
        m = registry.get("mhc").build(n, c, form="code", layer_index=b, dtype=torch.float64)
        with torch.no_grad():
            for name, p in m.named_parameters():
                p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) * (0.2 if "phi" in name else 1.0))
        mods.append(m)
        sd.update({f"net.{b}.hc.{k}": v.float() for k, v in m.state_dict().items()})
    f = tmp_path / "p.safetensors"
    save_file(sd, str(f))
    lay = tmp_path / "p.toml"
    lay.write_text(
        """
n = 3
[sites]
pattern = '^net\\.(?P<block>\\d+)\\.hc\\.'
[norm]
gain = "norm_weight"
[projection]
weights = { pre = "phi_pre", post = "phi_post", res = "phi_res" }
orientation = "in_out"
[bias]
pre = "b_pre"
post = "b_post"
res = "b_res"
[scale]
pre = "a_pre"
post = "a_post"
res = "a_res"
[sinkhorn]
convention = "paper"
iters = 20
"""
    )
    model = load(f, options=LoadOptions(layout_file=str(lay)))
    assert (model.n, model.C) == (n, c)
    x = torch.randn(5, n, c, generator=g, dtype=torch.float64)
    for m, site in zip(mods, model.sites, strict=True):
        m = m.float().double()  # the checkpoint holds float32 values
        for ours, ref in zip(site.module(x), m(x), strict=True):
            torch.testing.assert_close(ours, ref, atol=1e-12, rtol=0)


@pytest.mark.parametrize(
    ("constraint", "warning"),
    [
        ("none", "no site has a doubly-stochastic constraint (attn_0 (unconstrained), ffn_0 (unconstrained), "
                 "attn_1 (unconstrained), ffn_1 (unconstrained) and 2 more): the summary's worst and median error "
                 "are null"),
        ("identity", "no Sinkhorn site (attn_0 (identity), ffn_0 (identity), attn_1 (identity), ffn_1 (identity) "
                     "and 2 more): logit range, iterations to tol and exact axis do not apply (blank in the table, "
                     "null in JSON)"),
    ],
)
def test_null_summary_fields_come_with_a_warning_naming_the_sites(braid, tmp_path, constraint, warning):
    """constraint none / identity: the JSON's null fields and the table's blanks are announced on stderr."""
    from cli_runner import run_cli

    _, f, lay = braid
    text = lay.read_text().replace('constraint = "sinkhorn"', f'constraint = "{constraint}"')
    other = tmp_path / f"{constraint}.toml"
    other.write_text(text)
    for fmt in ([], ["--json"]):
        r = run_cli("stochasticity", f, "--layout-file", other, *fmt)
        assert r.returncode == 0 and r.stderr.splitlines() == [f"hcdiag: {warning}"]
        if fmt:
            doc = json.loads(r.stdout)
            assert doc["warnings"] == [warning]
            if constraint == "none":
                assert doc["summary"]["worst_error"] is None and doc["summary"]["median_error"] is None
            else:
                assert all(s["iters"] is None and s["logit_range_max"] is None for s in doc["sites"])

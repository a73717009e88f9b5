"""hcdiag's native layout: save_native -> load round trips, identification without metadata, errors.

Oracles: the original modules (outputs compared exactly, float64), the stored tensors read back with the
safetensors library, and for mhc / hc-static the H_res computed here by hand from the stored tensors.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from hcdiag import registry
from hcdiag.enums import Convention, Form
from hcdiag.errors import InputError, UsageError
from hcdiag.io.base import LoadOptions, get_layout
from hcdiag.io.load import load
from hcdiag.io.native import save_native, site_names
from hcdiag.site import SinkhornSpec

N, C, BLOCKS = 4, 6, 2
VARIANTS = registry.names()


def _modules(variant: str, form: Form = Form.CODE, *, dtype=torch.float64, seed: int = 0, n: int = N, c: int = C):
    """2 * BLOCKS site modules with every parameter moved off its initialisation (seeded)."""
    spec = registry.get(variant)
    gen = torch.Generator().manual_seed(seed)
    mods = []
    for i in range(2 * BLOCKS):
        m = spec.build(n, c, layer_index=i, form=form, dtype=dtype)
        with torch.no_grad():
            for p in m.parameters():
                p.add_((0.5 * torch.randn(p.shape, generator=gen, dtype=torch.float64)).to(p.dtype))
        mods.append(m)
    return mods


def _save(path: Path, variant: str, mods, form: Form = Form.CODE, **kw) -> Path:
    save_native(
        path,
        mods,
        variant=variant,
        n=mods[0].n,
        C=mods[0].C,
        blocks=len(mods) // 2,
        sinkhorn=getattr(mods[0], "sinkhorn", None),
        form=form,
        **kw,
    )
    return path


def _strip_metadata(src: Path, dst: Path, drop=None, rename=None, keep_meta=False) -> Path:
    tensors = load_file(str(src))
    with safe_open(str(src), "pt") as f:
        meta = f.metadata() or {}
    for k in drop or ():
        tensors.pop(k)
    for old, new in (rename or {}).items():
        tensors[new] = tensors.pop(old)
    save_file(tensors, str(dst), metadata=meta if keep_meta else None)
    return dst


def _outputs(module, x):
    out = module(x)
    return out.pre, out.post, out.res


X = torch.randn(7, N, C, generator=torch.Generator().manual_seed(123), dtype=torch.float64)


@pytest.mark.parametrize("form", [Form.CODE, Form.PAPER])
@pytest.mark.parametrize("variant", VARIANTS)
def test_round_trip_exact(tmp_path, variant, form):
    mods = _modules(variant, form)
    path = _save(tmp_path / "m.safetensors", variant, mods, form, metadata={"training": {"loss": [1.5, 1.25]}})
    lm = load(path)
    assert lm.layout == "native"
    assert (lm.n, lm.C) == (N, C)
    assert [s.name for s in lm.sites] == ["attn_0", "ffn_0", "attn_1", "ffn_1"]
    assert [(s.kind, s.block) for s in lm.sites] == [("attn", 0), ("ffn", 0), ("attn", 1), ("ffn", 1)]
    assert lm.settings_source["variant"] == "metadata"
    assert json.loads(lm.metadata["training"]) == {"loss": [1.5, 1.25]}
    for site, orig in zip(lm.sites, mods, strict=True):
        assert site.variant == variant
        sd, osd = site.module.state_dict(), orig.state_dict()
        assert sd.keys() == osd.keys()
        for k in osd:
            assert sd[k].dtype == torch.float64
            assert torch.equal(sd[k], osd[k]), k
        for a, b in zip(_outputs(site.module, X), _outputs(orig, X), strict=True):
            assert torch.equal(a, b)
    if variant == "identity":
        assert lm.source_dtype.startswith("none")
    else:
        assert lm.source_dtype == "float64"


def test_float32_stored_values_kept_exactly(tmp_path):
    mods = _modules("mhc", dtype=torch.float32)
    lm = load(_save(tmp_path / "m.safetensors", "mhc", mods))
    assert lm.source_dtype == "float32"
    for site, orig in zip(lm.sites, mods, strict=True):
        for k, v in orig.state_dict().items():
            assert torch.equal(site.module.state_dict()[k], v.double())
        assert {t.dtype for t in site.tensors} == {"float32"}


def test_hand_computed_h_res_from_stored_tensors(tmp_path):
    """x = 0 probe: mHC H_res = paper Sinkhorn(b_res) (mHC Eq. 9, 20 iterations, columns then rows);
    hc-static H_res = A_r^T. Both recomputed in numpy from the tensors in the file."""
    path = _save(tmp_path / "mhc.safetensors", "mhc", _modules("mhc"))
    lm = load(path)
    stored = load_file(str(path))
    zero = torch.zeros(N, C, dtype=torch.float64)
    for i, site in enumerate(lm.sites):
        M = np.exp(stored[f"hc.sites.{i}.b_res"].numpy())
        for _ in range(20):
            M = M / M.sum(axis=0, keepdims=True)
            M = M / M.sum(axis=1, keepdims=True)
        np.testing.assert_allclose(site.module(zero).res.detach().numpy(), M, rtol=0, atol=1e-14)
        np.testing.assert_allclose(M.sum(axis=1), 1.0, atol=1e-15)  # paper convention: exact rows
    path = _save(tmp_path / "hcs.safetensors", "hc-static", _modules("hc-static"))
    stored = load_file(str(path))
    for i, site in enumerate(load(path).sites):
        assert torch.equal(site.module(zero).res, stored[f"hc.sites.{i}.A_r"].T)


def test_metadata_contents(tmp_path):
    mods = _modules("kromhc")
    path = _save(tmp_path / "k.safetensors", "kromhc", mods, metadata={"note": "hi", "cfg": {"a": 1}})
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    assert meta["format"] == "hcdiag" and meta["format_version"] == "1"
    assert meta["variant"] == "kromhc" and meta["n"] == "4" and meta["C"] == "6" and meta["blocks"] == "2"
    assert json.loads(meta["sites"]) == site_names(2) == ["attn_0", "ffn_0", "attn_1", "ffn_1"]
    assert meta["form"] == "code" and meta["kron_factors"] == "2,2"
    assert "sinkhorn_convention" not in meta
    assert meta["note"] == "hi" and json.loads(meta["cfg"]) == {"a": 1}
    assert load(path).settings_source["kron_factors"] == "metadata"
    mhc = _save(tmp_path / "m.safetensors", "mhc", _modules("mhc"))
    with safe_open(str(mhc), "pt") as f:
        meta = f.metadata()
    assert (meta["sinkhorn_convention"], meta["sinkhorn_iters"], meta["sinkhorn_eps"]) == ("paper", "20", "0.0")


def test_sinkhorn_settings_metadata_cli_default(tmp_path):
    from hcdiag.sinkhorn import project

    mods = _modules("mhc")
    spec = SinkhornSpec(Convention.LOG, 7)
    for m in mods:
        m.sinkhorn = spec
    path = tmp_path / "m.safetensors"
    save_native(path, mods, variant="mhc", n=N, C=C, blocks=BLOCKS, sinkhorn=spec, form="code")
    lm = load(path)
    s = lm.sites[0].module.sinkhorn
    assert (s.convention, s.iters) == (Convention.LOG, 7)
    assert (lm.settings_source["convention"], lm.settings_source["iters"]) == ("metadata", "metadata")
    for site, orig in zip(lm.sites, mods, strict=True):
        assert torch.equal(site.module(X).res, orig(X).res)

    lm = load(path, options=LoadOptions(iters=3, convention="transformers"))
    s = lm.sites[1].module.sinkhorn
    # the stated eps (0, log's) is not the new convention's: transformers brings DeepSeek-V4's hc_eps
    assert (s.convention, s.iters, s.eps, s.source) == (Convention.TRANSFORMERS, 3, 1e-6, "cli")
    assert (lm.settings_source["convention"], lm.settings_source["iters"]) == ("cli (--convention)", "cli (--iters)")
    assert lm.settings_source["eps"] == "default (transformers hc_eps)"
    logits = mods[1].res_logits(X)
    want = project(logits, SinkhornSpec(Convention.TRANSFORMERS, 3, 1e-6))
    assert torch.equal(lm.sites[1].module(X).res, want)

    bare = _strip_metadata(path, tmp_path / "bare.safetensors")
    lm = load(bare)
    s = lm.sites[0].module.sinkhorn
    assert (s.convention, s.iters) == (Convention.PAPER, 20)
    assert (lm.settings_source["convention"], lm.settings_source["iters"]) == ("default", "default")


def test_stated_eps_stays_with_its_convention(tmp_path):
    """A file stating transformers with eps 1e-5, read with --convention paper: paper has no eps, so the
    stated one is dropped (was kept, and projecting then refused the paper convention with an eps)."""
    from hcdiag.sinkhorn import project

    mods = _modules("mhc")
    spec = SinkhornSpec(Convention.TRANSFORMERS, 20, 1e-5)
    for m in mods:
        m.sinkhorn = spec
    path = tmp_path / "t.safetensors"
    save_native(path, mods, variant="mhc", n=N, C=C, blocks=BLOCKS, sinkhorn=spec, form="code")
    lm = load(path, options=LoadOptions(convention="paper"))
    s = lm.sites[0].module.sinkhorn
    assert (s.convention, s.iters, s.eps) == (Convention.PAPER, 20, 0.0)
    assert (lm.settings_source["iters"], lm.settings_source["eps"]) == ("metadata", "default")
    want = project(mods[0].res_logits(X), SinkhornSpec(Convention.PAPER, 20))
    assert torch.equal(lm.sites[0].module(X).res, want)
    # the other transformers convention has an eps too: the model's (stated) one carries over
    lm = load(path, options=LoadOptions(convention="transformers-sigmoid"))
    s = lm.sites[0].module.sinkhorn
    assert (s.convention, s.eps, lm.settings_source["eps"]) == (Convention.TRANSFORMERS_SIGMOID, 1e-5, "metadata")


IDENTIFIABLE = [v for v in VARIANTS if v not in ("identity", "hc-static")]


@pytest.mark.parametrize("variant", IDENTIFIABLE)
def test_identification_without_metadata(tmp_path, variant):
    form = Form.PAPER if variant in ("mhc", "ihc") else Form.CODE
    mods = _modules(variant, form, n=4, c=8)
    path = _strip_metadata(_save(tmp_path / "m.safetensors", variant, mods, form), tmp_path / "bare.safetensors")
    lm = load(path)
    assert lm.layout == "native" and "no hcdiag metadata" in lm.layout_reason
    assert (lm.n, lm.C) == (4, 8)
    assert lm.settings_source["variant"] == lm.settings_source["n"] == lm.settings_source["C"] == "inferred"
    assert [s.variant for s in lm.sites] == [variant] * 4
    assert [s.name for s in lm.sites] == site_names(2)
    for site, orig in zip(lm.sites, mods, strict=True):
        assert site.module.form is (form if variant not in ("hc-dynamic",) else Form.CODE)
        assert torch.equal(
            site.module(torch.ones(3, 4, 8, dtype=torch.float64)).res,
            orig(torch.ones(3, 4, 8, dtype=torch.float64)).res,
        )


def test_identification_under_model_prefix_with_other_weights(tmp_path):
    mods = _modules("tbp")
    path = _save(tmp_path / "m.safetensors", "tbp", mods)
    tensors = {f"model.{k}": v for k, v in load_file(str(path)).items()}
    tensors["model.embed.weight"] = torch.randn(10, C)
    tensors["lm_head.weight"] = torch.randn(10, C)
    save_file(tensors, str(tmp_path / "p.safetensors"))
    lm = load(tmp_path / "p.safetensors")
    assert [s.variant for s in lm.sites] == ["tbp"] * 4 and (lm.n, lm.C) == (N, C)
    assert lm.sites[2].tensors[0].key.startswith("model.hc.sites.2.")
    for site, orig in zip(lm.sites, mods, strict=True):
        assert torch.equal(site.module(X).res, orig(X).res)


def test_metadata_less_ambiguous_and_identity_errors(tmp_path):
    path = _strip_metadata(
        _save(tmp_path / "s.safetensors", "hc-static", _modules("hc-static")), tmp_path / "bare.safetensors"
    )
    with pytest.raises(InputError, match=r"hc\.sites\.0.*several.*metadata"):
        load(path, layout="native")
    ident = _save(tmp_path / "i.safetensors", "identity", _modules("identity"), extra_tensors={"w": torch.ones(2)})
    lm = load(ident)  # with metadata: 4 identity sites, no tensors
    assert len(lm.sites) == 4 and torch.equal(lm.sites[3].module(X).res[0], torch.eye(N, dtype=torch.float64))


def test_missing_key_is_input_error(tmp_path):
    path = _save(tmp_path / "m.safetensors", "mhc", _modules("mhc"))
    bad = _strip_metadata(path, tmp_path / "bad.safetensors", drop=["hc.sites.3.phi_res"], keep_meta=True)
    with pytest.raises(InputError, match=r"missing key hc\.sites\.3\.phi_res in .*bad\.safetensors") as ei:
        load(bad)
    assert ei.value.path == str(bad)


def test_wrong_shape_is_input_error(tmp_path):
    path = _save(tmp_path / "m.safetensors", "mhc", _modules("mhc"))
    tensors = load_file(str(path))
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    tensors["hc.sites.1.b_res"] = torch.zeros(3, 3, dtype=torch.float64)
    save_file(tensors, str(tmp_path / "bad.safetensors"), metadata=meta)
    with pytest.raises(
        InputError, match=r"hc\.sites\.1\.b_res in .*bad\.safetensors has shape \[3, 3\], expected \[4, 4\]"
    ):
        load(tmp_path / "bad.safetensors")
    meta2 = dict(meta, C="7")  # metadata that disagrees with the stored shapes
    save_file(load_file(str(path)), str(tmp_path / "c.safetensors"), metadata=meta2)
    with pytest.raises(InputError, match=r"hc\.sites\.0\.\w+ in .*c\.safetensors has shape"):
        load(tmp_path / "c.safetensors")


def test_unexpected_key_unknown_variant_and_version(tmp_path):
    path = _save(tmp_path / "m.safetensors", "ihc", _modules("ihc"))
    tensors = load_file(str(path))
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    save_file(tensors | {"hc.sites.0.extra": torch.zeros(1)}, str(tmp_path / "x.safetensors"), metadata=meta)
    with pytest.raises(InputError, match=r"unexpected key hc\.sites\.0\.extra"):
        load(tmp_path / "x.safetensors")
    save_file(tensors, str(tmp_path / "v.safetensors"), metadata=dict(meta, variant="mhc-heavy"))
    with pytest.raises(InputError, match=r"variant='mhc-heavy'.*v\.safetensors.*mhc-lite"):
        load(tmp_path / "v.safetensors")
    save_file(tensors, str(tmp_path / "f.safetensors"), metadata=dict(meta, format_version="2"))
    with pytest.raises(InputError, match="format_version 2.*upgrade"):
        load(tmp_path / "f.safetensors")
    save_file(tensors, str(tmp_path / "s.safetensors"), metadata=dict(meta, sites='["attn_0"]'))
    with pytest.raises(InputError, match="lists 1 sites but blocks=2"):
        load(tmp_path / "s.safetensors")


def test_save_validation(tmp_path):
    mods = _modules("mhc")
    kw = dict(variant="mhc", n=N, C=C, sinkhorn=mods[0].sinkhorn, form="code")
    with pytest.raises(UsageError, match="blocks=3"):
        save_native(tmp_path / "a.safetensors", mods, blocks=3, **kw)
    with pytest.raises(UsageError, match="'variant'"):
        save_native(tmp_path / "a.safetensors", mods, blocks=2, metadata={"variant": "x"}, **kw)
    with pytest.raises(UsageError, match="collides"):
        save_native(tmp_path / "a.safetensors", mods, blocks=2, extra_tensors={"hc.sites.9.x": torch.ones(1)}, **kw)
    with pytest.raises(UsageError, match="tbp"):
        save_native(tmp_path / "a.safetensors", mods, blocks=2, **dict(kw, variant="tbp"))
    with pytest.raises(UsageError, match="differs from the modules' own"):
        save_native(tmp_path / "a.safetensors", mods, blocks=2, **dict(kw, sinkhorn=SinkhornSpec(Convention.LOG, 20)))
    ihc = _modules("ihc")
    with pytest.raises(UsageError, match="no Sinkhorn"):
        save_native(tmp_path / "a.safetensors", ihc, blocks=2, **dict(kw, variant="ihc"))
    assert not list(tmp_path.iterdir())  # nothing half-written
    # sinkhorn=None on an mhc site: the modules' own settings are written
    for m in mods:
        m.sinkhorn = SinkhornSpec(Convention.LUCIDRAINS, 9)
    save_native(tmp_path / "b.safetensors", mods, blocks=2, **dict(kw, sinkhorn=None))
    with safe_open(str(tmp_path / "b.safetensors"), "pt") as f:
        meta = f.metadata()
    assert (meta["sinkhorn_convention"], meta["sinkhorn_iters"]) == ("lucidrains", "9")


def test_save_is_byte_deterministic_and_shares_storage_safely(tmp_path):
    mods = _modules("mhc-lite")
    emb = torch.randn(5, C)
    extra = {"tok.weight": emb, "head.weight": emb}  # tied weights share storage
    a = _save(tmp_path / "a.safetensors", "mhc-lite", mods, extra_tensors=extra, metadata={"z": "1", "a": "2"})
    b = _save(tmp_path / "b.safetensors", "mhc-lite", mods, extra_tensors=extra, metadata={"z": "1", "a": "2"})
    assert a.read_bytes() == b.read_bytes()
    with safe_open(str(a), "pt") as f:
        assert torch.equal(f.get_tensor("head.weight"), emb)
        assert f.metadata()["z"] == "1"
    raw = a.read_bytes()
    header = json.loads(raw[8 : 8 + int.from_bytes(raw[:8], "little")])
    assert list(header)[0] == "__metadata__"
    assert list(header["__metadata__"])[:3] == ["format", "format_version", "variant"]


def test_pt_training_checkpoint_with_sidecar(tmp_path):
    mods = _modules("hc-dynamic")
    st = _save(tmp_path / "m.safetensors", "hc-dynamic", mods)
    with safe_open(str(st), "pt") as f:
        meta = f.metadata()
    sd = {f"module.{k}": v for k, v in load_file(str(st)).items()} | {"module.w": torch.ones(2)}
    pt = tmp_path / "ckpt.pt"
    torch.save({"model": sd, "optimizer": {"state": {}, "param_groups": []}, "step": 5}, pt)
    (tmp_path / "ckpt.pt.json").write_text(json.dumps(meta))
    lm = load(pt)
    assert lm.layout == "native" and lm.settings_source["variant"] == "metadata"
    for site, orig in zip(lm.sites, mods, strict=True):
        assert torch.equal(site.module(X).res, orig(X).res)


def test_layout_registered():
    lay = get_layout("native")
    assert lay.priority == 10 and lay.name == "native"

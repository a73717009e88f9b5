"""capture(): recorded x and H_res against the libraries' own module math, and the file format round trip."""

from __future__ import annotations

import json

import pytest
import torch
from hyper_connections import (
    get_init_and_expand_reduce_stream_functions,
    mc_get_init_and_expand_reduce_stream_functions,
)
from hyper_connections.hyper_connections import HyperConnections
from hyper_connections.mHCv2 import ManifoldConstrainedHyperConnections as MHCv2
from hyper_connections.mHCv2 import get_expand_reduce_stream_functions as v2_expand_reduce
from safetensors.torch import save_file
from torch import nn

from hcdiag.capture import FORMAT, capture, read_activations
from hcdiag.errors import InputError, UsageError

TOL = 1e-5


def perturb(m: nn.Module, seed: int, scale: float = 0.3) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)
    return m


def library_h(m: nn.Module, R: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(H_res the library uses [T, n, n] paper convention, its mixed streams) for streams R; f = 1.

    mHC: the output of the module's own residual_mix_constraint_fn (mean over proposals, transposed);
    HC: the alpha passed to the mixing einsum."""
    from hyper_connections import hyper_connections as hc_mod

    got: list[torch.Tensor] = []
    if isinstance(m, HyperConnections):
        real = hc_mod.einsum

        def spy(*args, **kwargs):
            if len(args) == 3 and "f1 s f2 t" in args[2]:
                a = args[0][..., 0, :, 0, m.num_input_views:]
                got.append(a.reshape(-1, *a.shape[-2:]).mT)
            return real(*args, **kwargs)

        hc_mod.einsum = spy
        try:
            _, out, _ = m.width_connection(R)
        finally:
            hc_mod.einsum = real
    else:
        real_fn = m.residual_mix_constraint_fn

        def wrapped(a):
            res = real_fn(a)
            got.append(res.mean(0).reshape(-1, *res.shape[-2:]).mT)
            return res

        m.residual_mix_constraint_fn = wrapped
        try:
            _, out, _ = m.width_connection(R)
        finally:
            m.residual_mix_constraint_fn = real_fn
    return got[0], out


class LucidNet(nn.Module):
    """mHC, HC, log-domain mHC with 2 proposals, and a decorate_branch mHC (7 iterations), on 4 streams."""

    def __init__(self, n: int = 4, C: int = 16) -> None:
        super().__init__()
        init_mhc, self.expand, self.reduce = mc_get_init_and_expand_reduce_stream_functions(n, dim=C)
        init_hc, _, _ = get_init_and_expand_reduce_stream_functions(n, dim=C)
        self.blocks = nn.ModuleList([
            init_mhc(branch=nn.Linear(C, C), layer_index=0),
            init_hc(branch=nn.Linear(C, C), layer_index=1),
            init_mhc(branch=nn.Linear(C, C), layer_index=2, log_domain_sinkhorn=True,
                     num_dynamic_alpha_proposals=2),
            init_mhc(layer_index=3, sinkhorn_iters=7),
        ])
        self.ff = nn.Linear(C, C)
        self.decorated = self.blocks[3].decorate_branch(self.ff)  # calls self.forward directly: no hooks fire

    def forward(self, tokens: torch.Tensor, *, record: list | None = None) -> torch.Tensor:
        x = self.expand(tokens)
        for i, blk in enumerate(self.blocks):
            if record is not None:
                record.append(x.detach().clone())
            x = self.decorated(x) if i == 3 else blk(x)
        return self.reduce(x)


def v1_streams(x: torch.Tensor, B: int, n: int) -> torch.Tensor:
    """[B*S, n, C] recorded layout -> the library's [(B n), S, C]."""
    return x.reshape(B, -1, n, x.shape[-1]).transpose(1, 2).reshape(B * n, -1, x.shape[-1])


def test_lucidrains_model(tmp_path) -> None:
    torch.manual_seed(0)
    net = perturb(LucidNet(), seed=1).eval()
    B, S, n = 2, 3, 4
    tokens = torch.randn(B, S, 16)
    path = tmp_path / "acts.safetensors"
    with torch.no_grad(), capture(net, path) as session:
        net(tokens)
    assert session.names == ["blocks.0", "blocks.1", "blocks.2", "blocks.3"]
    sites = read_activations(path)
    assert [s.name for s in sites] == session.names
    assert sorted(p.name for p in tmp_path.iterdir()) == ["acts.safetensors"]  # no temp file left
    inputs: list[torch.Tensor] = []
    with torch.no_grad():
        net(tokens, record=inputs)  # independent record of each block's residual input
    for site, blk, R in zip(sites, net.blocks, inputs, strict=True):
        assert site.x.shape == (B * S, n, 16) and site.h_res.shape == (B * S, n, n)
        torch.testing.assert_close(v1_streams(site.x, B, n), R, rtol=0, atol=0)
        with torch.no_grad():
            H, out = library_h(blk, v1_streams(site.x, B, n))
        assert (site.h_res - H).abs().max() < TOL, site.name
        mixed = torch.einsum("tij,tjd->tid", site.h_res, site.x)
        assert (v1_streams(mixed, B, n) - out).abs().max() < TOL
    meta = json.loads(__import__("safetensors").safe_open(str(path), "pt").metadata()["sites"])
    assert [m["h_res_from"] for m in meta] == ["recomputed"] * 4
    assert meta[1]["module_class"] == "hyper_connections.hyper_connections.HyperConnections"


def test_lucidrains_v2_fractions(tmp_path) -> None:
    """mHCv2 (streams [..., s, D]) with 2 fractions and stream mixing: x is [T, s f, D / f], s outer."""
    s, f, C = 3, 2, 16
    expand, reduce = v2_expand_reduce(s)
    blocks = nn.ModuleList([perturb(MHCv2(s, dim=C, num_fracs=f, mix_streams_before_norm=True,
                                          branch=nn.Linear(C, C), layer_index=0), seed=2),
                            perturb(MHCv2(s, dim=C, branch=nn.Linear(C, C), layer_index=1), seed=3)])
    tokens = torch.randn(2, 5, C)
    path = tmp_path / "v2.safetensors"
    inputs = []
    with torch.no_grad(), capture(blocks, path):
        x = expand(tokens)
        for blk in blocks:
            inputs.append(x.clone())
            x = blk(x)
        reduce(x)
    sites = read_activations(path)
    assert [tuple(t.x.shape) for t in sites] == [(10, s * f, C // f), (10, s, C)]
    for site, blk, R in zip(sites, blocks, inputs, strict=True):
        torch.testing.assert_close(site.x.reshape(R.shape), R, rtol=0, atol=0)
        with torch.no_grad():
            _, out, _ = blk.width_connection(site.x.reshape(R.shape))
        mixed = torch.einsum("tij,tjd->tid", site.h_res, site.x)
        assert (mixed.reshape(out.shape) - out).abs().max() < TOL
    with torch.no_grad():
        H, _ = library_h(blocks[1], sites[1].x.reshape(2, 5, s, C))
    assert (sites[1].h_res - H).abs().max() < TOL


def _tiny_deepseek():
    from transformers import DeepseekV4Config, DeepseekV4ForCausalLM

    cfg = DeepseekV4Config(
        vocab_size=64, hidden_size=32, moe_intermediate_size=16, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, head_dim=16, q_lora_rank=16, n_routed_experts=4, num_experts_per_tok=2,
        n_shared_experts=1, o_groups=2, o_lora_rank=8, index_n_heads=2, index_head_dim=8, index_topk=4,
        sliding_window=8, hc_mult=4, layer_types=["sliding_attention", "compressed_sparse_attention"],
        mlp_layer_types=["moe", "moe"], max_position_embeddings=64,
    )
    torch.manual_seed(0)
    model = DeepseekV4ForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "_hc." in name:
                p.copy_(torch.randn_like(p) * 0.5)
    return model


def test_transformers_deepseek_v4(tmp_path) -> None:
    model = _tiny_deepseek()
    ids = torch.randint(0, 64, (2, 5), generator=torch.Generator().manual_seed(0))
    seen: dict[str, torch.Tensor] = {}
    hcs = {name: m for name, m in model.named_modules() if name.endswith("_hc")}
    handles = [m.register_forward_pre_hook(lambda mod, args, name=name: seen.setdefault(name, args[0].clone()))
               for name, m in hcs.items()]
    path = tmp_path / "ds.safetensors"
    try:
        with torch.no_grad(), capture(model, path) as session:
            model(ids)
    finally:
        for h in handles:
            h.remove()
    expected = [f"model.layers.{i}.{k}_hc" for i in range(2) for k in ("attn", "ffn")]
    assert session.names == expected  # call order; hc_head is not a site
    for site in read_activations(path):
        assert site.x.shape == (10, 4, 32)
        torch.testing.assert_close(site.x, seen[site.name].reshape(10, 4, 32), rtol=0, atol=0)
        with torch.no_grad():
            _, comb, _ = hcs[site.name](site.x.reshape(2, 5, 4, 32))
        # the decoder layer mixes with comb^T: that is paper H_res
        assert (site.h_res - comb.reshape(10, 4, 4).mT).abs().max() < TOL
        assert site.module_class.endswith("DeepseekV4HyperConnection")


def test_hcdiag_site_modules_and_token_cap(tmp_path) -> None:
    """hcdiag's own SiteModules record (x, output.res); a second forward appends until max_tokens."""
    from hcdiag.io.lucidrains_layout import build_site, plan_site

    lib = perturb(HyperConnections(4, dim=8, layer_index=0), seed=4)
    sd = {k: v.detach() for k, v in lib.state_dict().items()}
    site = build_site(plan_site({k: tuple(v.shape) for k, v in sd.items()}), sd)
    holder = nn.ModuleDict({"hc": site})
    x1, x2 = torch.randn(2, 3, 4, 8), torch.randn(6, 4, 8)
    path = tmp_path / "own.safetensors"
    with torch.no_grad(), capture(holder, path, max_tokens=10):
        r1 = holder["hc"](x1).res
        r2 = holder["hc"](x2).res
    (rec,) = read_activations(path)
    assert rec.name == "hc" and rec.x.shape == (10, 4, 8)
    torch.testing.assert_close(rec.x, torch.cat([x1.reshape(6, 4, 8), x2[:4]]), rtol=0, atol=0)
    torch.testing.assert_close(rec.h_res, torch.cat([r1.reshape(6, 4, 4), r2[:4]]).float(), rtol=0, atol=0)


def test_recorded_rows_survive_buffer_growth(tmp_path, monkeypatch) -> None:
    """The recorder's buffer starting at a few rows and doubling (as it does past 256 MiB): every call's rows,
    cast to float32, land in order, up to max_tokens (compared with the inputs themselves)."""
    from hcdiag import capture as cap
    from hcdiag.io.lucidrains_layout import build_site, plan_site

    monkeypatch.setattr(cap._Rows, "START_BYTES", 3 * 4 * 8 * 4)  # 3 rows of x [4, 8] float32
    lib = perturb(HyperConnections(4, dim=8, layer_index=0), seed=5)
    sd = {k: v.detach() for k, v in lib.state_dict().items()}
    holder = nn.ModuleDict({"hc": build_site(plan_site({k: tuple(v.shape) for k, v in sd.items()}), sd)})
    xs = [torch.randn(k, 4, 8, dtype=torch.float64) for k in (1, 2, 5, 1, 7)]
    path = tmp_path / "grow.safetensors"
    with torch.no_grad(), capture(holder, path, max_tokens=14):
        res = [holder["hc"](x).res for x in xs]
    (rec,) = read_activations(path)
    assert rec.x.dtype == torch.float32 and rec.x.shape == (14, 4, 8)
    torch.testing.assert_close(rec.x, torch.cat(xs)[:14].float(), rtol=0, atol=0)
    torch.testing.assert_close(rec.h_res, torch.cat(res)[:14].float(), rtol=0, atol=0)


def test_site_selection_and_failures(tmp_path) -> None:
    net = LucidNet().eval()
    path = tmp_path / "sel.safetensors"
    with torch.no_grad(), capture(net, path, sites=["blocks.[13]"]) as session:
        net(torch.randn(1, 2, 16))
    assert session.names == ["blocks.1", "blocks.3"]
    with pytest.raises(UsageError, match="no hyper-connection module matches"):
        with capture(net, path, sites=["decoder.*"]):
            pass
    with pytest.raises(UsageError, match="no hyper-connection modules"):
        with capture(nn.Linear(2, 2), path):
            pass
    with pytest.raises(UsageError, match="max_tokens"):
        with capture(net, path, max_tokens=0):
            pass
    bad = tmp_path / "never.safetensors"
    with pytest.raises(RuntimeError, match="boom"):
        with torch.no_grad(), capture(net, bad):
            net(torch.randn(1, 2, 16))
            raise RuntimeError("boom")
    assert not bad.exists()
    assert net.blocks[3].__dict__.get("width_connection") is None  # hooks undone
    with pytest.raises(UsageError, match="no hyper-connection site was called"):
        with capture(net, tmp_path / "empty.safetensors"):
            pass


@pytest.mark.parametrize(
    "tensors, meta, match",
    [
        ({"a": torch.zeros(1)}, {"format": "hcdiag"}, "not an hcdiag activations file"),
        ({"a": torch.zeros(1)}, {"format": FORMAT, "version": "2", "sites": "[]"}, "version"),
        ({"a": torch.zeros(1)}, {"format": FORMAT, "version": "1", "sites": "{"}, "not JSON"),
        ({"sites.0.x": torch.zeros(2, 3, 4)}, {"format": FORMAT, "version": "1",
                                              "sites": '[{"index": 0, "name": "a"}]'}, "no tensor sites.0.h_res"),
        ({"sites.0.x": torch.zeros(2, 3, 4), "sites.0.h_res": torch.zeros(2, 4, 4)},
         {"format": FORMAT, "version": "1", "sites": '[{"index": 0, "name": "a"}]'}, r"\[T, n, C\]"),
        ({"a": torch.zeros(1)}, {"format": FORMAT, "version": "1", "sites": '[{"index": 1, "name": "a"}]'},
         "indices"),
    ],
)
def test_read_activations_refuses_bad_files(tmp_path, tensors, meta, match) -> None:
    path = tmp_path / "bad.safetensors"
    save_file(tensors, str(path), metadata=meta)
    with pytest.raises(InputError, match=match):
        read_activations(path)


def test_read_activations_not_safetensors(tmp_path) -> None:
    path = tmp_path / "junk.safetensors"
    path.write_bytes(b"\x00" * 3 + b"not a header at all")
    with pytest.raises(InputError, match="cannot read as safetensors"):
        read_activations(path)
    with pytest.raises(InputError, match="no such file"):
        read_activations(tmp_path / "missing.safetensors")


class FakeHYV4HyperConnection(nn.Module):
    """Shaped like transformers' HYV4HyperConnection: returns (post, collapsed), no comb: H_res = I."""

    def __init__(self, n: int = 4, C: int = 8) -> None:
        super().__init__()
        self.hc_mult = n
        self.fn = nn.Parameter(torch.randn(2 * n, n * C))

    def forward(self, hidden_streams):
        pre = torch.sigmoid(hidden_streams.flatten(2) @ self.fn[: self.hc_mult].T)
        return torch.ones_like(pre), (pre.unsqueeze(-1) * hidden_streams).sum(2)


def test_transformers_without_comb_records_identity(tmp_path) -> None:
    layers = nn.ModuleDict({"attn_hc": FakeHYV4HyperConnection()})
    path = tmp_path / "hy.safetensors"
    with torch.no_grad(), capture(layers, path):
        layers["attn_hc"](torch.randn(2, 3, 4, 8))
    (site,) = read_activations(path)
    assert torch.equal(site.h_res, torch.eye(4).expand(6, 4, 4))


@pytest.mark.parametrize("cls_name, variant", [("MHCLite", "mhc_lite"), ("TBP_MHC", "tbp_mhc"),
                                               ("ManifoldConstrainedHyperConnections", "mhc")])
def test_reference_repo_modules(tmp_path, cls_name: str, variant: str) -> None:
    """Modules of the nanoGPT reference repos (ported in test_io_nanogpt), recognised by class name."""
    from test_io_nanogpt import RefPort

    ref = perturb(type(cls_name, (RefPort,), {})(variant, 4, 8, layer_index=1), seed=9).eval()
    R = torch.randn(2 * 4, 3, 8)
    path = tmp_path / "ref.safetensors"
    with torch.no_grad(), capture(nn.ModuleDict({"hc_attn": ref}), path):
        _, out, _ = ref.width_connection(R)
    (site,) = read_activations(path)
    torch.testing.assert_close(v1_streams(site.x, 2, 4), R, rtol=0, atol=0)
    mixed = torch.einsum("tij,tjd->tid", site.h_res, site.x)
    assert (v1_streams(mixed, 2, 4) - out).abs().max() < TOL

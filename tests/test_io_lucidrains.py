"""lucidrains layout: every site's H_res, H_pre, H_post against the real hyper-connections modules.

Oracles (all from the installed library, hyper-connections 0.4.11, float32):
* action: the library's own ``width_connection`` output streams equal H_res x, its branch input equals H_pre x,
  and ``depth_connection`` adds H_post^T f(...) -- no knowledge of the library's alpha layout is used;
* matrix: for mHC the Sinkhorn output the module actually used (its ``residual_mix_constraint_fn`` wrapped), for
  HC the alpha handed to the mixing einsum, transposed to paper convention.
"""

from __future__ import annotations

import contextlib
import math

import pytest
import torch
from hyper_connections import hyper_connections as hc_mod
from hyper_connections.hyper_connections import HyperConnections
from hyper_connections.manifold_constrained_hyper_connections import ManifoldConstrainedHyperConnections as MHC
from hyper_connections.mHCv2 import ManifoldConstrainedHyperConnections as MHCv2
from safetensors.torch import save_file
from torch import nn

from hcdiag.enums import Convention, Exactness
from hcdiag.errors import InputError
from hcdiag.io.base import LoadOptions
from hcdiag.io.lucidrains_layout import LEAF, LUCIDRAINS, build_site, plan_site
from hcdiag.io.nanogpt_layout import NANOGPT
from hcdiag.io.reader import name_sites, site_prefixes
from hcdiag.io.source import open_source
from hcdiag.site import SinkhornSpec

TOL = 1e-5


def perturb(m: nn.Module, seed: int, scale: float = 0.5) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)
    return m


def is_v2(m: nn.Module) -> bool:
    return type(m).__module__.endswith("mHCv2")


def to_x(R: torch.Tensor, m: nn.Module) -> torch.Tensor:
    """Library stream tensor -> [T, n, d] in the library's fractional-stream order (independent of hcdiag)."""
    s, f = m.num_residual_streams, m.num_fracs
    if is_v2(m):  # [..., s, (f d)] -> s outer, f inner
        return R.reshape(-1, s * f, R.shape[-1] // f)
    bs, T, D = R.shape  # [(b s), T, (f d)] -> f outer, s inner
    return R.reshape(bs // s, s, T, f, D // f).permute(0, 2, 3, 1, 4).reshape(-1, f * s, D // f)


def random_streams(m: nn.Module, b: int, T: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    D = m.norm.gamma.shape[0] * m.num_fracs
    s = m.num_residual_streams
    return torch.randn((b, T, s, D) if is_v2(m) else (b * s, T, D), generator=g)


@contextlib.contextmanager
def library_h_res(m: nn.Module, out: list[torch.Tensor]):
    """Record the H_res (paper convention, [b*T, n, n]) the library module uses; f = 1 only."""
    if isinstance(m, HyperConnections):
        real = hc_mod.einsum

        def spy(*args, **kwargs):
            if len(args) == 3 and "f1 s f2 t" in args[2]:
                alpha = args[0]  # [b, T, f1, s, f2, v + s]
                out.append(alpha[..., 0, :, 0, m.num_input_views:].reshape(-1, *alpha.shape[-3:-2] * 2).mT)
            return real(*args, **kwargs)

        hc_mod.einsum = spy
        try:
            yield
        finally:
            hc_mod.einsum = real
        return
    real_fn = m.residual_mix_constraint_fn

    def wrapped(alpha_res):
        res = real_fn(alpha_res)  # v1: [p, b, T, 1, s, s]; v2: [p, b, T, n, n]; alpha[input, output]
        out.append(res.mean(0).reshape(-1, *res.shape[-2:]).mT)
        return res

    m.residual_mix_constraint_fn = wrapped
    try:
        yield
    finally:
        m.residual_mix_constraint_fn = real_fn


def site_for(m: nn.Module, *, convention: Convention = Convention.LUCIDRAINS, dtype=torch.float64, **kw):
    sd = {k: v.detach().to(dtype) for k, v in m.state_dict().items()}
    plan = plan_site({k: tuple(v.shape) for k, v in sd.items()})
    return plan, build_site(plan, sd, spec=SinkhornSpec(convention, 20), **kw)


def compare(m: nn.Module, site, seed: int = 0) -> dict[str, float]:
    """Max abs errors of hcdiag's site against the library module on random streams."""
    f = m.num_fracs
    b, T = 2, 5
    R = random_streams(m, b, T, seed)
    lib_h: list[torch.Tensor] = []
    with torch.no_grad(), library_h_res(m, lib_h):
        branch_in, streams_out, kw = m.width_connection(R)
    x = to_x(R, m)
    with torch.no_grad():
        out = site(x.to(site.static_alpha.dtype))
    d = x.shape[-1]
    err = {"res_action": (torch.einsum("tij,tjd->tid", out.res.double(), x.double())
                          - to_x(streams_out, m).double()).abs().max().item()}
    pre = out.pre if out.pre.ndim == 3 else out.pre.unsqueeze(-2)
    v = m.num_input_views
    bi = branch_in if v == 1 else branch_in.movedim(0, -2)  # [v, b, T, D] -> [b, T, v, D]
    bi = bi.reshape(b * T, v * f, d)
    err["pre_action"] = (torch.einsum("tij,tjd->tid", pre.double(), x.double()) - bi.double()).abs().max().item()
    bo = torch.randn(b, T, f * d, generator=torch.Generator().manual_seed(seed + 1))
    with torch.no_grad():
        added = to_x(m.depth_connection(bo, streams_out, **kw) - streams_out, m)
    post = out.post if out.post.ndim == 3 else out.post.unsqueeze(-2)
    pred = torch.einsum("tfn,tfd->tnd", post.double(), bo.reshape(b * T, f, d).double())
    err["post_action"] = (pred - added.double()).abs().max().item()
    if f == 1:
        assert len(lib_h) == 1
        err["res_matrix"] = (out.res.double() - lib_h[0].double()).abs().max().item()
    return err


CASES = {
    "hc": lambda: HyperConnections(4, dim=16, layer_index=1),
    "hc-no-tanh": lambda: HyperConnections(4, dim=16, layer_index=2, tanh=False),
    "hc-fracs": lambda: HyperConnections(3, dim=16, num_fracs=2, layer_index=0),
    "hc-views": lambda: HyperConnections(4, dim=16, num_input_views=2, num_fracs=2, layer_index=0),
    "mhc": lambda: MHC(4, dim=16, layer_index=0),
    "mhc-proposals": lambda: MHC(4, dim=16, layer_index=3, num_dynamic_alpha_proposals=3),
    "mhc-log": lambda: MHC(4, dim=16, layer_index=1, log_domain_sinkhorn=True),
    "mhc-iters7": lambda: MHC(4, dim=16, layer_index=1, sinkhorn_iters=7),
    "mhc-fracs": lambda: MHC(3, dim=16, num_fracs=2, layer_index=0),
    "mhc-n8": lambda: MHC(8, dim=8, layer_index=5),
    "mhcv2": lambda: MHCv2(4, dim=16, layer_index=2),
    "mhcv2-fracs-mix": lambda: MHCv2(3, dim=16, num_fracs=2, mix_streams_before_norm=True,
                                     num_dynamic_alpha_proposals=2, layer_index=1),
    "mhcv2-log": lambda: MHCv2(4, dim=16, log_domain_sinkhorn=True, layer_index=0),
}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("case", sorted(CASES))
def test_site_matches_library(case: str, dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    m = perturb(CASES[case](), seed=len(case)).eval()
    conv = Convention.LOG if case.endswith("log") else Convention.LUCIDRAINS
    iters = 7 if case.endswith("iters7") else 20
    plan, site = site_for(m, convention=conv, dtype=dtype, tanh=case != "hc-no-tanh")
    if site.sinkhorn is not None:
        site.sinkhorn = SinkhornSpec(conv, iters)
    assert plan.streams * plan.fracs == site.n
    assert (plan.streams, plan.fracs, plan.views) == (m.num_residual_streams, m.num_fracs, m.num_input_views)
    err = compare(m, site)
    assert max(err.values()) < TOL, err


def test_log_and_lucidrains_conventions_differ_only_by_underflow() -> None:
    """Same pass order, so the exp-domain and log-domain iterations agree to rounding on ordinary logits; they
    part ways when exp(l - max) underflows (float32, spread > ~87): the exp-domain kernel then keeps a zero row
    of alpha (an input stream that feeds nothing) while the log-domain one rescales it."""
    m = perturb(MHC(4, dim=16, layer_index=1, log_domain_sinkhorn=True), seed=3).eval()
    _, site = site_for(m, convention=Convention.LUCIDRAINS)
    assert compare(m, site)["res_matrix"] < 1e-6
    base = MHC(4, dim=8, layer_index=0)
    with torch.no_grad():
        base.static_alpha[1, 1:] = -200.0
    for log_domain, conv in ((False, Convention.LUCIDRAINS), (True, Convention.LOG)):
        lib = MHC(4, dim=8, layer_index=0, log_domain_sinkhorn=log_domain)
        lib.load_state_dict(base.state_dict())
        _, site32 = site_for(lib, convention=conv, dtype=torch.float32)
        assert compare(lib, site32)["res_matrix"] < TOL
        with torch.no_grad():
            H = site32(torch.randn(3, 4, 8)).res
        # paper column 1 = what input stream 1 contributes: nothing with exp-domain underflow
        col = H.sum(-2)[:, 1]
        assert (col.abs().max() == 0) if not log_domain else torch.allclose(col, torch.ones(3), atol=1e-5)


@pytest.mark.parametrize("case", ["mhc", "mhc-proposals", "mhcv2"])
def test_res_logits_round_trip(case: str) -> None:
    m = perturb(CASES[case](), seed=7).eval()
    _, site = site_for(m)
    x = torch.randn(6, site.n, site.C, dtype=torch.float64)
    with torch.no_grad():
        logits = site.res_logits(x)
        p = m.num_dynamic_alpha_proposals
        assert logits.shape == ((6, p, site.n, site.n) if p > 1 else (6, site.n, site.n))
        torch.testing.assert_close(site.res_from_logits(logits), site(x).res, rtol=0, atol=1e-12)
        # static probe: x = 0 gives F.normalize(0) = 0, so the logits are exactly static_alpha^T
        zero_logits = site.res_logits(torch.zeros(1, site.n, site.C, dtype=torch.float64))
    static = m.static_alpha.detach().double()[:, 1:].T
    assert torch.equal(zero_logits.reshape(-1, site.n, site.n)[0], static)


def test_static_identity_init_is_not_identity() -> None:
    """SPEC: static mHC H_res logits start at I, so H_res = Sinkhorn(exp(I)): diagonal e/(e + n - 1)."""
    n = 4
    _, site = site_for(MHC(n, dim=8, layer_index=0))
    with torch.no_grad():
        H = site(torch.zeros(1, n, 8, dtype=torch.float64)).res[0]
    e = math.e
    expected = torch.full((n, n), 1 / (e + n - 1), dtype=torch.float64)
    expected.fill_diagonal_(e / (e + n - 1))
    torch.testing.assert_close(H, expected, rtol=0, atol=1e-12)


# ---------------------------------------------------------------------------------------------------------------
# A whole network, saved and loaded through the layout


class Net(nn.Module):
    """11 blocks (natural order matters: 2 < 10), attn = mHC / mHCv2, ff = HC / mHC, with wrapped branches."""

    def __init__(self, n: int = 4, C: int = 8) -> None:
        super().__init__()
        blocks = []
        for i in range(11):
            attn = (MHCv2 if i % 3 == 2 else MHC)(n, dim=C, layer_index=2 * i, branch=nn.Linear(C, C),
                                                   num_dynamic_alpha_proposals=1 + (i % 2))
            ff = (HyperConnections if i % 2 else MHC)(n, dim=C, layer_index=2 * i + 1, branch=nn.Linear(C, C))
            blocks.append(nn.ModuleDict({"attn_hc": attn, "ff_hc": ff}))
        self.layers = nn.ModuleList(blocks)
        self.stream_embed = nn.Parameter(torch.zeros(n, C))


def _save(net: nn.Module, tmp_path, fmt: str) -> str:
    sd = {k: v.detach().clone().contiguous() for k, v in net.state_dict().items()}
    if fmt == "pt":
        path = tmp_path / "net.pt"
        torch.save({"model": sd, "step": 3}, path)
    else:
        path = tmp_path / "net.safetensors"
        save_file(sd, str(path))
    return str(path)


def _load(path: str, options: LoadOptions = LoadOptions()):
    try:
        from hcdiag.io.load import load
    except ImportError:  # pragma: no cover - until hcdiag.io.load exists
        return LUCIDRAINS.load(open_source(path), options)
    return load(path, options=options)


@pytest.mark.parametrize("fmt", ["pt", "safetensors"])
def test_network_round_trip(tmp_path, fmt: str) -> None:
    torch.manual_seed(1)
    net = perturb(Net(), seed=11).eval()
    path = _save(net, tmp_path, fmt)
    assert LUCIDRAINS.detect(open_source(path)) is not None
    assert NANOGPT.detect(open_source(path)) is None
    model = _load(path)
    assert model.layout == "lucidrains"
    assert (model.n, model.C) == (4, 8)
    assert [s.name for s in model.sites] == [f"{k}_{b}" for b in range(11) for k in ("attn", "ffn")]
    assert [s.block for s in model.sites] == [b for b in range(11) for _ in range(2)]
    assert model.settings_source["convention"] == "default" and model.settings_source["iters"] == "default"
    libs = [m for blk in net.layers for m in (blk["attn_hc"], blk["ff_hc"])]
    for site, lib in zip(model.sites, libs, strict=True):
        assert not any(t.key.split(".")[3] == "branch" for t in site.tensors)  # branch weights are not HC state
        assert site.module.exactness is (Exactness.UNCONSTRAINED if isinstance(lib, HyperConnections)
                                          else Exactness.SINKHORN)
        err = compare(lib, site.module, seed=site.index)
        assert max(err.values()) < TOL, (site.name, err)


def test_load_overrides_convention_and_iters(tmp_path) -> None:
    net = nn.ModuleDict({"a": MHC(4, dim=8, log_domain_sinkhorn=True, sinkhorn_iters=5, layer_index=0)})
    perturb(net, seed=5).eval()
    path = _save(net, tmp_path, "safetensors")
    model = _load(path, LoadOptions(convention="log", iters=5))
    src = model.settings_source
    assert (src["convention"], src["iters"]) == ("cli (--convention)", "cli (--iters)")
    assert model.sites[0].name == "a"
    assert max(compare(net["a"], model.sites[0].module).values()) < TOL


def test_convention_transformers_brings_its_eps(tmp_path) -> None:
    """--convention transformers on a checkpoint that states no eps: DeepSeek-V4's hc_eps (1e-6, its config
    default), as when stochasticity switches a loaded site's convention; the site then projects with it."""
    net = nn.ModuleDict({"a": MHC(4, dim=8, sinkhorn_iters=5, layer_index=0)})
    perturb(net, seed=6).eval()
    model = _load(_save(net, tmp_path, "safetensors"), LoadOptions(convention="transformers"))
    spec = model.sites[0].module.sinkhorn
    assert (spec.convention, spec.eps) == (Convention.TRANSFORMERS, 1e-6)
    assert model.settings_source["eps"] == "default (transformers hc_eps)"
    assert model.settings_source["convention"] == "cli (--convention)" and model.settings_source["iters"] == "default"


def test_bare_module_state_dict(tmp_path) -> None:
    m = perturb(MHC(4, dim=8, layer_index=0), seed=2).eval()
    path = _save(m, tmp_path, "pt")
    model = _load(path)
    assert [s.name for s in model.sites] == ["site"]
    assert max(compare(m, model.sites[0].module).values()) < TOL


# ---------------------------------------------------------------------------------------------------------------
# Naming, detection, hostile files


def test_natural_order_and_names() -> None:
    prefixes = ["blocks.10.mlp.", "blocks.2.self_attn.", "blocks.2.mlp.", "blocks.10.self_attn."]
    assert [r[1] for r in name_sites(prefixes)] == ["attn_2", "ffn_2", "attn_10", "ffn_10"]
    # no kind words: module paths, natural order
    assert [r[1] for r in name_sites(["h.10.", "h.9.", "h.1.0."])] == ["h.1.0", "h.9", "h.10"]
    groups = site_prefixes(["a.static_alpha", "a.norm.gamma", "a.branch.static_alpha", "a.branch.w"], LEAF)
    assert groups == {"a.": {"static_alpha": "a.static_alpha", "norm.gamma": "a.norm.gamma"},
                      "a.branch.": {"static_alpha": "a.branch.static_alpha", "w": "a.branch.w"}}


class DictSource:
    def __init__(self, tensors: dict[str, torch.Tensor], path: str = "mem.safetensors") -> None:
        from hcdiag.model import TensorInfo

        self.t, self.path, self.metadata, self.config = tensors, path, {}, None
        self.bytes_read, self.bytes_total = 0, sum(v.numel() * v.element_size() for v in tensors.values())
        self._info = {k: TensorInfo(k, tuple(v.shape), str(v.dtype).removeprefix("torch.")) for k, v in
                      tensors.items()}

    def keys(self):
        return list(self.t)

    def info(self, key):
        return self._info[key]

    def get(self, key, dtype=torch.float64):
        return self.t[key].to(dtype) if dtype is not None else self.t[key]


def _sd(m: nn.Module, prefix: str = "l.0.") -> dict[str, torch.Tensor]:
    return {prefix + k: v.detach().clone() for k, v in m.state_dict().items()}


@pytest.mark.parametrize(
    "mutate, match",
    [
        (lambda sd: sd.update({"l.0.static_alpha": torch.zeros(4, 4)}), "K > s f"),
        (lambda sd: sd.update({"l.0.norm.gamma": torch.zeros(7)}), "norm.gamma"),
        (lambda sd: sd.pop("l.0.residual_scale"), "missing residual_scale"),
        (lambda sd: sd.update({"l.0.mystery_gate": torch.zeros(3)}), "unexpected tensors mystery_gate"),
        (lambda sd: sd.update({"l.0.static_beta": torch.zeros(5)}), "static_beta"),
    ],
)
def test_hostile_groups_are_refused(mutate, match) -> None:
    sd = _sd(MHC(4, dim=8, layer_index=0))
    mutate(sd)
    src = DictSource(sd)
    assert LUCIDRAINS.detect(src) is None
    with pytest.raises(InputError, match=match):
        LUCIDRAINS.load(src, LoadOptions())


def test_nan_is_refused() -> None:
    sd = _sd(MHC(4, dim=8, layer_index=0))
    sd["l.0.dynamic_alpha_fn"][0, 0, 0] = float("nan")
    with pytest.raises(InputError, match="NaN"):
        LUCIDRAINS.load(DictSource(sd), LoadOptions())


def test_nanogpt_shapes_are_not_lucidrains() -> None:
    """The reference repos' mHC stores static_alpha [n, 1+n] too, but dynamic_alpha_fn [nC, n(n+1)]."""
    n, C = 4, 8
    sd = {"transformer.h.0.hc_attn.static_alpha": torch.zeros(n, n + 1),
          "transformer.h.0.hc_attn.dynamic_alpha_fn": torch.zeros(n * C, n * (n + 1)),
          "transformer.h.0.hc_attn.norm.gamma": torch.zeros(n * C),
          "transformer.h.0.hc_attn.pre_branch_scale": torch.zeros(1),
          "transformer.h.0.hc_attn.residual_scale": torch.zeros(1)}
    assert LUCIDRAINS.detect(DictSource(sd)) is None


def test_mutated_state_dicts_fail_cleanly() -> None:
    """Near-valid hostile files (a dim changed, a key dropped, a dim added or removed): both reference layouts
    either build finite sites or raise InputError, and detect() claims exactly the files load() accepts."""
    import random

    from test_io_nanogpt import CASES as REF_CASES
    from test_io_nanogpt import RefPort

    rng = random.Random(1)
    bases = [{k: v.detach() for k, v in make().state_dict().items()} for make in CASES.values()]
    for cfg in REF_CASES.values():
        cfg = dict(cfg)
        ref = RefPort(cfg.pop("variant"), cfg.pop("n"), 8, **cfg)
        bases.append({k: v.detach() for k, v in ref.state_dict().items()})
    accepted = 0
    for _ in range(250):
        sd = dict(rng.choice(bases))
        for _ in range(rng.choice([1, 1, 2])):
            k = rng.choice(list(sd))
            op, shape = rng.random(), list(sd[k].shape)
            if op < 0.2:
                sd.pop(k)
                continue
            if op < 0.6 and shape:
                i = rng.randrange(len(shape))
                shape[i] = max(0, shape[i] + rng.choice([-2, -1, 1, 2, shape[i]]))
            elif op < 0.8:
                shape.append(rng.choice([1, 2]))
            else:
                shape = shape[:-1]
            sd[k] = torch.randn(shape)
        src = DictSource({"l.0." + k: v for k, v in sd.items()})
        for layout in (LUCIDRAINS, NANOGPT):
            claimed = layout.detect(src) is not None
            try:
                model = layout.load(src, LoadOptions())
            except InputError:
                assert not claimed, layout.name
                continue
            assert claimed, layout.name
            accepted += 1
            with torch.no_grad():
                out = model.sites[0].module(torch.randn(3, model.n, model.C, dtype=torch.float64))
            assert out.res.shape == (3, model.n, model.n) and bool(torch.isfinite(out.res).all())
    assert accepted > 20  # the mutations keep some files valid, so both branches are exercised


@pytest.mark.parametrize("n, C", [(4, 2560), (4, 2048), (8, 4096)])
def test_hc_parameter_count_is_spec_dhc_plus_norm(n: int, C: int) -> None:
    """SPEC section 5: DHC (HC Eq. 25) = C(n+2) + n(n+2) + 2; lucidrains' HC adds its RMSNorm gain (C)."""
    m = HyperConnections(n, dim=C, layer_index=0)
    _, site = site_for(m, dtype=torch.float32)
    assert sum(p.numel() for p in site.parameters()) == sum(p.numel() for p in m.parameters())
    assert sum(p.numel() for p in site.parameters()) == C * (n + 2) + n * (n + 2) + 2 + C

"""hcdiag.probes: the stream inputs x that dynamic H_res matrices are evaluated on."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from cli_runner import run_cli

from hcdiag import registry
from hcdiag.enums import DType, Exactness, Probe
from hcdiag.errors import UsageError
from hcdiag.model import Site
from hcdiag.probes import ActivationsProbe, RandomProbe, StaticProbe, make_probe, torch_dtype

N, C = 4, 16


def _site(variant: str = "mhc", index: int = 0, n: int = N, c: int = C) -> Site:
    m = registry.get(variant).build(n, c, layer_index=index, dtype=torch.float64)
    return Site(index, f"s{index}", index // 2, "attn", variant, m)


@pytest.mark.parametrize("variant", list(registry.names()))
def test_static_probe_is_finite_for_every_variant(variant: str) -> None:
    # RMSNorm(0) = 0 * rsqrt(0 + eps): must not be NaN; the logits are then the biases alone
    site = _site(variant, index=1)
    with torch.no_grad():
        for p in site.module.parameters():  # non-trivial parameters everywhere
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(0), dtype=p.dtype) * 0.3)
    x = make_probe("static").inputs(site, DType.FLOAT64)
    assert x.shape == (1, N, C) and bool((x == 0).all())
    out = site.module(x)
    for t in out:
        assert bool(torch.isfinite(t).all()), variant
    logits = site.module.res_logits(x)
    if logits is not None:
        assert bool(torch.isfinite(logits).all())
    if site.module.exactness is Exactness.SINKHORN:
        torch.testing.assert_close(logits[0], site.module.b_res.detach(), rtol=0, atol=0)


def test_random_probe_deterministic_and_seeded_per_site() -> None:
    p = make_probe(Probe.RANDOM, tokens=512, seed=7)
    assert isinstance(p, RandomProbe) and p.tokens == 512
    a, b = _site(index=0), _site(index=1)
    x0 = p.inputs(a, DType.FLOAT64)
    assert x0.shape == (512, N, C) and x0.dtype == torch.float64
    torch.testing.assert_close(x0, make_probe("random", tokens=512, seed=7).inputs(a), rtol=0, atol=0)
    assert not torch.equal(x0, p.inputs(b))  # sites see independent draws
    assert not torch.equal(x0, make_probe("random", tokens=512, seed=8).inputs(a))
    # the same tokens in every dtype: float32 is the float64 draw rounded
    x32 = p.inputs(a, "float32")
    assert x32.dtype == torch.float32 and torch.equal(x32, x0.float())
    assert p.inputs(a, torch.bfloat16).dtype == torch.bfloat16
    # fewer tokens: a prefix of the same stream (numpy PCG64 fills in order)
    torch.testing.assert_close(make_probe("random", tokens=10, seed=7).inputs(a), x0[:10], rtol=0, atol=0)
    # independent oracle: numpy's Generator with the documented seeding
    ref = np.random.Generator(np.random.PCG64(np.random.SeedSequence([7, 0]))).standard_normal((512, N, C))
    np.testing.assert_array_equal(x0.numpy(), ref)


def test_random_probe_statistics() -> None:
    x = make_probe("random", tokens=2048, seed=0).inputs(_site()).numpy().ravel()
    # N(0, 1): mean 0 +- 4 sigma/sqrt(n), variance 1, kurtosis 3
    assert abs(x.mean()) < 4 / np.sqrt(x.size)
    assert x.var() == pytest.approx(1.0, abs=0.02)
    assert ((x - x.mean()) ** 4).mean() / x.var() ** 2 == pytest.approx(3.0, abs=0.1)
    t = make_probe("random", tokens=2048, seed=0, df=5).inputs(_site()).numpy().ravel()
    # Student-t(5): variance 5/3, excess kurtosis 6 (heavier tails than the Gaussian)
    assert t.var() == pytest.approx(5 / 3, rel=0.08)
    assert ((t - t.mean()) ** 4).mean() / t.var() ** 2 > 5.0


def test_rmsnorm_removes_scale() -> None:
    # why N(0, 1) is enough: the logits depend on x only through RMSNorm(vec(x)), which ignores the scale
    site = _site("mhc")
    with torch.no_grad():
        site.module.phi_res.normal_(generator=torch.Generator().manual_seed(1))
        site.module.a_res.fill_(1.0)
    x = make_probe("random", tokens=32, seed=2).inputs(site)
    with torch.no_grad():
        l1 = site.module.res_logits(x)
        l2 = site.module.res_logits(37.0 * x)
    # equal up to the norm's eps = 1e-6 next to mean(x^2) ~ 1: a relative change of about 5e-7
    dyn = (l1 - site.module.b_res.detach()).abs().max()
    assert float((l1 - l2).abs().max()) <= 1e-6 * float(dyn)
    # and the normalised input has unit RMS per token, like a real RMS-normalised residual
    with torch.no_grad():
        h = site.module._normed(x)
    torch.testing.assert_close(h.square().mean(-1), torch.ones(32, dtype=h.dtype), rtol=1e-5, atol=1e-5)


def test_static_probe_describe_and_dict() -> None:
    p = make_probe("static")
    assert isinstance(p, StaticProbe) and p.tokens == 1 and p.kind is Probe.STATIC
    assert p.to_dict() == {"kind": "static", "tokens": 1}
    assert "x = 0" in p.describe()
    assert make_probe("random", tokens=3, seed=1).to_dict()["distribution"] == "normal"


@pytest.mark.parametrize(
    ("kwargs", "option"),
    [
        ({"kind": "random", "tokens": 0}, "--tokens"),
        ({"kind": "random", "tokens": -5}, "--tokens"),
        ({"kind": "random", "tokens": 2.5}, "--tokens"),
        ({"kind": "random", "tokens": 4, "df": 0}, "--df"),
        ({"kind": "bogus"}, "--probe"),
        ({"kind": "activations"}, "--activations"),
        ({"kind": "activations", "activations": "/nonexistent/acts.safetensors"}, "--activations"),
    ],
)
def test_make_probe_usage_errors(kwargs: dict, option: str) -> None:
    kind = kwargs.pop("kind")
    with pytest.raises(UsageError) as ei:
        make_probe(kind, **kwargs)
    assert ei.value.option == option
    assert "\n" not in str(ei.value)


def test_torch_dtype() -> None:
    assert torch_dtype(DType.FLOAT32) is torch.float32
    assert torch_dtype("bfloat16") is torch.bfloat16
    assert torch_dtype(torch.float64) is torch.float64
    with pytest.raises(UsageError):
        torch_dtype("float16")


# ---- activations (hcdiag.capture's file format: sites.{i}.x [T, n, C], sites.{i}.h_res [T, n, n]) ----


def _write_acts(path: Path, sites: list[Site], T: int = 5, drop_last: bool = False) -> list[torch.Tensor]:
    """Record x and H_res of each site with hcdiag.capture (one forward call per site, depth order)."""
    from hcdiag.capture import capture

    g = torch.Generator().manual_seed(3)
    used = sites[:-1] if drop_last else sites
    xs = [torch.randn(T, s.module.n, s.module.C, generator=g, dtype=torch.float64) for s in used]
    model = torch.nn.ModuleList([s.module for s in used])  # capture names them "0", "1", ...
    with capture(model, path), torch.no_grad():
        for m, x in zip(model, xs, strict=True):
            m(x)
    return [x.float() for x in xs]


def test_activations_probe(tmp_path: Path) -> None:
    pytest.importorskip("hcdiag.capture")
    sites = [_site("mhc", index=i) for i in range(3)]
    path = tmp_path / "acts.safetensors"
    xs = _write_acts(path, sites)
    p = make_probe("activations", activations=path)
    assert isinstance(p, ActivationsProbe)
    p.prepare(sites)
    assert p.tokens == 5
    for s, x in zip(sites, xs, strict=True):
        got = p.inputs(s, DType.FLOAT64)
        assert got.dtype == torch.float64 and torch.equal(got, x.double())
        assert p.recorded_h_res(s).shape == (5, N, N)

    from hcdiag.model import LoadedModel
    from hcdiag.stochasticity import analyze_stochasticity

    model = LoadedModel(str(path), "test", "", sites, N, C)
    r = analyze_stochasticity(model, probe=p)
    assert r.probe["kind"] == "activations" and all(s.tokens == 5 for s in r.sites)
    assert max(s.recorded_diff for s in r.sites) < 1e-6  # recorded in float32

    # matched by name when every model site name is in the file ("0", "1", "2" here), whatever the order
    renamed = [Site(s.index, str(2 - s.index), 0, "attn", s.variant, sites[2 - s.index].module) for s in sites]
    q = make_probe("activations", activations=path)
    q.prepare(renamed)
    assert torch.equal(q.inputs(renamed[0]), xs[2].double())


def test_activations_probe_count_mismatch(tmp_path: Path) -> None:
    pytest.importorskip("hcdiag.capture")
    sites = [_site("mhc", index=i) for i in range(3)]
    path = tmp_path / "acts.safetensors"
    _write_acts(path, sites, drop_last=True)
    p = make_probe("activations", activations=path)
    with pytest.raises(UsageError, match="2 sites but the model has 3") as ei:
        p.prepare(sites)
    assert ei.value.option == "--activations"


def test_random_probe_refuses_tokens_that_do_not_fit(monkeypatch: pytest.MonkeyPatch) -> None:
    # the bound is the closed form T (3 * 8 nC + sites * 2 * 8 n^2): inputs of the widest site (draw, cast,
    # RMSNorm-ed copy) plus each site's kept float64 logits and H_res
    import hcdiag.probes as probes

    sites = [_site("mhc", 0), _site("mhc", 1), _site("mhc", 2, n=2, c=40)]
    per_token = 3 * 8 * max(N * C, 2 * 40) + 2 * 8 * (N * N + N * N + 2 * 2)
    assert probes.random_probe_bytes(7, sites) == 7 * per_token
    have = 1000 * per_token + per_token // 2
    monkeypatch.setattr(probes, "physical_memory_bytes", lambda: have)
    RandomProbe(tokens=1000).prepare(sites)  # fits: nothing raised
    with pytest.raises(UsageError, match=r"--tokens 1001 needs .* use --tokens 1000 or fewer") as exc:
        RandomProbe(tokens=1001).prepare(sites)
    assert exc.value.option == "--tokens"


def test_cli_refuses_tokens_that_do_not_fit_before_allocating() -> None:
    # 10^12 tokens of [n, C] float64 would be petabytes: refused in one line, exit 2, before any draw
    sample = Path(__file__).resolve().parent.parent / "samples" / "mhc.safetensors"
    res = run_cli("stochasticity", str(sample), "--probe", "random", "--tokens", str(10**12))
    assert res.returncode == 2, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "--tokens 1000000000000 needs" in lines[0] and "or fewer" in lines[0], lines

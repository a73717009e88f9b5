"""tokenbender's mHC (github.com/tokenbender/mHC-manifold-constrained-hyper-connections) against a port.

The repository is not on PyPI, so the oracle is a minimal port of its two mHC modules, written from the source
(``hyper_connections/hyper_connections.py`` at 6e05eb3: ``HyperConnections(mhc=True)``; and
``hyper_connections/hyper_connections_mhc.py`` at f4d7acb: with ``mhc_residual_identity_mix``). The port keeps
the library's parameter names (so its state dict is a checkpoint of the library), its ``sinkhorn_log`` (u / v
log-domain iterations of logits / tau, with -log n marginals times n in the first file and 0 marginals in the
second), and its width connection: residuals_out[t] = sum_s h_res[s, t] x[s].
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from brute_gain import stack_gains
from cli_runner import run_cli
from safetensors.torch import save_file
from torch import nn

TOL = 1e-6


def sinkhorn_log(logits: torch.Tensor, num_iters: int = 10, tau: float = 0.05, *, log_n: bool = True):
    """Port of the repository's sinkhorn_log (log_n: hyper_connections.py's -log n marginals, times n)."""
    n = logits.shape[-1]
    Z = logits / tau
    m = -math.log(n) if log_n else 0.0
    log_marginal = torch.full((n,), m, dtype=logits.dtype)
    u = torch.zeros(n, dtype=Z.dtype)
    v = torch.zeros(n, dtype=Z.dtype)
    for _ in range(num_iters):
        u = log_marginal - torch.logsumexp(Z + v.unsqueeze(0), dim=1)
        v = log_marginal - torch.logsumexp(Z + u.unsqueeze(1), dim=0)
    return torch.exp(Z + u.unsqueeze(1) + v.unsqueeze(0)) * (n if log_n else 1)


class TokenbenderMHC(nn.Module):
    """Port of the mHC path of the repository's HyperConnections (parameter names and maths as there)."""

    def __init__(self, n: int, dim: int, layer_index: int, *, version: str = "mhc", iters: int = 10,
                 tau: float = 0.05, identity_mix: bool = False, alpha: float = 0.01) -> None:
        super().__init__()
        self.n, self.iters, self.tau, self.version = n, iters, tau, version
        init = torch.full((n, n), -8.0)
        init.fill_diagonal_(0.0)
        self.H_res_logits = nn.Parameter(init)
        views = (n,) if version == "mhc" else (1, n)
        pre = torch.full(views, -8.0)
        pre[..., layer_index % n] = 0.0
        self.H_pre_logits = nn.Parameter(pre)
        self.H_post_logits = nn.Parameter(torch.zeros(views))
        if identity_mix:
            a = max(1e-4, min(1 - 1e-4, alpha))
            self.H_res_alpha_logit = nn.Parameter(torch.tensor(math.log(a / (1 - a))))
        else:
            self.H_res_alpha_logit = None
        if version == "mhc":  # HyperConnections(mhc=True) still creates the lucidrains HC tensors, unused
            self.static_alpha = nn.Parameter(torch.zeros(n, n + 1))
            self.dynamic_alpha_fn = nn.Parameter(torch.zeros(dim, n + 1))
            self.dynamic_alpha_scale = nn.Parameter(torch.ones(()) * 1e-2)
            self.static_beta = nn.Parameter(torch.ones(n))
            self.dynamic_beta_fn = nn.Parameter(torch.zeros(dim))
            self.dynamic_beta_scale = nn.Parameter(torch.ones(()) * 1e-2)
            self.norm = nn.Module()
            self.norm.gamma = nn.Parameter(torch.zeros(dim))

    def h_res(self) -> torch.Tensor:
        """The h_res [input s, output t] the width connection mixes with."""
        S = sinkhorn_log(self.H_res_logits, self.iters, self.tau, log_n=self.version == "mhc")
        if self.H_res_alpha_logit is None:
            return S
        a = torch.sigmoid(self.H_res_alpha_logit)
        return (1 - a) * torch.eye(self.n, dtype=S.dtype) + a * S

    def width_connection(self, residuals: torch.Tensor):
        """The library's width connection on residuals [(b s), ..., d]: (branch input [b, ..., d], residuals out
        [(b s), ..., d], {"beta": H_post})."""
        s = self.n
        x = residuals.reshape(-1, s, *residuals.shape[1:]).movedim(1, -2)  # (b s) ... d -> b ... s d
        mixed = torch.einsum("st,...sd->...td", self.h_res(), x)
        h_pre = self.H_pre_logits.softmax(dim=-1).reshape(self.n)
        branch = torch.einsum("s,...sd->...d", h_pre, x)
        out = mixed.movedim(-2, 1).reshape(residuals.shape)  # b ... s d -> (b s) ... d
        return branch, out, {"beta": self.H_post_logits.softmax(dim=-1)}

    def paper(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(H_pre, H_post, H_res) in paper convention for T = x.shape[0] tokens, read off the width connection
        on the standard basis: batch b holds the streams e_b (d = 1), so residuals out[b, t] = h_res[b, t]."""
        n = self.n
        branch, out, extra = self.width_connection(torch.eye(n, dtype=x.dtype).reshape(n * n, 1))
        pre, H = branch[:, 0], out.reshape(n, n).T  # column b of H is the image of e_b
        T = x.shape[0]
        return pre.expand(T, -1), extra["beta"].reshape(n).expand(T, -1), H.expand(T, -1, -1)


def build(n: int = 4, C: int = 8, blocks: int = 2, *, version: str = "mhc", identity_mix: bool = False,
          perturb: float = 0.0, seed: int = 0) -> tuple[dict[str, torch.Tensor], list[TokenbenderMHC]]:
    """A nanoGPT-shaped state dict: transformer.h.N.hc_attn / hc_mlp, in float64 modules."""
    g = torch.Generator().manual_seed(seed)
    mods = []
    sd = {}
    for b in range(blocks):
        for kind in ("attn", "mlp"):
            m = TokenbenderMHC(n, C, len(mods), version=version, identity_mix=identity_mix).double()
            with torch.no_grad():
                for p in (m.H_res_logits, m.H_pre_logits, m.H_post_logits):
                    p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * perturb)
            mods.append(m)
            for k, v in m.state_dict().items():
                sd[f"transformer.h.{b}.hc_{kind}.{k}"] = v.float().contiguous()
    for m in mods:  # the oracle runs on what the file stores
        m.load_state_dict({k: v.double() for k, v in m.state_dict().items()})
        with torch.no_grad():
            for p in m.parameters():
                p.copy_(p.float().double())
    return sd, mods


@pytest.fixture
def ckpt(tmp_path):
    sd, mods = build(perturb=1.5, seed=3)
    path = tmp_path / "tb.safetensors"
    save_file(sd, str(path))
    return path, mods


def _errs(H: np.ndarray) -> tuple[float, float]:
    return float(np.abs(H.sum(-1) - 1).max()), float(np.abs(H.sum(-2) - 1).max())


@pytest.mark.parametrize("version, mix", [("mhc", False), ("mhc_v1", True), ("mhc_v1", False)])
def test_every_site_matches_the_port(tmp_path, version: str, mix: bool) -> None:
    from hcdiag.io.load import load

    sd, mods = build(version=version, identity_mix=mix, perturb=1.0, seed=5)
    path = tmp_path / "tb.safetensors"
    save_file(sd, str(path))
    model = load(path)
    assert model.layout == "tokenbender" and len(model.sites) == 4 and model.n == 4
    x = torch.randn(3, 4, model.C, dtype=torch.float64)
    for site, ref in zip(model.sites, mods, strict=True):
        with torch.no_grad():
            pre, post, res = site.module.in_dtype(torch.float64)(x)
            rpre, rpost, rres = ref.paper(x)
        assert torch.allclose(res, rres, atol=1e-12, rtol=0), (site.name, (res - rres).abs().max())
        assert torch.allclose(pre, rpre, atol=1e-12) and torch.allclose(post, rpost, atol=1e-12)


def test_stochasticity_json_matches_the_port(ckpt) -> None:
    path, mods = ckpt
    p = run_cli("stochasticity", path, "--json")
    assert p.returncode == 0, p.stderr
    doc = json.loads(p.stdout)
    assert doc["layout"] == "tokenbender"
    x = torch.zeros(1, 4, 8, dtype=torch.float64)
    heat = {h["index"]: np.array(h["matrix"]) for h in doc["heatmaps"]}
    for row, ref in zip(doc["sites"], mods, strict=True):
        pre, post, H = (t.detach().numpy() for t in ref.paper(x))
        r, c = _errs(H[0])
        assert abs(row["row_err_max"] - r) <= TOL and abs(row["col_err_max"] - c) <= TOL
        np.testing.assert_allclose(row["h_pre_mean"], pre[0], atol=TOL)
        np.testing.assert_allclose(row["h_post_mean"], post[0], atol=TOL)
        np.testing.assert_allclose(row["row_sums_of_mean"], H[0].sum(-1), atol=TOL)
        if row["index"] in heat:
            np.testing.assert_allclose(heat[row["index"]], H[0], atol=TOL)
        assert row["iters"] == 10 and row["convention"] == "paper"
        # the tempered logits: range of H_res_logits / 0.05
        L = ref.H_res_logits.detach().numpy() / 0.05
        assert abs(row["logit_range_max"] - (L.max() - L.min())) <= 1e-6 * max(1.0, L.max() - L.min())


def test_gain_sweep_from_equals_the_brute_force_product(ckpt) -> None:
    path, mods = ckpt
    p = run_cli("gain-sweep", "--from", path, "--json")
    assert p.returncode == 0, p.stderr
    curves = json.loads(p.stdout)["variants"][0]["curves"]
    x = torch.zeros(1, 4, 8, dtype=torch.float64)
    fwd, bwd = stack_gains([ref.paper(x)[2][0].detach().numpy() for ref in mods])
    np.testing.assert_allclose(curves["gain_fwd"]["median"], fwd, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(curves["gain_bwd"]["median"], bwd, rtol=1e-9, atol=1e-9)


def test_default_tau_reports_the_logit_range_and_the_collapse(tmp_path) -> None:
    """At init (0 on the diagonal, -8 off it) and tau = 0.05 the logits span 160: the advice says so, and that
    Sinkhorn returns near-permutations (here: the identity, as tokenbender's users report)."""
    sd, mods = build(perturb=0.0)
    path = tmp_path / "tb_init.safetensors"
    save_file(sd, str(path))
    p = run_cli("stochasticity", path, "--json")
    assert p.returncode == 0, p.stderr
    doc = json.loads(p.stdout)
    H = mods[0].paper(torch.zeros(1, 4, 8, dtype=torch.float64))[2][0].detach().numpy()
    assert np.abs(H - np.eye(4)).max() < 1e-60  # the port's own H_res: the identity to far below rounding
    assert all(abs(r["logit_range_max"] - 160.0) < 1e-9 for r in doc["sites"])
    advice = " ".join(doc["summary"]["advice"])
    assert "logit range up to 160" in advice and "near-permutation" in advice, advice
    assert "H_res_logits" in advice  # names the checkpoint's own tensor
    # a larger temperature is a usage of --temperature: the logit range shrinks by the same factor
    p = run_cli("stochasticity", path, "--json", "--temperature", "1.0")
    assert p.returncode == 0, p.stderr
    doc = json.loads(p.stdout)
    assert all(abs(r["logit_range_max"] - 8.0) < 1e-9 for r in doc["sites"])


def test_bad_shapes_are_refused_with_the_tensor_named(tmp_path) -> None:
    sd, _ = build()
    sd["transformer.h.0.hc_attn.H_pre_logits"] = torch.zeros(5)
    path = tmp_path / "bad.safetensors"
    save_file(sd, str(path))
    p = run_cli("stochasticity", path, "--layout", "tokenbender")
    assert p.returncode == 3, p.stderr
    assert "H_pre_logits" in p.stderr and "Traceback" not in p.stderr


_LAYOUT_TOML = """
version = 1
name = "tokenbender-by-hand"
n = 4

[sites]
pattern = '^transformer\\.h\\.(?P<block>\\d+)\\.hc_(?P<kind>attn|mlp)\\.'
kinds = { mlp = "ffn" }

[bias]
res = "H_res_logits"
pre = "H_pre_logits"
post = "H_post_logits"

[pre]
activation = "softmax"

[post]
activation = "softmax"

[res]
orientation = "code"
constraint = "sinkhorn"

[sinkhorn]
convention = "paper"
iters = 10
temperature = 0.05
"""


def test_a_layout_file_states_the_temperature(ckpt, tmp_path) -> None:
    """Issue 15 item 2: temperature in layout files. The tokenbender checkpoint described by a layout file with
    [sinkhorn] temperature = 0.05 gives the port's H_res; --temperature overrides the file."""
    from hcdiag.io.base import LoadOptions
    from hcdiag.io.load import load

    path, mods = ckpt
    lay = tmp_path / "tb.toml"
    lay.write_text(_LAYOUT_TOML)
    model = load(path, options=LoadOptions(layout_file=str(lay)))
    assert model.settings_source["temperature"] == "layout file ([sinkhorn] temperature)"
    x = torch.zeros(1, 4, model.C, dtype=torch.float64)
    for site, ref in zip(model.sites, mods, strict=True):
        _, _, res = site.module.in_dtype(torch.float64)(x)
        assert (res - ref.paper(x)[2]).abs().max() < 1e-12, site.name
    p = run_cli("stochasticity", path, "--layout-file", lay, "--json", "--temperature", "1.0")
    assert p.returncode == 0, p.stderr
    rows = json.loads(p.stdout)["sites"]
    for row, ref in zip(rows, mods, strict=True):
        L = ref.H_res_logits.detach().numpy()
        assert abs(row["logit_range_max"] - (L.max() - L.min())) < 1e-9  # tau = 1: the stored range


@pytest.mark.parametrize("with_layout_file", [False, True])
def test_a_zero_temperature_is_refused(ckpt, tmp_path, with_layout_file: bool) -> None:
    """--temperature 0 divides the logits by zero: refused with exit 2 by the tokenbender reader and by a layout
    file alike (the layout file's reader took it unchecked)."""
    path, _ = ckpt
    lay = tmp_path / "tb.toml"
    lay.write_text(_LAYOUT_TOML)
    extra = ("--layout-file", lay) if with_layout_file else ()
    p = run_cli("stochasticity", path, *extra, "--temperature", "0")
    assert p.returncode == 2, p.stderr
    assert "--temperature must be a positive number" in p.stderr and "Traceback" not in p.stderr


def test_capture_records_the_ports_h_res_and_stochasticity_agrees(ckpt, tmp_path) -> None:
    """capture() finds the module by its H_res_logits and width_connection (before the lucidrains check: the
    fork's HyperConnections(mhc=True) also holds static_alpha), records x and H_res; the checkpoint analysed
    on those activations reproduces them within float32 rounding."""
    from hcdiag.capture import capture, read_activations

    path, mods = ckpt
    net = nn.ModuleList(mods)
    acts = tmp_path / "acts.safetensors"
    xs = [torch.randn(2 * 4, 3, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(i)) for i in range(4)]
    with capture(net, acts), torch.no_grad():
        for m, r in zip(mods, xs, strict=True):
            m.width_connection(r)  # residuals [(b s), T, d], b = 2
    sites = read_activations(acts)
    assert len(sites) == 4
    for site, ref in zip(sites, mods, strict=True):
        H = ref.paper(site.x.double())[2]
        assert (site.h_res.double() - H).abs().max() < 1e-6
        assert site.h_post is not None and site.h_pre is not None
    p = run_cli("stochasticity", path, "--json", "--probe", "activations", "--activations", acts)
    assert p.returncode == 0, p.stderr
    doc = json.loads(p.stdout)
    assert all(r["recorded_diff"] <= r["recorded_tol"] for r in doc["sites"])


@pytest.mark.parametrize("fmt", ["pt-model-args", "safetensors-metadata"])
@pytest.mark.parametrize("proj, code", [("orthostochastic", 3), ("sinkhorn", 0)])
def test_a_stated_orthostochastic_projection_is_refused_by_name(tmp_path, fmt: str, proj: str, code: int) -> None:
    """tokenbender's mhc_h_res_proj is not in the state dict; where the checkpoint states it (a nanoGPT-style
    model_args, or safetensors metadata) and it is not Sinkhorn, hcdiag refuses rather than report a Sinkhorn."""
    sd, _ = build(perturb=0.5, seed=1)
    if fmt == "pt-model-args":
        path = tmp_path / "ckpt.pt"
        torch.save({"model": sd, "model_args": {"mhc_h_res_proj": proj, "n_layer": 2}, "iter_num": 3}, path)
    else:
        path = tmp_path / "ckpt.safetensors"
        save_file(sd, str(path), metadata={"mhc_h_res_proj": proj})
    p = run_cli("stochasticity", path)
    assert p.returncode == code, p.stderr
    if code:
        assert len(p.stderr.strip().splitlines()) == 1
        assert f"mhc_h_res_proj='{proj}'" in p.stderr and "Newton-Schulz" in p.stderr


def test_the_orthostochastic_option_is_a_usage_error(ckpt) -> None:
    from hcdiag.errors import UsageError
    from hcdiag.io.base import LoadOptions
    from hcdiag.io.load import load

    path, _ = ckpt
    with pytest.raises(UsageError, match="Newton-Schulz"):
        load(path, options=LoadOptions(extra={"tokenbender_proj": "orthostochastic"}))

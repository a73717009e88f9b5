"""mhc-pytorch (PyPI ``mhc-pytorch==0.2.3``, ``mhc/hyper_connection.py``) against a port of its module.

The package requires Python >= 3.12 (this environment runs 3.11: ``pip install mhc-pytorch==0.2.3`` finds no
distribution), so the oracle is a minimal port written from the 0.2.3 source: ``ManifoldHyperConnections``
with its parameter names (its state dict is a checkpoint of the package) and ``apply_sinkhorn_knopp`` (exp,
then 20 x rows, columns). ``mappings(x_l)`` is the package's forward up to the maps, taking the n streams x_l
[..., n, dim] directly (the package itself builds them as n copies of its input).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from brute_gain import stack_gains
from cli_runner import run_cli
from safetensors.torch import save_file
from torch import nn

TOL = 1e-6


def apply_sinkhorn_knopp(logits: torch.Tensor, iters: int = 20) -> torch.Tensor:
    probs = torch.exp(logits)
    for _ in range(iters):
        probs = probs / probs.sum(dim=-1, keepdim=True)
        probs = probs / probs.sum(dim=-2, keepdim=True)
    return probs


class ManifoldHyperConnections(nn.Module):
    """Port of mhc-pytorch 0.2.3's module (the block is an nn.Linear, as a user's would be)."""

    def __init__(self, dim: int, num_streams: int) -> None:
        super().__init__()
        self.num_streams, self.dim = num_streams, dim
        self.block = nn.Linear(dim, dim)
        d = num_streams * dim
        self.phi_pre = nn.Linear(d, num_streams)
        self.phi_post = nn.Linear(d, num_streams)
        self.phi_res = nn.Linear(d, num_streams * num_streams)
        self.alpha_pre = nn.Parameter(torch.ones(1))
        self.alpha_post = nn.Parameter(torch.ones(1))
        self.alpha_res = nn.Parameter(torch.ones(1))
        self.b_pre = nn.Parameter(torch.zeros(num_streams))
        self.b_post = nn.Parameter(torch.zeros(num_streams))
        self.b_res = nn.Parameter(torch.zeros(num_streams, num_streams))
        self.norm = nn.RMSNorm(dim)

    def mappings(self, x_l: torch.Tensor, eps: float | None = None):
        """x_l [..., n, dim] -> h_pre, h_post [..., n], h_res [..., n, n] (the package's forward).
        eps: F.rms_norm's (None = torch's default, finfo(dtype).eps)."""
        n = self.num_streams
        x_vec = x_l.reshape(*x_l.shape[:-2], n * self.dim)
        x_vec_norm = F.rms_norm(x_vec, (n * self.dim,), eps=eps)
        h_pre = torch.sigmoid(self.alpha_pre * self.phi_pre(x_vec_norm) + self.b_pre)
        h_post = 2 * torch.sigmoid(self.alpha_post * self.phi_post(x_vec_norm) + self.b_post)
        h_res = apply_sinkhorn_knopp(
            self.alpha_res * self.phi_res(x_vec_norm).view(*x_l.shape[:-2], n, n) + self.b_res
        )
        return h_pre, h_post, h_res


def package_forward(self, x: torch.Tensor) -> torch.Tensor:
    """The package's forward (0.2.3): expand x [bs, seq, dim] into n copies, mix, collapse by mean."""
    bs, seq_len, dim = x.shape
    x_l = x.unsqueeze(dim=2).expand(bs, seq_len, self.num_streams, dim)
    h_pre, h_post, h_res = self.mappings(x_l)
    block_input = torch.sum(x_l * h_pre.unsqueeze(-1), dim=2)
    out_streams = torch.matmul(h_res, x_l) + h_post.unsqueeze(-1) * self.block(block_input).unsqueeze(2)
    return out_streams.mean(dim=2)


ManifoldHyperConnections.forward = package_forward


def build(n: int = 4, C: int = 8, blocks: int = 2, seed: int = 0, scale: float = 3.0):
    """A state dict of 2 x blocks sites (layers.N.attn_mhc / mlp_mhc) with strong maps, and the float64 ports."""
    torch.manual_seed(seed)
    mods, sd = [], {}
    for b in range(blocks):
        for kind in ("attn", "mlp"):
            m = ManifoldHyperConnections(C, n)
            with torch.no_grad():
                m.phi_res.weight.mul_(scale)
                m.b_res.normal_(0.0, 4.0)  # strong enough that 20 passes leave a visible row error
                m.b_pre.normal_(0.0, 1.0)
                m.alpha_res.fill_(1.7)
            for k, v in m.state_dict().items():
                sd[f"layers.{b}.{kind}_mhc.{k}"] = v.detach().float().contiguous()
            mods.append(m.double().eval())
    return sd, mods


@pytest.fixture
def ckpt(tmp_path):
    sd, mods = build()
    path = tmp_path / "mhc_pytorch.safetensors"
    save_file(sd, str(path))
    return path, mods


def _eps() -> float:
    return torch.finfo(torch.float32).eps  # the stored dtype's: what the package computes with in float32


def test_every_site_matches_the_port(ckpt) -> None:
    from hcdiag.io.load import load

    path, mods = ckpt
    model = load(path)
    assert model.layout == "mhc-pytorch" and [s.name for s in model.sites] == ["attn_0", "ffn_0", "attn_1", "ffn_1"]
    x = torch.randn(5, 4, 8, dtype=torch.float64) * 2
    for site, ref in zip(model.sites, mods, strict=True):
        with torch.no_grad():
            pre, post, res = site.module.in_dtype(torch.float64)(x)
            rpre, rpost, rres = ref.mappings(x, eps=_eps())
        assert (res - rres).abs().max() < 1e-12, site.name
        assert (pre - rpre).abs().max() < 1e-12 and (post - rpost).abs().max() < 1e-12


@pytest.mark.parametrize("probe", ["static", "random"])
def test_stochasticity_json_matches_the_port(ckpt, probe: str) -> None:
    from hcdiag.probes import RandomProbe

    path, mods = ckpt
    args = ["stochasticity", path, "--json", "--probe", probe] + (["--tokens", "6"] if probe == "random" else [])
    p = run_cli(*args)
    assert p.returncode == 0, p.stderr
    doc = json.loads(p.stdout)
    for row, ref in zip(doc["sites"], mods, strict=True):
        if probe == "static":
            x = torch.zeros(1, 4, 8, dtype=torch.float64)
        else:
            x = torch.from_numpy(RandomProbe(tokens=6, seed=0).draw(row["index"], 4, 8))
        with torch.no_grad():
            pre, post, H = (t.numpy() for t in ref.mappings(x, eps=_eps()))
        assert abs(row["row_err_max"] - np.abs(H.sum(-1) - 1).max()) <= TOL
        assert abs(row["col_err_max"] - np.abs(H.sum(-2) - 1).max()) <= TOL
        assert row["col_err_max"] < 1e-12 < row["row_err_max"]  # the package's last pass: columns
        np.testing.assert_allclose(row["h_pre_mean"], pre.mean(0), atol=TOL)
        np.testing.assert_allclose(row["h_post_mean"], post.mean(0), atol=TOL)
        np.testing.assert_allclose(row["row_sums_of_mean"], H.mean(0).sum(-1), atol=TOL)


def test_paper_convention_moves_the_error_to_the_other_axis(ckpt) -> None:
    path, _ = ckpt
    p = run_cli("stochasticity", path, "--json", "--convention", "paper")
    assert p.returncode == 0, p.stderr
    rows = json.loads(p.stdout)["sites"]
    assert all(r["row_err_max"] < 1e-12 < r["col_err_max"] for r in rows)


def test_gain_sweep_from_equals_the_brute_force_product(ckpt) -> None:
    path, mods = ckpt
    p = run_cli("gain-sweep", "--from", path, "--json")
    assert p.returncode == 0, p.stderr
    doc = json.loads(p.stdout)
    curves = doc["variants"][0]["curves"]
    x = torch.zeros(1, 4, 8, dtype=torch.float64)
    Hs = [ref.mappings(x, eps=_eps())[2][0].detach().numpy() for ref in mods]
    fwd, bwd = stack_gains(Hs)
    np.testing.assert_allclose(curves["gain_fwd"]["median"], fwd, rtol=1e-9)
    np.testing.assert_allclose(curves["gain_bwd"]["median"], bwd, rtol=1e-9)
    assert any("do not persist across sites" in note for note in doc["notes"])


def test_missing_tensor_is_refused_by_name(tmp_path) -> None:
    sd, _ = build(blocks=1)
    del sd["layers.0.attn_mhc.phi_post.bias"]
    path = tmp_path / "bad.safetensors"
    save_file(sd, str(path))
    p = run_cli("inspect", path, "--layout", "mhc-pytorch")
    assert p.returncode == 3, p.stderr
    assert "phi_post.bias" in p.stderr and "Traceback" not in p.stderr


def test_capture_records_the_expanded_streams(ckpt, tmp_path) -> None:
    """capture() on the package's module: x = the n copies the forward builds, H_res recomputed from the live
    parameters; the checkpoint analysed on those activations agrees within float32 rounding."""
    from hcdiag.capture import capture, read_activations

    path, mods = ckpt
    net = nn.ModuleList([m.float() for m in mods])
    acts = tmp_path / "acts.safetensors"
    with capture(net, acts), torch.no_grad():
        for i, m in enumerate(net):
            m(torch.randn(2, 3, 8, generator=torch.Generator().manual_seed(i)))
    sites = read_activations(acts)
    assert len(sites) == 4 and all(s.x.shape == (6, 4, 8) for s in sites)
    for site, m in zip(sites, net, strict=True):
        assert torch.equal(site.x, site.x[:, :1].expand_as(site.x))  # n copies of the input
        with torch.no_grad():
            H = m.double().mappings(site.x.double(), eps=_eps())[2]
        assert (site.h_res.double() - H).abs().max() < 1e-6
    p = run_cli("stochasticity", path, "--json", "--probe", "activations", "--activations", acts)
    assert p.returncode == 0, p.stderr
    assert all(r["recorded_diff"] <= r["recorded_tol"] for r in json.loads(p.stdout)["sites"])

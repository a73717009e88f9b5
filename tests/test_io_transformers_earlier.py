"""The earlier transformers DeepSeek-V4 code (before 5.8.0, the first release with ``models/deepseek_v4``) against
a port of it.

Port source: ``DeepseekV4HyperConnection`` / ``DeepseekV4DecoderLayer`` of
``src/transformers/models/deepseek_v4/modular_deepseek_v4.py`` as stored in the search index (file id
53747464290; the commit cannot be pinned, the transformers history is too large to fetch). Facts the port keeps:

* parameters ``attn_hc.hc_fn [(n+2)n, nC]``, ``hc_base [(n+2)n]``, ``hc_scale [3]`` and ``mlp_hc.*`` (module
  names), ``hc_head.hc_{fn,base,scale}``;
* ``mixes = linear(flat, hc_fn) * rsqrt(mean(flat^2) + rms_norm_eps)``;
* ``pre = sigmoid(.) + hc_eps``, ``post = sigmoid(.) + hc_eps`` (no factor 2), ``comb = sigmoid(.) + hc_eps``,
  then ``hc_sinkhorn_iters`` x (``comb /= comb.sum(-1) + eps``; ``comb /= comb.sum(-2) + eps``);
* the layer applies ``torch.matmul(comb, residual)``: output stream i = sum_j comb[i, j] x_j, so paper
  H_res = comb (not comb^T as in 5.8.0 and later) and its columns are the exact axis.

The 5.24 module (``tests/test_io_transformers.py``) differs in all three: softmax start, post = 2 sigmoid,
comb^T.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from cli_runner import run_cli
from safetensors.torch import save_file

from hcdiag.enums import Convention
from hcdiag.io import load

N, C, LAYERS = 4, 8, 2
ITERS, HC_EPS, RMS_EPS = 7, 1e-5, 1e-6


class EarlierDeepseekV4HC(torch.nn.Module):
    """Port of the earlier DeepseekV4HyperConnection (float64): x [..., n, C] -> (pre, post, comb)."""

    def __init__(self, fn: torch.Tensor, base: torch.Tensor, scale: torch.Tensor) -> None:
        super().__init__()
        self.hc_fn, self.hc_base, self.hc_scale = fn.double(), base.double(), scale.double()

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        hc = N
        flat = x.flatten(-2).double()
        rsqrt = torch.rsqrt(flat.square().mean(-1, keepdim=True) + RMS_EPS)
        mixes = F.linear(flat, self.hc_fn) * rsqrt
        pre_scale, post_scale, comb_scale = self.hc_scale.unbind(0)
        pre = torch.sigmoid(mixes[..., :hc] * pre_scale + self.hc_base[:hc]) + HC_EPS
        post = torch.sigmoid(mixes[..., hc:2 * hc] * post_scale + self.hc_base[hc:2 * hc]) + HC_EPS
        comb_logits = mixes[..., 2 * hc:].unflatten(-1, (hc, hc)) * comb_scale + self.hc_base[2 * hc:].view(hc, hc)
        comb = torch.sigmoid(comb_logits) + HC_EPS
        for _ in range(ITERS):
            comb = comb / (comb.sum(dim=-1, keepdim=True) + HC_EPS)
            comb = comb / (comb.sum(dim=-2, keepdim=True) + HC_EPS)
        return pre, post, comb

    def layer(self, x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
        """The decoder layer's update: post_k F + (comb @ residual)_k."""
        _, post, comb = self(x)
        return post.unsqueeze(-1) * f.unsqueeze(-2) + torch.matmul(comb, x.double())


def _weights(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    rows = (N + 2) * N
    return {"fn": torch.randn(rows, N * C, generator=g) * 0.3, "base": torch.randn(rows, generator=g),
            "scale": 1 + torch.rand(3, generator=g)}


def _checkpoint(root: Path, names: str) -> tuple[Path, list[EarlierDeepseekV4HC]]:
    """A model directory with the earlier module names (``names='module'``: layers.N.attn_hc.hc_fn) or the
    original release names (``'release'``: layers.N.hc_attn_fn), config.json of a 5.8.0 pre-release."""
    root.mkdir()
    tensors: dict[str, torch.Tensor] = {}
    ports = []
    for layer in range(LAYERS):
        for kind, mod in (("attn", "attn_hc"), ("ffn", "mlp_hc")):
            w = _weights(10 * layer + len(ports))
            ports.append(EarlierDeepseekV4HC(w["fn"], w["base"], w["scale"]))
            for part, t in w.items():
                module_key = f"model.layers.{layer}.{mod}.hc_{part}"
                key = module_key if names == "module" else f"layers.{layer}.hc_{kind}_{part}"
                tensors[key] = t.float().contiguous()
    save_file(tensors, str(root / "model.safetensors"))
    cfg = {"model_type": "deepseek_v4", "hc_mult": N, "hidden_size": C, "num_hidden_layers": LAYERS,
           "hc_sinkhorn_iters": ITERS, "hc_eps": HC_EPS, "rms_norm_eps": RMS_EPS, "transformers_version": "5.8.0.dev0"}
    (root / "config.json").write_text(json.dumps(cfg))
    return root, ports


@pytest.mark.parametrize("names", ["module", "release"])
def test_earlier_code_matrices_equal_the_port(tmp_path, names):
    root, ports = _checkpoint(tmp_path / "ckpt", names)
    model = load(root)
    assert [s.name for s in model.sites] == ["attn_0", "ffn_0", "attn_1", "ffn_1"]
    assert {s.module.sinkhorn.convention for s in model.sites} == {Convention.TRANSFORMERS_SIGMOID}
    g = torch.Generator().manual_seed(5)
    x = torch.randn(6, N, C, generator=g, dtype=torch.float64) * 2
    for site, port in zip(model.sites, ports, strict=True):
        with torch.no_grad():
            pre, post, comb = port(x)
            got = site.module.in_dtype(torch.float64)(x)
        assert float((got.res - comb).abs().max()) < 1e-12  # paper H_res = comb: the layer applies comb @ x
        assert float((got.post - post).abs().max()) < 1e-12  # sigmoid + eps, no factor 2
        assert float((got.pre - pre).abs().max()) < 1e-12
        # the update equation of the paper with hcdiag's matrices is the port's layer
        f = torch.randn(6, C, generator=g, dtype=torch.float64)
        update = got.res @ x + got.post.unsqueeze(-1) * f.unsqueeze(-2)
        assert float((update - port.layer(x, f)).abs().max()) < 1e-12
        # and comb^T (the 5.8.0+ orientation) would be visibly wrong here: the test can fail
        assert float((comb.transpose(-1, -2) - comb).abs().max()) > 1e-3


def test_stochasticity_reports_the_ports_errors_and_exact_axis(tmp_path):
    root, ports = _checkpoint(tmp_path / "ckpt", "module")
    p = run_cli("stochasticity", root, "--json")
    assert p.returncode == 0, p.stderr
    doc = json.loads(p.stdout)
    x0 = torch.zeros(1, N, C, dtype=torch.float64)  # the static probe
    for row, port in zip(doc["sites"], ports, strict=True):
        _, _, comb = port(x0)
        assert row["convention"] == "transformers-sigmoid"
        assert row["row_err_max"] == pytest.approx(float((comb.sum(-1) - 1).abs().max()), rel=1e-9, abs=1e-15)
        assert row["col_err_max"] == pytest.approx(float((comb.sum(-2) - 1).abs().max()), rel=1e-9, abs=1e-15)
        assert row["col_err_max"] < row["row_err_max"]  # the last pass sets the columns (to the eps floor)

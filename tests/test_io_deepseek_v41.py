"""DeepSeek-V4.1 (transformers main branch, ``models/deepseek_v41``) against a port of its decoder layer's mHC.

V4.1 is not in a transformers release (5.24 is installed here), so the oracle is a minimal port written from
``src/transformers/models/deepseek_v41/modular_deepseek_v41.py`` at 0a2080b: ``DeepseekV41DecoderLayer``'s raw
mHC parameters (``hc_attn_fn / base / scale``, ``hc_ffn_*``), ``hc_mixes`` (unweighted RMSNorm of the flattened
streams, one projection -> pre, post, comb; comb = softmax + eps, one column pass, then (iters - 1) x (rows,
columns)), ``hc_collapse`` and ``hc_expand`` (out_k = post_k x + sum_j comb[j, k] residual_j), and the model's
pairing (the pre of one site collapses the next branch; a one-hot stream-0 mix first; the last pre before the
norm). The checkpoint is written as ``save_pretrained`` writes one: ``model.`` prefix, config.json with the
settings under ``text_config`` (model_type deepseek_v41), and Engram tensors at ``engram_layer_ids``.
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


class DeepseekV41DecoderLayer(nn.Module):
    """Port of DeepseekV41DecoderLayer's mHC, same class name (branches: a fixed linear map, standing in for
    attention / MoE)."""

    def __init__(self, n: int, C: int, iters: int, hc_eps: float, rms_eps: float, g: torch.Generator) -> None:
        super().__init__()
        self.hc_mult, self.hc_sinkhorn_iters, self.hc_eps, self.rms_eps = n, iters, hc_eps, rms_eps
        mix = (2 + n) * n
        for site in ("attn", "ffn"):
            setattr(self, f"hc_{site}_fn", nn.Parameter(torch.randn(mix, n * C, generator=g) * 0.3))
            setattr(self, f"hc_{site}_base", nn.Parameter(torch.randn(mix, generator=g)))
            setattr(self, f"hc_{site}_scale", nn.Parameter(torch.randn(3, generator=g) * 1.5))
        self.attn = nn.Linear(C, C, bias=False)
        self.ffn = nn.Linear(C, C, bias=False)

    def hc_mixes(self, hidden_streams, fn, scale, base):
        hc = self.hc_mult
        x = hidden_streams.flatten(start_dim=2).float()
        flat = x * torch.rsqrt(x.float().square().mean(-1, keepdim=True) + self.rms_eps).to(x.dtype)
        mixes = F.linear(flat, fn.float())
        pre = torch.sigmoid(mixes[..., :hc] * scale[0].float() + base[:hc].float()) + self.hc_eps
        post = 2 * torch.sigmoid(mixes[..., hc : 2 * hc] * scale[1].float() + base[hc : 2 * hc].float())
        comb_logits = (mixes[..., 2 * hc :] * scale[2].float() + base[2 * hc :].float()).view(*mixes.shape[:-1], hc, hc)
        comb = torch.softmax(comb_logits, dim=-1) + self.hc_eps
        comb = comb / (comb.sum(dim=-2, keepdim=True) + self.hc_eps)
        for _ in range(self.hc_sinkhorn_iters - 1):
            comb = comb / (comb.sum(dim=-1, keepdim=True) + self.hc_eps)
            comb = comb / (comb.sum(dim=-2, keepdim=True) + self.hc_eps)
        return pre, post, comb

    @staticmethod
    def hc_collapse(hidden_streams, pre):
        return (pre.unsqueeze(-1) * hidden_streams.float()).sum(dim=2).to(hidden_streams.dtype)

    @staticmethod
    def hc_expand(x, residual, post, comb):
        mixed = torch.einsum("bsjk,bsjd->bskd", comb.float(), residual.float())
        return (post.unsqueeze(-1) * x.float().unsqueeze(-2) + mixed).to(residual.dtype)

    def site(self, kind: str, streams: torch.Tensor):
        """hc_mixes of one site on streams [B, S, n, C]."""
        return self.hc_mixes(streams, getattr(self, f"hc_{kind}_fn"), getattr(self, f"hc_{kind}_scale"),
                             getattr(self, f"hc_{kind}_base"))

    def forward(self, hidden_streams, pre_mix, record: list):
        residual = hidden_streams
        record.append(hidden_streams)
        attn_pre, attn_post, attn_comb = self.site("attn", hidden_streams)
        hidden_streams = self.hc_expand(self.attn(self.hc_collapse(hidden_streams, pre_mix)), residual, attn_post,
                                        attn_comb)
        residual = hidden_streams
        record.append(hidden_streams)
        ffn_pre, ffn_post, ffn_comb = self.site("ffn", hidden_streams)
        hidden_streams = self.hc_expand(self.ffn(self.hc_collapse(hidden_streams, attn_pre)), residual, ffn_post,
                                        ffn_comb)
        return hidden_streams, ffn_pre


N, C, LAYERS, ITERS, HC_EPS, RMS_EPS = 4, 8, 3, 5, 1e-6, 1e-20


def build(d, *, engram_layers=(1,), composite: bool = True):
    g = torch.Generator().manual_seed(7)
    layers = [DeepseekV41DecoderLayer(N, C, ITERS, HC_EPS, RMS_EPS, g) for _ in range(LAYERS)]
    sd = {}
    for i, layer in enumerate(layers):
        for k, v in layer.state_dict().items():
            sd[f"model.layers.{i}.{k}"] = v.contiguous()
    for i in engram_layers:  # DeepseekV41Engram's tensors (tiny tables): names and shapes as the module's
        sd[f"model.layers.{i}.engram.embed.weight"] = torch.randn(16, 32, generator=g)
        sd[f"model.layers.{i}.engram.embed.scale"] = torch.ones(16, 1)
        sd[f"model.layers.{i}.engram.wkv.weight"] = torch.randn(C * (N + 1), 3 * 32, generator=g)
        sd[f"model.layers.{i}.engram.q_weight"] = torch.ones(N, C)
        sd[f"model.layers.{i}.engram.k_weight"] = torch.ones(N, C)
    sd["model.norm.weight"] = torch.ones(C)
    text = {"model_type": "deepseek_v41_text", "hc_mult": N, "hidden_size": C, "num_hidden_layers": LAYERS,
            "hc_sinkhorn_iters": ITERS, "hc_eps": HC_EPS, "rms_norm_eps": RMS_EPS,
            "engram_layer_ids": list(engram_layers)}
    cfg = {"model_type": "deepseek_v41", "architectures": ["DeepseekV41ForCausalLM"], "text_config": text}
    d.mkdir(parents=True, exist_ok=True)
    save_file(sd, str(d / "model.safetensors"))
    (d / "config.json").write_text(json.dumps(cfg if composite else text))
    return [l.double() for l in layers]


def oracle(layers, index: int, x: torch.Tensor):
    """(pre, post, H_res paper) of site ``index`` (attn_0, ffn_0, attn_1, ...) on streams x [T, n, C]."""
    with torch.no_grad():
        pre, post, comb = layers[index // 2].site("attn" if index % 2 == 0 else "ffn", x.double().unsqueeze(0))
    return pre[0], post[0], comb[0].transpose(-1, -2)


@pytest.fixture
def ckpt(tmp_path):
    layers = build(tmp_path / "v41")
    return tmp_path / "v41", layers


def test_every_site_matches_the_port(ckpt) -> None:
    from hcdiag.io.load import load

    path, layers = ckpt
    model = load(path)
    assert model.layout == "deepseek-v41" and model.n == N and model.C == C
    assert [s.name for s in model.sites] == [f"{k}_{b}" for b in range(LAYERS) for k in ("attn", "ffn")]
    assert model.settings_source["iters"] == "config.json:text_config (hc_sinkhorn_iters)"
    x = torch.randn(5, N, C, dtype=torch.float64) * 2
    for site in model.sites:
        pre, post, res = site.module.in_dtype(torch.float64)(x)
        opre, opost, ores = oracle(layers, site.index, x)
        # float32 inside the port (the library's .float() casts): 1e-6
        for a, b in ((pre, opre), (post, opost), (res, ores)):
            assert (a - b.double()).abs().max() < TOL, site.name


def test_the_port_updates_the_streams_as_the_pairing_note_says(ckpt) -> None:
    """The port's own forward: x_{s+1} = H_res,s x_s + H_post,s F_s(H_pre,s-1 x_s) with the one-hot first mix
    and comb^T; checks the pairing the layout states, on the port alone."""
    path, layers = ckpt
    x = torch.randn(1, 3, N, C, dtype=torch.float64)
    pre_mix = torch.zeros(1, 3, N, dtype=torch.float64)
    pre_mix[..., 0] = 1.0
    streams, record = x, []
    with torch.no_grad():
        for i, layer in enumerate(layers):
            prev = pre_mix
            out, pre_mix = layer(streams, pre_mix, record)
            xa = record[-2]
            pa, qa, Ha = oracle(layers, 2 * i, xa[0])
            branch = layer.attn((prev[0].unsqueeze(-1) * xa[0]).sum(-2))
            ya = Ha.double() @ xa[0] + qa.double().unsqueeze(-1) * branch.unsqueeze(-2)
            assert (ya - record[-1][0]).abs().max() < 1e-5
            streams = out
    p = run_cli("inspect", path, "--json")
    notes = " ".join(json.loads(p.stdout)["notes"])
    assert "one-hot mix of stream 0" in notes and "before model.norm (no hc_head)" in notes


def test_stochasticity_json_matches_the_port(ckpt) -> None:
    from hcdiag.probes import RandomProbe

    path, layers = ckpt
    p = run_cli("stochasticity", path, "--json", "--probe", "random", "--tokens", "6")
    assert p.returncode == 0, p.stderr
    doc = json.loads(p.stdout)
    for row in doc["sites"]:
        x = torch.from_numpy(RandomProbe(tokens=6, seed=0).draw(row["index"], N, C))
        pre, post, H = (t.double().numpy() for t in oracle(layers, row["index"], x))
        assert abs(row["row_err_max"] - np.abs(H.sum(-1) - 1).max()) <= TOL
        assert abs(row["col_err_max"] - np.abs(H.sum(-2) - 1).max()) <= TOL
        np.testing.assert_allclose(row["h_pre_mean"], pre.mean(0), atol=TOL)
        np.testing.assert_allclose(row["h_post_mean"], post.mean(0), atol=TOL)
        assert row["iters"] == ITERS and row["eps"] == HC_EPS and row["convention"] == "transformers"


def test_gain_sweep_from_equals_the_brute_force_product_and_names_engram(ckpt) -> None:
    path, layers = ckpt
    p = run_cli("gain-sweep", "--from", path, "--json")
    assert p.returncode == 0, p.stderr
    doc = json.loads(p.stdout)
    curves = doc["variants"][0]["curves"]
    x = torch.zeros(1, N, C, dtype=torch.float64)
    Hs = [oracle(layers, i, x)[2][0].double().numpy() for i in range(2 * LAYERS)]
    fwd, bwd = stack_gains(Hs)
    np.testing.assert_allclose(curves["gain_fwd"]["median"], fwd, rtol=TOL, atol=TOL)
    np.testing.assert_allclose(curves["gain_bwd"]["median"], bwd, rtol=TOL, atol=TOL)
    assert any("Engram modules at layers [1] also write into the streams" in n for n in doc["notes"])
    p = run_cli("gain-sweep", "--from", path)  # the table output says it too
    assert p.returncode == 0 and "Engram" in p.stdout + p.stderr


def test_flat_text_config_and_the_v4_reader_boundary(tmp_path) -> None:
    """A flat DeepseekV41TextConfig is recognised; the same keys with a DeepSeek-V4 config stay with the
    transformers layout (the key names are the original V4 release's)."""
    build(tmp_path / "flat", composite=False)
    p = run_cli("inspect", tmp_path / "flat", "--json")
    assert p.returncode == 0 and json.loads(p.stdout)["layout"] == "deepseek-v41"
    build(tmp_path / "v4", engram_layers=())
    cfg = json.loads((tmp_path / "v4" / "config.json").read_text())["text_config"]
    cfg["model_type"] = "deepseek_v4"
    (tmp_path / "v4" / "config.json").write_text(json.dumps(cfg))
    p = run_cli("inspect", tmp_path / "v4", "--json")
    assert p.returncode == 0 and json.loads(p.stdout)["layout"] == "transformers"


def test_capture_wraps_hc_mixes_and_stochasticity_agrees(ckpt, tmp_path) -> None:
    """capture() on the decoder layers: one record per hc_mixes site (told apart by the fn passed), in call
    order attn_0, ffn_0, ...; H_res = comb^T, H_pre / H_post as returned."""
    from hcdiag.capture import capture, read_activations

    path, layers = ckpt
    acts = tmp_path / "acts.safetensors"
    streams = torch.randn(1, 5, N, C, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    pre_mix = torch.zeros(1, 5, N, dtype=torch.float64)
    pre_mix[..., 0] = 1.0
    with capture(nn.ModuleList(layers), acts), torch.no_grad():
        for layer in layers:
            streams, pre_mix = layer(streams, pre_mix, [])
    sites = read_activations(acts)
    assert [s.name for s in sites] == [f"{i}.hc_{k}" for i in range(LAYERS) for k in ("attn", "ffn")]
    for i, site in enumerate(sites):
        pre, post, H = oracle(layers, i, site.x.double())
        assert (site.h_res.double() - H.double()).abs().max() < TOL
        assert (site.h_pre.double() - pre.double()).abs().max() < TOL
    p = run_cli("stochasticity", path, "--json", "--probe", "activations", "--activations", acts)
    assert p.returncode == 0, p.stderr
    assert all(r["recorded_diff"] <= r["recorded_tol"] for r in json.loads(p.stdout)["sites"])

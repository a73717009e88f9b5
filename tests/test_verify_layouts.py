"""``verify`` on the layouts of issue 15, with activations that ``hcdiag.capture`` records from a forward pass of
the real module (transformers' Qwen4-Exp) or of the test ports (DeepSeek-V4.1, tokenbender's mHC, mhc-pytorch):
every site conforms, each check it has is at float32 rounding, and the verdict claims only what was checked. An
injected bug in the real Qwen4-Exp module (the gated streams summed instead of averaged) is caught by the branch
input check, which compares the library's own ``mixed_input`` with the one hcdiag recomputes from the checkpoint.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from cli_runner import run_cli
from safetensors.torch import save_file
from torch import nn

from hcdiag.capture import capture
from hcdiag.verification import TOLERANCE


def _qwen4(d: Path, n: int) -> tuple[Path, Path]:
    pytest.importorskip("transformers.models.qwen4_exp")
    from test_io_qwen4_exp import tiny_model

    model = tiny_model(n)
    model.save_pretrained(d / "ckpt")
    acts = d / "acts.safetensors"
    with capture(model, acts), torch.no_grad():
        model(input_ids=torch.arange(7).reshape(1, 7) + 1, use_cache=False)
    return d / "ckpt", acts


def _v41(d: Path) -> tuple[Path, Path]:
    from test_io_deepseek_v41 import C, N, build

    layers = build(d / "ckpt")
    streams = torch.randn(1, 5, N, C, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    pre_mix = torch.zeros(1, 5, N, dtype=torch.float64)
    pre_mix[..., 0] = 1.0
    acts = d / "acts.safetensors"
    with capture(nn.ModuleList(layers), acts), torch.no_grad():
        for layer in layers:
            streams, pre_mix = layer(streams, pre_mix, [])
    return d / "ckpt", acts


def _tokenbender(d: Path) -> tuple[Path, Path]:
    from test_io_tokenbender import build

    sd, mods = build(perturb=1.5, seed=3)
    save_file(sd, str(d / "tb.safetensors"))
    acts = d / "acts.safetensors"
    with capture(nn.ModuleList(mods), acts), torch.no_grad():
        for i, m in enumerate(mods):
            m.width_connection(torch.randn(8, 3, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(i)))
    return d / "tb.safetensors", acts


def _mhc_pytorch(d: Path) -> tuple[Path, Path]:
    from test_io_mhc_pytorch import build

    sd, mods = build()
    save_file(sd, str(d / "mhc_pytorch.safetensors"))
    net = nn.ModuleList([m.float() for m in mods])
    acts = d / "acts.safetensors"
    with capture(net, acts), torch.no_grad():
        for i, m in enumerate(net):
            m(torch.randn(2, 3, 8, generator=torch.Generator().manual_seed(i)))
    return d / "mhc_pytorch.safetensors", acts


CASES = {"qwen4-exp-n4": lambda d: _qwen4(d, 4), "qwen4-exp-n8": lambda d: _qwen4(d, 8), "deepseek-v41": _v41,
         "tokenbender": _tokenbender, "mhc-pytorch": _mhc_pytorch}


@pytest.mark.parametrize("name", list(CASES))
def test_every_site_conforms_on_a_recorded_forward(name: str, tmp_path) -> None:
    ckpt, acts = CASES[name](tmp_path)
    p = run_cli("verify", ckpt, "--activations", acts, "--json")
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr
    doc = json.loads(p.stdout)
    assert doc["conforms"] and doc["sites"]
    for site in doc["sites"]:
        assert site["checks"], site["name"]
        assert all(0 <= v <= TOLERANCE for v in site["checks"].values()), (site["name"], site["checks"])
    updated = sum("update (recomputed)" in s["checks"] for s in doc["sites"])
    claims_update = "the recorded output streams follow" in doc["verdict"]
    assert claims_update == (updated > 0), doc["verdict"]


def test_qwen4_exp_branch_input_is_the_librarys_mixed_input(tmp_path) -> None:
    """The branch input is checked at every Qwen4-Exp site (against what the real module returned)."""
    ckpt, acts = _qwen4(tmp_path, 4)
    doc = json.loads(run_cli("verify", ckpt, "--activations", acts, "--json").stdout)
    assert all("branch input" in s["checks"] and "H_post" in s["checks"] for s in doc["sites"])


def test_qwen4_exp_summed_instead_of_averaged_is_caught(tmp_path, monkeypatch) -> None:
    pytest.importorskip("transformers.models.qwen4_exp")
    from transformers.models.qwen4_exp import modeling_qwen4_exp as lib

    original = lib.Qwen4ExpTextGatedResidual.forward

    def summed(self, hyper_input):
        out = original(self, hyper_input)
        if self.block_inject_weight is None:  # the final hyper_connection_mixer: not a site
            return out
        mixed, hyper, post = out
        return mixed * self.hc_count, hyper, post  # sum over streams instead of the mean

    monkeypatch.setattr(lib.Qwen4ExpTextGatedResidual, "forward", summed)
    ckpt, acts = _qwen4(tmp_path, 4)
    p = run_cli("verify", ckpt, "--activations", acts, "--json")
    assert p.returncode == 1, p.stderr
    doc = json.loads(p.stdout)
    assert doc["sites"] and all("branch input" in s["failing"] for s in doc["sites"])
    # the residual of a factor n on the branch input: ||b - n b|| / ||n b|| = (n - 1) / n
    for s in doc["sites"]:
        assert s["checks"]["branch input"] == pytest.approx(3 / 4, rel=1e-6)

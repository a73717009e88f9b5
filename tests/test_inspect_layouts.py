"""`hcdiag inspect` (headers only) names the layout and every site, for each supported layout.

The expected names come from how each test checkpoint is built (block order, attention before FFN), and the
expected sites from `load()` reading the tensors, so a header-only inspect must agree with a full load.
"""

from __future__ import annotations

import json

import pytest
import torch
from cli_runner import run_cli
from safetensors.torch import save_file

from hcdiag.io import load


def _check(path, layout: str, names: list[str]) -> None:
    doc = json.loads(run_cli("inspect", path, "--json").stdout)
    assert doc["layout"] == layout
    assert [s["name"] for s in doc["sites"]] == names
    assert doc["bytes_read"] == 0
    full = load(str(path))
    assert [(s.name, s.variant) for s in full.sites] == [(s["name"], s["variant"]) for s in doc["sites"]]
    assert (doc["n"], doc["C"]) == (full.n, full.C)


def test_lucidrains(tmp_path):
    pytest.importorskip("hyper_connections")
    from test_io_lucidrains import Net, _save, perturb

    torch.manual_seed(1)
    path = _save(perturb(Net(), seed=11).eval(), tmp_path, "safetensors")
    _check(path, "lucidrains", [f"{k}_{b}" for b in range(11) for k in ("attn", "ffn")])


@pytest.mark.parametrize("variant", ["mhc", "mhc_lite", "kromhc", "tbp_mhc"])
def test_nanogpt(tmp_path, variant):
    from test_io_nanogpt import gpt_state

    sd, _ = gpt_state(variant, 4, 8, blocks=3, seed=3)
    path = tmp_path / "model.safetensors"
    save_file(sd, str(path))
    _check(path, "nanogpt", [f"{k}_{b}" for b in range(3) for k in ("attn", "ffn")])


def test_transformers_sharded(tmp_path):
    pytest.importorskip("transformers")
    from test_io_transformers import LAYERS, SETTINGS, TINY_DSV4, _randomize_hc
    from transformers import DeepseekV4Config, DeepseekV4ForCausalLM

    torch.manual_seed(0)
    model = DeepseekV4ForCausalLM(DeepseekV4Config(**TINY_DSV4, **SETTINGS)).eval()
    _randomize_hc(model, 1)
    model.save_pretrained(tmp_path / "m", max_shard_size="40KB")
    _check(tmp_path / "m", "transformers", [f"{k}_{b}" for b in range(LAYERS) for k in ("attn", "ffn")])


@pytest.mark.parametrize("variant", ["mhc", "mhc-lite", "kromhc", "tbp", "hc-dynamic", "ihc"])
def test_native_samples(variant):
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "samples" / f"{variant}.safetensors"
    _check(path, "native", [f"{k}_{b}" for b in range(8) for k in ("attn", "ffn")])

"""`gain-sweep --from` against a brute-force product of the per-site matrices (issue 6's must-show).

The per-site H_res are taken the way `stochasticity` takes them (the loaded site module's own forward on the
probe's input, paper convention); the composite is multiplied out in numpy, later sites on the left, and
compared with what the CLI's JSON reports: the Fig. 8 heatmap of all sites and the composite gain curves.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from cli_runner import run_cli

from hcdiag.io import load

SAMPLES = sorted((Path(__file__).resolve().parent.parent / "samples").glob("*.safetensors"))


def _brute(path: Path) -> list[np.ndarray]:
    model = load(str(path))
    mats = []
    with torch.no_grad():
        for site in model.sites:
            x = torch.zeros(1, site.module.n, site.module.C, dtype=torch.float64)  # static probe
            mats.append(site.module(x).res[0].double().numpy())
    return mats


def _check(path: Path) -> dict:
    mats = _brute(path)
    p = run_cli("gain-sweep", "--from", path, "--json")
    assert p.returncode == 0, p.stderr
    doc = json.loads(p.stdout)
    v = doc["variants"][0]
    prod = np.eye(mats[0].shape[0])
    fwd = []
    for H in mats:
        prod = H @ prod  # H_l ... H_1
        fwd.append(np.abs(prod.sum(1)).max())
    np.testing.assert_allclose(np.array(v["heatmaps"]["all"]), prod, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(v["curves"]["gain_fwd"]["median"], fwd, rtol=1e-10)
    bwd = []
    prod = np.eye(mats[0].shape[0])
    for H in reversed(mats):
        prod = prod @ H  # H_L ... H_l
        bwd.append(np.abs(prod.sum(0)).max())
    np.testing.assert_allclose(v["curves"]["gain_bwd"]["median"], bwd[::-1], rtol=1e-10)
    return doc


@pytest.mark.parametrize("path", SAMPLES, ids=[p.stem for p in SAMPLES])
def test_from_sample_equals_brute_force_product(path):
    _check(path)


def test_from_transformers_checkpoint_equals_brute_force_product(tmp_path):
    pytest.importorskip("transformers")
    from test_io_transformers import SETTINGS, TINY_DSV4, _randomize_hc
    from transformers import DeepseekV4Config, DeepseekV4ForCausalLM

    torch.manual_seed(0)
    model = DeepseekV4ForCausalLM(DeepseekV4Config(**TINY_DSV4, **SETTINGS)).eval()
    _randomize_hc(model, 2)
    model.save_pretrained(tmp_path / "dsv4", max_shard_size="40KB")
    doc = _check(tmp_path / "dsv4")
    # only the HC tensors were read: fn [(n+2)n, nC], base [(n+2)n], scale [3] per site, float32
    n, C, sites = TINY_DSV4["hc_mult"], TINY_DSV4["hidden_size"], 2 * TINY_DSV4["num_hidden_layers"]
    assert doc["bytes_read"] == sites * 4 * ((n + 2) * n * (n * C + 1) + 3) < doc["bytes_total"]


def test_gain_sweep_cli_json_and_plots(tmp_path):
    import matplotlib.image as mpimg

    out = tmp_path / "out"
    p = run_cli("gain-sweep", "--layers", "4", "--variants", "hc-static,mhc,kromhc", "--logit-scale", "0.5",
                "--seeds", "4", "--plot", "-o", out, "--json")
    assert p.returncode == 0, p.stderr
    doc = json.loads(p.stdout)  # one JSON document on stdout; the plot list went to stderr
    assert [v["name"] for v in doc["variants"]] == ["hc-static", "mhc", "kromhc"]
    assert all(len(v["curves"]["gain_fwd"]["median"]) == 8 for v in doc["variants"])
    assert set(doc["plots"]) == {str(f) for f in out.glob("*.png")} and len(doc["plots"]) >= 3
    for f in doc["plots"]:
        assert mpimg.imread(f).ndim == 3
    assert (out / "gain-sweep.json").exists() and (out / "gain-sweep.csv").exists()


def test_from_checkpoint_whose_projection_overflows(tmp_path):
    # finite but huge logits at attn_0: exp() overflows in the paper convention -> a one-line refusal naming the
    # site (exit 3); the log-domain convention projects the same logits and the run goes through
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    src = next(p for p in SAMPLES if p.stem == "mhc")
    with safe_open(str(src), "pt") as f:
        meta = f.metadata()
    tensors = load_file(str(src))
    key = "hc.sites.0.b_res"
    tensors[key] = torch.full_like(tensors[key], 1000.0)
    tensors[key][0, 1] = -1000.0
    bad = tmp_path / "big_logits.safetensors"
    save_file(tensors, str(bad), metadata=meta)
    p = run_cli("gain-sweep", "--from", bad, "-o", tmp_path / "out")
    assert p.returncode == 3 and len(p.stderr.strip().splitlines()) == 1
    assert "attn_0" in p.stderr and "hcdiag stochasticity" in p.stderr
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())
    ok = run_cli("gain-sweep", "--from", bad, "--convention", "log", "--json")
    assert ok.returncode == 0, ok.stderr
    assert all(np.isfinite(json.loads(ok.stdout)["variants"][0]["heatmaps"]["all"]).ravel())


def test_from_model_with_mixed_stream_counts_is_refused_by_name():
    import dataclasses

    from hcdiag import registry
    from hcdiag.errors import InputError
    from hcdiag.gain import gain_from_model

    model = load(str(next(p for p in SAMPLES if p.stem == "mhc")))
    first = model.sites[0]
    six = registry.get("mhc").build(6, first.module.C, layer_index=1, dtype=torch.float64)
    sites = list(model.sites)
    sites[1] = dataclasses.replace(sites[1], module=six)
    with pytest.raises(InputError) as err:
        gain_from_model(dataclasses.replace(model, sites=tuple(sites)))
    assert "4 at attn_0" in str(err.value) and "6 at ffn_0" in str(err.value)


def test_from_with_recorded_h_res_warns_when_the_recomputation_differs(tmp_path):
    """--probe activations: the recomputation is compared with the H_res the real DeepSeek-V4 modules recorded.
    As stored (20 iterations) no warning; with --iters 3 one warning line names the site where the library's own
    3-iteration matrices differ most from the recorded ones, and the likely cause."""
    pytest.importorskip("transformers")
    from test_io_transformers import TINY_DSV4, _oracle, _randomize_hc
    from transformers import DeepseekV4Config, DeepseekV4ForCausalLM

    from hcdiag.capture import capture, read_activations

    torch.manual_seed(0)
    model = DeepseekV4ForCausalLM(DeepseekV4Config(**TINY_DSV4)).eval()
    _randomize_hc(model, 3)
    model.save_pretrained(tmp_path / "dsv4")
    acts = tmp_path / "acts.safetensors"
    ids = torch.randint(1, 64, (1, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), capture(model, acts):
        model(ids)

    def warnings(*extra):
        p = run_cli("gain-sweep", "--from", tmp_path / "dsv4", "--probe", "activations", "--activations", acts,
                    "--json", *extra)
        assert p.returncode == 0, p.stderr
        return [w for w in json.loads(p.stdout)["variants"][0]["warnings"] if "recorded one" in w]

    assert warnings() == []
    # independently: the library module at 3 iterations on the recorded inputs, against the recorded H_res
    diffs = {}
    for (name, lib), site in zip(_oracle(model, dict(hc_sinkhorn_iters=3)), read_activations(acts), strict=True):
        kind, layer = name.split("_")
        assert site.name == f"model.layers.{layer}.{kind}_hc"
        with torch.no_grad():
            _, comb, _ = lib(site.x.unsqueeze(0))
        diffs[name] = float((comb[0].transpose(-1, -2).double() - site.h_res.double()).abs().max())
    worst = max(diffs, key=diffs.__getitem__)
    assert diffs[worst] > 1e-3
    (line,) = warnings("--iters", "3")
    assert f"worst {worst})" in line and "--convention and --iters" in line and "\n" not in line, line
    assert f"up to {diffs[worst]:.2g}" in line, line

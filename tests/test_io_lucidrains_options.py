"""hyper-connections options that hcdiag used to mishandle (issue 15 item 4), against the installed package.

* ``num_dynamic_alpha_proposals > 1`` (mHC): ``stochasticity`` crashed ("a Tensor with 3 elements cannot be
  converted to Scalar"); H_res must be the mean of the proposals' projections, as the library mixes.
* ``HyperConnections(tanh=False)``: not stored in a state dict; ``--no-hc-tanh`` sets it for checkpoints,
  ``capture`` reads it from the live module, and a recording analysed with the wrong setting is flagged.
"""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from cli_runner import run_cli
from e2e_layouts import _lucidrains_h
from safetensors.torch import save_file
from torch import nn

pytest.importorskip("hyper_connections")

TOL = 1e-6


def _net(cls, seed: int, **kw) -> nn.ModuleDict:
    torch.manual_seed(seed)
    blocks = [nn.ModuleDict({"attn_hc": cls(4, dim=8, layer_index=2 * i, **kw),
                             "ff_hc": cls(4, dim=8, layer_index=2 * i + 1, **kw)}) for i in range(2)]
    net = nn.ModuleDict({"layers": nn.ModuleList(blocks)})
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 2.0)
    return net.eval()


def _libs(net) -> list[nn.Module]:
    return [copy.deepcopy(m).double() for blk in net["layers"] for m in (blk["attn_hc"], blk["ff_hc"])]


def _save(net, path) -> None:
    save_file({k: v.detach().contiguous() for k, v in net.state_dict().items()}, str(path))


def _errs(H: np.ndarray) -> tuple[float, float]:
    return float(np.abs(H.sum(-1) - 1).max()), float(np.abs(H.sum(-2) - 1).max())


@pytest.mark.parametrize("module", ["manifold_constrained_hyper_connections", "mHCv2"])
def test_dynamic_alpha_proposals_average_as_the_library(tmp_path, module: str) -> None:
    import importlib

    from hcdiag.probes import RandomProbe

    cls = importlib.import_module(f"hyper_connections.{module}").ManifoldConstrainedHyperConnections
    net = _net(cls, 3, num_dynamic_alpha_proposals=3)
    path = tmp_path / "prop.safetensors"
    _save(net, path)
    libs = _libs(net)
    for probe in ("static", "random"):
        args = ["stochasticity", path, "--json", "--probe", probe] + (["--tokens", "5"] if probe == "random" else [])
        p = run_cli(*args)
        assert p.returncode == 0, p.stderr
        doc = json.loads(p.stdout)
        for row, lib in zip(doc["sites"], libs, strict=True):
            x = (torch.zeros(1, 4, 8, dtype=torch.float64) if probe == "static"
                 else torch.from_numpy(RandomProbe(tokens=5, seed=0).draw(row["index"], 4, 8)))
            with torch.no_grad():
                H = _lucidrains_h(lib, x).numpy()  # the mean over proposals the library mixes with
            r, c = _errs(H)
            # 1e-6 (the matrix test's bar): the library's Sinkhorn casts to float32 (measured 4.8e-8 here)
            assert abs(row["row_err_max"] - r) <= TOL and abs(row["col_err_max"] - c) <= TOL, row["name"]
            np.testing.assert_allclose(row["row_sums_of_mean"], H.mean(0).sum(-1), atol=TOL)
        assert any("num_dynamic_alpha_proposals" in note for note in doc["notes"])
    p = run_cli("gain-sweep", "--from", path, "--json")
    assert p.returncode == 0, p.stderr


def _hc_net(tanh: bool) -> nn.ModuleDict:
    from hyper_connections.hyper_connections import HyperConnections

    return _net(HyperConnections, 5, tanh=tanh)


def test_no_hc_tanh_matches_the_library_and_the_default_does_not(tmp_path) -> None:
    from hcdiag.probes import RandomProbe

    net = _hc_net(tanh=False)
    path = tmp_path / "hc_notanh.safetensors"
    _save(net, path)
    libs = _libs(net)

    def rows(*extra: str) -> list[dict]:
        p = run_cli("stochasticity", path, "--json", "--probe", "random", "--tokens", "6", *extra)
        assert p.returncode == 0, p.stderr
        return json.loads(p.stdout)["sites"]

    worst_default = 0.0
    for flag in ("--no-hc-tanh", None):
        got = rows(flag) if flag else rows()
        for row, lib in zip(got, libs, strict=True):
            x = torch.from_numpy(RandomProbe(tokens=6, seed=0).draw(row["index"], 4, 8))
            with torch.no_grad():
                H = _lucidrains_h(lib, x).numpy()
            r, c = _errs(H)
            d = max(abs(row["row_err_max"] - r), abs(row["col_err_max"] - c))
            if flag:
                assert d <= TOL, row["name"]
            else:
                worst_default = max(worst_default, d)
    assert worst_default > 1e-3  # analysed with tanh on, the tanh=False checkpoint gives other matrices


def test_capture_reads_tanh_from_the_live_module_and_a_wrong_setting_is_flagged(tmp_path) -> None:
    from hcdiag.capture import capture, read_activations

    net = _hc_net(tanh=False)
    path = tmp_path / "hc_notanh.safetensors"
    _save(net, path)
    acts = tmp_path / "acts.safetensors"
    libs = [m for blk in net["layers"] for m in (blk["attn_hc"], blk["ff_hc"])]
    xs = [torch.randn(5, 4, 8, generator=torch.Generator().manual_seed(i)) * 2 for i in range(4)]
    with capture(net, acts), torch.no_grad():
        for m, x in zip(libs, xs, strict=True):
            m(x.transpose(0, 1))  # [(b s), T, d] with b = 1
    recorded = read_activations(acts)
    for site, lib, x in zip(recorded, _libs(net), xs, strict=True):
        with torch.no_grad():
            H = _lucidrains_h(lib, x.double())
        # float32 recording (entries up to ~70 without tanh), tanh off as the live module
        assert (site.h_res.double() - H).abs().max() < 1e-6 * H.abs().max(), site.name
    p = run_cli("stochasticity", path, "--json", "--probe", "activations", "--activations", acts, "--no-hc-tanh")
    assert p.returncode == 0, p.stderr
    doc = json.loads(p.stdout)
    assert all(r["recorded_diff"] <= r["recorded_tol"] for r in doc["sites"])
    assert not any("recorded one" in a for a in doc["summary"]["advice"])
    p = run_cli("stochasticity", path, "--json", "--probe", "activations", "--activations", acts)
    assert p.returncode == 0, p.stderr
    doc = json.loads(p.stdout)
    line = next(a for a in doc["summary"]["advice"] if "recorded one" in a)
    worst = max(doc["sites"], key=lambda r: r["recorded_diff"])
    assert f"worst {worst['name']}" in line and "--hc-tanh" in line, line


def test_loader_options_that_do_not_apply_are_usage_errors(tmp_path) -> None:
    from hyper_connections.manifold_constrained_hyper_connections import ManifoldConstrainedHyperConnections

    net = _net(ManifoldConstrainedHyperConnections, 1)  # mHC only: no HC site for --no-hc-tanh, no temperature
    path = tmp_path / "mhc.safetensors"
    _save(net, path)
    for opt in (["--no-hc-tanh"], ["--temperature", "0.5"]):
        p = run_cli("stochasticity", path, *opt)
        assert p.returncode == 2, p.stderr
        assert p.stderr.count("\n") == 1 and opt[0].split("/")[0] in p.stderr and "Traceback" not in p.stderr
    p = run_cli("gain-sweep", "--from", path, "--temperature", "0.5")
    assert p.returncode == 2 and "--temperature" in p.stderr


_HC_TOML = """
version = 1
name = "lucidrains-hc"
n = 4

[sites]
pattern = '^layers\\.(?P<block>\\d+)\\.(?P<kind>attn|ff)_hc\\.'
kinds = { ff = "ffn" }

[norm]
kind = "rms"
eps = 0.0
over = "per_stream"
gain = "norm.gamma"
gain_offset = 1.0

[projection]
weight = "dynamic_alpha_fn"
input = "per_stream"
orientation = "in_out"
split = ["1", "n"]
names = ["pre", "res"]
activation = "ACT"

[bias]
tensor = "static_alpha"

[scale]
pre = "dynamic_alpha_scale"
res = "dynamic_alpha_scale"

[pre]
activation = "identity"

[res]
orientation = "code"
constraint = "none"
"""


@pytest.mark.parametrize("tanh", [False, True])
def test_a_layout_file_states_tanh(tmp_path, tanh: bool) -> None:
    """The layout-file field for HyperConnections(tanh=...): [projection] activation = "tanh" / "identity".
    The right one reproduces the library's H_res; the other one does not."""
    from hcdiag.io.base import LoadOptions
    from hcdiag.io.load import load

    net = _hc_net(tanh=tanh)
    path = tmp_path / "hc.safetensors"
    _save(net, path)
    libs = _libs(net)
    x = torch.randn(5, 4, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(9)) * 2
    worst = {}
    for act in ("tanh", "identity"):
        lay = tmp_path / f"{act}.toml"
        lay.write_text(_HC_TOML.replace("ACT", act))
        model = load(path, options=LoadOptions(layout_file=str(lay)))
        assert [s.name for s in model.sites] == ["attn_0", "ffn_0", "attn_1", "ffn_1"]
        worst[act] = 0.0
        for site, lib in zip(model.sites, libs, strict=True):
            with torch.no_grad():
                res = site.module.in_dtype(torch.float64)(x).res
                H = _lucidrains_h(lib, x)
            worst[act] = max(worst[act], float((res - H).abs().max()))
    right, wrong = ("tanh", "identity") if tanh else ("identity", "tanh")
    assert worst[right] < 1e-9 and worst[wrong] > 1e-3, worst

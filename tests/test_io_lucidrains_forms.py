"""The hyper-connections package's other ``HyperConnections`` classes, read by the ``lucidrains`` layout:
``hyper_connections_channel_first`` (1x1 Conv2d projections on [(b s), d, h, w] streams),
``hyper_connections_with_multi_input_streams`` (ProjActScale projections, additional input paths) and
``hyper_connections_with_multi_branch_inputs`` (num_branch_inputs = m: m branch inputs and outputs).

Oracle: the real modules' own action (hyper-connections 0.4.11), with no use of their parameter layout: the
streams ``width_connection`` returns equal H_res x, its branch input(s) equal H_pre x, and what
``depth_connection`` adds equals H_post^T f, for the matrices hcdiag builds from the saved checkpoint; and
``gain-sweep --from`` equals the brute-force product of the library's static alpha (x = 0), transposed.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from brute_gain import stack_gains
from cli_runner import run_cli
from einops import rearrange
from hyper_connections.hyper_connections_channel_first import HyperConnections as ChannelFirst
from hyper_connections.hyper_connections_with_multi_branch_inputs import HyperConnections as MultiBranch
from hyper_connections.hyper_connections_with_multi_input_streams import HyperConnections as MultiInput
from safetensors.torch import save_file
from torch import nn

from hcdiag.io import load
from hcdiag.io.base import LoadOptions

TOL = 1e-5
S, D, B, T = 4, 16, 2, 3


def _perturbed(m: nn.Module, seed: int) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.5)
    return m.eval()


def _save(mods: list[nn.Module], path) -> None:
    net = nn.ModuleDict({"layers": nn.ModuleList(mods)})
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(path))


def _apply(H: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return torch.einsum("tij,tjd->tid", H.double(), x.double())


def _channel_first_action(m, seed: int):
    """(x [N, s, d], out streams [N, s, d], branch inputs [N, 1, d], branch output [N, 1, d], added [N, s, d])
    over the N = b h w positions."""
    R = torch.randn(B * S, D, 2, 3, generator=torch.Generator().manual_seed(seed))
    tok = "(b s) d h w -> (b h w) s d"
    with torch.no_grad():
        bi, out, kw = m.width_connection(R)
        bo = torch.randn(B, D, 2, 3, generator=torch.Generator().manual_seed(seed + 1))
        added = m.depth_connection(bo, out, **kw) - out
    x, out, added = (rearrange(t, tok, s=S) for t in (R, out, added))
    return x, out, rearrange(bi, "b d h w -> (b h w) 1 d"), rearrange(bo, "b d h w -> (b h w) 1 d"), added


def _multi_input_action(m, seed: int):
    R = torch.randn(B * S, T, D, generator=torch.Generator().manual_seed(seed))
    extra = {"x2": torch.randn(B * S, T, D)} if m.additional_input_paths else {}
    with torch.no_grad():
        (bis, _), out, kw = m.width_connection(R, **extra)
        bo = torch.randn(B, T, D, generator=torch.Generator().manual_seed(seed + 1))
        added = m.depth_connection(bo, out, **kw) - rearrange(out, "b t s d -> (b s) t d")
    x = rearrange(R, "(b s) t d -> (b t) s d", s=S)
    return (x, rearrange(out, "b t s d -> (b t) s d"), rearrange(bis[0], "b t d -> (b t) 1 d"),
            rearrange(bo, "b t d -> (b t) 1 d"), rearrange(added, "(b s) t d -> (b t) s d", s=S))


def _multi_branch_action(m, seed: int):
    i = m.num_branch_inputs
    R = torch.randn(B * S, T, D, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        bi, out, kw = m.width_connection(R)
        bo = torch.randn(i * B, T, D, generator=torch.Generator().manual_seed(seed + 1))
        added = m.depth_connection(bo, out, **kw) - rearrange(out, "b t s d -> (b s) t d")
    x = rearrange(R, "(b s) t d -> (b t) s d", s=S)
    return (x, rearrange(out, "b t s d -> (b t) s d"), rearrange(bi, "(i b) t d -> (b t) i d", i=i),
            rearrange(bo, "(i b) t d -> (b t) i d", i=i), rearrange(added, "(b s) t d -> (b t) s d", s=S))


CF, MI, MB = ("hyper_connections_channel_first", "hyper_connections_with_multi_input_streams",
              "hyper_connections_with_multi_branch_inputs")
CASES = {  # name: (module k, its action, the class the notes name)
    "channel-first": (lambda k: ChannelFirst(S, dim=D, layer_index=k), _channel_first_action, CF),
    "channel-first-no-tanh": (lambda k: ChannelFirst(S, dim=D, layer_index=k, tanh=False), _channel_first_action,
                              CF),
    "multi-input": (lambda k: MultiInput(S, dim=D, layer_index=k), _multi_input_action, MI),
    "multi-input-path": (lambda k: MultiInput(S, dim=D, layer_index=k, additional_input_paths=[("x2", D)]),
                         _multi_input_action, MI),
    "multi-branch-1": (lambda k: MultiBranch(S, dim=D, layer_index=k, num_branch_inputs=1), _multi_branch_action,
                       MB),
    "multi-branch-2": (lambda k: MultiBranch(S, dim=D, layer_index=k, num_branch_inputs=2), _multi_branch_action,
                       MB),
    "multi-branch-3": (lambda k: MultiBranch(S, dim=D, layer_index=k, num_branch_inputs=3), _multi_branch_action,
                       MB),
}


@pytest.fixture(params=sorted(CASES))
def case(request, tmp_path):
    make, action, cls = CASES[request.param]
    mods = [_perturbed(make(k), seed=10 + k) for k in range(3)]
    path = tmp_path / "ckpt.safetensors"
    _save(mods, path)
    return request.param, path, mods, action, cls


def test_every_site_acts_as_the_library_module(case) -> None:
    name, path, mods, action, cls = case
    options = LoadOptions(extra={"tanh": False}) if "no-tanh" in name else LoadOptions()
    model = load(path, options=options)
    assert model.layout == "lucidrains" and [s.name for s in model.sites] == ["layers.0", "layers.1", "layers.2"]
    assert any(note.startswith(cls + ".HyperConnections at 3 site(s)") for note in model.notes), model.notes
    for k, (site, m) in enumerate(zip(model.sites, mods, strict=True)):
        x, out, bi, bo, added = action(m, seed=k)
        with torch.no_grad():
            o = site.module(x.double())
        pre = o.pre if o.pre.ndim == 3 else o.pre.unsqueeze(-2)
        post = o.post if o.post.ndim == 3 else o.post.unsqueeze(-2)
        assert (_apply(o.res, x) - out.double()).abs().max() < TOL
        assert (_apply(pre, x) - bi.double()).abs().max() < TOL
        assert (torch.einsum("tfn,tfd->tnd", post.double(), bo.double()) - added.double()).abs().max() < TOL


def test_gain_sweep_from_is_the_product_of_the_static_alphas(case) -> None:
    name, path, mods, _, _ = case
    p = run_cli("gain-sweep", "--from", path, "--json", *(["--no-hc-tanh"] if "no-tanh" in name else []))
    assert p.returncode == 0, p.stderr
    curves = json.loads(p.stdout)["variants"][0]["curves"]
    Hs = [m.static_alpha.detach().double().numpy()[:, -S:].T for m in mods]  # x = 0: alpha = static_alpha
    fwd, bwd = stack_gains(Hs)
    np.testing.assert_allclose(curves["gain_fwd"]["median"], fwd, rtol=1e-6)
    np.testing.assert_allclose(curves["gain_bwd"]["median"], bwd, rtol=1e-6)


def test_capture_refuses_them_by_name(tmp_path) -> None:
    from hcdiag.capture import capture
    from hcdiag.errors import UsageError

    for make, _, _ in CASES.values():
        net = nn.ModuleDict({"layers": nn.ModuleList([make(0)])})
        with pytest.raises(UsageError, match="reads its checkpoints but does not record"):
            with capture(net, tmp_path / "acts.safetensors"):
                pass


def test_a_kxk_convolution_is_refused_with_the_tensor_named(tmp_path) -> None:
    m = ChannelFirst(S, dim=D, layer_index=0)
    sd = {f"layers.0.{k}": v for k, v in m.state_dict().items()}
    sd["layers.0.dynamic_alpha_fn.weight"] = torch.zeros(S + 1, D, 3, 3)
    path = tmp_path / "bad.safetensors"
    save_file(sd, str(path))
    p = run_cli("stochasticity", path, "--layout", "lucidrains")
    assert p.returncode == 3 and "dynamic_alpha_fn.weight (5, 16, 3, 3)" in p.stderr, p.stderr
    assert len(p.stderr.strip().splitlines()) == 1

"""One checkpoint per layout hcdiag reads, written by the real library, with an oracle for its H_res.

Each builder writes a checkpoint (and an activations file for ``--probe activations``) into a directory and
returns a :class:`Case`. ``Case.oracle(index, x)`` gives the H_res [T, n, n] (paper convention, float64) that
the *library's own module* computes for site ``index`` on streams x [T, n, C], or None where the library adds the
residual unmixed (H_res = I). The oracles never call hcdiag: transformers' HyperConnection modules, lucidrains'
modules (the Sinkhorn output they hand to their mixing step), the reference ports of the nanoGPT repos
(tests/test_io_nanogpt.py), the numpy reference of docs/layout-file.md, and for native files the variant
modules that wrote them.

Adding a layout = adding a builder to :data:`BUILDERS`; the matrix test gains its cells.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file
from torch import nn

Oracle = Callable[[int, torch.Tensor], "torch.Tensor | None"]


@dataclass
class Case:
    path: Path
    oracle: Oracle
    activations: Path
    args: tuple[str, ...] = ()  # extra CLI arguments the layout needs (--layout-file ...)
    sites: list[dict] | None = None  # filled by the matrix test from the first inspect --json
    # transformers-family sites: the library module's fn [k, nC] of site ``index`` (what the layer reads x through)
    read_weight: Callable[[int], torch.Tensor] | None = None


def _perturb(m: nn.Module, seed: int, scale: float = 0.5) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * scale)
    return m


def _streams(seed: int, T: int, n: int, C: int) -> torch.Tensor:
    return torch.randn(T, n, C, generator=torch.Generator().manual_seed(seed)) * 2.0


def _write_activations(path: Path, xs: list[torch.Tensor], hs: list[torch.Tensor]) -> Path:
    """The hcdiag.capture file format (hcdiag/capture.py docstring), written from the library's own numbers."""
    tensors, sites = {}, []
    for i, (x, h) in enumerate(zip(xs, hs, strict=True)):
        tensors[f"sites.{i}.x"] = x.float().contiguous()
        tensors[f"sites.{i}.h_res"] = h.float().contiguous()
        sites.append({"index": i, "name": f"site{i}", "module_class": "reference", "h_res_from": "output",
                      "tokens": x.shape[0], "n": x.shape[1], "C": x.shape[2]})
    save_file(tensors, str(path), metadata={"format": "hcdiag-activations", "version": "1",
                                            "sites": json.dumps(sites)})
    return path


def _acts_from_oracle(path: Path, oracle: Oracle, count: int, n: int, C: int) -> Path:
    xs = [_streams(100 + i, 5, n, C) for i in range(count)]
    hs = []
    for i, x in enumerate(xs):
        h = oracle(i, x.double())
        hs.append(torch.eye(n).expand(x.shape[0], n, n) if h is None else h)
    return _write_activations(path, xs, hs)


# ---------------------------------------------------------------------------------------------------------------
# native: hcdiag's own file format, one per registry variant


def native(variant: str) -> Callable[[Path], Case]:
    def build(d: Path) -> Case:
        from hcdiag import registry
        from hcdiag.capture import capture
        from hcdiag.io.native import save_native

        n, C, blocks = 4, 8, 2
        mods = [_perturb(registry.get(variant).build(n, C, layer_index=k, dtype=torch.float64), 7 + k, 0.3)
                for k in range(2 * blocks)]
        path = save_native(d / f"{variant}.safetensors", mods, variant=variant, n=n, C=C, blocks=blocks,
                           sinkhorn=None, form="code")

        def oracle(i: int, x: torch.Tensor) -> torch.Tensor | None:
            with torch.no_grad():
                return mods[i](x).res.double().detach()

        acts = d / "acts.safetensors"
        with capture(nn.ModuleList(mods), acts), torch.no_grad():
            for i, m in enumerate(mods):
                m(_streams(100 + i, 5, n, C).double())
        return Case(Path(path), oracle, acts)

    return build


# ---------------------------------------------------------------------------------------------------------------
# transformers: DeepSeek-V4, GLM-5-Next, HY-V4, HY-V4-VL (tiny configs, random HC weights, save_pretrained)


def _randomize_hc(model: nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "_hc." in name or "hc_head" in name:
                scale = {"fn": 0.3, "base": 1.0, "scale": 1.5}.get(name.rsplit(".", 1)[-1].removeprefix("hc_"), 1.0)
                p.copy_(torch.randn(p.shape, generator=g) * scale)


def _hc_modules(layers: nn.ModuleList) -> list[nn.Module]:
    return [m for layer in layers for m in (layer.attn_hc, layer.ffn_hc)]


def _transformers_case(d: Path, model: nn.Module, layers: nn.ModuleList, *, comb: bool) -> Case:
    from hcdiag.capture import capture

    _randomize_hc(model, 1)
    model.eval()
    model.save_pretrained(d / "ckpt")
    libs = [copy.deepcopy(m) for m in _hc_modules(layers)]

    def oracle(i: int, x: torch.Tensor) -> torch.Tensor | None:
        if not comb:
            return None
        with torch.no_grad():
            _, c, _ = libs[i](x.float().unsqueeze(0))  # comb [1, T, input, output]; the layer applies comb^T
        return c[0].transpose(-1, -2).double()

    acts = d / "acts.safetensors"
    ids = torch.arange(6).reshape(1, 6) % 60 + 1
    with capture(model, acts), torch.no_grad():
        model(input_ids=ids, use_cache=False)
    return Case(d / "ckpt", oracle, acts, read_weight=lambda i: libs[i].fn.detach().double())


def deepseek_v4(d: Path) -> Case:
    from test_io_transformers import TINY_DSV4
    from transformers import DeepseekV4Config, DeepseekV4ForCausalLM

    torch.manual_seed(0)
    model = DeepseekV4ForCausalLM(DeepseekV4Config(**dict(TINY_DSV4, num_hidden_layers=2)))
    return _transformers_case(d, model, model.model.layers, comb=True)


def glm5_next(d: Path) -> Case:
    from test_io_transformers import TINY_GLM5
    from transformers import Glm5NextTextConfig, Glm5NextTextModel

    torch.manual_seed(0)
    model = Glm5NextTextModel(Glm5NextTextConfig(**TINY_GLM5))
    return _transformers_case(d, model, model.layers, comb=True)


def hy_v4(d: Path) -> Case:
    from test_io_transformers import TINY_HY
    from transformers import HYV4Config, HYV4Model

    torch.manual_seed(0)
    model = HYV4Model(HYV4Config(**TINY_HY))
    return _transformers_case(d, model, model.layers, comb=False)


def hy_v4_vl(d: Path) -> Case:
    from transformers.models.hy_v4_vl.configuration_hy_v4_vl import HYV4VLTextConfig
    from transformers.models.hy_v4_vl.modeling_hy_v4_vl import HYV4VLTextModel

    torch.manual_seed(0)
    from test_io_transformers import TINY_HY

    rope = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 1, 1]}  # sums to qk_rope_head_dim / 2
    model = HYV4VLTextModel(HYV4VLTextConfig(**TINY_HY, rope_parameters=rope))
    return _transformers_case(d, model, model.layers, comb=False)


# ---------------------------------------------------------------------------------------------------------------
# lucidrains hyper-connections: HC, mHC, mHCv2; .safetensors, .pt, a training dict


def _lucidrains_h(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The H_res (paper convention) the library module uses on streams x [T, n, C] (f = 1, one batch)."""
    from hyper_connections import hyper_connections as hc_mod
    from hyper_connections.hyper_connections import HyperConnections

    v2 = type(m).__module__.endswith("mHCv2")
    R = x.unsqueeze(0) if v2 else x.transpose(0, 1)  # v2: [b, T, s, d]; v1: [(b s), T, d]
    got: list[torch.Tensor] = []
    if isinstance(m, HyperConnections):
        real = hc_mod.einsum

        def spy(*args, **kwargs):
            if len(args) == 3 and "f1 s f2 t" in args[2]:
                a = args[0][..., 0, :, 0, m.num_input_views:]  # alpha [.., input s, output t]
                got.append(a.reshape(-1, *a.shape[-2:]).mT)
            return real(*args, **kwargs)

        hc_mod.einsum = spy
        try:
            m.width_connection(R)
        finally:
            hc_mod.einsum = real
    else:
        real_fn = m.residual_mix_constraint_fn

        def wrapped(a):
            res = real_fn(a)  # [proposals, ..., input, output]; the library mixes with their mean
            got.append(res.mean(0).reshape(-1, *res.shape[-2:]).mT)
            return res

        m.residual_mix_constraint_fn = wrapped
        try:
            m.width_connection(R)
        finally:
            m.residual_mix_constraint_fn = real_fn
    assert len(got) == 1
    return got[0].double()


def lucidrains(kind: str, fmt: str = "safetensors") -> Callable[[Path], Case]:
    """kind: hc | mhc | mhcv2 | mixed (mHC, mHCv2 and HC sites in one network); fmt: safetensors | pt | train."""

    def build(d: Path) -> Case:
        from hyper_connections.hyper_connections import HyperConnections
        from hyper_connections.manifold_constrained_hyper_connections import (
            ManifoldConstrainedHyperConnections as MHC,
        )
        from hyper_connections.mHCv2 import ManifoldConstrainedHyperConnections as MHCv2

        from hcdiag.capture import capture

        n, C = 4, 8
        cls = {"hc": [HyperConnections], "mhc": [MHC], "mhcv2": [MHCv2], "mixed": [MHC, MHCv2, HyperConnections]}
        order = cls[kind]
        torch.manual_seed(0)
        blocks = []
        for i in range(2):
            a, f = order[(2 * i) % len(order)], order[(2 * i + 1) % len(order)]
            blocks.append(nn.ModuleDict({"attn_hc": a(n, dim=C, layer_index=2 * i),
                                         "ff_hc": f(n, dim=C, layer_index=2 * i + 1)}))
        # strong enough that 20 Sinkhorn iterations leave a visible error at the static probe
        net = _perturb(nn.ModuleDict({"layers": nn.ModuleList(blocks)}), seed=11, scale=2.0).eval()
        libs = [m for blk in net["layers"] for m in (blk["attn_hc"], blk["ff_hc"])]
        sd = {k: v.detach().clone().contiguous() for k, v in net.state_dict().items()}
        if fmt == "safetensors":
            path = d / "net.safetensors"
            save_file(sd, str(path))
        elif fmt == "pt":
            path = d / "net.pt"
            torch.save(sd, path)
        else:  # a training checkpoint: model + optimizer state + step
            path = d / "train.pt"
            opt = torch.optim.AdamW(net.parameters())
            torch.save({"model": sd, "optimizer": opt.state_dict(), "step": 12, "epoch": 1}, path)
        libs64 = [copy.deepcopy(m).double() for m in libs]

        def oracle(i: int, x: torch.Tensor) -> torch.Tensor | None:
            with torch.no_grad():
                return _lucidrains_h(libs64[i], x.double())

        acts = d / "acts.safetensors"
        with capture(net, acts), torch.no_grad():
            for i, m in enumerate(libs):
                x = _streams(100 + i, 5, n, C)
                m(x.unsqueeze(0) if type(m).__module__.endswith("mHCv2") else x.transpose(0, 1))
        return Case(path, oracle, acts)

    return build


def _action_h(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The H_res [T, n, n] (paper convention) of one of the package's other HyperConnections classes on streams
    x [T, n, C], from its action alone: the streams width_connection returns are H_res x, so H_res = out x^+
    (x of full row rank); at x = 0 the library's alpha is its static_alpha, so H_res = static_alpha[:, -n:]^T."""
    n = x.shape[1]
    if not x.any():
        return m.static_alpha.detach().double()[:, -n:].mT.expand(x.shape[0], n, n)
    channel_first = type(m).__module__.endswith("channel_first")
    R = x.permute(1, 2, 0).unsqueeze(-1) if channel_first else x.transpose(0, 1)  # [s, d, T, 1] / [s, T, d]
    side = {path: torch.zeros_like(R) for path, _ in getattr(m, "additional_input_paths", [])}  # other inputs
    out = m.width_connection(R, **side)[1]
    out = out[..., 0].permute(2, 0, 1) if channel_first else out[0]  # -> [T, s, d]
    return out.double() @ torch.linalg.pinv(x.double())


def lucidrains_forms(d: Path) -> Case:
    """One site each of hyper_connections_channel_first, _with_multi_input_streams (with an additional input
    path) and _with_multi_branch_inputs (m = 2) in one network."""
    from hyper_connections.hyper_connections_channel_first import HyperConnections as ChannelFirst
    from hyper_connections.hyper_connections_with_multi_branch_inputs import HyperConnections as MultiBranch
    from hyper_connections.hyper_connections_with_multi_input_streams import HyperConnections as MultiInput

    n, C = 4, 8
    mods = [ChannelFirst(n, dim=C, layer_index=0), MultiInput(n, dim=C, layer_index=1),
            MultiInput(n, dim=C, layer_index=2, additional_input_paths=[("x2", C)]),
            MultiBranch(n, dim=C, layer_index=3, num_branch_inputs=2)]
    net = _perturb(nn.ModuleDict({"layers": nn.ModuleList(mods)}), seed=5, scale=1.0).eval()
    path = d / "forms.safetensors"
    save_file({k: v.detach().clone().contiguous() for k, v in net.state_dict().items()}, str(path))
    libs64 = [copy.deepcopy(m).double() for m in net["layers"]]

    def oracle(i: int, x: torch.Tensor) -> torch.Tensor | None:
        with torch.no_grad():
            return _action_h(libs64[i], x.double())

    return Case(path, oracle, _acts_from_oracle(d / "acts.safetensors", oracle, len(mods), n, C))


# ---------------------------------------------------------------------------------------------------------------
# nanoGPT reference repos (mhc-lite / KromHC / tbp-mHC model.py): the reference port of tests/test_io_nanogpt.py


def _ref_h(ref: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The reference port's alpha_res (its mixing step's input), transposed to paper convention, one token at a
    time (the port's Kronecker step broadcasts over a single leading dim), in the port's float32."""
    s = ref.n
    out = []
    for t in range(x.shape[0]):
        normed = ref.norm(x[t : t + 1].float().reshape(1, s * x.shape[-1]))
        alpha, _ = ref.alpha_beta(normed)  # mHC / TBP: [1, f, s, f, v + s]; mHC-lite / KromHC: [1, s, f, v + s]
        a = alpha[0, 0, :, 0, ref.v :] if alpha.ndim == 5 else alpha[0, :, 0, ref.v :]
        out.append(a.mT.double())
    return torch.stack(out)


def nanogpt(variant: str) -> Callable[[Path], Case]:
    def build(d: Path) -> Case:
        from test_io_nanogpt import gpt_state

        n, C = 4, 8
        sd, refs = gpt_state(variant, n, C, blocks=2, seed=3)
        path = d / "ckpt.pt"
        torch.save({"model": sd, "model_args": {"hyper_conn_type": variant, "hyper_conn_n": n}, "iter_num": 5},
                   path)
        def oracle(i: int, x: torch.Tensor) -> torch.Tensor | None:
            with torch.no_grad():
                return _ref_h(refs[i], x)

        return Case(path, oracle, _acts_from_oracle(d / "acts.safetensors", oracle, len(refs), n, C))

    return build


# ---------------------------------------------------------------------------------------------------------------
# a layout file (docs/layout-file.md's "braid" example)


def layout_file(d: Path) -> Case:
    from test_layout_file import BLOCKS, _braid_reference, _braid_sd, _doc_toml

    sd = _braid_sd()
    path = d / "braid.safetensors"
    save_file(sd, str(path))
    lay = d / "braid.toml"
    lay.write_text(_doc_toml())

    def oracle(i: int, x: torch.Tensor) -> torch.Tensor | None:
        kind = "attn" if i % 2 == 0 else "mlp"
        _, _, res = _braid_reference(sd, f"trunk.blocks.{i // 2}.{kind}_braid.", x.numpy())
        return torch.from_numpy(np.ascontiguousarray(res))

    n = 4
    C = sd["trunk.embed.weight"].shape[1]
    acts = _acts_from_oracle(d / "acts.safetensors", oracle, 2 * BLOCKS, n, C)
    return Case(path, oracle, acts, ("--layout-file", str(lay)))


# ---------------------------------------------------------------------------------------------------------------
# issue 15: tokenbender's mHC and mhc-pytorch (ports: neither installs here), Qwen4-Exp (transformers 5.24, the
# real model), DeepSeek-V4.1 (transformers main branch only: a port of its decoder layer)


def tokenbender(d: Path) -> Case:
    from test_io_tokenbender import build

    sd, mods = build(perturb=1.5, seed=3)
    path = d / "tb.safetensors"
    save_file(sd, str(path))

    def oracle(i: int, x: torch.Tensor) -> torch.Tensor | None:
        with torch.no_grad():
            return mods[i].paper(x.double())[2].detach()

    return Case(path, oracle, _acts_from_oracle(d / "acts.safetensors", oracle, len(mods), 4, 8))


def mhc_pytorch(d: Path) -> Case:
    from test_io_mhc_pytorch import build

    sd, mods = build()
    path = d / "mhc_pytorch.safetensors"
    save_file(sd, str(path))

    def oracle(i: int, x: torch.Tensor) -> torch.Tensor | None:
        with torch.no_grad():  # F.rms_norm's default eps for the stored float32
            return mods[i].mappings(x.double(), eps=torch.finfo(torch.float32).eps)[2].detach()

    return Case(path, oracle, _acts_from_oracle(d / "acts.safetensors", oracle, len(mods), 4, 8))


def qwen4_exp(n: int) -> Callable[[Path], Case]:
    def build(d: Path) -> Case:
        from test_io_qwen4_exp import tiny_model

        model = tiny_model(n)
        model.save_pretrained(d / "ckpt")

        def oracle(i: int, x: torch.Tensor) -> torch.Tensor | None:
            return None  # Qwen4ExpTextGatedResidual adds hyper_input unmixed: H_res = I

        return Case(d / "ckpt", oracle, _acts_from_oracle(d / "acts.safetensors", oracle, 4, n, 16))

    return build


def deepseek_v41(d: Path) -> Case:
    from test_io_deepseek_v41 import LAYERS, C, N, build
    from test_io_deepseek_v41 import oracle as port

    layers = build(d / "ckpt")

    def oracle(i: int, x: torch.Tensor) -> torch.Tensor | None:
        return port(layers, i, x)[2].double()

    return Case(d / "ckpt", oracle, _acts_from_oracle(d / "acts.safetensors", oracle, 2 * LAYERS, N, C))


def _builders() -> dict[str, Callable[[Path], Case]]:
    from hcdiag import registry

    out: dict[str, Callable[[Path], Case]] = {f"native-{v}": native(v) for v in registry.names()}
    out |= {"dsv4": deepseek_v4, "glm5-next": glm5_next, "hy-v4": hy_v4, "hy-v4-vl": hy_v4_vl}
    out |= {"lr-hc": lucidrains("hc"), "lr-mhc": lucidrains("mhc"), "lr-mhcv2": lucidrains("mhcv2"),
            "lr-mixed-pt": lucidrains("mixed", "pt"), "lr-train-dict": lucidrains("mhc", "train"),
            "lr-forms": lucidrains_forms}
    out |= {f"nanogpt-{v}": nanogpt(v) for v in ("mhc", "mhc_lite", "kromhc", "tbp_mhc")}
    out["layout-file"] = layout_file
    # one row per layout (Qwen4-Exp at n = 8 too is tests/test_io_qwen4_exp.py's: the matrix costs ~20 s a row)
    out |= {"tokenbender": tokenbender, "mhc-pytorch": mhc_pytorch, "qwen4-exp": qwen4_exp(4),
            "deepseek-v41": deepseek_v41}
    return out


BUILDERS = _builders()

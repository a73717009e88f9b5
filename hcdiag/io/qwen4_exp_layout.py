"""Layout ``qwen4-exp``: Qwen4-Exp's gated residual in transformers 5.24 (``models/qwen4_exp``).

Dimension letters: n streams (``hc_count``), C width of one stream (``hidden_size``), r = ``hc_lowrank``,
... leading token dims.

Keys per site (``Qwen4ExpTextGatedResidual``; converted checkpoints, any model prefix)::

    <prefix>layers.N.{attn,mlp}_hyper_connection.hc_norm.weight               [nC]
    <prefix>layers.N.{attn,mlp}_hyper_connection.input_mix_weight_down.weight [r, nC]
    <prefix>layers.N.{attn,mlp}_hyper_connection.input_mix_weight_up.weight   [nC, r]
    <prefix>layers.N.{attn,mlp}_hyper_connection.block_inject_weight.weight   [n, nC]
    <prefix>hyper_connection_mixer.*   (use_combine=False: the final collapse before the norm; not a site)

The streams are kept flat as [..., nC]. Forward, per token::

    x' = RMSNorm_C(x) (1 + hc_norm.weight)         grouped: one statistic per stream (group_size = C), fp32
    g  = sigmoid(up(silu(down(x') / n)))  [n, C]   a low-rank per-channel gate
    branch input = mean_i g_i * x'_i               (the n gated, normalised streams averaged)
    post = 2 sigmoid(inject(x') / n)   [n]         out = x + post_i F(...)  on stream i: H_res = I

hcdiag's site returns H_res = I (exactness ``identity``: the residual is added unmixed, so there is no
doubly-stochastic error to measure), H_post = post exactly, and as H_pre [n] the channel mean of the gate over
n, mean_c g_ic / n: the weight stream i gets in the average on a typical channel. The module gates each channel
separately and reads the *normalised* streams, so no scalar H_pre reproduces its branch input; a note says so.
"""

from __future__ import annotations

import math
import re
from typing import Any

import torch
import torch.nn.functional as F

from hcdiag.enums import Exactness
from hcdiag.errors import InputError
from hcdiag.io import reader
from hcdiag.io.base import Layout, LoadOptions, TensorSource, register_layout
from hcdiag.io.limits import MAX_STREAMS, bounded
from hcdiag.io.reader import KeyScan, Settings, assemble, depth_order, found, sub_config
from hcdiag.model import LoadedModel, Site
from hcdiag.site import HCOutput, SinkhornSpec, SiteModule, rms_norm

__all__ = ["DEFAULT_RMS_NORM_EPS", "QWEN4_EXP", "Qwen4ExpSite"]

DEFAULT_RMS_NORM_EPS = 1e-6  # Qwen4ExpTextConfig.rms_norm_eps
_PARTS = {
    "hc_norm.weight": "norm",
    "input_mix_weight_down.weight": "down",
    "input_mix_weight_up.weight": "up",
    "block_inject_weight.weight": "inject",
}
_SITE_RE = re.compile(
    r"^(?P<prefix>(?:.*\.)?)layers\.(?P<block>\d+)\.(?P<kind>attn|mlp)_hyper_connection\."
    r"(?P<part>" + "|".join(re.escape(p) for p in _PARTS) + r")$"
)
_MIXER_RE = re.compile(r"(?:^|\.)hyper_connection_mixer\.")


class Qwen4ExpSite(SiteModule):
    """One ``Qwen4ExpTextGatedResidual`` site (use_combine=True), in its buffers' dtype; H_res = I."""

    exactness = Exactness.IDENTITY
    sinkhorn = None
    norm: torch.Tensor  # [nC]
    down: torch.Tensor  # [r, nC]
    up: torch.Tensor  # [nC, r]
    inject: torch.Tensor  # [n, nC]

    def __init__(self, t: dict[str, torch.Tensor], *, n: int, C: int, norm_eps: float) -> None:
        super().__init__()
        self.n, self.C, self.norm_eps = int(n), int(C), float(norm_eps)
        for part, name in _PARTS.items():
            self.register_buffer(name, t[part])

    def _normed(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., n, C] -> the grouped RMSNorm times (1 + weight), [..., n, C]."""
        if x.shape[-2:] != (self.n, self.C):
            raise ValueError(f"expected stream input [..., {self.n}, {self.C}], got {list(x.shape)}")
        x = x.to(self.norm.dtype)
        return rms_norm(x, None, self.norm_eps) * (1.0 + self.norm.unflatten(-1, (self.n, self.C)))

    def _gate(self, normed: torch.Tensor) -> torch.Tensor:
        """The per-channel input gate g [..., n, C] (sigmoid of the low-rank mix) of the normalised streams."""
        g = torch.sigmoid(F.linear(F.silu(F.linear(normed.flatten(-2), self.down) / self.n), self.up))
        return g.unflatten(-1, (self.n, self.C))

    def branch_input(self, x: torch.Tensor, pre: torch.Tensor) -> torch.Tensor:
        """The module's ``mixed_input``: the channel-gated normalised streams averaged, mean_i g_i * x'_i
        [..., C] (``pre``, the gate's channel mean, does not determine it)."""
        normed = self._normed(x)
        return (self._gate(normed) * normed).mean(-2)

    def res_logits(self, x: torch.Tensor) -> None:
        return None

    def res_from_logits(self, logits: torch.Tensor, spec: SinkhornSpec | None = None) -> torch.Tensor:
        """H_res = I broadcast over ``logits``' leading dims."""
        eye = torch.eye(self.n, dtype=logits.dtype, device=logits.device)
        return eye.expand(*logits.shape[:-2], self.n, self.n).clone()

    def forward(self, x: torch.Tensor) -> HCOutput:
        """x [..., n, C] -> H_pre = mean_c g / n [..., n], H_post = 2 sigmoid(inject(x') / n), H_res = I."""
        normed = self._normed(x)
        pre = self._gate(normed).mean(-1) / self.n
        post = 2 * torch.sigmoid(F.linear(normed.flatten(-2), self.inject) / self.n)
        eye = torch.eye(self.n, dtype=pre.dtype, device=pre.device)
        return HCOutput(pre, post, eye.expand(*pre.shape[:-1], self.n, self.n).clone())

    def extra_repr(self) -> str:
        return f"n={self.n}, C={self.C}, lowrank={self.down.shape[0]}, norm_eps={self.norm_eps}"


def _scan(keys: list[str]) -> KeyScan:
    """Group the Qwen4-Exp gated-residual keys by model prefix, block and kind (mlp -> ffn); the
    hyper_connection_mixer tensors are ``side["mixer"]``."""
    return reader.scan_keys(keys, _SITE_RE, side={"mixer": _MIXER_RE})


def _detect(source: TensorSource) -> str | None:
    scan = _scan(source.keys())
    prefix = scan.main()
    if prefix is None:
        return None
    sites = scan.groups[prefix]
    return found(len(sites), "Qwen4-Exp gated-residual sites", f"{prefix}layers.N.{{attn,mlp}}_hyper_connection.*",
                 blocks=len({b for b, _ in sites}))


def _cfg_number(cfg: dict[str, Any], key: str, where: str, path: str, *, integer: bool) -> float | None:
    if key not in cfg:
        return None
    v = cfg[key]
    ok = isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
    ok = ok and (v >= 1 and float(v).is_integer() if integer else v >= 0)
    if not ok:
        raise InputError(f"{path}: {where} {key}={v!r} is not valid; fix config.json", path=path)
    return v


def _settings(source: TensorSource) -> tuple[Settings, dict[str, Any]]:
    """hc_count, hidden_size (as stated) and rms_norm_eps (else its default) of the (sub-)config holding
    hc_count, each with where it came from; and that config (its model_type and ple_layer_ids)."""
    path = source.path
    cfg, where = sub_config(source.config, marker="hc_count")
    st = Settings({}, {}, path)
    for key, integer in (("hc_count", True), ("hidden_size", True), ("rms_norm_eps", False)):
        v = _cfg_number(cfg, key, where, path, integer=integer)
        if v is not None:
            st.values[key], st.source[key] = v, f"{where} ({key})"
    if st.stated("hc_count"):
        bounded(int(st.values["hc_count"]), MAX_STREAMS, f"{where} hc_count (streams n)", path)
    if st.stated("rms_norm_eps"):
        st.values["rms_norm_eps"] = float(st.values["rms_norm_eps"])
    else:
        st.values["rms_norm_eps"] = DEFAULT_RMS_NORM_EPS
        st.source["rms_norm_eps"] = f"default ({DEFAULT_RMS_NORM_EPS})"
    return st, cfg


def _site_shapes(source: TensorSource, parts: dict[str, str], name: str) -> tuple[int, int]:
    """(n, C) from one site's shapes; InputError naming what does not fit."""
    path = source.path
    missing = [p for p in _PARTS if p not in parts]
    if missing:
        raise InputError(f"{path}: Qwen4-Exp site {name} is incomplete: no {', '.join(missing)} (missing shard "
                         "or renamed key?)", path=path)
    sh = {p: tuple(source.info(k).shape) for p, k in parts.items()}
    inject, norm = sh["block_inject_weight.weight"], sh["hc_norm.weight"]
    if len(inject) != 2 or len(norm) != 1 or inject[1] != norm[0] or inject[0] < 2 or norm[0] % inject[0]:
        raise InputError(f"{path}: {parts['block_inject_weight.weight']} {list(inject)} and "
                         f"{parts['hc_norm.weight']} {list(norm)} are not [n, nC] and [nC]", path=path)
    n, nC = inject
    down, up = sh["input_mix_weight_down.weight"], sh["input_mix_weight_up.weight"]
    if len(down) != 2 or down[1] != nC or up != (nC, down[0]):
        raise InputError(f"{path}: {parts['input_mix_weight_down.weight']} {list(down)} / "
                         f"{parts['input_mix_weight_up.weight']} {list(up)} are not [r, {nC}] / [{nC}, r]", path=path)
    return n, nC // n


def _site(source: TensorSource, block: int, kind: str, parts: dict[str, str], st: Settings,
          earlier: list[Site]) -> Site:
    """The next site after ``earlier``: its shapes checked against config.json's hc_count / hidden_size and
    against the first site's n and C."""
    path, name = source.path, f"{kind}_{block}"
    n, C = _site_shapes(source, parts, name)
    n_cfg, C_cfg = st.get("hc_count"), st.get("hidden_size")
    if (n_cfg is not None and n != n_cfg) or (C_cfg is not None and C != C_cfg):
        where = st.source.get("hc_count", st.source.get("hidden_size", "")).split(" (")[0]
        raise InputError(f"{path}: {parts['block_inject_weight.weight']} implies n={n}, C={C}; {where} says "
                         f"hc_count={n_cfg}, hidden_size={C_cfg}", path=path)
    if earlier and (n, C) != (earlier[0].module.n, earlier[0].module.C):
        raise InputError(f"{path}: site {name} has n={n}, C={C}; earlier sites differ", path=path)
    t = {p: source.get(k) for p, k in parts.items()}
    infos = [source.info(parts[p]) for p in _PARTS]
    module = Qwen4ExpSite(t, n=n, C=C, norm_eps=st.values["rms_norm_eps"])
    return Site(len(earlier), name, block, kind, "qwen4-exp", module, infos)


def _sites(source: TensorSource, groups: dict[tuple[int, str], dict[str, str]], st: Settings) -> list[Site]:
    """The sites in depth order (attn before ffn in each block)."""
    sites: list[Site] = []
    for block, kind in depth_order(groups):
        sites.append(_site(source, block, kind, groups[(block, kind)], st, sites))
    return sites


def _sources(st: Settings) -> dict[str, str]:
    return {
        "n": st.source["hc_count"] if st.stated("hc_count") else "shapes (block_inject_weight rows)",
        "C": st.source["hidden_size"] if st.stated("hidden_size") else "shapes (hc_norm.weight / n)",
        "rms_norm_eps": st.source["rms_norm_eps"],
        "convention": "not applicable (H_res = I: Qwen4-Exp adds the residual unmixed)",
    }


def _notes(scan: KeyScan, prefix: str, cfg: dict[str, Any]) -> list[str]:
    """H_res = I and what H_pre / H_post mean; the final mixer, the PLE writes and the other prefixes."""
    notes = [
        "Qwen4-Exp adds the residual unmixed: H_res = I at every site, so there is no doubly-stochastic error to "
        "measure (rows and columns sum to 1 exactly); what the sites learn is H_pre / H_post",
        "H_post = 2 sigmoid(block_inject(x') / n) exactly; H_pre = mean over channels of the per-channel gate "
        "sigmoid(up(silu(down(x') / n))) over n: the module gates every channel separately and reads the "
        "normalised streams x' = RMSNorm_C(x) (1 + hc_norm.weight), so no scalar H_pre reproduces its branch "
        "input exactly",
    ]
    if scan.side["mixer"]:
        notes.append(f"hyper_connection_mixer ({len(scan.side['mixer'])} tensors) collapses the n streams before "
                     "the final norm: not a residual site, not counted")
    ple = cfg.get("ple_layer_ids") or []
    if isinstance(ple, list) and ple:
        blocks = sorted(int(b) - 1 for b in ple if isinstance(b, int) and not isinstance(b, bool))
        notes.append(f"PLE modules at layers {blocks} also write into the streams (hidden_states + ple(...)) "
                     "before the attention site: the H_res products and gains leave them out")
    for other in sorted(p for p in scan.groups if p != prefix):
        notes.append(f"ignored {len(scan.groups[other])} Qwen4-Exp sites under {other!r}; read those under "
                     f"{prefix or '(no prefix)'!r}")
    return notes


def _load(source: TensorSource, options: LoadOptions) -> LoadedModel:
    path = source.path
    scan = _scan(source.keys())
    prefix = scan.main()
    if prefix is None:
        raise InputError(f"{path}: no Qwen4-Exp keys (layers.N.attn_hyper_connection.*)", path=path)
    st, cfg = _settings(source)
    sites = _sites(source, scan.groups[prefix], st)
    used = {m.string for m in scan.side["mixer"]} | {i.key for s in sites for i in s.tensors}
    return assemble(source, "qwen4-exp", sites, settings=_sources(st), notes=_notes(scan, prefix, cfg),
                    used=used, metadata={"family": cfg.get("model_type") or "qwen4_exp"})


QWEN4_EXP = register_layout(
    Layout(
        name="qwen4-exp",
        summary="Qwen4-Exp (transformers 5.24) gated residual: layers.N.{attn,mlp}_hyper_connection.*, H_res = I",
        detect=_detect,
        load=_load,
        priority=45,
    )
)

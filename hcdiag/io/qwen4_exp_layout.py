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
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from hcdiag.enums import Exactness
from hcdiag.errors import InputError
from hcdiag.io.base import Layout, LoadOptions, TensorSource, dtype_summary, register_layout
from hcdiag.io.limits import MAX_STREAMS, bounded
from hcdiag.io.reader import main_prefix
from hcdiag.model import LoadedModel, Site
from hcdiag.site import HCOutput, SinkhornSpec, SiteModule

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
        xn = x * torch.rsqrt(x.square().mean(-1, keepdim=True) + self.norm_eps)
        return xn * (1.0 + self.norm.unflatten(-1, (self.n, self.C)))

    def gate(self, x: torch.Tensor) -> torch.Tensor:
        """The per-channel input gate g [..., n, C] (sigmoid of the low-rank mix)."""
        flat = self._normed(x).flatten(-2)
        g = torch.sigmoid(F.linear(F.silu(F.linear(flat, self.down) / self.n), self.up))
        return g.unflatten(-1, (self.n, self.C))

    def res_logits(self, x: torch.Tensor) -> None:
        return None

    def res_from_logits(self, logits: torch.Tensor, spec: SinkhornSpec | None = None) -> torch.Tensor:
        """H_res = I broadcast over ``logits``' leading dims."""
        eye = torch.eye(self.n, dtype=logits.dtype, device=logits.device)
        return eye.expand(*logits.shape[:-2], self.n, self.n).clone()

    def forward(self, x: torch.Tensor) -> HCOutput:
        """x [..., n, C] -> H_pre = mean_c g / n [..., n], H_post = 2 sigmoid(inject(x') / n), H_res = I."""
        flat = self._normed(x).flatten(-2)
        pre = self.gate(x).mean(-1) / self.n
        post = 2 * torch.sigmoid(F.linear(flat, self.inject) / self.n)
        eye = torch.eye(self.n, dtype=pre.dtype, device=pre.device)
        return HCOutput(pre, post, eye.expand(*pre.shape[:-1], self.n, self.n).clone())

    def extra_repr(self) -> str:
        return f"n={self.n}, C={self.C}, lowrank={self.down.shape[0]}, norm_eps={self.norm_eps}"


@dataclass
class _Scan:
    groups: dict[str, dict[tuple[int, str], dict[str, str]]] = field(default_factory=dict)
    mixer: list[str] = field(default_factory=list)


def _scan(keys: list[str]) -> _Scan:
    scan = _Scan()
    for key in keys:
        m = _SITE_RE.match(key)
        if m:
            kind = "attn" if m.group("kind") == "attn" else "ffn"
            site = scan.groups.setdefault(m.group("prefix"), {}).setdefault((int(m.group("block")), kind), {})
            site[m.group("part")] = key
        elif _MIXER_RE.search(key):
            scan.mixer.append(key)
    return scan


def _detect(source: TensorSource) -> str | None:
    scan = _scan(source.keys())
    prefix = main_prefix(scan.groups)
    if prefix is None:
        return None
    sites = scan.groups[prefix]
    return (f"found {len(sites)} Qwen4-Exp gated-residual sites in {len({b for b, _ in sites})} blocks named "
            f"{prefix}layers.N.{{attn,mlp}}_hyper_connection.*")


def _text_config(config: dict[str, Any] | None) -> tuple[dict[str, Any], str]:
    """The (sub-)config holding hc_count: top level or ``text_config``."""
    if not isinstance(config, dict):
        return {}, ""
    if "hc_count" in config:
        return config, "config.json"
    sub = config.get("text_config")
    if isinstance(sub, dict):
        return sub, "config.json:text_config"
    return config, "config.json"


def _cfg_number(cfg: dict[str, Any], key: str, where: str, path: str, *, integer: bool) -> float | None:
    if key not in cfg:
        return None
    v = cfg[key]
    ok = isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
    ok = ok and (v >= 1 and float(v).is_integer() if integer else v >= 0)
    if not ok:
        raise InputError(f"{path}: {where} {key}={v!r} is not valid; fix config.json", path=path)
    return v


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


def _load(source: TensorSource, options: LoadOptions) -> LoadedModel:
    path = source.path
    scan = _scan(source.keys())
    prefix = main_prefix(scan.groups)
    if prefix is None:
        raise InputError(f"{path}: no Qwen4-Exp keys (layers.N.attn_hyper_connection.*)", path=path)
    cfg, where = _text_config(source.config)
    n_cfg = _cfg_number(cfg, "hc_count", where, path, integer=True)
    C_cfg = _cfg_number(cfg, "hidden_size", where, path, integer=True)
    eps_cfg = _cfg_number(cfg, "rms_norm_eps", where, path, integer=False)
    if n_cfg is not None:
        bounded(int(n_cfg), MAX_STREAMS, f"{where} hc_count (streams n)", path)
    eps = float(eps_cfg) if eps_cfg is not None else DEFAULT_RMS_NORM_EPS
    sites: list[Site] = []
    used: set[str] = set(scan.mixer)
    groups = scan.groups[prefix]
    for block, kind in sorted(groups, key=lambda bk: (bk[0], 0 if bk[1] == "attn" else 1)):
        parts = groups[(block, kind)]
        name = f"{kind}_{block}"
        n, C = _site_shapes(source, parts, name)
        if (n_cfg is not None and n != n_cfg) or (C_cfg is not None and C != C_cfg):
            raise InputError(f"{path}: {parts['block_inject_weight.weight']} implies n={n}, C={C}; {where} says "
                             f"hc_count={n_cfg}, hidden_size={C_cfg}", path=path)
        if sites and (n, C) != (sites[0].module.n, sites[0].module.C):
            raise InputError(f"{path}: site {name} has n={n}, C={C}; earlier sites differ", path=path)
        t = {p: source.get(k) for p, k in parts.items()}
        used.update(parts.values())
        infos = [source.info(parts[p]) for p in _PARTS]
        sites.append(Site(len(sites), name, block, kind, "qwen4-exp", Qwen4ExpSite(t, n=n, C=C, norm_eps=eps), infos))
    n, C = sites[0].module.n, sites[0].module.C
    settings = {
        "n": f"{where} (hc_count)" if n_cfg is not None else "shapes (block_inject_weight rows)",
        "C": f"{where} (hidden_size)" if C_cfg is not None else "shapes (hc_norm.weight / n)",
        "rms_norm_eps": f"{where} (rms_norm_eps)" if eps_cfg is not None else f"default ({DEFAULT_RMS_NORM_EPS})",
        "convention": "not applicable (H_res = I: Qwen4-Exp adds the residual unmixed)",
    }
    notes = [
        "Qwen4-Exp adds the residual unmixed: H_res = I at every site, so there is no doubly-stochastic error to "
        "measure (rows and columns sum to 1 exactly); what the sites learn is H_pre / H_post",
        "H_post = 2 sigmoid(block_inject(x') / n) exactly; H_pre = mean over channels of the per-channel gate "
        "sigmoid(up(silu(down(x') / n))) over n: the module gates every channel separately and reads the "
        "normalised streams x' = RMSNorm_C(x) (1 + hc_norm.weight), so no scalar H_pre reproduces its branch "
        "input exactly",
    ]
    if scan.mixer:
        notes.append(f"hyper_connection_mixer ({len(scan.mixer)} tensors) collapses the n streams before the final "
                     "norm: not a residual site, not counted")
    ple = cfg.get("ple_layer_ids") or []
    if isinstance(ple, list) and ple:
        blocks = sorted(int(b) - 1 for b in ple if isinstance(b, int) and not isinstance(b, bool))
        notes.append(f"PLE modules at layers {blocks} also write into the streams (hidden_states + ple(...)) "
                     "before the attention site: the H_res products and gains leave them out")
    others = sorted(p for p in scan.groups if p != prefix)
    for other in others:
        notes.append(f"ignored {len(scan.groups[other])} Qwen4-Exp sites under {other!r}; read those under "
                     f"{prefix or '(no prefix)'!r}")
    from hcdiag.io.load import unmatched_hc_keys

    return LoadedModel(
        path=path,
        layout="qwen4-exp",
        layout_reason="",
        sites=sites,
        n=n,
        C=C,
        metadata={"family": cfg.get("model_type") or "qwen4_exp"},
        settings_source=settings,
        source_dtype=dtype_summary(i for s in sites for i in s.tensors),
        unmatched_keys=unmatched_hc_keys(source, used),
        notes=notes,
    )


QWEN4_EXP = register_layout(
    Layout(
        name="qwen4-exp",
        summary="Qwen4-Exp (transformers 5.24) gated residual: layers.N.{attn,mlp}_hyper_connection.*, H_res = I",
        detect=_detect,
        load=_load,
        priority=45,
    )
)

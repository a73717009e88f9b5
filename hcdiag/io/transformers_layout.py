"""The ``transformers`` layout: mHC as shipped in DeepSeek-V4, GLM-5-Next and HY-V4 (SPEC section 2).

Dimension letters: n streams (``hc_mult``), C width of one stream (``hidden_size``), ... leading token dims.

Checked against transformers 5.24 (``models/deepseek_v4/modeling_deepseek_v4.py`` DeepseekV4HyperConnection,
``models/glm5_next`` Glm5NextTextHyperConnection, ``models/hy_v4`` HYV4HyperConnection) and the key renames in
``transformers/conversion_mapping.py``. Per site (one sub-layer), keys in the converted checkpoints::

    <prefix>layers.N.attn_hc.{fn,base,scale}   <prefix>layers.N.ffn_hc.{fn,base,scale}
    <prefix>hc_head.{hc_fn,hc_base,hc_scale}   (DeepSeek-V4 / HY-V4 model-level head; not a residual site)

and in the original releases (before conversion)::

    layers.N.hc_attn_{fn,base,scale}  layers.N.hc_ffn_*  hc_head_{fn,base,scale}          (DeepSeek-V4, GLM-5)
    layers.N.hc_pre.hc_attn_layer.hc_fn  layers.N.hc_mlp_layer.hc_{fn,base,scale}         (HY-V4)

DeepSeek-V4 / GLM-5-Next site: fn [(n+2)n, nC], base [(n+2)n], scale [3]. With x' = unweighted RMSNorm of the
flattened streams (eps = ``rms_norm_eps``), mixes = x' fn^T split [pre n, post n, comb n^2]:
pre = sigmoid(pre_w s0 + b_pre) + hc_eps, post = 2 sigmoid(post_w s1 + b_post),
comb = Sinkhorn_transformers(comb_w s2 + b_comb) on comb = [input stream, output stream]; the decoder layer
applies comb^T to the streams, so paper H_res = comb^T (the final column pass on comb makes paper rows exact).

HY-V4 site: fn [2n, nC], base [2n], scale [2]: pre = sigmoid(.) + hc_eps, post = hc_magnitude sigmoid(.) +
hc_eps, and the residual is added unmixed: H_res = I (exactness IDENTITY; iHC in the registry).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from typing import Any

import torch
import torch.nn.functional as F
from packaging.version import InvalidVersion, Version

from hcdiag.enums import Convention, Exactness, Form
from hcdiag.errors import InputError, UsageError
from hcdiag.io.base import Layout, LoadOptions, TensorSource, drop_layers_beyond, main_prefix, register_layout
from hcdiag.io.limits import MAX_ITERS, MAX_STREAMS, bounded
from hcdiag.model import LoadedModel, Site
from hcdiag.sinkhorn import has_eps
from hcdiag.site import HCOutput, LinearRead, SinkhornSpec, SiteEval, SiteModule

__all__ = [
    "DEFAULT_HC_EPS",
    "DEFAULT_HC_MAGNITUDE",
    "DEFAULT_ITERS",
    "DEFAULT_RMS_NORM_EPS",
    "TRANSFORMERS",
    "TransformersIHCSite",
    "TransformersMHCSite",
    "scan_keys",
]

# transformers 5.24 config defaults (DeepseekV4Config / Glm5NextTextConfig / HYV4Config)
DEFAULT_ITERS = 20  # hc_sinkhorn_iters
DEFAULT_HC_EPS = 1e-6  # hc_eps
DEFAULT_RMS_NORM_EPS = 1e-6  # DeepseekV4Config.rms_norm_eps (GLM-5-Next and HY-V4 default to 1e-5)
DEFAULT_HC_MAGNITUDE = 2.0  # HYV4Config.hc_magnitude

_SITE_RE = re.compile(
    r"^(?P<prefix>(?:.*\.)?)layers\.(?P<block>\d+)\.(?:"
    r"(?P<k1>attn|ffn|mlp)_hc\.(?P<p1>fn|base|scale)"
    r"|(?:hc_pre\.)?hc_(?P<k2>attn|ffn|mlp)(?:_layer\.hc)?_(?P<p2>fn|base|scale)"
    r")$"
)
_HEAD_RE = re.compile(r"(?:^|\.)hc_head(?:\.hc_head_|\.hc_|_)(?:fn|base|scale)$")
_KIND = {"attn": "attn", "ffn": "ffn", "mlp": "ffn"}
_PARTS = ("fn", "base", "scale")


# ------------------------------------------------------------------------------------------------------------
# site modules


class _TransformersSiteBase(SiteModule):
    """Shared RMSNorm + projection of DeepseekV4HyperConnection / HYV4HyperConnection, in the buffers' dtype."""

    fn: torch.Tensor  # [rows, nC]
    base: torch.Tensor  # [rows]
    scale: torch.Tensor  # [3] (pre, post, comb) or [2] (HY-V4: pre, post)

    def __init__(
        self,
        fn: torch.Tensor,
        base: torch.Tensor,
        scale: torch.Tensor,
        *,
        n: int,
        C: int,
        norm_eps: float,
        hc_eps: float,
    ) -> None:
        super().__init__()
        self.n = n
        self.C = C
        self.norm_eps = float(norm_eps)
        self.hc_eps = float(hc_eps)
        self.register_buffer("fn", fn)
        self.register_buffer("base", base)
        self.register_buffer("scale", scale)

    def _mixes(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., n, C] -> mixes [..., rows of fn] = RMSNorm(vec(x)) fn^T (unweighted RMSNorm over nC)."""
        if x.shape[-2:] != (self.n, self.C):
            raise ValueError(f"expected stream input [..., {self.n}, {self.C}], got {list(x.shape)}")
        flat = x.to(self.fn.dtype).flatten(-2)
        flat = flat * torch.rsqrt(flat.square().mean(-1, keepdim=True) + self.norm_eps)
        return F.linear(flat, self.fn)

    def _logits(self, mixes: torch.Tensor, sizes: list[int]) -> list[torch.Tensor]:
        """mixes [..., rows of fn] (:meth:`_mixes`) -> split by ``sizes`` (pre, post[, comb]), each times its
        scale plus its slice of base, in the buffers' dtype."""
        if mixes.shape[-1] != self.fn.shape[0]:
            raise ValueError(f"expected read values [..., {self.fn.shape[0]}], got {list(mixes.shape)}")
        parts = mixes.to(self.fn.dtype).split(sizes, dim=-1)
        return [w * s + b for w, b, s in zip(parts, self.base.split(sizes), self.scale.unbind(0), strict=True)]

    def linear_read(self) -> LinearRead:
        """Every output is a function of RMSNorm(vec(x)) fn^T: W = fn [rows, nC], eps = rms_norm_eps."""
        return LinearRead(self.fn, self.norm_eps)

    def evaluate(self, x: torch.Tensor) -> SiteEval:
        """H_pre, H_post and the H_res logits (or H_res) from one RMSNorm + projection of x [..., n, C]."""
        return self.evaluate_read(self._mixes(x))

    def extra_repr(self) -> str:
        return f"n={self.n}, C={self.C}, norm_eps={self.norm_eps}, hc_eps={self.hc_eps}"


class TransformersMHCSite(_TransformersSiteBase):
    """One DeepSeek-V4 / GLM-5-Next ``*_hc`` site: fn [(n+2)n, nC], base [(n+2)n], scale [3].

    Reproduces ``DeepseekV4HyperConnection.forward`` and returns paper convention: H_res = comb^T.
    """

    res_params = ("fn", "base", "scale")  # packed: comb is the last n^2 rows of fn / base, with scale[2]

    exactness = Exactness.SINKHORN
    registry_variant = "mhc"
    param_form = Form.PAPER

    def __init__(
        self,
        fn: torch.Tensor,
        base: torch.Tensor,
        scale: torch.Tensor,
        *,
        n: int,
        C: int,
        norm_eps: float = DEFAULT_RMS_NORM_EPS,
        hc_eps: float = DEFAULT_HC_EPS,
        sinkhorn: SinkhornSpec | None = None,
    ) -> None:
        super().__init__(fn, base, scale, n=n, C=C, norm_eps=norm_eps, hc_eps=hc_eps)
        self.sinkhorn = sinkhorn or SinkhornSpec(Convention.TRANSFORMERS, DEFAULT_ITERS, hc_eps, "default")

    def evaluate_read(self, z: torch.Tensor) -> SiteEval:
        """mixes z [..., (n+2)n] -> H_pre, H_post [..., n] and the comb logits in paper orientation [..., n, n]."""
        n = self.n
        pre, post, comb = self._logits(z, [n, n, n * n])
        # comb logits [..., input, output] (code orientation); paper orientation is the transpose
        comb = comb.unflatten(-1, (n, n))
        return SiteEval(torch.sigmoid(pre) + self.hc_eps, 2 * torch.sigmoid(post), comb.transpose(-1, -2), None)

    def res_logits(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., n, C] -> comb logits transposed to paper orientation [..., n, n] (row = output stream)."""
        logits = self.evaluate(x).logits
        assert logits is not None
        return logits

    def res_from_logits(self, logits: torch.Tensor, spec: SinkhornSpec | None = None) -> torch.Tensor:
        """H_res [..., n, n] = comb^T after the transformers Sinkhorn (softmax + eps start, eps denominators)."""
        from hcdiag.sinkhorn import project  # lazy: keeps the reader light

        use = spec if spec is not None else self.sinkhorn
        assert use is not None
        return project(logits, use)

    def forward(self, x: torch.Tensor) -> HCOutput:
        """x [..., n, C] -> H_pre [..., n], H_post [..., n], H_res [..., n, n] (paper convention)."""
        pre, post, logits, _ = self.evaluate(x)
        assert logits is not None
        return HCOutput(pre, post, self.res_from_logits(logits))


class TransformersIHCSite(_TransformersSiteBase):
    """One HY-V4 site: fn [2n, nC], base [2n], scale [2]; no comb, H_res = I."""

    exactness = Exactness.IDENTITY
    registry_variant = "ihc"
    param_form = Form.PAPER
    sinkhorn = None

    def __init__(
        self,
        fn: torch.Tensor,
        base: torch.Tensor,
        scale: torch.Tensor,
        *,
        n: int,
        C: int,
        norm_eps: float = DEFAULT_RMS_NORM_EPS,
        hc_eps: float = DEFAULT_HC_EPS,
        magnitude: float = DEFAULT_HC_MAGNITUDE,
    ) -> None:
        super().__init__(fn, base, scale, n=n, C=C, norm_eps=norm_eps, hc_eps=hc_eps)
        self.magnitude = float(magnitude)

    def _eye(self, lead: torch.Size | tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
        eye = torch.eye(self.n, dtype=like.dtype, device=like.device)
        return eye.expand(*lead, self.n, self.n).clone()

    def res_logits(self, x: torch.Tensor) -> None:
        return None

    def res_from_logits(self, logits: torch.Tensor, spec: SinkhornSpec | None = None) -> torch.Tensor:
        """H_res = I broadcast over ``logits``' leading dims."""
        return self._eye(logits.shape[:-2], logits)

    def evaluate_read(self, z: torch.Tensor) -> SiteEval:
        """mixes z [..., 2n] -> H_pre, H_post [..., n]; no logits; H_res = I [..., n, n]."""
        pre_l, post_l = self._logits(z, [self.n, self.n])
        pre = torch.sigmoid(pre_l) + self.hc_eps
        post = self.magnitude * torch.sigmoid(post_l) + self.hc_eps
        return SiteEval(pre, post, None, self._eye(pre.shape[:-1], pre))

    def forward(self, x: torch.Tensor) -> HCOutput:
        """x [..., n, C] -> H_pre, H_post [..., n]; H_res = I [..., n, n]."""
        pre, post, _, res = self.evaluate(x)
        assert res is not None
        return HCOutput(pre, post, res)


# ------------------------------------------------------------------------------------------------------------
# key scanning


@dataclass
class _Scan:
    # prefix -> (block, kind) -> part -> key
    groups: dict[str, dict[tuple[int, str], dict[str, str]]] = field(default_factory=dict)
    head: list[str] = field(default_factory=list)
    style: dict[str, str] = field(default_factory=dict)  # prefix -> an example key with N for the block


def scan_keys(keys: list[str]) -> _Scan:
    """Group the keys that follow a transformers mHC naming by model prefix, block and sub-layer kind."""
    scan = _Scan()
    for key in keys:
        m = _SITE_RE.match(key)
        if m:
            prefix = m.group("prefix")
            kind = _KIND[m.group("k1") or m.group("k2")]
            part = m.group("p1") or m.group("p2")
            site = scan.groups.setdefault(prefix, {}).setdefault((int(m.group("block")), kind), {})
            site.setdefault(part, key)
            if prefix not in scan.style:
                s, e = m.span("block")
                scan.style[prefix] = key[:s] + "N" + key[e:]
        elif _HEAD_RE.search(key):
            scan.head.append(key)
    return scan


def _detect(source: TensorSource) -> str | None:
    scan = scan_keys(source.keys())
    prefix = main_prefix(scan.groups)
    if prefix is None:
        return None
    sites = scan.groups[prefix]
    blocks = {b for b, _ in sites}
    style = re.sub(r"(attn|ffn|mlp)", "{attn,ffn}", scan.style[prefix], count=1)
    style = re.sub(r"(fn|base|scale)$", "{fn,base,scale}", style)
    return f"found {len(sites)} HC sites in {len(blocks)} blocks named {style}"


# ------------------------------------------------------------------------------------------------------------
# settings


def _hc_config(config: dict[str, Any] | None) -> tuple[dict[str, Any], str]:
    """The (sub-)config that holds hc_mult: top level, or text_config / language_config / ... of a VLM."""
    if not isinstance(config, dict):
        return {}, ""
    if "hc_mult" in config:
        return config, "config.json"
    for name, sub in config.items():
        if isinstance(sub, dict) and "hc_mult" in sub:
            return sub, f"config.json:{name}"
    return config, "config.json"


def _number(cfg: dict[str, Any], key: str, where: str, path: str, kind: type) -> Any:
    value = cfg[key]
    ok = isinstance(value, int | float) and not isinstance(value, bool)
    if kind is int:
        ok = ok and float(value).is_integer() and value >= 1
    else:
        ok = ok and math.isfinite(value) and value >= 0
    if not ok:
        raise InputError(f"{path}: {where} {key}={value!r} is not a valid {kind.__name__}; fix config.json", path=path)
    return kind(value)


@dataclass
class _Settings:
    values: dict[str, Any]
    source: dict[str, str]


def _settings(source: TensorSource, options: LoadOptions) -> _Settings:
    cfg, where = _hc_config(source.config)
    top = source.config if isinstance(source.config, dict) else {}
    vals: dict[str, Any] = {}
    src: dict[str, str] = {}
    defaults = {
        "hc_sinkhorn_iters": (int, DEFAULT_ITERS),
        "hc_eps": (float, DEFAULT_HC_EPS),
        "rms_norm_eps": (float, DEFAULT_RMS_NORM_EPS),
        "hc_magnitude": (float, DEFAULT_HC_MAGNITUDE),
        "hc_mult": (int, None),
        "hidden_size": (int, None),
        "num_hidden_layers": (int, None),
    }
    for key, (kind, default) in defaults.items():
        if key in cfg:
            vals[key] = _number(cfg, key, where, source.path, kind)
            src[key] = f"{where} ({key})"
        elif key in top:
            vals[key] = _number(top, key, "config.json", source.path, kind)
            src[key] = f"config.json ({key})"
        elif default is not None:
            vals[key] = default
            src[key] = f"default ({key}={default})"
    if options.iters is None and ("hc_sinkhorn_iters" in cfg or "hc_sinkhorn_iters" in top):
        bounded(vals["hc_sinkhorn_iters"], MAX_ITERS, f"{src['hc_sinkhorn_iters'].split(' (')[0]} hc_sinkhorn_iters",
                source.path, override="--iters")
    if "hc_mult" in vals:
        bounded(vals["hc_mult"], MAX_STREAMS, "config.json hc_mult (streams n)", source.path)
    if options.iters is not None:
        if isinstance(options.iters, bool) or not isinstance(options.iters, int) or options.iters < 1:
            raise UsageError(f"--iters {options.iters!r} must be an integer >= 1", option="--iters")
        vals["hc_sinkhorn_iters"] = options.iters
        src["hc_sinkhorn_iters"] = "cli (--iters)"
    vals["model_type"] = cfg.get("model_type") or top.get("model_type")
    return _Settings(vals, src)


# The transformers release from which DeepSeek-V4's comb Sinkhorn starts from softmax + eps. Found from the PyPI
# wheels (no git history here: `fetch` of huggingface/transformers was refused, 1.33 GB > the 500 MB cap):
# 5.7.0 has no models/deepseek_v4; 5.8.0 (the first with it), 5.9.0, 5.10.1, 5.10.4, 5.16.1, 5.20.2, 5.22.2 and
# 5.24.0 all start from `torch.softmax(comb...` and none from `torch.sigmoid(comb...`. The sigmoid start
# (Convention.TRANSFORMERS_SIGMOID) was the code before the first release (the DeepSeek-V4 pull request), so
# only a config written by a transformers 5 pre-release below 5.8.0 (e.g. 5.8.0.dev0) gets it. A 4.x version
# predates any transformers DeepSeek-V4 code (DeepSeek's own release configs say 4.57.1) and keeps softmax.
SOFTMAX_START_SINCE = Version("5.8.0")
_SIGMOID_FROM = Version("5.0.0.dev0")


def _library_version(top: dict[str, Any]) -> tuple[Version, str] | None:
    """The transformers version that runs the checkpoint: config.json's ``transformers_version`` when present
    and valid, else the installed transformers, else None."""
    raw = top.get("transformers_version")
    if raw is not None:
        try:
            return Version(str(raw)), f"config.json transformers_version {raw}"
        except InvalidVersion:
            pass
    try:
        v = version("transformers")
    except PackageNotFoundError:
        return None
    return Version(v), f"installed transformers {v}"


def _convention(options: LoadOptions, top: dict[str, Any], model_type: Any) -> tuple[Convention, str]:
    if options.convention is None:
        lib = _library_version(top) if model_type in (None, "deepseek_v4") else None
        if lib is None:
            return Convention.TRANSFORMERS, "layout (transformers)"
        v, why = lib
        if _SIGMOID_FROM <= v < SOFTMAX_START_SINCE:
            return Convention.TRANSFORMERS_SIGMOID, (
                f"{why} < {SOFTMAX_START_SINCE}, the first release with the softmax start "
                "(the earlier DeepSeek-V4 code starts from sigmoid)"
            )
        if v < _SIGMOID_FROM:
            return Convention.TRANSFORMERS, f"layout (transformers; {why} predates transformers' DeepSeek-V4 code)"
        return Convention.TRANSFORMERS, f"layout (transformers; {why} >= {SOFTMAX_START_SINCE}: softmax start)"
    try:
        return Convention(str(options.convention)), "cli (--convention)"
    except ValueError:
        known = ", ".join(c.value for c in Convention)
        raise UsageError(
            f"--convention {options.convention!r} is unknown; choose one of: {known}", option="--convention"
        ) from None


# ------------------------------------------------------------------------------------------------------------
# loading


def _infer_n(rows: int, scale_len: int) -> int | None:
    if scale_len == 3:
        n = math.isqrt(rows + 1) - 1  # rows = (n + 2) n = (n + 1)^2 - 1
        return n if n >= 1 and (n + 2) * n == rows else None
    if scale_len == 2 and rows % 2 == 0 and rows >= 2:
        return rows // 2
    return None


def _gaps(blocks: list[int], shown: int = 8) -> str:
    """The missing block numbers between the first and the last of ``blocks`` (sorted), as text: at most
    ``shown`` of them and a count, never the whole range (a key may name block 10^8)."""
    missing: list[int] = []
    total = 0
    for a, b in zip(blocks, blocks[1:], strict=False):  # consecutive pairs
        total += b - a - 1
        missing.extend(range(a + 1, min(b, a + 1 + shown - len(missing))))
    if not total:
        return ""
    more = f" and {total - len(missing):,} more" if total > len(missing) else ""
    return "[" + ", ".join(map(str, missing)) + "]" + more


def _load(source: TensorSource, options: LoadOptions) -> LoadedModel:
    path = source.path
    scan = scan_keys(source.keys())
    prefix = main_prefix(scan.groups)
    if prefix is None:
        raise InputError(f"{path}: no transformers mHC keys (layers.N.attn_hc.fn, layers.N.hc_attn_fn, ...)", path=path)
    st = _settings(source, options)
    top = source.config if isinstance(source.config, dict) else {}
    conv, conv_src = _convention(options, top, st.values.get("model_type"))
    notes: list[str] = []
    for other in sorted(p for p in scan.groups if p != prefix):
        notes.append(
            f"ignored {len(scan.groups[other])} HC sites under {other or '(no prefix)'!r}; "
            f"read those under {prefix or '(no prefix)'!r}"
        )
    n_layers = st.values.get("num_hidden_layers")
    sites_keys, dropped = drop_layers_beyond(scan.groups[prefix], n_layers, "MTP layers")
    notes += [dropped] if dropped else []
    if not sites_keys:
        raise InputError(f"{path}: no transformers mHC sites within num_hidden_layers={n_layers}", path=path)

    n_cfg, C_cfg = st.values.get("hc_mult"), st.values.get("hidden_size")
    if options.iters is not None or options.convention is not None:
        spec_src = "cli"
    elif st.source["hc_sinkhorn_iters"].startswith("config"):
        spec_src = "config"
    else:
        spec_src = "default"
    n = C = None
    settings_source: dict[str, str] = {}
    sites: list[Site] = []
    dtypes: set[str] = set()
    used: set[str] = set()
    for block, kind in sorted(sites_keys, key=lambda bk: (bk[0], 0 if bk[1] == "attn" else 1)):
        parts = sites_keys[(block, kind)]
        missing = [p for p in _PARTS if p not in parts]
        if missing:
            have = ", ".join(parts[p] for p in _PARTS if p in parts)
            raise InputError(
                f"{path}: HC site {kind}_{block} is incomplete: has {have} but no {', '.join(missing)} "
                "(missing shard or renamed key?)",
                path=path,
            )
        infos = {p: source.info(parts[p]) for p in _PARTS}
        fn_i, base_i, scale_i = infos["fn"], infos["base"], infos["scale"]
        for info in infos.values():
            if info.dtype.startswith(("float8", "float4", "float6", "int", "uint", "bool")):
                # a quantised HC tensor needs its scale_inv companion applied: refuse rather than misread
                raise InputError(
                    f"{path}: {info.key} is stored as {info.dtype}; hcdiag reads HC tensors in float32 / "
                    "bfloat16 / float16 / float64 only: dequantise the checkpoint first",
                    path=path,
                )
        if len(fn_i.shape) != 2 or len(base_i.shape) != 1 or len(scale_i.shape) != 1:
            raise InputError(
                f"{path}: {fn_i.key} {list(fn_i.shape)}, {base_i.key} {list(base_i.shape)}, {scale_i.key} "
                f"{list(scale_i.shape)}: expected fn [rows, nC], base [rows], scale [3] (or [2] for HY-V4)",
                path=path,
            )
        rows, cols = fn_i.shape
        s_len = scale_i.shape[0]
        if s_len not in (2, 3):
            raise InputError(
                f"{path}: {scale_i.key} has {s_len} entries; expected 3 (pre, post, comb) or 2 (HY-V4: pre, post)",
                path=path,
            )
        site_n = n_cfg if n_cfg is not None else _infer_n(rows, s_len)
        want_rows = None if site_n is None else ((site_n + 2) * site_n if s_len == 3 else 2 * site_n)
        if site_n is None or rows != want_rows:
            how = f"hc_mult={n_cfg} from config.json" if n_cfg is not None else "no n solves it"
            raise InputError(
                f"{path}: {fn_i.key} has {rows} rows, not (n+2)n (or 2n for HY-V4) with {how}; "
                "check hc_mult or write a layout file (--layout-file)",
                path=path,
            )
        if base_i.shape[0] != rows:
            raise InputError(
                f"{path}: {base_i.key} has {base_i.shape[0]} entries, {fn_i.key} has {rows} rows", path=path
            )
        if cols % site_n:
            raise InputError(f"{path}: {fn_i.key} has {cols} columns, not a multiple of n={site_n}", path=path)
        site_C = cols // site_n
        if C_cfg is not None and site_C != C_cfg:
            raise InputError(
                f"{path}: {fn_i.key} has {cols} columns = n*C with C={site_C}, but config hidden_size={C_cfg}",
                path=path,
            )
        if n is None:
            n, C = site_n, site_C
        elif (site_n, site_C) != (n, C):
            raise InputError(
                f"{path}: {fn_i.key} implies n={site_n}, C={site_C}; earlier sites had n={n}, C={C}",
                path=path,
            )
        fn, base, scale = (source.get(parts[p]) for p in _PARTS)
        dtypes.add(fn_i.dtype)
        used.update(parts.values())
        if s_len == 3:
            spec = SinkhornSpec(
                conv,
                st.values["hc_sinkhorn_iters"],
                st.values["hc_eps"] if has_eps(conv) else 0.0,
                spec_src,
            )
            module: SiteModule = TransformersMHCSite(
                fn,
                base,
                scale,
                n=site_n,
                C=site_C,
                norm_eps=st.values["rms_norm_eps"],
                hc_eps=st.values["hc_eps"],
                sinkhorn=spec,
            )
            variant = "mhc"
        else:
            module = TransformersIHCSite(
                fn,
                base,
                scale,
                n=site_n,
                C=site_C,
                norm_eps=st.values["rms_norm_eps"],
                hc_eps=st.values["hc_eps"],
                magnitude=st.values["hc_magnitude"],
            )
            variant = "ihc"
        sites.append(
            Site(
                index=len(sites),
                name=f"{kind}_{block}",
                block=block,
                kind=kind,
                variant=variant,
                module=module,
                tensors=[infos[p] for p in _PARTS],
            )
        )

    assert n is not None and C is not None
    fn_key = sites[0].tensors[0].key
    settings_source["n"] = st.source["hc_mult"] if n_cfg is not None else f"inferred from {fn_key} shape"
    settings_source["C"] = (
        st.source["hidden_size"] if C_cfg is not None else f"inferred from {fn_key} shape (columns / n)"
    )
    has_comb = any(s.variant == "mhc" for s in sites)
    if has_comb:
        settings_source["convention"] = conv_src
        settings_source["iters"] = st.source["hc_sinkhorn_iters"]
        settings_source["eps"] = st.source["hc_eps"]
    else:
        settings_source["convention"] = "not applicable (H_res = I: HY-V4 sites have no comb)"
        settings_source["hc_magnitude"] = st.source["hc_magnitude"]
    settings_source["hc_eps"] = st.source["hc_eps"]
    settings_source["rms_norm_eps"] = st.source["rms_norm_eps"]

    gaps = _gaps(sorted({s.block for s in sites}))
    if gaps:
        notes.append(f"no HC sites for blocks {gaps}: the depth composite skips them")
    if has_comb:
        notes.append(f"convention: {conv.value} ({conv_src})")
        if conv is Convention.TRANSFORMERS_SIGMOID:
            notes.append("H_post is read as 2 sigmoid (transformers >= 5.8); the earlier code's sigmoid + eps "
                         "is not reproduced: H_res and its Sinkhorn are")
        notes.append(
            "H_res = comb^T: transformers stores comb as [input stream, output stream] and the decoder "
            "layer applies comb^T; converted to paper convention"
        )
    else:
        notes.append("HY-V4 hyper-connections: no comb, H_res = I at every site (identity residual)")

    metadata: dict[str, Any] = {"family": st.values.get("model_type") or "transformers mHC"}
    head = [k for k in scan.head if k.startswith(prefix) or not prefix]
    if head:
        shapes = ", ".join(f"{k} {list(source.info(k).shape)}" for k in head)
        metadata["hc_head"] = shapes
        notes.append(
            f"hc_head ({len(head)} tensors) collapses the n streams before the final norm: "
            "not a residual site, not counted"
        )
    used.update(scan.head)  # every hc_head tensor is recognised, whichever prefix it sits under

    from hcdiag.io.load import unmatched_hc_keys

    unmatched = unmatched_hc_keys(source, used)
    mtp = [t.key for t in unmatched if re.search(r"(?:^|\.)mtp", t.key)]
    if mtp:
        notes.append(
            f"{len(mtp)} HC tensors of multi-token-prediction modules (e.g. {mtp[0]}) are not sites of "
            "the residual stack: listed as unmatched"
        )

    return LoadedModel(
        path=path,
        layout="transformers",
        layout_reason="",
        sites=sites,
        n=n,
        C=C,
        metadata=metadata,
        settings_source=settings_source,
        source_dtype=dtypes.pop() if len(dtypes) == 1 else "mixed (" + ", ".join(sorted(dtypes)) + ")",
        unmatched_keys=unmatched,
        notes=notes,
    )


TRANSFORMERS = register_layout(
    Layout(
        name="transformers",
        summary="DeepSeek-V4 / GLM-5-Next / HY-V4 in transformers: layers.N.{attn,ffn}_hc.{fn,base,scale}",
        detect=_detect,
        load=_load,
        priority=50,
    )
)

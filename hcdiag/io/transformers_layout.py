"""The ``transformers`` layout: mHC as shipped in DeepSeek-V4, GLM-5-Next and HY-V4 (SPEC section 2).

Dimension letters: n streams (``hc_mult``), C width of one stream (``hidden_size``), ... leading token dims.

Checked against transformers 5.24 (``models/deepseek_v4/modeling_deepseek_v4.py`` DeepseekV4HyperConnection,
``models/glm5_next`` Glm5NextTextHyperConnection, ``models/hy_v4`` HYV4HyperConnection) and the key renames in
``transformers/conversion_mapping.py``. Per site (one sub-layer), keys in the converted checkpoints::

    <prefix>layers.N.attn_hc.{fn,base,scale}   <prefix>layers.N.ffn_hc.{fn,base,scale}
    <prefix>layers.N.attn_hc.hc_{fn,base,scale}   <prefix>layers.N.mlp_hc.hc_*   (earlier DeepSeek-V4 code)
    <prefix>hc_head.{hc_fn,hc_base,hc_scale}   (DeepSeek-V4 / HY-V4 model-level head; not a residual site)

and in the original releases (before conversion)::

    layers.N.hc_attn_{fn,base,scale}  layers.N.hc_ffn_*  hc_head_{fn,base,scale}          (DeepSeek-V4, GLM-5)
    layers.N.hc_pre.hc_attn_layer.hc_fn  layers.N.hc_mlp_layer.hc_{fn,base,scale}         (HY-V4)

DeepSeek-V4 / GLM-5-Next site: fn [(n+2)n, nC], base [(n+2)n], scale [3]. With x' = unweighted RMSNorm of the
flattened streams (eps = ``rms_norm_eps``), mixes = x' fn^T split [pre n, post n, comb n^2]:
pre = sigmoid(pre_w s0 + b_pre) + hc_eps, post = 2 sigmoid(post_w s1 + b_post),
comb = Sinkhorn_transformers(comb_w s2 + b_comb) on comb = [input stream, output stream]; the decoder layer
applies comb^T to the streams, so paper H_res = comb^T (the final column pass on comb makes paper rows exact).

The earlier transformers DeepSeek-V4 code (before 5.8.0, the first release with ``models/deepseek_v4``; chosen
from config.json's ``transformers_version`` or the installed transformers, or by ``--convention
transformers-sigmoid``) stored ``layers.N.attn_hc.hc_{fn,base,scale}`` / ``layers.N.mlp_hc.hc_*`` and computed
post = sigmoid(.) + hc_eps, comb = sigmoid(.) + hc_eps then iters x (rows, columns), and its layer applied
``torch.matmul(comb, residual)``: there paper H_res = comb itself (:class:`TransformersMHCSite` ``earlier``).

HY-V4 site: fn [2n, nC], base [2n], scale [2]: pre = sigmoid(.) + hc_eps, post = hc_magnitude sigmoid(.) +
hc_eps, and the residual is added unmixed: H_res = I (exactness IDENTITY; iHC in the registry).
"""

from __future__ import annotations

import math
import re
from importlib.metadata import PackageNotFoundError, version
from typing import Any

import torch
import torch.nn.functional as F
from packaging.version import InvalidVersion, Version

from hcdiag.enums import Convention, Exactness, Form
from hcdiag.errors import InputError
from hcdiag.io import reader
from hcdiag.io.base import Layout, LoadOptions, TensorSource, register_layout
from hcdiag.io.limits import MAX_STREAMS
from hcdiag.io.reader import (
    KeyScan,
    Settings,
    SiteDims,
    assemble,
    depth_order,
    drop_layers_beyond,
    found,
    gaps_note,
    other_prefix_notes,
    read_settings,
    refuse_quantised,
    require_parts,
    sub_config,
)
from hcdiag.model import LoadedModel, Site, TensorInfo
from hcdiag.sinkhorn import effective_spec
from hcdiag.site import HCOutput, LinearRead, SinkhornSpec, SiteEval, SiteModule, rms_norm

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
    r"(?P<kind1>attn|ffn|mlp)_hc\.(?:hc_)?(?P<part1>fn|base|scale)"
    r"|(?:hc_pre\.)?hc_(?P<kind2>attn|ffn|mlp)(?:_layer\.hc)?_(?P<part2>fn|base|scale)"
    r")$"
)
_HEAD_RE = re.compile(r"(?:^|\.)hc_head(?:\.hc_head_|\.hc_|_)(?:fn|base|scale)$")
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
        return F.linear(rms_norm(flat, None, self.norm_eps), self.fn)

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

    Reproduces ``DeepseekV4HyperConnection.forward`` and returns paper convention: H_res = comb^T. With
    ``earlier=True`` it is the earlier transformers DeepSeek-V4 code instead (before 5.8.0; module docstring):
    post = sigmoid + hc_eps and H_res = comb (that code's layer applies ``torch.matmul(comb, residual)``).
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
        earlier: bool = False,
    ) -> None:
        super().__init__(fn, base, scale, n=n, C=C, norm_eps=norm_eps, hc_eps=hc_eps)
        self.sinkhorn = sinkhorn or SinkhornSpec(Convention.TRANSFORMERS, DEFAULT_ITERS, hc_eps, "default")
        self.earlier = bool(earlier)

    def evaluate_read(self, z: torch.Tensor) -> SiteEval:
        """mixes z [..., (n+2)n] -> H_pre, H_post [..., n] and the comb logits in paper orientation [..., n, n]."""
        n = self.n
        pre, post, comb = self._logits(z, [n, n, n * n])
        comb = comb.unflatten(-1, (n, n))
        if self.earlier:  # the earlier code: post = sigmoid + eps, its layer applies comb itself
            return SiteEval(torch.sigmoid(pre) + self.hc_eps, torch.sigmoid(post) + self.hc_eps, comb, None)
        # comb logits [..., input, output] (code orientation); paper orientation is the transpose
        return SiteEval(torch.sigmoid(pre) + self.hc_eps, 2 * torch.sigmoid(post), comb.transpose(-1, -2), None)

    def res_logits(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., n, C] -> comb logits in paper orientation [..., n, n] (row = output stream): transposed, or
        as stored for the earlier code."""
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
# key scanning and detection


def scan_keys(keys: list[str]) -> KeyScan:
    """Group the keys that follow a transformers mHC naming by model prefix, block and sub-layer kind; the
    hc_head tensors are ``side["head"]``."""
    return reader.scan_keys(keys, _SITE_RE, side={"head": _HEAD_RE})


def _detect(source: TensorSource) -> str | None:
    scan = scan_keys(source.keys())
    prefix = scan.main()
    if prefix is None:
        return None
    sites = scan.groups[prefix]
    style = re.sub(r"(attn|ffn|mlp)", "{attn,ffn}", scan.style[prefix], count=1)
    style = re.sub(r"(fn|base|scale)$", "{fn,base,scale}", style)
    return found(len(sites), "HC sites", style, blocks=len({b for b, _ in sites}))


# ------------------------------------------------------------------------------------------------------------
# settings

#: config.json settings: (integer, default); hc_mult's (sub-)config holds them, else the top level
_WANTED: dict[str, tuple[bool, Any]] = {
    "hc_sinkhorn_iters": (True, DEFAULT_ITERS),
    "hc_eps": (False, DEFAULT_HC_EPS),
    "rms_norm_eps": (False, DEFAULT_RMS_NORM_EPS),
    "hc_magnitude": (False, DEFAULT_HC_MAGNITUDE),
    "hc_mult": (True, None),
    "hidden_size": (True, None),
    "num_hidden_layers": (True, None),
}


def _settings(source: TensorSource, options: LoadOptions) -> Settings:
    st = read_settings(source.config, source.path, _WANTED, marker="hc_mult", names=None, top_fallback=True)
    st.take_iters(options, "hc_sinkhorn_iters")
    st.bound("hc_mult", MAX_STREAMS, " (streams n)")
    cfg, _ = sub_config(source.config, marker="hc_mult", names=None)
    st.values["model_type"] = cfg.get("model_type") or _top(source).get("model_type")
    return st


def _top(source: TensorSource) -> dict[str, Any]:
    return source.config if isinstance(source.config, dict) else {}


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


def _library_convention(top: dict[str, Any], model_type: Any) -> tuple[Convention, str]:
    """The Sinkhorn of the transformers code that runs the checkpoint (by its version, see module docstring)."""
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


def _spec(st: Settings, options: LoadOptions, top: dict[str, Any]) -> tuple[SinkhornSpec, dict[str, str]]:
    """The comb Sinkhorn: the library code's convention, the config's iterations (``--iters`` already laid over
    them by :meth:`Settings.take_iters`) and hc_eps, then ``--convention`` by :func:`effective_spec`."""
    conv, conv_src = _library_convention(top, st.get("model_type"))
    src = {"convention": conv_src, "iters": st.source["hc_sinkhorn_iters"], "eps": st.source["hc_eps"]}
    where = "config" if st.stated("hc_sinkhorn_iters") else "default"
    base = SinkhornSpec(conv, st.values["hc_sinkhorn_iters"], st.values["hc_eps"], where)
    return effective_spec(base, convention=options.convention, sources=src, option="--convention")


# ------------------------------------------------------------------------------------------------------------
# one site


def _infer_n(rows: int, scale_len: int) -> int | None:
    if scale_len == 3:
        n = math.isqrt(rows + 1) - 1  # rows = (n + 2) n = (n + 1)^2 - 1
        return n if n >= 1 and (n + 2) * n == rows else None
    if scale_len == 2 and rows % 2 == 0 and rows >= 2:
        return rows // 2
    return None


def _site_shape(source: TensorSource, parts: dict[str, str], name: str, st: Settings) -> tuple[list[TensorInfo], int]:
    """The site's infos (fn, base, scale) and n, checked against each other and config.json's hc_mult."""
    path = source.path
    require_parts(path, "HC", name, parts, _PARTS)
    infos = [source.info(parts[p]) for p in _PARTS]
    refuse_quantised(path, infos)
    fn_i, base_i, scale_i = infos
    if len(fn_i.shape) != 2 or len(base_i.shape) != 1 or len(scale_i.shape) != 1:
        raise InputError(
            f"{path}: {fn_i.key} {list(fn_i.shape)}, {base_i.key} {list(base_i.shape)}, {scale_i.key} "
            f"{list(scale_i.shape)}: expected fn [rows, nC], base [rows], scale [3] (or [2] for HY-V4)",
            path=path,
        )
    rows, s_len = fn_i.shape[0], scale_i.shape[0]
    if s_len not in (2, 3):
        raise InputError(
            f"{path}: {scale_i.key} has {s_len} entries; expected 3 (pre, post, comb) or 2 (HY-V4: pre, post)",
            path=path,
        )
    n_cfg = st.get("hc_mult")
    n = n_cfg if n_cfg is not None else _infer_n(rows, s_len)
    if n is None or rows != ((n + 2) * n if s_len == 3 else 2 * n):
        how = f"hc_mult={n_cfg} from config.json" if n_cfg is not None else "no n solves it"
        raise InputError(
            f"{path}: {fn_i.key} has {rows} rows, not (n+2)n (or 2n for HY-V4) with {how}; "
            "check hc_mult or write a layout file (--layout-file)",
            path=path,
        )
    if base_i.shape[0] != rows:
        raise InputError(f"{path}: {base_i.key} has {base_i.shape[0]} entries, {fn_i.key} has {rows} rows", path=path)
    return infos, n


def _site_C(fn: TensorInfo, n: int, st: Settings, path: str) -> int:
    """C = columns of fn / n, checked against config.json's hidden_size."""
    cols = fn.shape[1]
    if cols % n:
        raise InputError(f"{path}: {fn.key} has {cols} columns, not a multiple of n={n}", path=path)
    C, C_cfg = cols // n, st.get("hidden_size")
    if C_cfg is not None and C != C_cfg:
        raise InputError(
            f"{path}: {fn.key} has {cols} columns = n*C with C={C}, but config hidden_size={C_cfg}", path=path
        )
    return C


def _module(source: TensorSource, infos: list[TensorInfo], n: int, C: int, st: Settings,
            spec: SinkhornSpec) -> SiteModule:
    """The site module: DeepSeek-V4 / GLM-5-Next mHC (scale [3]) or HY-V4 iHC (scale [2])."""
    fn, base, scale = (source.get(i.key) for i in infos)
    norm_eps, hc_eps = st.values["rms_norm_eps"], st.values["hc_eps"]
    if infos[2].shape[0] == 3:
        return TransformersMHCSite(fn, base, scale, n=n, C=C, norm_eps=norm_eps, hc_eps=hc_eps, sinkhorn=spec,
                                   earlier=spec.convention is Convention.TRANSFORMERS_SIGMOID)
    return TransformersIHCSite(fn, base, scale, n=n, C=C, norm_eps=norm_eps, hc_eps=hc_eps,
                               magnitude=st.values["hc_magnitude"])


# ------------------------------------------------------------------------------------------------------------
# the model


def _sources(st: Settings, sites: list[Site], sk_src: dict[str, str]) -> dict[str, str]:
    fn_key = sites[0].tensors[0].key
    out = {
        "n": st.source["hc_mult"] if "hc_mult" in st.values else f"inferred from {fn_key} shape",
        "C": st.source["hidden_size"] if "hidden_size" in st.values else f"inferred from {fn_key} shape (columns / n)",
    }
    if any(s.variant == "mhc" for s in sites):
        out.update(sk_src)
    else:
        out["convention"] = "not applicable (H_res = I: HY-V4 sites have no comb)"
        out["hc_magnitude"] = st.source["hc_magnitude"]
    out.update(hc_eps=st.source["hc_eps"], rms_norm_eps=st.source["rms_norm_eps"])
    return out


def _notes(sites: list[Site], conv: Convention) -> list[str]:
    notes = [note] if (note := gaps_note(sites)) else []
    if not any(s.variant == "mhc" for s in sites):
        return [*notes, "HY-V4 hyper-connections: no comb, H_res = I at every site (identity residual)"]
    if conv is Convention.TRANSFORMERS_SIGMOID:
        notes.append("the earlier transformers DeepSeek-V4 code (before 5.8.0): comb = sigmoid + eps, then rows and "
                     "columns; post = sigmoid + eps; its layer applies comb @ streams, so H_res = comb (columns exact)")
        return notes
    notes.append(
        "H_res = comb^T: transformers stores comb as [input stream, output stream] and the decoder "
        "layer applies comb^T; converted to paper convention"
    )
    return notes


def _head(source: TensorSource, scan: KeyScan, prefix: str, metadata: dict[str, Any]) -> list[str]:
    """The hc_head note (and its shapes in ``metadata``), if the model prefix has one."""
    head = [m.string for m in scan.side["head"] if m.string.startswith(prefix) or not prefix]
    if not head:
        return []
    metadata["hc_head"] = ", ".join(f"{k} {list(source.info(k).shape)}" for k in head)
    return [f"hc_head ({len(head)} tensors) collapses the n streams before the final norm: "
            "not a residual site, not counted"]


def _mtp(unmatched: list[TensorInfo]) -> list[str]:
    mtp = [t.key for t in unmatched if re.search(r"(?:^|\.)mtp", t.key)]
    if not mtp:
        return []
    return [f"{len(mtp)} HC tensors of multi-token-prediction modules (e.g. {mtp[0]}) are not sites of "
            "the residual stack: listed as unmatched"]


def _fn_dtype(sites: list[Site]) -> str:
    """The stored dtype of the sites' fn tensors, "mixed (...)" when they differ."""
    dtypes = sorted({s.tensors[0].dtype for s in sites})
    return dtypes[0] if len(dtypes) == 1 else "mixed (" + ", ".join(dtypes) + ")"


def _load(source: TensorSource, options: LoadOptions) -> LoadedModel:
    path = source.path
    scan = scan_keys(source.keys())
    prefix = scan.main()
    if prefix is None:
        raise InputError(f"{path}: no transformers mHC keys (layers.N.attn_hc.fn, layers.N.hc_attn_fn, ...)", path=path)
    st = _settings(source, options)
    notes = other_prefix_notes(scan.groups, prefix, "HC sites")
    sites_keys, dropped = drop_layers_beyond(scan.groups[prefix], st.get("num_hidden_layers"), "MTP layers")
    notes += [dropped] if dropped else []
    if not sites_keys:
        raise InputError(f"{path}: no transformers mHC sites within num_hidden_layers={st.get('num_hidden_layers')}",
                         path=path)
    (spec, sk_src), dims = _spec(st, options, _top(source)), SiteDims(path)
    sites: list[Site] = []
    for block, kind in depth_order(sites_keys):
        infos, n = _site_shape(source, sites_keys[(block, kind)], f"{kind}_{block}", st)
        C = _site_C(infos[0], n, st, path)
        dims.add(n, C, infos[0].key)
        module = _module(source, infos, n, C, st, spec)
        variant = "mhc" if isinstance(module, TransformersMHCSite) else "ihc"
        sites.append(Site(len(sites), f"{kind}_{block}", block, kind, variant, module, infos))
    notes += _notes(sites, Convention(spec.convention))
    metadata: dict[str, Any] = {"family": st.get("model_type") or "transformers mHC"}
    notes += _head(source, scan, prefix, metadata)
    used = {i.key for s in sites for i in s.tensors} | {m.string for m in scan.side["head"]}
    from hcdiag.io.load import unmatched_hc_keys  # lazy: load imports the layouts

    unmatched = unmatched_hc_keys(source, used)  # every hc_head tensor is recognised, whichever its prefix
    return assemble(source, "transformers", sites, settings=_sources(st, sites, sk_src),
                    notes=notes + _mtp(unmatched), unmatched=unmatched, metadata=metadata,
                    source_dtype=_fn_dtype(sites))


TRANSFORMERS = register_layout(
    Layout(
        name="transformers",
        summary="DeepSeek-V4 / GLM-5-Next / HY-V4 in transformers: layers.N.{attn,ffn}_hc.{fn,base,scale}",
        detect=_detect,
        load=_load,
        priority=50,
    )
)

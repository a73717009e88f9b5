"""Layout ``deepseek-v41``: DeepSeek-V4.1's single-pass mHC (transformers main branch, ``models/deepseek_v41``;
not in a release: read from ``modular_deepseek_v41.py`` at 0a2080b).

Dimension letters: n streams (``hc_mult``), C width of one stream (``hidden_size``), ... leading token dims.

Keys: the mHC parameters are raw attributes of ``DeepseekV41DecoderLayer`` (fp32 in the checkpoint)::

    <prefix>layers.N.hc_attn_{fn [(n+2)n, nC], base [(n+2)n], scale [3]}   <prefix>layers.N.hc_ffn_*
    <prefix>layers.N.engram.*   (Engram at ``engram_layer_ids``: also writes into the streams)

config.json is composite (``DeepseekV41Config``: settings under ``text_config``, model_type ``deepseek_v41``)
or flat (``DeepseekV41TextConfig``, model_type ``deepseek_v41_text``). The key names are those of the original
DeepSeek-V4 release, so without such a config (or Engram keys) the ``transformers`` layout reads the file.

One projection per site (``hc_mixes``) gives pre, post and comb from the unweighted RMSNorm of the flattened
streams (eps = ``rms_norm_eps``, 1e-20 by default), in fp32::

    pre  = sigmoid(mixes[:n] scale0 + base[:n]) + hc_eps       post = 2 sigmoid(mixes[n:2n] scale1 + base[n:2n])
    comb = softmax(comb_logits, -1) + hc_eps; one column pass; (iters - 1) x (rows, columns), eps denominators
    out_k = post_k F + sum_j comb[j, k] residual_j              -> paper H_res = comb^T

exactly DeepSeek-V4's maths in transformers 5.24 (so each site is a :class:`TransformersMHCSite`, convention
``transformers``). What differs is the pairing: the ``pre`` a site computes collapses the streams of the *next*
branch (attn_l's branch collapses with the previous site's pre, ffn_l's with attn_l's); attn_0's branch gets a
one-hot mix of stream 0; the last ffn site's pre collapses the streams before ``model.norm`` (no ``hc_head``).
hcdiag reports at every site the H_pre its own projection computes (what the module outputs for that input)
and states the pairing in the notes.
"""

from __future__ import annotations

import math
import re
from typing import Any

from hcdiag.enums import Convention
from hcdiag.errors import InputError, UsageError
from hcdiag.io.base import Layout, LoadOptions, TensorSource, dtype_summary, register_layout
from hcdiag.io.limits import MAX_ITERS, MAX_STREAMS, bounded
from hcdiag.io.reader import drop_layers_beyond, main_prefix
from hcdiag.io.transformers_layout import TransformersMHCSite
from hcdiag.model import LoadedModel, Site
from hcdiag.site import SinkhornSpec

__all__ = ["DEEPSEEK_V41", "DEFAULTS"]

#: DeepseekV41TextConfig defaults of the HC settings
DEFAULTS: dict[str, Any] = {"hc_sinkhorn_iters": 20, "hc_eps": 1e-6, "rms_norm_eps": 1e-20}
_MODEL_TYPES = ("deepseek_v41", "deepseek_v41_text")
_SITE_RE = re.compile(r"^(?P<prefix>(?:.*\.)?)layers\.(?P<block>\d+)\.hc_(?P<kind>attn|ffn)_(?P<part>fn|base|scale)$")
_ENGRAM_RE = re.compile(r"^(?P<prefix>(?:.*\.)?)layers\.(?P<block>\d+)\.engram\.")
_PARTS = ("fn", "base", "scale")


def _text_config(config: dict[str, Any] | None) -> tuple[dict[str, Any], str]:
    if not isinstance(config, dict):
        return {}, ""
    sub = config.get("text_config")
    if isinstance(sub, dict):
        return sub, "config.json:text_config"
    return config, "config.json"


def _is_v41_config(config: dict[str, Any] | None) -> bool:
    if not isinstance(config, dict):
        return False
    cfg, _ = _text_config(config)
    types = {config.get("model_type"), cfg.get("model_type")}
    archs = " ".join(str(a) for a in config.get("architectures") or [])
    return bool(types & set(_MODEL_TYPES)) or "DeepseekV41" in archs


def _scan(keys: list[str]) -> tuple[dict[str, dict[tuple[int, str], dict[str, str]]], dict[str, set[int]]]:
    sites: dict[str, dict[tuple[int, str], dict[str, str]]] = {}
    engram: dict[str, set[int]] = {}
    for key in keys:
        m = _SITE_RE.match(key)
        if m:
            site = sites.setdefault(m.group("prefix"), {}).setdefault((int(m.group("block")), m.group("kind")), {})
            site[m.group("part")] = key
            continue
        e = _ENGRAM_RE.match(key)
        if e:
            engram.setdefault(e.group("prefix"), set()).add(int(e.group("block")))
    return sites, engram


def _detect(source: TensorSource) -> str | None:
    sites, engram = _scan(source.keys())
    prefix = main_prefix(sites)
    if prefix is None:
        return None
    why = None
    if _is_v41_config(source.config):
        why = "config.json says DeepSeek-V4.1"
    elif prefix in engram:
        why = f"Engram modules at layers {sorted(engram[prefix])}"
    if why is None:
        return None
    return (f"found {len(sites[prefix])} single-pass mHC sites named {prefix}layers.N.hc_{{attn,ffn}}_"
            f"{{fn,base,scale}} ({why})")


def _setting(cfg: dict[str, Any], key: str, where: str, path: str, *, integer: bool) -> tuple[Any, str]:
    if key not in cfg:
        return DEFAULTS.get(key), f"default ({key}={DEFAULTS.get(key)})"
    v = cfg[key]
    ok = isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
    ok = ok and (v >= 1 and float(v).is_integer() if integer else v >= 0)
    if not ok:
        raise InputError(f"{path}: {where} {key}={v!r} is not a valid {'integer' if integer else 'number'}; "
                         "fix config.json", path=path)
    return (int(v) if integer else float(v)), f"{where} ({key})"


def _spec(cfg: dict[str, Any], where: str, options: LoadOptions, path: str) -> tuple[SinkhornSpec, dict[str, str]]:
    from hcdiag.sinkhorn import parse_convention

    iters, it_src = _setting(cfg, "hc_sinkhorn_iters", where, path, integer=True)
    if "hc_sinkhorn_iters" in cfg:
        bounded(iters, MAX_ITERS, f"{where} hc_sinkhorn_iters", path, override="--iters")
    hc_eps, eps_src = _setting(cfg, "hc_eps", where, path, integer=False)
    conv, conv_src = Convention.TRANSFORMERS, "layout (DeepSeek-V4.1: transformers' comb Sinkhorn)"
    if options.convention is not None:
        conv, conv_src = parse_convention(options.convention), "cli (--convention)"
    if options.iters is not None:
        if isinstance(options.iters, bool) or not isinstance(options.iters, int) or options.iters < 1:
            raise UsageError(f"--iters {options.iters!r} must be an integer >= 1", option="--iters")
        iters, it_src = options.iters, "cli (--iters)"
    source = "cli" if options.iters is not None or options.convention is not None else it_src.split(" ")[0]
    eps = hc_eps if conv is Convention.TRANSFORMERS else 0.0
    return SinkhornSpec(conv, int(iters), eps, source), {"convention": conv_src, "iters": it_src, "eps": eps_src}


def _site_n_C(source: TensorSource, parts: dict[str, str], name: str, n_cfg: int | None) -> tuple[int, int]:
    path = source.path
    missing = [p for p in _PARTS if p not in parts]
    if missing:
        raise InputError(f"{path}: HC site {name} is incomplete: no hc_*_{', hc_*_'.join(missing)} (missing shard?)",
                         path=path)
    fn, base, scale = (tuple(source.info(parts[p]).shape) for p in _PARTS)
    if len(fn) != 2 or scale != (3,) or base != fn[:1]:
        raise InputError(f"{path}: {parts['fn']} {list(fn)}, {parts['base']} {list(base)}, {parts['scale']} "
                         f"{list(scale)}: expected fn [(n+2)n, nC], base [(n+2)n], scale [3]", path=path)
    rows, cols = fn
    n = n_cfg if n_cfg is not None else math.isqrt(rows + 1) - 1
    if n < 1 or (n + 2) * n != rows or cols % n:
        raise InputError(f"{path}: {parts['fn']} is {list(fn)}: not [(n+2)n, nC] for n={n}; check hc_mult",
                         path=path)
    return n, cols // n


def _load(source: TensorSource, options: LoadOptions) -> LoadedModel:
    path = source.path
    sites_keys, engram = _scan(source.keys())
    prefix = main_prefix(sites_keys)
    if prefix is None:
        raise InputError(f"{path}: no DeepSeek-V4.1 mHC keys (layers.N.hc_attn_fn, ...)", path=path)
    cfg, where = _text_config(source.config)
    n_cfg = _setting(cfg, "hc_mult", where, path, integer=True)[0] if "hc_mult" in cfg else None
    if n_cfg is not None:
        bounded(n_cfg, MAX_STREAMS, f"{where} hc_mult (streams n)", path)
    C_cfg = _setting(cfg, "hidden_size", where, path, integer=True)[0] if "hidden_size" in cfg else None
    layers = _setting(cfg, "num_hidden_layers", where, path, integer=True)[0] if "num_hidden_layers" in cfg else None
    norm_eps, norm_src = _setting(cfg, "rms_norm_eps", where, path, integer=False)
    hc_eps, _ = _setting(cfg, "hc_eps", where, path, integer=False)
    spec, sk_src = _spec(cfg, where, options, path)
    notes: list[str] = []
    groups, dropped = drop_layers_beyond(sites_keys[prefix], layers, "DSpark draft layers")
    notes += [dropped] if dropped else []
    if not groups:
        raise InputError(f"{path}: no DeepSeek-V4.1 mHC sites within num_hidden_layers={layers}", path=path)
    sites: list[Site] = []
    used: set[str] = set()
    for block, kind in sorted(groups, key=lambda bk: (bk[0], 0 if bk[1] == "attn" else 1)):
        parts = groups[(block, kind)]
        name = f"{kind}_{block}"
        n, C = _site_n_C(source, parts, name, n_cfg)
        if C_cfg is not None and C != C_cfg:
            raise InputError(f"{path}: {parts['fn']} implies C={C}, config hidden_size={C_cfg}", path=path)
        if sites and (n, C) != (sites[0].module.n, sites[0].module.C):
            raise InputError(f"{path}: {parts['fn']} implies n={n}, C={C}; earlier sites differ", path=path)
        fn, base, scale = (source.get(parts[p]) for p in _PARTS)
        used.update(parts.values())
        module = TransformersMHCSite(fn, base, scale, n=n, C=C, norm_eps=norm_eps, hc_eps=hc_eps, sinkhorn=spec)
        infos = [source.info(parts[p]) for p in _PARTS]
        sites.append(Site(len(sites), name, block, kind, "mhc", module, infos))
    names = [s.name for s in sites]
    notes += [
        "DeepSeek-V4.1 single-pass mHC: one projection per site gives pre, post and comb; H_res = comb^T "
        "(transformers' comb Sinkhorn, as DeepSeek-V4) and H_post = post come from the site's own input",
        f"site pairing: the H_pre a site reports is the one its projection computes, which the code applies to "
        f"the next branch's streams: {names[0]}'s branch collapses a one-hot mix of stream 0; each later "
        f"branch collapses with the previous site's pre; {names[-1]}'s pre collapses the streams before "
        "model.norm (no hc_head)",
    ]
    eng = sorted(engram.get(prefix, set()))
    cfg_eng = cfg.get("engram_layer_ids")
    if not eng and isinstance(cfg_eng, list):
        eng = sorted(int(b) for b in cfg_eng if isinstance(b, int) and not isinstance(b, bool))
    if eng:
        notes.append(
            f"Engram modules at layers {eng} also write into the streams (h + gate * value, per stream) before "
            f"the attention site of their layer: the H_res products and gains here leave those writes out"
        )
    settings = {
        "n": f"{where} (hc_mult)" if n_cfg is not None else "inferred from hc_attn_fn shape",
        "C": f"{where} (hidden_size)" if C_cfg is not None else "inferred from hc_attn_fn shape (columns / n)",
        "rms_norm_eps": norm_src,
        **sk_src,
    }
    from hcdiag.io.load import unmatched_hc_keys

    return LoadedModel(
        path=path,
        layout="deepseek-v41",
        layout_reason="",
        sites=sites,
        n=sites[0].module.n,
        C=sites[0].module.C,
        metadata={"family": cfg.get("model_type") or "deepseek_v41", "engram_layers": eng},
        settings_source=settings,
        source_dtype=dtype_summary(i for s in sites for i in s.tensors),
        unmatched_keys=[t for t in unmatched_hc_keys(source, used) if not _ENGRAM_RE.match(t.key)],
        notes=notes,
    )


DEEPSEEK_V41 = register_layout(
    Layout(
        name="deepseek-v41",
        summary="DeepSeek-V4.1 (transformers main) single-pass mHC: layers.N.hc_{attn,ffn}_{fn,base,scale} "
        "with a deepseek_v41 config or Engram keys",
        detect=_detect,
        load=_load,
        priority=40,
    )
)

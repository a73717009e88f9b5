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
from hcdiag.errors import InputError
from hcdiag.io import reader
from hcdiag.io.base import Layout, LoadOptions, TensorSource, register_layout
from hcdiag.io.limits import MAX_ITERS, MAX_STREAMS
from hcdiag.io.reader import (
    KeyScan,
    Settings,
    assemble,
    cli_iters,
    depth_order,
    drop_layers_beyond,
    found,
    read_settings,
    sub_config,
)
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
_Groups = dict[tuple[int, str], dict[str, str]]  # (block, kind) -> part -> key


#: config.json settings: (integer, default); hc_mult is read (and bounded) before the others
_WANTED: dict[str, tuple[bool, Any]] = {
    "hidden_size": (True, None),
    "num_hidden_layers": (True, None),
    "rms_norm_eps": (False, DEFAULTS["rms_norm_eps"]),
    "hc_eps": (False, DEFAULTS["hc_eps"]),
    "hc_sinkhorn_iters": (True, DEFAULTS["hc_sinkhorn_iters"]),
}


def _is_v41_config(config: dict[str, Any] | None) -> bool:
    if not isinstance(config, dict):
        return False
    cfg, _ = sub_config(config)
    types = {config.get("model_type"), cfg.get("model_type")}
    archs = " ".join(str(a) for a in config.get("architectures") or [])
    return bool(types & set(_MODEL_TYPES)) or "DeepseekV41" in archs


def _scan(keys: list[str]) -> KeyScan:
    """Group the hc_{attn,ffn}_{fn,base,scale} keys by model prefix, block and kind; the Engram keys are
    ``side["engram"]``."""
    return reader.scan_keys(keys, _SITE_RE, side={"engram": _ENGRAM_RE})


def _engram_blocks(scan: KeyScan) -> dict[str, set[int]]:
    """{model prefix: the blocks with Engram keys}."""
    engram: dict[str, set[int]] = {}
    for m in scan.side["engram"]:
        engram.setdefault(m.group("prefix"), set()).add(int(m.group("block")))
    return engram


def _detect(source: TensorSource) -> str | None:
    scan = _scan(source.keys())
    prefix = scan.main()
    if prefix is None:
        return None
    engram = _engram_blocks(scan)
    why = None
    if _is_v41_config(source.config):
        why = "config.json says DeepSeek-V4.1"
    elif prefix in engram:
        why = f"Engram modules at layers {sorted(engram[prefix])}"
    if why is None:
        return None
    return found(len(scan.groups[prefix]), "single-pass mHC sites",
                 f"{prefix}layers.N.hc_{{attn,ffn}}_{{fn,base,scale}}", why=why)


def _settings(source: TensorSource) -> Settings:
    """The text config's settings with where they came from: hc_mult (bounded) first, then the others (a
    stated hc_sinkhorn_iters is bounded in :func:`_spec`, unless --iters replaces it)."""
    path = source.path
    st = read_settings(source.config, path, {"hc_mult": (True, None)})
    st.bound("hc_mult", MAX_STREAMS, " (streams n)")
    rest = read_settings(source.config, path, _WANTED)
    st.values.update(rest.values)
    st.source.update(rest.source)
    return st


def _spec(st: Settings, options: LoadOptions) -> tuple[SinkhornSpec, dict[str, str]]:
    """The comb Sinkhorn (transformers' unless --convention) and where its convention / iters / eps came from."""
    from hcdiag.sinkhorn import effective_spec

    cli = cli_iters(options)
    if cli is None:
        st.bound("hc_sinkhorn_iters", MAX_ITERS, override="--iters")
    src = {"convention": "layout (DeepSeek-V4.1: transformers' comb Sinkhorn)",
           "iters": st.source["hc_sinkhorn_iters"], "eps": st.source["hc_eps"]}
    base = SinkhornSpec(Convention.TRANSFORMERS, int(st.values["hc_sinkhorn_iters"]), st.values["hc_eps"],
                        src["iters"].split(" ")[0])
    return effective_spec(base, iters=cli, convention=options.convention, sources=src, option="--convention")


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


def _site_groups(scan: KeyScan, prefix: str, st: Settings, path: str) -> tuple[_Groups, list[str]]:
    """The model's sites within num_hidden_layers (DSpark draft layers dropped, with a note)."""
    layers = st.get("num_hidden_layers")
    groups, dropped = drop_layers_beyond(scan.groups[prefix], layers, "DSpark draft layers")
    if not groups:
        raise InputError(f"{path}: no DeepSeek-V4.1 mHC sites within num_hidden_layers={layers}", path=path)
    return groups, [dropped] if dropped else []


def _site(source: TensorSource, block: int, kind: str, parts: dict[str, str], st: Settings, spec: SinkhornSpec,
          earlier: list[Site]) -> Site:
    """The next site after ``earlier``: n and C checked against config.json's hidden_size and the first site."""
    path, name = source.path, f"{kind}_{block}"
    n, C = _site_n_C(source, parts, name, st.get("hc_mult"))
    C_cfg = st.get("hidden_size")
    if C_cfg is not None and C != C_cfg:
        raise InputError(f"{path}: {parts['fn']} implies C={C}, config hidden_size={C_cfg}", path=path)
    if earlier and (n, C) != (earlier[0].module.n, earlier[0].module.C):
        raise InputError(f"{path}: {parts['fn']} implies n={n}, C={C}; earlier sites differ", path=path)
    fn, base, scale = (source.get(parts[p]) for p in _PARTS)
    module = TransformersMHCSite(fn, base, scale, n=n, C=C, norm_eps=st.values["rms_norm_eps"],
                                 hc_eps=st.values["hc_eps"], sinkhorn=spec)
    infos = [source.info(parts[p]) for p in _PARTS]
    return Site(len(earlier), name, block, kind, "mhc", module, infos)


def _engram_layers(scan: KeyScan, prefix: str, cfg: dict[str, Any]) -> list[int]:
    """The layers with Engram keys under the model prefix, else config.json's engram_layer_ids."""
    eng = sorted(_engram_blocks(scan).get(prefix, set()))
    cfg_eng = cfg.get("engram_layer_ids")
    if not eng and isinstance(cfg_eng, list):
        eng = sorted(int(b) for b in cfg_eng if isinstance(b, int) and not isinstance(b, bool))
    return eng


def _notes(sites: list[Site], eng: list[int]) -> list[str]:
    """What the single-pass sites report, the site pairing, and the Engram writes."""
    names = [s.name for s in sites]
    notes = [
        "DeepSeek-V4.1 single-pass mHC: one projection per site gives pre, post and comb; H_res = comb^T "
        "(transformers' comb Sinkhorn, as DeepSeek-V4) and H_post = post come from the site's own input",
        f"site pairing: the H_pre a site reports is the one its projection computes, which the code applies to "
        f"the next branch's streams: {names[0]}'s branch collapses a one-hot mix of stream 0; each later "
        f"branch collapses with the previous site's pre; {names[-1]}'s pre collapses the streams before "
        "model.norm (no hc_head)",
    ]
    if eng:
        notes.append(
            f"Engram modules at layers {eng} also write into the streams (h + gate * value, per stream) before "
            f"the attention site of their layer: the H_res products and gains here leave those writes out"
        )
    return notes


def _sources(st: Settings, sk_src: dict[str, str]) -> dict[str, str]:
    return {
        "n": st.source["hc_mult"] if "hc_mult" in st.values else "inferred from hc_attn_fn shape",
        "C": st.source["hidden_size"] if "hidden_size" in st.values else "inferred from hc_attn_fn shape (columns / n)",
        "rms_norm_eps": st.source["rms_norm_eps"],
        **sk_src,
    }


def _load(source: TensorSource, options: LoadOptions) -> LoadedModel:
    path = source.path
    scan = _scan(source.keys())
    prefix = scan.main()
    if prefix is None:
        raise InputError(f"{path}: no DeepSeek-V4.1 mHC keys (layers.N.hc_attn_fn, ...)", path=path)
    st = _settings(source)
    spec, sk_src = _spec(st, options)
    groups, notes = _site_groups(scan, prefix, st, path)
    sites: list[Site] = []
    for block, kind in depth_order(groups):
        sites.append(_site(source, block, kind, groups[(block, kind)], st, spec, sites))
    cfg, _ = sub_config(source.config)
    eng = _engram_layers(scan, prefix, cfg)
    from hcdiag.io.load import unmatched_hc_keys  # lazy: load imports the layouts

    used = {i.key for s in sites for i in s.tensors}
    unmatched = [t for t in unmatched_hc_keys(source, used) if not _ENGRAM_RE.match(t.key)]
    return assemble(source, "deepseek-v41", sites, settings=_sources(st, sk_src), notes=notes + _notes(sites, eng),
                    unmatched=unmatched, metadata={"family": cfg.get("model_type") or "deepseek_v41",
                                                   "engram_layers": eng})


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

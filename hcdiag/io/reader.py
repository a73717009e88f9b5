"""The shared steps of a layout reader: scan keys -> read settings -> per site: check tensors, build a module ->
assemble the :class:`hcdiag.model.LoadedModel`.

Dimension letters: n streams, C width of one stream.

A layout is then two small parts: a *detector* (key names, shapes, config -> the one-line reason ``inspect``
prints, :func:`found`) and a *site builder* that turns one site's tensors into a
:class:`hcdiag.site.SiteModule`. Two key schemes are served:

* block-kind keys (``<prefix>layers.N.<kind>...<part>``, transformers-style): :func:`scan_keys` with a regex of
  named groups ``prefix``, ``block``, ``kind*``, ``part*`` (alternatives may number them: ``kind1``,
  ``kind2``); sites are ordered by :func:`depth_order`.
* per-module key groups (``<path>.<leaf>``, lucidrains-style): :func:`site_prefixes`, :func:`name_sites`,
  :func:`detect_groups`, :func:`read_site_tensors`, :func:`grouped_model`.

Settings read from a config come with a "where it came from" string (:class:`Settings`); every number a file
states goes through :func:`hcdiag.io.limits.bounded` where it is read.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sized
from dataclasses import dataclass, field
from typing import Any

import torch

from hcdiag.enums import Convention
from hcdiag.errors import InputError, UsageError
from hcdiag.io.base import LoadOptions, TensorSource, dtype_summary
from hcdiag.io.limits import MAX_ITERS, bounded
from hcdiag.model import LoadedModel, Site, TensorInfo
from hcdiag.site import SinkhornSpec

__all__ = [
    "IGNORED_SUBTREES",
    "KIND_NAMES",
    "KeyScan",
    "Settings",
    "SiteDims",
    "assemble",
    "cli_iters",
    "common_value",
    "config_number",
    "depth_order",
    "detect_groups",
    "detect_summary",
    "drop_layers_beyond",
    "found",
    "gaps",
    "gaps_note",
    "group_shapes",
    "grouped_model",
    "main_prefix",
    "name_sites",
    "natural_key",
    "other_prefix_notes",
    "path_kind",
    "read_settings",
    "read_site_tensors",
    "refuse_quantised",
    "require_parts",
    "sinkhorn_settings",
    "site_prefixes",
    "sub_config",
    "unknown_params",
]

#: sub-layer words of block-kind keys -> hcdiag's kind
KIND_NAMES = {"attn": "attn", "ffn": "ffn", "mlp": "ffn"}


# ------------------------------------------------------------------------------------------------------------
# block-kind keys: scan, main prefix, depth order, notes


@dataclass
class KeyScan:
    """Keys grouped by model prefix -> (block, kind) -> part -> key (the first key wins), an example key per
    prefix with the block number written N (``style``), and the keys each side pattern found (``side``)."""

    groups: dict[str, dict[tuple[int, str], dict[str, str]]] = field(default_factory=dict)
    style: dict[str, str] = field(default_factory=dict)
    side: dict[str, list[re.Match[str]]] = field(default_factory=dict)

    def main(self) -> str | None:
        """The prefix of the model itself (:func:`main_prefix`), None without sites."""
        return main_prefix(self.groups)


def _named(m: re.Match[str], name: str) -> str:
    """The first group named ``name`` or ``name<digit>`` that took part in the match."""
    for group in m.re.groupindex:
        if group.rstrip("0123456789") == name and m.group(group) is not None:
            return m.group(group)
    raise ValueError(f"pattern {m.re.pattern!r} matched without a {name} group")


def scan_keys(
    keys: Iterable[str],
    site_re: re.Pattern[str],
    *,
    kinds: Mapping[str, str] = KIND_NAMES,
    side: Mapping[str, re.Pattern[str]] | None = None,
) -> KeyScan:
    """Group the keys ``site_re`` matches (named groups prefix, block, kind*, part*; ``kinds`` maps the kind
    word); a key it does not match goes to the first ``side`` pattern that finds it (``re.search``)."""
    scan = KeyScan(side={name: [] for name in side or {}})
    for key in keys:
        m = site_re.match(key)
        if m is None:
            for name, pattern in (side or {}).items():
                hit = pattern.search(key)
                if hit:
                    scan.side[name].append(hit)
                    break
            continue
        prefix = m.group("prefix")
        site = scan.groups.setdefault(prefix, {}).setdefault((int(m.group("block")), kinds[_named(m, "kind")]), {})
        site.setdefault(_named(m, "part"), key)
        if prefix not in scan.style:
            s, e = m.span("block")
            scan.style[prefix] = key[:s] + "N" + key[e:]
    return scan


def main_prefix(groups: Mapping[str, Sized]) -> str | None:
    """The key prefix with the most sites (the shortest among equals): the model itself, not a draft / MTP copy."""
    if not groups:
        return None
    return max(groups, key=lambda p: (len(groups[p]), -len(p)))


def found(count: int, what: str, named: str, *, blocks: int | None = None, why: str | None = None) -> str:
    """A detector's one-line reason: "found 8 HC sites in 4 blocks named <style> (<why>)"."""
    where = f" in {blocks} blocks" if blocks is not None else ""
    because = f" ({why})" if why else ""
    return f"found {count} {what}{where} named {named}{because}"


def drop_layers_beyond(
    groups: Mapping[tuple[int, str], Any], layers: int | None, what: str
) -> tuple[dict[tuple[int, str], Any], str | None]:
    """Sites keyed by (block, kind) without the blocks at or past ``layers`` (config's num_hidden_layers; None
    keeps all), and the note naming those dropped (``what`` says what such layers are: MTP, draft, ...)."""
    kept = {k: v for k, v in groups.items() if layers is None or k[0] < layers}
    beyond = sorted({b for b, _ in groups} - {b for b, _ in kept})
    if not beyond:
        return kept, None
    return kept, f"ignored HC keys of layers {beyond} (beyond num_hidden_layers={layers}: {what})"


def depth_order(groups: Iterable[tuple[int, str]]) -> list[tuple[int, str]]:
    """(block, kind) pairs in depth order: by block, attn before ffn."""
    return sorted(groups, key=lambda bk: (bk[0], 0 if bk[1] == "attn" else 1))


def other_prefix_notes(groups: Mapping[str, Sized], prefix: str, what: str) -> list[str]:
    """One note per prefix other than ``prefix`` (draft / MTP / vision copies): what was ignored, what read."""
    return [
        f"ignored {len(groups[other])} {what} under {other or '(no prefix)'!r}; read those under "
        f"{prefix or '(no prefix)'!r}"
        for other in sorted(p for p in groups if p != prefix)
    ]


def gaps(blocks: list[int], shown: int = 8) -> str:
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


def gaps_note(sites: Iterable[Site]) -> str | None:
    """The note for blocks without HC sites between the first and the last site's block, else None."""
    missing = gaps(sorted({s.block for s in sites}))
    return f"no HC sites for blocks {missing}: the depth composite skips them" if missing else None


# ------------------------------------------------------------------------------------------------------------
# settings: config numbers with where they came from


def sub_config(
    config: dict[str, Any] | None, *, marker: str | None = None, names: Iterable[str] | None = ("text_config",)
) -> tuple[dict[str, Any], str]:
    """The (sub-)config holding the HC settings and where it is ("config.json", "config.json:text_config").

    The top level when it has ``marker``; else the first sub-config among ``names`` that is a dict, or with
    ``names=None`` the first sub-config of any name that has ``marker`` (a VLM's language_config); else the top.
    """
    if not isinstance(config, dict):
        return {}, ""
    if marker is not None and marker in config:
        return config, "config.json"
    candidates = config.items() if names is None else ((name, config.get(name)) for name in names)
    for name, sub in candidates:
        if isinstance(sub, dict) and (names is not None or marker in sub):
            return sub, f"config.json:{name}"
    return config, "config.json"


def config_number(cfg: Mapping[str, Any], key: str, where: str, path: str, *, integer: bool) -> int | float:
    """``cfg[key]`` as an integer >= 1 or a finite number >= 0; InputError naming where it was stated."""
    v = cfg[key]
    ok = isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
    ok = ok and (v >= 1 and float(v).is_integer() if integer else v >= 0)
    if not ok:
        raise InputError(f"{path}: {where} {key}={v!r} is not a valid {'integer' if integer else 'number'}; "
                         "fix config.json", path=path)
    return int(v) if integer else float(v)


@dataclass
class Settings:
    """Settings by name and, for each, where it came from: "<where> (<key>)", "default (<key>=<value>)" or
    "cli (--iters)"; a setting neither stated nor defaulted is absent."""

    values: dict[str, Any]
    source: dict[str, str]
    path: str

    def get(self, key: str) -> Any:
        return self.values.get(key)

    def stated(self, key: str) -> bool:
        """Whether the file states ``key`` (not a default, not an option)."""
        return self.source.get(key, "").startswith("config")

    def bound(self, key: str, limit: int, what: str = "", *, override: str | None = None) -> None:
        """:func:`bounded` on a stated value, naming where it was stated and ``what`` it is."""
        if self.stated(key):
            where = self.source[key].split(" (")[0]
            bounded(self.values[key], limit, f"{where} {key}{what}", self.path, override=override)

    def take_iters(self, options: LoadOptions, key: str) -> None:
        """``--iters`` replaces ``key`` (source "cli (--iters)"); without it a stated count is bounded."""
        from hcdiag.sinkhorn import CLI_SOURCE

        iters = cli_iters(options)
        if iters is None:
            self.bound(key, MAX_ITERS, override="--iters")
        else:
            self.values[key], self.source[key] = iters, CLI_SOURCE["iters"]


def read_settings(
    config: dict[str, Any] | None,
    path: str,
    wanted: Mapping[str, tuple[bool, Any]],
    *,
    marker: str | None = None,
    names: Iterable[str] | None = ("text_config",),
    top_fallback: bool = False,
) -> Settings:
    """``wanted`` = {key: (integer, default or None)} from the :func:`sub_config` (then from the top level when
    ``top_fallback``), else the default; each validated by :func:`config_number`."""
    cfg, where = sub_config(config, marker=marker, names=names)
    top = config if isinstance(config, dict) and top_fallback else {}
    st = Settings({}, {}, path)
    for key, (integer, default) in wanted.items():
        for table, name in ((cfg, where), (top, "config.json")):
            if key in table:
                st.values[key] = config_number(table, key, name, path, integer=integer)
                st.source[key] = f"{name} ({key})"
                break
        else:
            if default is not None:
                st.values[key], st.source[key] = default, f"default ({key}={default})"
    return st


def cli_iters(options: LoadOptions) -> int | None:
    """``--iters`` checked (an integer >= 1; UsageError otherwise), None when not given."""
    if options.iters is None:
        return None
    if isinstance(options.iters, bool) or not isinstance(options.iters, int) or options.iters < 1:
        raise UsageError(f"--iters {options.iters!r} must be an integer >= 1", option="--iters")
    return int(options.iters)


def cli_temperature(options: LoadOptions) -> float | None:
    """``--temperature`` (``LoadOptions.extra["temperature"]``) checked (a finite number > 0; UsageError
    otherwise: tau divides the logits), None when not given."""
    t = (options.extra or {}).get("temperature")
    if t is None:
        return None
    if isinstance(t, bool) or not isinstance(t, int | float) or not math.isfinite(t) or t <= 0:
        raise UsageError(f"--temperature must be a positive number, got {t!r}", option="--temperature")
    return float(t)


# ------------------------------------------------------------------------------------------------------------
# site tensors: complete, readable, consistent


def require_parts(path: str, what: str, name: str, parts: Mapping[str, str], wanted: Iterable[str]) -> None:
    """InputError unless the site has every part in ``wanted``, naming the keys it has and the parts it lacks."""
    wanted = list(wanted)
    missing = [p for p in wanted if p not in parts]
    if missing:
        have = ", ".join(parts[p] for p in wanted if p in parts)
        raise InputError(
            f"{path}: {what} site {name} is incomplete: has {have} but no {', '.join(missing)} "
            "(missing shard or renamed key?)",
            path=path,
        )


_QUANTISED = ("float8", "float4", "float6", "int", "uint", "bool")


def refuse_quantised(path: str, infos: Iterable[TensorInfo]) -> None:
    """InputError for a tensor stored quantised (float8, int8, ...): its scale_inv companion would be needed."""
    for info in infos:
        if info.dtype.startswith(_QUANTISED):
            raise InputError(
                f"{path}: {info.key} is stored as {info.dtype}; hcdiag reads HC tensors in float32 / "
                "bfloat16 / float16 / float64 only: dequantise the checkpoint first",
                path=path,
            )


@dataclass
class SiteDims:
    """n and C of the model: the first site's, and an InputError when a later site implies others."""

    path: str
    n: int | None = None
    C: int | None = None

    def add(self, n: int, C: int, what: str) -> None:
        if self.n is None:
            self.n, self.C = n, C
        elif (n, C) != (self.n, self.C):
            raise InputError(f"{self.path}: {what} implies n={n}, C={C}; earlier sites had n={self.n}, C={self.C}",
                             path=self.path)


# ------------------------------------------------------------------------------------------------------------
# the LoadedModel


def assemble(
    source: TensorSource,
    layout: str,
    sites: list[Site],
    *,
    settings: dict[str, str],
    notes: list[str],
    used: Iterable[str] = (),
    unmatched: list[TensorInfo] | None = None,
    metadata: dict[str, Any] | None = None,
    layout_reason: str = "",
    n: int | None = None,
    C: int | None = None,
    source_dtype: str | None = None,
) -> LoadedModel:
    """The reader's result: n and C of the first site unless given, the stored dtypes of the sites' tensors
    unless given, and as unmatched (unless given) the HC-looking keys outside ``used``."""
    from hcdiag.io.load import unmatched_hc_keys  # lazy: load imports the layouts

    return LoadedModel(
        path=source.path,
        layout=layout,
        layout_reason=layout_reason,
        sites=sites,
        n=sites[0].module.n if n is None else n,
        C=sites[0].module.C if C is None else C,
        metadata=metadata if metadata is not None else {},
        settings_source=settings,
        bytes_read=source.bytes_read,
        bytes_total=source.bytes_total,
        source_dtype=source_dtype or dtype_summary(i for s in sites for i in s.tensors),
        unmatched_keys=unmatched if unmatched is not None else unmatched_hc_keys(source, used),
        notes=notes,
    )


# ------------------------------------------------------------------------------------------------------------
# per-module key groups (<path>.<leaf>): grouping, natural order, names, Sinkhorn settings, reading a site

#: Sub-trees of a site module that are not HC parameters: the wrapped branch (its tensors are also stored under
#: the model's own module, e.g. nanoGPT's block.branch_attn), and a residual conv (applied before the width
#: connection; the streams hcdiag analyses are its output).
IGNORED_SUBTREES = ("branch.", "residual_transform.")


def site_prefixes(keys: Iterable[str], leaf: str) -> dict[str, dict[str, str]]:
    """Group keys by the module path of each ``<path>.<leaf>`` key: {prefix: {param: key}}.

    ``leaf`` is the one parameter every site of the codebase has (hyper-connections: ``static_alpha``).

    ``prefix`` keeps its trailing dot ("" for a bare module's state dict). A key belongs to the longest site
    prefix it starts with, so a site nested inside another site's branch stays apart.
    """
    keys = list(keys)
    prefixes = {k[: -len(leaf)] for k in keys if k == leaf or k.endswith("." + leaf)}
    groups: dict[str, dict[str, str]] = {p: {} for p in prefixes}
    for k in keys:
        parts = k.split(".")
        for cut in range(len(parts) - 1, -1, -1):
            p = ".".join(parts[:cut]) + "." if cut else ""
            if p in groups:
                groups[p][k[len(p) :]] = k
                break
    return groups


_ATTN_WORDS = {"attn", "attention", "selfattention", "self_attn", "cross_attn", "att", "mha", "mixer"}
_FFN_WORDS = {"ff", "ffn", "mlp", "feedforward", "feed_forward", "moe", "fc", "ffw"}


def _segment_kind(segment: str) -> str | None:
    s = segment.lower()
    words = set(re.split(r"[_\-]", s)) | {s, s.replace("_", "")}
    if words & _ATTN_WORDS:
        return "attn"
    if words & _FFN_WORDS:
        return "ffn"
    return None


def path_kind(path: str) -> str:
    """``attn`` / ``ffn`` from the last path segment naming one (hc_attn, self_attn, mlp...), else other."""
    kind = "other"
    for seg in path.split("."):
        k = _segment_kind(seg)
        if k is not None:
            kind = k
    return kind


def natural_key(path: str) -> tuple:
    """Sort key: numbers compare as numbers; at the same position an attn segment sorts before an ffn one."""
    key: list[tuple] = []
    for seg in path.split("."):
        if seg.isdigit():
            key.append((0, int(seg), ()))
        else:
            rank = {"attn": 0, "ffn": 1, None: 2}[_segment_kind(seg)]
            toks = tuple((0, int(t), "") if t.isdigit() else (1, 0, t) for t in re.split(r"(\d+)", seg) if t)
            key.append((1, rank, toks))
    return tuple(key)


def name_sites(prefixes: Iterable[str]) -> list[tuple[str, str, int, str]]:
    """(prefix, name, block, kind) in depth order.

    name = ``{kind}_{block}`` when every site's path names a kind (attn / ffn) and a block number (the first
    number in the path) and these pairs are unique; else the module path itself.
    """
    ordered = sorted(prefixes, key=lambda p: natural_key(p.rstrip(".")))
    rows = []
    for i, p in enumerate(ordered):
        path = p.rstrip(".")
        nums = [int(s) for s in path.split(".") if s.isdigit()]
        rows.append((p, path, nums[0] if nums else i, path_kind(path)))
    pairs = [(kind, block) for _, _, block, kind in rows]
    short = all(kind != "other" for kind, _ in pairs) and len(set(pairs)) == len(pairs)
    out = []
    for p, path, block, kind in rows:
        name = f"{kind}_{block}" if short else (path or "site")
        out.append((p, name, block, kind))
    return out


@dataclass(frozen=True)
class StatedSinkhorn:
    """The Sinkhorn settings a file states (None: not stated), under the source name ``where`` ("metadata",
    "layout file"); ``iters_what`` names the stated count in the message when it exceeds the limit."""

    where: str
    convention: Convention | None = None
    iters: int | None = None
    eps: float | None = None
    iters_what: str = "sinkhorn iters"


def sinkhorn_settings(
    options: LoadOptions,
    default: Convention,
    default_iters: int,
    stated: StatedSinkhorn | None = None,
    path: str = "",
) -> tuple[SinkhornSpec, dict[str, str]]:
    """A reader's SinkhornSpec: what the file states (``stated``, source ``stated.where``; a stated count is
    bounded unless ``--iters`` replaces it), else the codebase's ``default`` / ``default_iters`` and the
    convention's own eps (:func:`~hcdiag.sinkhorn.default_eps`); then ``--convention`` / ``--iters`` over it
    by :func:`~hcdiag.sinkhorn.effective_spec`, as every command applies them. Returns (spec, {setting: source})."""
    from hcdiag.sinkhorn import default_eps, effective_spec

    st = stated or StatedSinkhorn("default")
    cli = cli_iters(options)
    conv = st.convention or default
    src = {"convention": st.where if st.convention is not None else "default"}
    if st.iters is None:
        iters, src["iters"] = default_iters, "default"
    else:
        if cli is None:
            bounded(st.iters, MAX_ITERS, st.iters_what, path, override="--iters")
        iters, src["iters"] = st.iters, st.where
    if st.eps is not None:
        eps, src["eps"] = st.eps, st.where
    else:
        eps, src["eps"] = default_eps(conv)
    base = SinkhornSpec(conv, iters, eps, source=st.where if st.where in src.values() else "default")
    return effective_spec(base, iters=cli, convention=options.convention, sources=src, option="--convention")


def unknown_params(group: Mapping[str, Any], known: set[str]) -> list[str]:
    return sorted(p for p in group if p not in known and not p.startswith(IGNORED_SUBTREES))


def common_value(values: list[int], what: str, notes: list[str]) -> int:
    """The first value; a note when sites disagree (a model whose stream width changes with depth)."""
    if len(set(values)) > 1:
        notes.append(
            f"{what} differs across sites ({', '.join(str(v) for v in sorted(set(values)))}); "
            f"the model-level {what} is the first site's"
        )
    return values[0]


def detect_summary(kinds: Mapping[str, str]) -> tuple[str, str]:
    """For a detect() reason, from ``{site prefix: its class}``: the count per class ("2 mhc, 14 tbp", by
    name) and the first site's path in depth order ("(top level)" for a bare module's state dict)."""
    counts = Counter(kinds.values())
    what = ", ".join(f"{v} {k}" for k, v in sorted(counts.items()))
    sample = sorted(kinds, key=lambda p: natural_key(p.rstrip(".")))[0].rstrip(".") or "(top level)"
    return what, sample


def group_shapes(source: TensorSource, group: Mapping[str, str]) -> dict[str, tuple[int, ...]]:
    """``{param: shape}`` of one :func:`site_prefixes` group."""
    return {p: tuple(source.info(k).shape) for p, k in group.items()}


def detect_groups(
    source: TensorSource,
    groups: Mapping[str, Mapping[str, str]],
    check: Callable[[dict[str, tuple[int, ...]], str, str], Any],
    reason: str,
) -> str | None:
    """detect() of a layout of per-site key groups: None unless there are groups and every one passes
    ``check(shapes, prefix, path)`` (an InputError: no match); else ``reason`` with ``{count}`` and ``{first}``
    (the first site's prefix in natural order) filled in."""
    if not groups:
        return None
    for prefix, group in groups.items():
        try:
            check(group_shapes(source, group), prefix, source.path)
        except InputError:
            return None
    first = name_sites(groups)[0][0].rstrip(".") or "(top level)"
    return reason.format(count=len(groups), first=first)


def read_site_tensors(
    source: TensorSource, group: Mapping[str, str], params: list[str], prefix: str
) -> tuple[list[TensorInfo], dict[str, torch.Tensor]]:
    """The infos of ``params`` (sorted by name) and their tensors in float64, read in the order given;
    InputError naming those that hold NaN/Inf."""
    infos = [source.info(group[p]) for p in sorted(params)]
    tensors = {p: source.get(group[p], dtype=torch.float64) for p in params}
    bad = [p for p, t in tensors.items() if not bool(torch.isfinite(t).all())]
    if bad:
        raise InputError(
            f"site {prefix.rstrip('.') or '(top level)'} in {source.path} has NaN/Inf in "
            f"{', '.join(bad)}; the checkpoint is damaged",
            path=source.path,
        )
    return infos, tensors


def grouped_model(
    source: TensorSource,
    layout: str,
    detect: Callable[[TensorSource], str | None],
    groups: Mapping[str, Mapping[str, str]],
    sites: list[Site],
    settings: dict[str, str],
    notes: list[str],
) -> LoadedModel:
    """:func:`assemble` for a layout whose sites are :func:`site_prefixes` groups: n and C of the first site (a
    note when sites disagree), the dtypes of the sites' tensors, the file's metadata, the detector's reason, and
    as unmatched the keys that look HC-related but belong to no group (stream embeddings, attention-pool
    reducers...)."""
    n = common_value([s.module.n for s in sites], "n", notes)
    C = common_value([s.module.C for s in sites], "C", notes)
    return assemble(
        source, layout, sites, settings=settings, notes=notes, n=n, C=C,
        used={k for g in groups.values() for k in g.values()}, metadata=dict(source.metadata or {}),
        layout_reason=detect(source) or f"forced with --layout {layout}",
    )  # fmt: skip

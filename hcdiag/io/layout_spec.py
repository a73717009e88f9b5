"""The ``--layout-file`` format: read and validate a TOML / JSON layout file into a :class:`LayoutSpec`.

Dimension letters: n streams, C width of one stream.

Every field, its default and its check are in docs/layout-file.md; the reader that applies a spec to a
checkpoint is :mod:`hcdiag.io.layout_file`. A file with several mistakes gets the first error in the order of
:func:`parse_layout_file`; every number it states is bounded here (n, n * C, part sizes).
"""

from __future__ import annotations

import ast
import json
import math
import operator
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hcdiag.enums import Convention
from hcdiag.errors import InputError
from hcdiag.io.limits import MAX_STREAM_WIDTH, MAX_STREAMS, bounded

__all__ = ["PARTS", "LayoutSpec", "Packed", "describes", "layout_error", "parse_layout_file", "part_size"]

PARTS = ("pre", "post", "res")
_ACTS = ("sigmoid", "2sigmoid", "identity", "softmax")
_DEFAULT_ACT = {"pre": "sigmoid", "post": "2sigmoid"}
_KIND_DEFAULTS = {
    "attn": "attn",
    "attention": "attn",
    "self_attn": "attn",
    "att": "attn",
    "sa": "attn",
    "ffn": "ffn",
    "mlp": "ffn",
    "ff": "ffn",
    "feedforward": "ffn",
    "feed_forward": "ffn",
    "moe": "ffn",
}
_TOP_KEYS = {
    "version",
    "name",
    "n",
    "C",
    "sites",
    "norm",
    "projection",
    "bias",
    "scale",
    "pre",
    "post",
    "res",
    "sinkhorn",
}


# ------------------------------------------------------------------------------------------------------------
# the parsed file


@dataclass(frozen=True)
class Packed:
    """A tensor split along its last axis into named parts, and/or one entry per part."""

    tensor: str | None = None
    split: tuple[Any, ...] = ()
    names: tuple[str, ...] = ()
    per_part: dict[str, str | float] = field(default_factory=dict)


@dataclass(frozen=True)
class LayoutSpec:
    """A parsed layout file (see the module docstring and docs/layout-file.md)."""

    path: str
    name: str
    n: int
    C: int | None
    pattern: re.Pattern[str] | None
    kinds: dict[str, str]
    explicit: tuple[tuple[str, int, str], ...]  # (prefix, block, kind)
    norm_kind: str
    norm_eps: float
    norm_over: str
    norm_gain: str | None
    norm_gain_offset: float
    proj_input: str
    proj_orientation: str
    proj: Packed | None  # packed weight (tensor + split + names) or per-part weights
    proj_bias: Packed | None
    bias: Packed | None
    scale: Packed | None
    acts: dict[str, str]
    eps: dict[str, float]
    res_orientation: str
    res_constraint: str
    convention: Convention | None
    iters: int | None
    sinkhorn_eps: float | None
    temperature: float | None = None  # [sinkhorn] temperature: H_res logits / tau before the projection
    proj_activation: str = "identity"  # [projection] activation on y before the scales (hyper-connections HC: tanh)


def layout_error(path: str, msg: str) -> InputError:
    return InputError(f"{path}: {msg}; see docs/layout-file.md", path=path)


def _table(data: dict, key: str, path: str, allowed: set[str]) -> dict:
    t = data.get(key, {})
    if not isinstance(t, dict):
        raise layout_error(path, f"[{key}] must be a table")
    unknown = set(t) - allowed
    if unknown:
        raise layout_error(path, f"unknown key(s) {sorted(unknown)} in [{key}]; known: {sorted(allowed)}")
    return t


def _choice(value: Any, allowed: tuple[str, ...], what: str, path: str) -> str:
    if value not in allowed:
        raise layout_error(path, f"{what} = {value!r}; choose one of {list(allowed)}")
    return str(value)


def _num(value: Any, what: str, path: str, *, integer: bool = False, minimum: float = 0.0) -> Any:
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    if ok and integer:
        ok = float(value).is_integer()
    if not ok or value < minimum:
        kind = "an integer" if integer else "a number"
        raise layout_error(path, f"{what} = {value!r} must be {kind} >= {minimum:g}")
    return int(value) if integer else float(value)


_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Pow: operator.pow}
_MAX_SIZE = 1 << 40  # a part size, and every intermediate of its expression ("9**9**9" must not run for hours)


def part_size(expr: Any, n: int, path: str) -> int:
    """A part size: an integer or an expression in n ("n", "n*n", "n^2", "2*n + 1")."""
    if isinstance(expr, int) and not isinstance(expr, bool):
        if not 0 <= expr <= _MAX_SIZE:
            raise layout_error(path, f"split size {expr} must be between 0 and {_MAX_SIZE:,}")
        return expr

    def ev(node: ast.AST) -> int:
        if isinstance(node, ast.Expression):
            return ev(node.body)
        if isinstance(node, ast.Constant) and isinstance(node.value, int) and not isinstance(node.value, bool):
            return node.value
        if isinstance(node, ast.Name) and node.id == "n":
            return n
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            left, right = ev(node.left), ev(node.right)
            if isinstance(node.op, ast.Pow) and not (0 <= right <= 64 and abs(left) <= _MAX_SIZE):
                raise OverflowError(expr)
            value = _OPS[type(node.op)](left, right)
            if abs(value) > _MAX_SIZE:
                raise OverflowError(expr)
            return value
        raise ValueError(expr)

    try:
        value = int(ev(ast.parse(str(expr).replace("^", "**"), mode="eval")))
        if value < 0:
            raise OverflowError(expr)
        return value
    except OverflowError:
        raise layout_error(path, f"split size {expr!r} is not between 0 and {_MAX_SIZE:,} at n={n}") from None
    except (ValueError, SyntaxError, TypeError):
        raise layout_error(path, f'split size {expr!r} is not an integer or an expression in n like "n*n"') from None


def _packed(t: dict, path: str, where: str, tensor_key: str = "tensor") -> Packed | None:
    if not t:
        return None
    tensor = t.get(tensor_key)
    per_part = {p: t[p] for p in PARTS if p in t}
    for p, v in per_part.items():
        if not (isinstance(v, str) or (isinstance(v, int | float) and not isinstance(v, bool))):
            raise layout_error(path, f"[{where}] {p} must be a tensor name or a number")
    if tensor is not None and not isinstance(tensor, str):
        raise layout_error(path, f"[{where}] {tensor_key} must be a tensor name")
    split = t.get("split", ())
    names = t.get("names", ())
    if not isinstance(split, list | tuple) or not isinstance(names, list | tuple):
        raise layout_error(path, f"[{where}] split and names must be arrays")
    for nm in names:
        if nm not in (*PARTS, "_"):
            raise layout_error(path, f"[{where}] names entry {nm!r}: use pre, post, res (or _ for a slice to skip)")
    if len(set(n for n in names if n != "_")) != len([n for n in names if n != "_"]):
        raise layout_error(path, f"[{where}] names repeats a part")
    if tensor is None and not per_part:
        return None
    return Packed(tensor=tensor, split=tuple(split), names=tuple(names), per_part=per_part)


def _read_data(p: Path) -> dict:
    """The file's top-level table: read, decoded as UTF-8 and parsed as TOML (JSON by a ``.json`` suffix);
    InputError when it cannot be read, does not parse, or is not a table / JSON object."""
    ps = str(p)
    try:
        raw = p.read_bytes()
    except OSError as exc:
        raise InputError(f"{p}: cannot read the layout file ({exc.strerror or exc})", path=ps) from None
    try:
        text = raw.decode("utf-8")
        data = json.loads(text) if p.suffix.lower() == ".json" else tomllib.loads(text)
    except (UnicodeDecodeError, json.JSONDecodeError, tomllib.TOMLDecodeError) as exc:
        kind = "JSON" if p.suffix.lower() == ".json" else "TOML"
        raise InputError(f"{p}: layout file is not valid {kind} ({exc}); see docs/layout-file.md", path=ps) from None
    if not isinstance(data, dict):
        raise layout_error(ps, "layout file must be a table / JSON object")
    return data


def _top_level(data: dict, ps: str) -> tuple[int, int | None]:
    """n and C: no unknown top-level key, version 1, n (required) an integer >= 1 within MAX_STREAMS, C (optional)
    an integer >= 1 with n * C within MAX_STREAM_WIDTH."""
    unknown = set(data) - _TOP_KEYS
    if unknown:
        raise layout_error(ps, f"unknown top-level key(s) {sorted(unknown)}; known: {sorted(_TOP_KEYS)}")
    if data.get("version", 1) != 1:
        raise layout_error(ps, f"version = {data.get('version')!r}; this hcdiag reads version 1")
    if "n" not in data:
        raise layout_error(ps, "n (number of streams) is required")
    n = bounded(_num(data["n"], "n", ps, integer=True, minimum=1), MAX_STREAMS, "layout file n (streams)", ps)
    C = _num(data["C"], "C", ps, integer=True, minimum=1) if "C" in data else None
    if C is not None:
        bounded(n * C, MAX_STREAM_WIDTH, "layout file n * C (stream entries per token)", ps)
    return n, C


def _site_pattern(sites: dict, ps: str) -> re.Pattern[str] | None:
    """``[sites] pattern`` compiled (None when absent); it must be a valid regex with a named group block."""
    if "pattern" not in sites:
        return None
    try:
        pattern = re.compile(str(sites["pattern"]))
    except re.error as exc:
        raise layout_error(ps, f"[sites] pattern is not a valid regex ({exc})") from None
    if "block" not in pattern.groupindex:
        raise layout_error(ps, "[sites] pattern needs a named group (?P<block>\\d+)")
    return pattern


def _site_kinds(sites: dict, ps: str) -> dict[str, str]:
    """The raw kind -> attn / ffn / other map: the built-in words, then ``[sites] kinds`` (a table of those)."""
    kinds = dict(_KIND_DEFAULTS)
    extra_kinds = sites.get("kinds", {})
    if not isinstance(extra_kinds, dict):
        raise layout_error(ps, "[sites] kinds must be a table raw-kind -> attn | ffn | other")
    for raw_kind, k in extra_kinds.items():
        kinds[str(raw_kind)] = _choice(k, ("attn", "ffn", "other"), f"[sites.kinds] {raw_kind}", ps)
    return kinds


def _site_list(sites: dict, kinds: dict[str, str], ps: str) -> list[tuple[str, int, str]]:
    """``[[sites.list]]`` as (prefix, block, kind): each entry a table with prefix and block (an integer >= 0);
    kind (default other) a raw kind of ``kinds`` or one of attn / ffn / other."""
    explicit = []
    listed = sites.get("list", [])
    if not isinstance(listed, list):
        raise layout_error(ps, "[sites] list must be an array of {prefix, block, kind} tables")
    for i, entry in enumerate(listed):
        if not isinstance(entry, dict) or "prefix" not in entry or "block" not in entry:
            raise layout_error(ps, f"[[sites.list]] entry {i} needs prefix and block")
        kind = entry.get("kind", "other")
        explicit.append(
            (
                str(entry["prefix"]),
                _num(entry["block"], "block", ps, integer=True),
                kinds[str(kind)] if str(kind) in kinds else _choice(kind, ("attn", "ffn", "other"), "kind", ps),
            )
        )
    return explicit


def _sites_section(data: dict, ps: str) -> tuple[re.Pattern[str] | None, dict[str, str], list[tuple[str, int, str]]]:
    """``[sites]``: (pattern, kinds, listed sites); at least a pattern or one listed site."""
    sites = _table(data, "sites", ps, {"pattern", "kinds", "list"})
    pattern = _site_pattern(sites, ps)
    kinds = _site_kinds(sites, ps)
    explicit = _site_list(sites, kinds, ps)
    if pattern is None and not explicit:
        raise layout_error(ps, "[sites] needs a pattern (regex with (?P<block>...)) or a list of sites")
    return pattern, kinds, explicit


def _packed_projection(proj_t: dict, ps: str) -> tuple[Packed, Packed | None]:
    """A packed ``[projection] weight``: (weight with split and names of equal length, its bias split alike or
    None)."""
    proj = _packed(
        {
            "tensor": proj_t["weight"],
            "split": proj_t.get("split", ()),
            "names": proj_t.get("names", ()),
        },
        ps,
        "projection",
    )
    if proj is None or not proj.split or len(proj.split) != len(proj.names):
        raise layout_error(ps, "[projection] a packed weight needs split and names of equal length")
    proj_bias = None
    if proj_t.get("bias") is not None:
        proj_bias = Packed(tensor=str(proj_t["bias"]), split=proj.split, names=proj.names)
    return proj, proj_bias


def _per_part_projection(proj_t: dict, ps: str) -> tuple[Packed, Packed | None]:
    """``[projection] weights`` (one per part among pre, post, res) and its bias (a table over those parts) or
    None."""
    w = proj_t["weights"]
    if not isinstance(w, dict) or not w or set(w) - set(PARTS):
        raise layout_error(ps, "[projection] weights must be a table with keys among pre, post, res")
    proj = Packed(per_part={k: str(v) for k, v in w.items()})
    proj_bias = None
    b = proj_t.get("bias")
    if b is not None:
        if not isinstance(b, dict) or set(b) - set(w):
            raise layout_error(ps, "[projection] bias with per-part weights must be a table part -> tensor")
        proj_bias = Packed(per_part={k: str(v) for k, v in b.items()})
    return proj, proj_bias


def _projection_section(data: dict, ps: str) -> tuple[dict, Packed | None, Packed | None]:
    """``[projection]``: (its table, the weight(s) or None, the projection bias or None); exactly one of weight
    and weights when the table is there."""
    proj_t = _table(data, "projection", ps,
                    {"weight", "weights", "input", "orientation", "bias", "split", "names", "activation"})
    if not proj_t:
        return proj_t, None, None
    if ("weight" in proj_t) == ("weights" in proj_t):
        raise layout_error(ps, "[projection] needs exactly one of weight (packed, with split and names) or weights")
    if "weight" in proj_t:
        return proj_t, *_packed_projection(proj_t, ps)
    return proj_t, *_per_part_projection(proj_t, ps)


def _bias_section(data: dict, ps: str, proj: Packed | None) -> Packed | None:
    """``[bias]``: a packed tensor and/or per-part tensors; a packed tensor without split takes the packed
    projection's split and names (an error without one)."""
    bias = _packed(_table(data, "bias", ps, {"tensor", "split", "names", *PARTS}), ps, "bias")
    if bias is not None and bias.tensor is not None and not bias.split:
        if proj is None or not proj.split:
            raise layout_error(ps, "[bias] tensor needs split and names (or a packed projection to copy them from)")
        bias = Packed(tensor=bias.tensor, split=proj.split, names=proj.names, per_part=bias.per_part)
    return bias


def _scale_section(data: dict, ps: str, proj: Packed | None) -> Packed | None:
    """``[scale]``: a tensor and/or per-part tensors or numbers; a tensor without names takes the projection's
    names (none without a projection)."""
    scale = _packed(_table(data, "scale", ps, {"tensor", "names", *PARTS}), ps, "scale")
    if scale is not None and scale.tensor is not None and not scale.names:
        names = proj.names if proj is not None and proj.names else ()
        scale = Packed(tensor=scale.tensor, names=names, per_part=scale.per_part)
    return scale


def _pre_post_sections(data: dict, ps: str) -> tuple[dict[str, str], dict[str, float]]:
    """``[pre]`` and ``[post]``: (activation per part, one of _ACTS with the part's default; eps per part, a
    number >= 0, default 0)."""
    acts: dict[str, str] = {}
    eps: dict[str, float] = {}
    for part in ("pre", "post"):
        t = _table(data, part, ps, {"activation", "eps"})
        acts[part] = _choice(t.get("activation", _DEFAULT_ACT[part]), _ACTS, f"[{part}] activation", ps)
        eps[part] = _num(t.get("eps", 0.0), f"[{part}] eps", ps)
    return acts, eps


def _res_section(data: dict, ps: str) -> dict[str, Any]:
    """``[res]``: res_orientation (paper / code, default paper) and res_constraint (sinkhorn / identity / none,
    default sinkhorn)."""
    res = _table(data, "res", ps, {"orientation", "constraint"})
    res_orientation = _choice(res.get("orientation", "paper"), ("paper", "code"), "[res] orientation", ps)
    res_constraint = _choice(
        res.get("constraint", "sinkhorn"), ("sinkhorn", "identity", "none"), "[res] constraint", ps
    )
    return {"res_orientation": res_orientation, "res_constraint": res_constraint}


def _sinkhorn_section(data: dict, ps: str) -> dict[str, Any]:
    """``[sinkhorn]``: convention (a known Convention) or None, iters (an integer >= 1), eps (>= 0) and
    temperature (> 0), each None when absent (iters is bounded on load, where --iters may replace it)."""
    sk = _table(data, "sinkhorn", ps, {"convention", "iters", "eps", "temperature"})
    convention = None
    if "convention" in sk:
        try:
            convention = Convention(str(sk["convention"]))
        except ValueError:
            known = [c.value for c in Convention]
            raise layout_error(
                ps,
                f"[sinkhorn] convention = {sk['convention']!r}; choose one of {known} (custom pass "
                "orders are not supported)",
            ) from None
    iters = _num(sk["iters"], "[sinkhorn] iters", ps, integer=True, minimum=1) if "iters" in sk else None
    sk_eps = _num(sk["eps"], "[sinkhorn] eps", ps) if "eps" in sk else None
    tau = _num(sk["temperature"], "[sinkhorn] temperature", ps, minimum=1e-30) if "temperature" in sk else None
    return {"convention": convention, "iters": iters, "sinkhorn_eps": sk_eps, "temperature": tau}


def _norm_fields(norm: dict, proj_t: dict, proj: Packed | None, ps: str) -> dict[str, Any]:
    """``[norm]``'s values: kind (rms by default with a projection, else none), eps (>= 0, 1e-6), over (flat /
    per_stream, default the projection's input), gain (a tensor name or None), gain_offset (any number, 0)."""
    return {
        "norm_kind": _choice(norm.get("kind", "rms" if proj is not None else "none"), ("rms", "none"),
                             "[norm] kind", ps),
        "norm_eps": _num(norm.get("eps", 1e-6), "[norm] eps", ps),
        "norm_over": _choice(norm.get("over", proj_t.get("input", "flat")), ("flat", "per_stream"),
                             "[norm] over", ps),
        "norm_gain": str(norm["gain"]) if "gain" in norm else None,
        "norm_gain_offset": _num(norm.get("gain_offset", 0.0), "[norm] gain_offset", ps, minimum=-math.inf),
    }  # fmt: skip


def _projection_fields(proj_t: dict, ps: str) -> dict[str, Any]:
    """``[projection]``'s choices: input (flat / per_stream, default flat), orientation (out_in / in_out,
    default out_in), activation (identity / tanh, default identity)."""
    return {
        "proj_input": _choice(proj_t.get("input", "flat"), ("flat", "per_stream"), "[projection] input", ps),
        "proj_orientation": _choice(
            proj_t.get("orientation", "out_in"), ("out_in", "in_out"), "[projection] orientation", ps
        ),
        "proj_activation": _choice(proj_t.get("activation", "identity"), ("identity", "tanh"),
                                   "[projection] activation", ps),
    }  # fmt: skip


def parse_layout_file(path: str | Path) -> LayoutSpec:
    """Read and validate a layout file (TOML, or JSON by a ``.json`` suffix); InputError on any problem.

    Steps: read the table -> top level (n, C) -> [sites] -> [norm] table -> [projection] -> [bias] -> [scale]
    -> [pre] / [post] -> [res] -> [sinkhorn] -> the [norm] and [projection] values. A file with several
    mistakes gets the first error in this order.
    """
    p = Path(path)
    ps = str(p)
    data = _read_data(p)
    n, C = _top_level(data, ps)
    pattern, kinds, explicit = _sites_section(data, ps)
    norm = _table(data, "norm", ps, {"kind", "eps", "over", "gain", "gain_offset"})
    proj_t, proj, proj_bias = _projection_section(data, ps)
    bias = _bias_section(data, ps, proj)
    scale = _scale_section(data, ps, proj)
    acts, eps = _pre_post_sections(data, ps)
    res = _res_section(data, ps)
    sinkhorn = _sinkhorn_section(data, ps)
    norm_fields = _norm_fields(norm, proj_t, proj, ps)
    proj_fields = _projection_fields(proj_t, ps)
    return LayoutSpec(
        path=ps,
        name=str(data.get("name", p.stem)),
        n=n,
        C=C,
        pattern=pattern,
        kinds=kinds,
        explicit=tuple(explicit),
        proj=proj,
        proj_bias=proj_bias,
        bias=bias,
        scale=scale,
        acts=acts,
        eps=eps,
        **norm_fields,
        **proj_fields,
        **res,
        **sinkhorn,
    )



def describes(spec: LayoutSpec, part: str) -> bool:
    if spec.proj is not None and (part in spec.proj.names or part in spec.proj.per_part):
        return True
    b = spec.bias
    return b is not None and (part in b.names or part in b.per_part)


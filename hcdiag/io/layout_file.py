"""``--layout-file FILE``: describe a codebase's HC tensors in TOML or JSON and read them as a generic mHC site.

Dimension letters: n streams, C width of one stream, ... leading token dims, out = packed projection width.

The site this builds (every part optional except H_res; docs/layout-file.md has a worked example)::

    h        = RMSNorm(x) over the flattened nC ("flat") or per stream over C ("per_stream"), times an optional
               gain (+ gain_offset); or x itself (norm kind "none")
    y        = act(h W^T (+ projection bias)), W stored [out, in] ("out_in", nn.Linear) or [in, out] ("in_out"),
               act identity or tanh ([projection] activation; hyper-connections HC: tanh unless tanh=False);
               split along its last axis into the named parts (pre, post, res) with the given sizes,
               or one weight per part
    logit_p  = scale_p * y_p + bias_p                  (a part without projection is static: bias_p alone)
    H_pre    = act_pre(logit_pre) + eps_pre            (act: sigmoid, 2sigmoid, identity, softmax; default sigmoid)
    H_post   = act_post(logit_post) + eps_post         (default 2sigmoid)
    H_res    = Sinkhorn(logit_res) (named convention, iters, eps) | I ("identity") | logit_res ("none")

with logit_res read as [output, input] ("paper") or [input, output] ("code", transposed on load). Flat parts
are [..., n] (pre, post) and [..., n*n] -> [n, n] row-major (res); per-stream parts are [..., n, k] with row =
stream s, so pre / post take k = 1 and res takes k = n (row = input stream: code orientation).
Tensor names are relative to the site prefix (what the site pattern matched); a name starting with "/" is a
full key (a tensor shared by all sites).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from hcdiag.enums import Convention, Exactness
from hcdiag.errors import InputError, UsageError
from hcdiag.io.base import Layout, LoadOptions, TensorSource, register_layout
from hcdiag.io.layout_spec import PARTS, LayoutSpec, Packed, describes, layout_error, parse_layout_file, part_size
from hcdiag.io.reader import StatedSinkhorn, assemble, cli_temperature, sinkhorn_settings
from hcdiag.model import LoadedModel, Site, TensorInfo
from hcdiag.site import HCOutput, SinkhornSpec, SiteModule, rms_norm

__all__ = ["LAYOUT_FILE", "LayoutFileSite", "LayoutSpec", "parse_layout_file"]

# ------------------------------------------------------------------------------------------------------------
# the site module


def _activate(t: torch.Tensor, act: str) -> torch.Tensor:
    if act == "sigmoid":
        return torch.sigmoid(t)
    if act == "2sigmoid":
        return 2 * torch.sigmoid(t)
    if act == "softmax":
        return torch.softmax(t, dim=-1)
    return t


class LayoutFileSite(SiteModule):
    """A site described by a layout file. Buffers: ``w`` (packed) or ``w_<part>``, ``pb``/``pb_<part>``,
    ``b_<part>``, ``s_<part>``, ``gain``; everything in paper convention on output."""

    def __init__(
        self,
        *,
        n: int,
        C: int,
        spec: LayoutSpec,
        tensors: dict[str, torch.Tensor],
        consts: dict[str, float],
        sinkhorn: SinkhornSpec | None,
        temperature: float | None = None,
    ) -> None:
        super().__init__()
        self.n = n
        self.C = C
        self._spec = spec
        self.temperature = temperature
        self._consts = dict(consts)
        for name, t in tensors.items():
            self.register_buffer(name, t)
        self.sinkhorn = sinkhorn
        self._sizes = [part_size(e, n, spec.path) for e in spec.proj.split] if spec.proj is not None else []
        self.exactness = {
            "sinkhorn": Exactness.SINKHORN,
            "identity": Exactness.IDENTITY,
            "none": Exactness.UNCONSTRAINED,
        }[spec.res_constraint]

    def _t(self, name: str) -> torch.Tensor | None:
        return self._buffers.get(name)

    def _need(self, name: str) -> torch.Tensor:
        t = self._buffers.get(name)
        if t is None:
            raise KeyError(name)
        return t

    def _normed(self, x: torch.Tensor) -> torch.Tensor:
        s = self._spec
        dtype = next((b.dtype for b in self.buffers() if b.is_floating_point()), torch.float64)
        x = x.to(dtype)
        h = x.flatten(-2) if s.norm_over == "flat" else x
        if s.norm_kind == "rms":
            h = rms_norm(h, None, s.norm_eps)
        gain = self._t("gain")
        if gain is not None:
            h = h * (gain.reshape(h.shape[-1]) + s.norm_gain_offset)
        if s.norm_over == "flat" and s.proj_input == "per_stream":
            h = h.unflatten(-1, (self.n, self.C))
        elif s.norm_over == "per_stream" and s.proj_input == "flat":
            h = h.flatten(-2)
        return h

    def _linear(self, h: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
        y = F.linear(h, w) if self._spec.proj_orientation == "out_in" else h @ w
        return y if b is None else y + b

    def _shape(self, t: torch.Tensor, part: str, lead: int) -> torch.Tensor:
        """Reshape a part's values to [..., n] (pre/post) or [..., n, n] (res); ``lead`` leading dims kept."""
        n = self.n
        tail = (n,) if part != "res" else (n, n)
        return t.reshape(*t.shape[:lead], *tail)

    def _logits(self, x: torch.Tensor) -> dict[str, torch.Tensor | None]:
        s = self._spec
        lead = x.dim() - 2
        dyn: dict[str, torch.Tensor] = {}
        if s.proj is not None:
            h = self._normed(x)
            if s.proj.tensor is not None:
                y = self._linear(h, self._need("w"), self._t("pb"))
                sizes = self._sizes
                for name, piece in zip(s.proj.names, y.split(sizes, dim=-1), strict=True):
                    if name != "_":
                        dyn[name] = piece
            else:
                for part in s.proj.per_part:
                    dyn[part] = self._linear(h, self._need(f"w_{part}"), self._t(f"pb_{part}"))
        out: dict[str, torch.Tensor | None] = {}
        for part in PARTS:
            logit = None
            if part in dyn:
                d = self._shape(dyn[part], part, lead)
                if s.proj_activation == "tanh":  # hyper-connections HC: tanh(h W) * scale + static
                    d = torch.tanh(d)
                scale = self._t(f"s_{part}")
                if scale is not None:
                    d = d * scale.reshape(())
                elif f"s_{part}" in self._consts:
                    d = d * self._consts[f"s_{part}"]
                logit = d
            bias = self._t(f"b_{part}")
            if bias is not None:
                bias = bias.reshape((self.n,) if part != "res" else (self.n, self.n))
                logit = bias.expand(*x.shape[:lead], *bias.shape) if logit is None else logit + bias
            elif f"b_{part}" in self._consts:
                c = self._consts[f"b_{part}"]
                logit = logit + c if logit is not None else None
            if part == "res" and logit is not None and s.res_orientation == "code":
                logit = logit.transpose(-1, -2)
            out[part] = logit
        return out

    def res_logits(self, x: torch.Tensor) -> torch.Tensor | None:
        """Paper-orientation H_res logits [..., n, n] (Sinkhorn sites); None for identity / unconstrained."""
        if self._spec.res_constraint != "sinkhorn":
            return None
        z = self._logits(x)["res"]
        return z if self.temperature is None or z is None else z / self.temperature

    def res_from_logits(self, logits: torch.Tensor, spec: SinkhornSpec | None = None) -> torch.Tensor:
        c = self._spec.res_constraint
        if c == "identity":
            eye = torch.eye(self.n, dtype=logits.dtype, device=logits.device)
            return eye.expand(*logits.shape[:-2], self.n, self.n).clone()
        if c == "none":
            return logits
        from hcdiag.sinkhorn import project  # lazy: keeps the reader light

        use = spec if spec is not None else self.sinkhorn
        assert use is not None
        return project(logits, use)

    def forward(self, x: torch.Tensor) -> HCOutput:
        """x [..., n, C] -> H_pre [..., n], H_post [..., n], H_res [..., n, n] (paper convention)."""
        s = self._spec
        logits = self._logits(x)
        lead = x.shape[:-2]
        dtype = next((b.dtype for b in self.buffers() if b.is_floating_point()), torch.float64)
        nan = torch.full((*lead, self.n), math.nan, dtype=dtype)
        pre = nan if logits["pre"] is None else _activate(logits["pre"], s.acts["pre"]) + s.eps["pre"]
        post = nan if logits["post"] is None else _activate(logits["post"], s.acts["post"]) + s.eps["post"]
        if s.res_constraint == "identity":
            res = torch.eye(self.n, dtype=dtype).expand(*lead, self.n, self.n).clone()
        else:
            res_l = logits["res"]
            assert res_l is not None
            if self.temperature is not None and s.res_constraint == "sinkhorn":
                res_l = res_l / self.temperature
            res = self.res_from_logits(res_l)
        return HCOutput(pre, post, res)


# ------------------------------------------------------------------------------------------------------------
# loading


def _site_prefixes(spec: LayoutSpec, keys: list[str]) -> list[tuple[str, int, str, str]]:
    """(prefix, block, kind, raw kind) for every site, in depth order."""
    found: dict[str, tuple[int, str, str]] = {}
    for prefix, block, kind in spec.explicit:
        found[prefix] = (block, kind, kind)
    if spec.pattern is not None:
        for key in keys:
            m = spec.pattern.search(key)
            if not m:
                continue
            prefix = key[: m.end()]
            raw = m.groupdict().get("kind") or ""
            kind = spec.kinds.get(raw, "other") if raw else "other"
            found.setdefault(prefix, (int(m.group("block")), kind, raw))
    rank = {"attn": 0, "ffn": 1, "other": 2}
    return sorted(((p, b, k, r) for p, (b, k, r) in found.items()), key=lambda s: (s[1], rank[s[2]], s[3], s[0]))


def _match_sites(spec: LayoutSpec, path: str, keys: list[str]) -> list[tuple[str, int, str, str]]:
    """The sites of :func:`_site_prefixes`; InputError when the file's pattern / list matches no key."""
    sites_found = _site_prefixes(spec, keys)
    if not sites_found:
        what = f"pattern {spec.pattern.pattern!r}" if spec.pattern is not None else "the listed prefixes"
        raise InputError(f"{path}: no key matches {what} of layout file {spec.path}; check [sites]", path=path)
    return sites_found


def _sinkhorn(spec: LayoutSpec, options: LoadOptions, settings: dict[str, str]) -> SinkhornSpec | None:
    """The SinkhornSpec of a Sinkhorn H_res (None otherwise): :func:`sinkhorn_settings` over the file's
    [sinkhorn] table, whose convention is required (or --convention); iters default 20. Sources into
    ``settings``."""
    if spec.res_constraint != "sinkhorn":
        return None
    if spec.convention is None and options.convention is None:
        raise layout_error(spec.path, "[sinkhorn] convention is required for a Sinkhorn H_res (or pass --convention)")
    stated = StatedSinkhorn(
        "layout file", spec.convention, spec.iters, spec.sinkhorn_eps, iters_what="layout file [sinkhorn] iters"
    )
    sink, src = sinkhorn_settings(options, spec.convention or Convention.PAPER, 20, stated, spec.path)
    settings.update(src)
    return sink


def _temperature(spec: LayoutSpec, options: LoadOptions, settings: dict[str, str]) -> float | None:
    """tau from --temperature, else the file's [sinkhorn] temperature, else None; its source into ``settings``."""
    tau = cli_temperature(options)
    if tau is not None:
        settings["temperature"] = "cli (--temperature)"
    elif spec.temperature is not None:
        tau, settings["temperature"] = spec.temperature, "layout file ([sinkhorn] temperature)"
    return tau


@dataclass
class _Reading:
    """One checkpoint read with one layout file: its keys, the width C so far (the file's, or inferred from the
    first projection) and where it came from, and the keys and stored dtypes the sites used."""

    source: TensorSource
    spec: LayoutSpec
    known: set[str]
    C: int | None = None
    C_src: str = ""
    used: set[str] = field(default_factory=set)
    dtypes: set[str] = field(default_factory=set)

    @property
    def path(self) -> str:
        return self.source.path

    def key(self, prefix: str, rel: str) -> str:
        """The checkpoint key of a tensor name: relative to the site prefix, or a full key after "/"."""
        return rel[1:] if rel.startswith("/") else prefix + rel

    def need(self, prefix: str, rel: str, what: str) -> str:
        """:meth:`key`, with an InputError naming the expected key when the checkpoint lacks it."""
        k = self.key(prefix, rel)
        if k not in self.known:
            raise InputError(
                f"{self.path}: layout file {self.spec.path} expects {what} tensor {k!r}, which is not in the "
                "checkpoint",
                path=self.path,
            )
        return k


@dataclass
class _SiteTensors:
    """One site's reads: its buffers by name, its numeric parts (``consts``) and the infos in read order."""

    reading: _Reading
    prefix: str
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    consts: dict[str, float] = field(default_factory=dict)
    infos: list[TensorInfo] = field(default_factory=list)

    def take(self, name: str, rel: str, what: str) -> torch.Tensor:
        """Read tensor ``rel`` (InputError when missing) as buffer ``name``, noting its key and dtype."""
        r = self.reading
        k = r.need(self.prefix, rel, what)
        info = r.source.info(k)
        self.infos.append(info)
        r.used.add(k)
        r.dtypes.add(info.dtype)
        t = r.source.get(k)
        self.tensors[name] = t
        return t


def _packed_weight(site: _SiteTensors) -> int:
    """Read the packed projection weight: a matrix whose outputs equal the split's sum at n; its input width."""
    r, spec = site.reading, site.reading.spec
    assert spec.proj is not None and spec.proj.tensor is not None
    w = site.take("w", spec.proj.tensor, "projection")
    wkey = r.key(site.prefix, spec.proj.tensor)
    in_dim = _in_dim(w, spec, r.path, wkey)
    out_dim = int(w.shape[0] if spec.proj_orientation == "out_in" else w.shape[1])
    total = sum(part_size(e, spec.n, spec.path) for e in spec.proj.split)
    if out_dim != total:
        raise InputError(
            f"{r.path}: projection {wkey} {list(w.shape)} ({spec.proj_orientation}) has {out_dim} "
            f"outputs, but the layout file's split {list(spec.proj.split)} sums to {total} at n={spec.n}",
            path=r.path,
        )
    return in_dim


def _per_part_weights(site: _SiteTensors) -> int:
    """Read one projection weight per part: matrices agreeing on the input width; that width."""
    r, spec = site.reading, site.reading.spec
    assert spec.proj is not None
    dims = {}
    for part, rel in spec.proj.per_part.items():
        w = site.take(f"w_{part}", str(rel), f"{part} projection")
        dims[r.key(site.prefix, str(rel))] = _in_dim(w, spec, r.path, r.key(site.prefix, str(rel)))
    if len(set(dims.values())) != 1:
        raise InputError(f"{r.path}: projections {dims} disagree on the input width", path=r.path)
    return next(iter(dims.values()))


def _projection(site: _SiteTensors) -> None:
    """Read the site's projection weight(s) and bias; its input width gives C (flat: a multiple of n, / n),
    which must equal the file's or the first site's C (the first site without one sets it)."""
    r, spec = site.reading, site.reading.spec
    assert spec.proj is not None
    n = spec.n
    in_dim = _packed_weight(site) if spec.proj.tensor is not None else _per_part_weights(site)
    if spec.proj_bias is not None:
        if spec.proj_bias.tensor is not None:
            site.take("pb", spec.proj_bias.tensor, "projection bias")
        for part, rel in spec.proj_bias.per_part.items():
            site.take(f"pb_{part}", str(rel), f"{part} projection bias")
    site_C = in_dim // n if spec.proj_input == "flat" else in_dim
    if spec.proj_input == "flat" and in_dim % n:
        raise InputError(
            f"{r.path}: projection of site {site.prefix!r} has input width {in_dim}, not a multiple of n={n}",
            path=r.path,
        )
    if r.C is None:
        r.C, r.C_src = site_C, "inferred from the projection's input width"
    elif site_C != r.C:
        raise InputError(f"{r.path}: projection of site {site.prefix!r} implies C={site_C}, expected C={r.C}",
                         path=r.path)


def _bias_and_scale(site: _SiteTensors) -> None:
    """Read [bias] and [scale]: a packed tensor split into its parts (:func:`_unpack`), per-part tensors, and
    per-part numbers (into ``consts``)."""
    r, spec = site.reading, site.reading.spec
    tensors = site.tensors
    for kind_name, packed in (("b", spec.bias), ("s", spec.scale)):
        if packed is None:
            continue
        if packed.tensor is not None:
            t = site.take(f"{kind_name}_packed", packed.tensor, "bias" if kind_name == "b" else "scale")
            del tensors[f"{kind_name}_packed"]
            _unpack(t, packed, kind_name, spec.n, tensors, r.path, r.key(site.prefix, packed.tensor), spec)
        for part, v in packed.per_part.items():
            if isinstance(v, str):
                site.take(f"{kind_name}_{part}", v, f"{part} {'bias' if kind_name == 'b' else 'scale'}")
            else:
                site.consts[f"{kind_name}_{part}"] = float(v)


def _site_module(site: _SiteTensors, sink: SinkhornSpec | None, tau: float | None) -> LayoutFileSite:
    """The site's module: read projection, norm gain, bias and scale; check it has an H_res (a projection part or
    a bias named res, unless constraint identity); evaluate it once at x = 0 (:func:`_trial`)."""
    r, spec = site.reading, site.reading.spec
    if spec.proj is not None:
        _projection(site)
    if spec.norm_gain is not None:
        site.take("gain", spec.norm_gain, "norm gain")
    _bias_and_scale(site)
    has_res = "b_res" in site.tensors or (spec.proj is not None and "res" in (spec.proj.names or spec.proj.per_part))
    if spec.res_constraint != "identity" and not has_res:
        raise layout_error(spec.path, "H_res has neither a projection part nor a bias named res")
    module = LayoutFileSite(n=spec.n, C=r.C or 1, spec=spec, tensors=site.tensors, consts=site.consts,
                            sinkhorn=sink, temperature=tau if sink is not None else None)
    _trial(module, r.path, spec, site.prefix, site.infos)
    return module


def _site_name(kind: str, block: int, raw: str, j: int, sites: list[Site]) -> str:
    """``{kind}_{block}`` (other: ``{raw kind or site}_{block}``), with ``_{j}`` appended when already taken."""
    name = f"{kind}_{block}" if kind != "other" else f"{raw or 'site'}_{block}"
    if any(s.name == name for s in sites):
        name = f"{name}_{j}"
    return name


def _notes(spec: LayoutSpec, count: int) -> list[str]:
    """The file and its site count; the parts it does not describe (NaN); a code-orientation H_res."""
    notes = [f"layout file {spec.path} ({spec.name}): {count} sites"]
    missing_parts = [p for p in ("pre", "post") if not describes(spec, p)]
    if missing_parts:
        notes.append(f"layout file describes no {' / '.join(missing_parts)}: reported as NaN")
    if spec.res_orientation == "code":
        notes.append("H_res logits stored [input, output] (code orientation): transposed to paper convention")
    return notes


def _load(source: TensorSource, options: LoadOptions) -> LoadedModel:
    """Read a checkpoint with ``--layout-file``: parse the file -> match its sites in the keys -> Sinkhorn and
    temperature settings -> per site: tensors, shapes, module -> C for every site -> notes -> LoadedModel."""
    if options.layout_file is None:
        raise UsageError("the layout-file layout needs --layout-file FILE", option="--layout-file")
    spec = parse_layout_file(options.layout_file)
    keys = source.keys()
    sites_found = _match_sites(spec, source.path, keys)
    settings: dict[str, str] = {"n": f"layout file ({spec.path})"}
    sink = _sinkhorn(spec, options, settings)
    tau = _temperature(spec, options, settings)
    r = _Reading(source, spec, set(keys), C=spec.C, C_src=f"layout file ({spec.path})" if spec.C is not None else "")
    variant = {"sinkhorn": "mhc", "identity": "ihc", "none": "hc"}[spec.res_constraint]
    sites: list[Site] = []
    for j, (prefix, block, kind, raw) in enumerate(sites_found):
        site = _SiteTensors(r, prefix)
        module = _site_module(site, sink, tau)
        sites.append(Site(index=len(sites), name=_site_name(kind, block, raw, j, sites), block=block, kind=kind,
                          variant=f"layout-file:{variant}", module=module, tensors=site.infos))
    for s in sites:
        s.module.C = r.C or 1  # static-only files need no C; x is ignored
    settings["C"] = r.C_src or "not needed (static sites: no projection)"

    dtypes = sorted(r.dtypes)
    return assemble(source, "layout-file", sites, settings=settings, notes=_notes(spec, len(sites)), used=r.used,
                    metadata={"layout_file": spec.path, "layout_name": spec.name},
                    layout_reason=f"layout file {spec.path}: {len(sites)} sites", n=spec.n, C=r.C or 1,
                    source_dtype=dtypes[0] if len(dtypes) == 1 else "mixed (" + ", ".join(dtypes) + ")")


def _trial(module: LayoutFileSite, path: str, spec: LayoutSpec, prefix: str, infos: list[TensorInfo]) -> None:
    """Evaluate a site at x = 0 once. A layout file may pair any stored tensors with any parts, so a stored
    shape that does not fit the part it is read as (a gain of the wrong width, a bias part that is not n or
    n*n entries) surfaces as torch's RuntimeError in a reshape or matmul: an InputError naming the tensors."""
    try:
        with torch.no_grad():
            module(torch.zeros(1, module.n, module.C, dtype=torch.float64))
    except RuntimeError as exc:
        shapes = ", ".join(f"{t.key} {list(t.shape)}" for t in infos) or "no tensors"
        first = (str(exc).splitlines() or [""])[0][:200]
        raise InputError(
            f"{path}: site {prefix!r} ({shapes}) does not fit layout file {spec.path} at n={module.n}, "
            f"C={module.C}: {first}; check the shapes against the file's split / names",
            path=path,
        ) from None


def _in_dim(w: torch.Tensor, spec: LayoutSpec, path: str, key: str) -> int:
    if w.dim() != 2:
        raise InputError(f"{path}: projection {key} has shape {list(w.shape)}; expected a matrix", path=path)
    return int(w.shape[1] if spec.proj_orientation == "out_in" else w.shape[0])


def _unpack(
    t: torch.Tensor,
    packed: Packed,
    kind_name: str,
    n: int,
    out: dict[str, torch.Tensor],
    path: str,
    key: str,
    spec: LayoutSpec,
) -> None:
    """Split a packed bias (along its last axis, by split/names) or scale (one entry per name, or one shared)."""
    if kind_name == "s":
        names = list(packed.names)
        flat = t.reshape(-1)
        if flat.numel() == 1:
            for part in PARTS:
                out[f"s_{part}"] = flat[0].clone()
            return
        if flat.numel() != len(names):
            raise InputError(
                f"{path}: scale {key} has {flat.numel()} entries for parts {names}; give one per part "
                "or a single shared scale",
                path=path,
            )
        for nm, v in zip(names, flat, strict=True):
            if nm != "_":
                out[f"s_{nm}"] = v.clone()
        return
    sizes = [part_size(e, n, spec.path) for e in packed.split]
    if t.dim() == 0 or t.shape[-1] != sum(sizes):
        raise InputError(
            f"{path}: bias {key} has shape {list(t.shape)}; its last axis should be {sum(sizes)} "
            f"(split {list(packed.split)} at n={n})",
            path=path,
        )
    for nm, piece in zip(packed.names, t.split(sizes, dim=-1), strict=True):
        if nm == "_":
            continue
        want = n if nm != "res" else n * n
        if piece.numel() != want:
            raise InputError(f"{path}: bias {key} part {nm} has {piece.numel()} entries, expected {want}", path=path)
        out[f"b_{nm}"] = piece.contiguous().clone()


LAYOUT_FILE = register_layout(
    Layout(
        name="layout-file",
        summary="any naming, described by --layout-file FILE (docs/layout-file.md)",
        detect=lambda source: None,  # chosen only by --layout-file
        load=_load,
        priority=1000,
    )
)

"""Record the stream inputs and the H_res that a live model's hyper-connection sites actually use.

Dimension letters: T tokens (batch and sequence dims flattened), n streams, C width of one stream.

Usage::

    from hcdiag.capture import capture, read_activations

    with capture(model, "acts.safetensors", max_tokens=4096):
        model(input_ids)                      # any number of forward passes
    sites = read_activations("acts.safetensors")   # [CapturedSite(name, x [T, n, C], h_res [T, n, n], ...)]

Sites found (each records every call; a site called several times, e.g. over several forward passes,
concatenates its tokens, keeping the first ``max_tokens`` per site):

* hcdiag's own :class:`~hcdiag.site.SiteModule` instances: x = the forward input, H_res = the output's ``res``.
* transformers ``*HyperConnection`` modules (DeepSeek-V4, GLM-5-Next, HY-V4, ...): x = ``hidden_streams``
  [B, S, n, C]; H_res = ``comb``^T (the decoder layer applies comb^T to the streams); modules that return no
  comb (HY-V4: (post, collapsed)) keep H_res = I, recorded as such.
* lucidrains ``hyper-connections`` modules (HyperConnections, mHC, mHCv2) and the nanoGPT reference repos'
  modules (mHC, mHC-lite, KromHC, TBP-mHC): their ``width_connection`` is wrapped (so ``decorate_branch`` and
  branch-less calls are seen too); x = the residual streams it receives, after ``residual_transform`` for
  lucidrains mHC, in the fractional-stream order of :mod:`hcdiag.io.lucidrains_layout` when ``num_fracs`` > 1.
  These modules do not expose their mixing matrix, so H_res is recomputed from x, in float32, by the same
  hcdiag site modules the checkpoint layouts build from the module's live parameters (tested against the
  library to 1e-5); Sinkhorn convention and iterations are read from the live module.
* Qwen4-Exp ``Qwen4ExpTextGatedResidual`` (not the final ``hyper_connection_mixer``): x = ``hyper_input`` as
  [..., n, C], H_res = I (added unmixed), h_post = ``injection_weights``, branch_in = ``mixed_input``.
* DeepSeek-V4.1 ``DeepseekV41DecoderLayer``: its ``hc_mixes`` is wrapped, one site per fn it is called with
  (``<layer>.hc_attn``, ``<layer>.hc_ffn``): x = ``hidden_streams``, H_res = comb^T, h_pre / h_post as returned
  (the code applies that pre to the next branch).
* tokenbender's mHC (a ``width_connection`` module holding ``H_res_logits``; found before the lucidrains check)
  and mhc-pytorch ``ManifoldHyperConnections`` (x = the n copies its forward builds): H_res recomputed from the
  live parameters, tau / iterations read from the module.

File format (one safetensors file, written atomically: a temporary name in the same directory, then
``os.replace``)::

    tensors   sites.{i}.x       [T_i, n_i, C_i]  float32   stream input x_l of site i, one row per token
              sites.{i}.h_res   [T_i, n_i, n_i]  float32   H_res used for that token, paper convention
                                                           (row = output stream: x_next = H_res x + ...)
    optional (version 1 files written before these existed lack them; readers treat them as absent):
              sites.{i}.f             [T_i, C_i]       branch output F_l: what the attention / MLP wrote back
              sites.{i}.y             [T_i, n_i, C_i]  output streams x_{l+1} (the next site's input, or what
                                                       the decoder layer / final collapse received)
              sites.{i}.h_pre         [T_i, n_i]       H_pre as the module produced it
              sites.{i}.h_post        [T_i, n_i]       H_post as the module produced it (x_next = ... + H_post^T F)
              sites.{i}.branch_in     [T_i, C_i]       the branch input the module produced (= H_pre x when
                                                       the module applies H_pre itself and does not return it)
              sites.{i}.h_res_module  [T_i, n_i, n_i]  H_res as the module's own code produced it, where
                                                       ``h_res`` is a recomputation (lucidrains mHC: the output
                                                       of its ``residual_mix_constraint_fn``, mean over
                                                       proposals, transposed to paper convention)
    metadata  format   "hcdiag-activations"
              version  "1"
              sites    JSON list, one object per site in first-call order:
                       {"index": i, "name": module path in the model, "module_class": "pkg.mod.Class",
                        "h_res_from": "output" | "comb" | "identity" | "recomputed", "tokens": T_i,
                        "n": n_i, "C": C_i, "library": "transformers" | "hyper-connections" | "hcdiag" | ...,
                        "library_version": "5.24.0", "recorded": {optional tensor: where it came from},
                        "skipped": {optional tensor: why it was not recorded}}

What each kind of module exposes (the rest is listed under "skipped" with the reason):

* transformers DeepSeek-V4 / GLM-5-Next: h_post = ``post``, H_res = ``comb``^T, branch_in = ``collapsed``
  (the module applies H_pre itself and does not return it: no h_pre), f = the output of the decoder layer's
  ``self_attn`` (attn sites) or ``mlp`` (ffn sites), y = the next site's input within the decoder layer, or the
  decoder layer's output. HY-V4: the same without comb (H_res = I).
* lucidrains HyperConnections / mHC (``num_fracs`` = 1, one input view): branch_in and h_post (``beta``) from
  ``width_connection``, f and y from ``depth_connection``; mHC also h_res_module. No h_pre (not returned).
* hcdiag SiteModules: h_pre, h_post from the output; they compute the matrices only (the caller applies the
  update), so f and y are not seen.

Readers need only ``index``, ``name`` and the two tensors ``x`` and ``h_res``; the other fields are informative
or used by ``hcdiag verify``.
"""

from __future__ import annotations

import contextlib
import fnmatch
import functools
import json
import math
import os
import weakref
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from hcdiag.enums import Convention
from hcdiag.errors import InputError, UsageError
from hcdiag.site import SinkhornSpec, SiteModule

__all__ = ["DEFAULT_MAX_TOKENS", "FORMAT", "OPTIONAL", "VERSION", "CaptureSession", "CapturedSite", "capture",
           "read_activations"]

FORMAT = "hcdiag-activations"
VERSION = "1"
DEFAULT_MAX_TOKENS = 4096


#: optional per-site tensors: name -> trailing shape as letters (T rows first), see the module docstring
OPTIONAL = {"f": "C", "y": "nC", "h_pre": "n", "h_post": "n", "branch_in": "C", "h_res_module": "nn"}


class _Reader:
    """The tensors of one activations file, read on demand. The header was parsed and checked once by
    :class:`hcdiag.io.source.SafetensorsSource` (``source``); each read opens the file with safetensors'
    ``safe_open`` and takes one tensor, which (stored as float32) stays backed by the file's pages, mapped
    privately: nothing is copied, the pages are faulted in as the tensor is used, and the mapping goes when the
    last reference to the tensor does. ``bytes_read``: the bytes of the tensors handed out (each read counts)."""

    def __init__(self, path: str, source: Any) -> None:
        self.path = path
        self.source = source
        self.bytes_read = 0

    def read(self, key: str) -> torch.Tensor:
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(self.path, framework="pt", device="cpu") as f:
                t = f.get_tensor(key)
        except (SafetensorError, OSError) as exc:  # the file changed or is damaged past its header; anything
            # else is hcdiag's own bug and reaches the CLI as an internal error (exit 4)
            first = (str(exc).splitlines() or [type(exc).__name__])[0][:200]
            raise InputError(f"{self.path}: cannot read tensor {key!r} ({type(exc).__name__}: {first}); the file "
                             "may be damaged", path=self.path) from None
        self.bytes_read += t.numel() * t.element_size()
        return t.float()


class CapturedSite:
    """One site of an activations file: x [T, n, C] and h_res [T, n, n] (paper convention), float32, and the
    optional tensors of :data:`OPTIONAL` (None where the file does not hold them).

    From :func:`read_activations`, a tensor is read from the file when its attribute (``site.x``, ``site.y``,
    ...) is accessed, one tensor per access. It stays cached only while a caller still holds it (a weak
    reference), so going through the sites of a large capture one after another holds one site's tensors at
    a time. Shapes are known without reading: :meth:`shape`, :meth:`has`, :attr:`tokens`, :attr:`n`, :attr:`C`.
    Constructed directly, it holds the tensors it is given. Read-only, like the frozen dataclass it replaces.
    """

    __slots__ = ("name", "module_class", "index", "h_res_from", "library", "library_version", "recorded",
                 "skipped", "_held", "_keys", "_shapes", "_reader", "_refs")

    name: str
    module_class: str
    index: int
    h_res_from: str
    library: str
    library_version: str
    recorded: dict[str, str]
    skipped: dict[str, str]
    _held: dict[str, torch.Tensor]
    _keys: dict[str, tuple[str, tuple[int, ...]]]
    _shapes: dict[str, tuple[int, ...]]
    _reader: _Reader | None
    _refs: dict[str, weakref.ref[torch.Tensor]]

    def __init__(self, name: str, x: torch.Tensor | None = None, h_res: torch.Tensor | None = None,
                 module_class: str = "", index: int = 0, f: torch.Tensor | None = None,
                 y: torch.Tensor | None = None, h_pre: torch.Tensor | None = None,
                 h_post: torch.Tensor | None = None, branch_in: torch.Tensor | None = None,
                 h_res_module: torch.Tensor | None = None, h_res_from: str = "", library: str = "",
                 library_version: str = "", recorded: dict[str, str] | None = None,
                 skipped: dict[str, str] | None = None, *, reader: _Reader | None = None,
                 keys: dict[str, tuple[str, tuple[int, ...]]] | None = None) -> None:
        """``reader`` / ``keys`` (:func:`read_activations`): tensor name -> (file key, shape), read lazily
        through ``reader``; otherwise x and h_res are required and every tensor is held."""
        given = {"x": x, "h_res": h_res, "f": f, "y": y, "h_pre": h_pre, "h_post": h_post, "branch_in": branch_in,
                 "h_res_module": h_res_module}
        held = {k: t for k, t in given.items() if t is not None}
        lazy = dict(keys or {}) if reader is not None else {}
        if not {"x", "h_res"} <= set(held) | set(lazy):
            raise TypeError("CapturedSite needs x and h_res")
        shapes = {k: tuple(int(d) for d in t.shape) for k, t in held.items()}
        shapes.update({k: shape for k, (_, shape) in lazy.items() if k not in held})
        values: dict[str, Any] = {
            "name": name, "module_class": module_class, "index": index, "h_res_from": h_res_from,
            "library": library, "library_version": library_version, "recorded": dict(recorded or {}),
            "skipped": dict(skipped or {}), "_held": held, "_keys": lazy, "_shapes": shapes, "_reader": reader,
            "_refs": {},
        }
        for slot, value in values.items():
            object.__setattr__(self, slot, value)

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"CapturedSite is read-only (cannot set {name!r})")

    def __repr__(self) -> str:
        shapes = ", ".join(f"{k}={list(s)}" for k, s in self._shapes.items())
        return f"CapturedSite({self.name!r}, index={self.index}, {shapes})"

    def has(self, key: str) -> bool:
        """Whether this site holds tensor ``key`` (``"x"``, ``"h_res"`` or a key of :data:`OPTIONAL`)."""
        return key in self._shapes

    def shape(self, key: str) -> tuple[int, ...] | None:
        """The shape of tensor ``key``, without reading it; None where the site does not hold it."""
        return self._shapes.get(key)

    @property
    def tokens(self) -> int:
        """T: the tokens recorded for this site."""
        return self._shapes["x"][0]

    @property
    def n(self) -> int:
        return self._shapes["x"][1]

    @property
    def C(self) -> int:
        return self._shapes["x"][2]

    def tensor(self, key: str) -> torch.Tensor | None:
        """Tensor ``key`` as float32, read from the file unless a caller still holds it; None where absent."""
        held = self._held.get(key)
        if held is not None:
            return held
        if key not in self._keys:
            return None
        ref = self._refs.get(key)
        t = ref() if ref is not None else None
        if t is None:
            assert self._reader is not None
            t = self._reader.read(self._keys[key][0])
            self._refs[key] = weakref.ref(t)
        return t

    def _required(self, key: str) -> torch.Tensor:
        t = self.tensor(key)
        assert t is not None
        return t

    @property
    def x(self) -> torch.Tensor:
        """Stream input x_l [T, n, C]."""
        return self._required("x")

    @property
    def h_res(self) -> torch.Tensor:
        """H_res used for each token [T, n, n], paper convention."""
        return self._required("h_res")

    @property
    def f(self) -> torch.Tensor | None:
        """Branch output F_l [T, C]."""
        return self.tensor("f")

    @property
    def y(self) -> torch.Tensor | None:
        """Output streams x_{l+1} [T, n, C]."""
        return self.tensor("y")

    @property
    def h_pre(self) -> torch.Tensor | None:
        """H_pre as the module produced it [T, n]."""
        return self.tensor("h_pre")

    @property
    def h_post(self) -> torch.Tensor | None:
        """H_post as the module produced it [T, n]."""
        return self.tensor("h_post")

    @property
    def branch_in(self) -> torch.Tensor | None:
        """The branch input the module produced [T, C]."""
        return self.tensor("branch_in")

    @property
    def h_res_module(self) -> torch.Tensor | None:
        """H_res as the module's own code produced it [T, n, n], where ``h_res`` is a recomputation."""
        return self.tensor("h_res_module")


def _tail(letters: str, n: int, C: int) -> tuple[int, ...]:
    return tuple(n if ch == "n" else C for ch in letters)


def _library(module: nn.Module) -> tuple[str, str]:
    """(distribution name, version) of the package that defines ``module``'s class; ("", "") if unknown."""
    from importlib import metadata

    top = type(module).__module__.split(".")[0]
    dists = metadata.packages_distributions().get(top, [top])
    for dist in dists:
        with contextlib.suppress(metadata.PackageNotFoundError):
            return dist, metadata.version(dist)
    return top, str(getattr(__import__(top), "__version__", ""))


# ---------------------------------------------------------------------------------------------------------------
# Recording


class _Rows:
    """Recorded rows [T, ...] (float32, CPU), appended in place to one buffer.

    The buffer grows by doubling and starts at a whole 256 MiB of rows (or the cap, if smaller), so that a
    large recording lives in a few large allocations, which the allocator maps apart from the forward pass's
    temporaries and returns when freed. Kept as many small copies, the same rows sat among freed temporaries the
    allocator could not return: measured (bench/bench_capture.py, 2 GiB recorded in 16 MiB calls) 2.1x the
    recording in peak RSS. Pages of the buffer past the last row are not touched, so they cost no memory.
    """

    START_BYTES = 1 << 28

    def __init__(self, cap: int) -> None:
        self.cap = cap  # the most rows ever kept (the session's max_tokens)
        self.buf: torch.Tensor | None = None
        self.rows = 0

    @property
    def tail(self) -> tuple[int, ...] | None:
        return None if self.buf is None else tuple(self.buf.shape[1:])

    def append(self, t: torch.Tensor) -> None:
        t = t.detach()
        need = self.rows + t.shape[0]
        if self.buf is None or need > self.buf.shape[0]:
            row_bytes = 4 * math.prod(t.shape[1:])
            start = max(1, self.START_BYTES // max(1, row_bytes))
            size = min(self.cap, max(need, 2 * (0 if self.buf is None else self.buf.shape[0]), start))
            grown = torch.empty(size, *t.shape[1:], dtype=torch.float32)
            if self.buf is not None:
                grown[: self.rows] = self.buf[: self.rows]
            self.buf = grown
        self.buf[self.rows : need] = t  # copies, casting to float32 and moving to the CPU
        self.rows = need

    def value(self) -> torch.Tensor:
        """The rows kept (a contiguous view of the buffer)."""
        assert self.buf is not None
        return self.buf[: self.rows]


class _Record:
    def __init__(self, name: str, module: nn.Module, how: str, limit: int) -> None:
        self.name = name
        self.module_class = f"{type(module).__module__}.{type(module).__qualname__}"
        self.library, self.library_version = _library(module)
        self.how = how
        self.limit = limit
        self.xs = _Rows(limit)
        self.hs = _Rows(limit)
        self.tokens = 0
        self.calls = 0
        self.extra: dict[str, _Rows] = {}
        self.recorded: dict[str, str] = {}
        self.skipped: dict[str, str] = {}
        self.call_rows = 0  # rows (tokens) of the latest call, before the cap
        self.take = 0  # rows of the latest call that were kept

    @property
    def full(self) -> bool:
        return self.tokens >= self.limit

    def add(self, x: torch.Tensor, h: torch.Tensor) -> int:
        """x [..., n, C], h [..., n, n] with the same leading dims; returns the rows kept."""
        n, C = x.shape[-2:]
        x = x.detach().reshape(-1, n, C)
        h = h.detach().reshape(-1, n, n)
        if x.shape[0] != h.shape[0] or h.shape[-1] != n:
            raise UsageError(f"site {self.name}: stream input {tuple(x.shape)} and H_res {tuple(h.shape)} disagree")
        if self.xs.tail is not None and self.xs.tail != tuple(x.shape[1:]):
            raise UsageError(f"site {self.name} was called with streams {tuple(x.shape[1:])} after "
                             f"{self.xs.tail}; one file holds one shape per site")
        self.calls += 1
        self.call_rows = int(x.shape[0])
        take = max(0, min(x.shape[0], self.limit - self.tokens))
        self.take = take
        if take <= 0:
            return 0
        self.xs.append(x[:take])
        self.hs.append(h[:take])
        self.tokens += take
        return take

    def shape(self) -> tuple[int, int]:
        assert self.xs.tail is not None
        return self.xs.tail[0], self.xs.tail[1]

    def skip(self, key: str, why: str) -> None:
        self.skipped.setdefault(key, why)

    def add_extra(self, key: str, t: Any, source: str) -> None:
        """Keep the latest call's rows of an optional tensor ``key`` (trailing shape from :data:`OPTIONAL`)."""
        if self.take <= 0 or self.xs.tail is None or key in self.skipped:
            return
        tail = _tail(OPTIONAL[key], *self.shape())
        if not isinstance(t, torch.Tensor) or t.numel() != self.call_rows * math.prod(tail):
            got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            self.skip(key, f"{source} has shape {got}, not {self.call_rows} tokens x {list(tail)}")
            return
        rows = t.detach().reshape(self.call_rows, *tail)[: self.take]
        self.extra.setdefault(key, _Rows(self.limit)).append(rows)
        self.recorded.setdefault(key, source)

    def extras(self) -> dict[str, torch.Tensor]:
        """The optional tensors recorded for every kept token; the others go to ``skipped`` with the reason."""
        out = {}
        for key, rows in self.extra.items():
            if key in self.skipped:
                continue
            if rows.rows != self.tokens:
                self.skip(key, f"seen for {rows.rows} of {self.tokens} tokens")
                continue
            out[key] = rows.value()
        return out


class CaptureSession:
    """What :func:`capture` yields: ``names`` (recorded sites, first-call order) and ``path``."""

    def __init__(self, path: Path, max_tokens: int) -> None:
        self.path = path
        self.max_tokens = max_tokens
        self._records: list[_Record] = []
        self._by_module: dict[int, _Record] = {}
        self._pending_y: dict[int, _Record] = {}  # decoder layer -> site whose output streams are awaited
        self._hooked_layers: set[int] = set()
        self.root: nn.Module | None = None

    @property
    def names(self) -> list[str]:
        return [r.name for r in self._records]

    def _record(self, name: str, module: nn.Module, how: str, key: Any = None) -> _Record:
        """The record of ``module`` (``key``: one of several sites a module holds, e.g. a decoder layer's two)."""
        k = id(module) if key is None else key
        rec = self._by_module.get(k)
        if rec is None:
            rec = _Record(name, module, how, self.max_tokens)
            self._by_module[k] = rec
            self._records.append(rec)
        return rec

    def _wants(self, module: nn.Module, key: Any = None) -> bool:
        rec = self._by_module.get(id(module) if key is None else key)
        return rec is None or not rec.full

    def write(self) -> Path:
        from safetensors.torch import save_file

        from hcdiag.fileio import atomic_write

        records = [r for r in self._records if r.tokens > 0]
        if not records:
            raise UsageError("capture(): no hyper-connection site was called inside the with-block; run a forward "
                             "pass of the model inside it", option="model")
        tensors: dict[str, torch.Tensor] = {}
        sites = []
        for i, r in enumerate(records):
            x, h = r.xs.value(), r.hs.value()
            tensors[f"sites.{i}.x"] = x
            tensors[f"sites.{i}.h_res"] = h
            for key, t in r.extras().items():
                tensors[f"sites.{i}.{key}"] = t
            sites.append({"index": i, "name": r.name, "module_class": r.module_class, "h_res_from": r.how,
                          "tokens": int(x.shape[0]), "n": int(x.shape[1]), "C": int(x.shape[2]),
                          "library": r.library, "library_version": r.library_version,
                          "recorded": {k: v for k, v in r.recorded.items() if k not in r.skipped},
                          "skipped": dict(r.skipped)})
        meta = {"format": FORMAT, "version": VERSION, "sites": json.dumps(sites)}
        return atomic_write(self.path, lambda tmp: save_file(tensors, str(tmp), metadata=meta), option="path")


# ---------------------------------------------------------------------------------------------------------------
# Adapters: how each kind of module is found, hooked and converted


def _first_arg(args: tuple, kwargs: dict, *names: str) -> Any:
    if args:
        return args[0]
    for n in names:
        if n in kwargs:
            return kwargs[n]
    return None


def _is_transformers_hc(m: nn.Module) -> bool:
    return type(m).__name__.endswith("HyperConnection") and hasattr(m, "hc_mult") and hasattr(m, "fn")


def _is_width_connection_hc(m: nn.Module) -> bool:
    return callable(getattr(m, "width_connection", None)) and isinstance(m._parameters.get("static_alpha"),
                                                                         torch.Tensor)


def _per_token(v: Any, x: torch.Tensor) -> Any:
    """A site output [n] or [..., n] broadcast to x's leading dims (static sites return one vector)."""
    if isinstance(v, torch.Tensor) and v.ndim >= 1 and v.shape[-1] == x.shape[-2]:
        with contextlib.suppress(RuntimeError):
            return v.expand(*x.shape[:-2], v.shape[-1])
    return v


_NO_UPDATE = "hcdiag SiteModules compute the matrices only; the caller applies the update, so capture does not see it"


def _attach_site_module(session: CaptureSession, name: str, m: nn.Module) -> Callable[[], None]:
    def hook(module, args, kwargs, output):
        if not session._wants(module):
            return
        x = _first_arg(args, kwargs, "x")
        res = getattr(output, "res", None)
        if res is None and isinstance(output, tuple) and len(output) == 3:
            res = output[2]
        if isinstance(x, torch.Tensor) and isinstance(res, torch.Tensor):
            rec = session._record(name, module, "output")
            rec.add(x, res)
            rec.add_extra("h_pre", _per_token(output[0], x), "output.pre")
            rec.add_extra("h_post", _per_token(output[1], x), "output.post")
            for key in ("f", "y"):
                rec.skip(key, _NO_UPDATE)

    handle = m.register_forward_hook(hook, with_kwargs=True)
    return handle.remove


# the branch a transformers HC site feeds, by the first word of the site's attribute name (attn_hc, ffn_hc)
_BRANCHES = {"attn": ("self_attn", "attn", "attention", "self_attention"),
             "ffn": ("mlp", "ffn", "feed_forward"), "mlp": ("mlp", "ffn", "feed_forward")}


def _first_tensor(output: Any) -> Any:
    return output[0] if isinstance(output, tuple | list) and output else output


def _decoder_layer(session: CaptureSession, name: str) -> nn.Module | None:
    parent = name.rpartition(".")[0]
    if not parent or session.root is None:
        return None
    with contextlib.suppress(AttributeError):
        return session.root.get_submodule(parent)
    return None


def _branch_of(layer: nn.Module | None, name: str) -> tuple[str, nn.Module] | None:
    word = name.rpartition(".")[2].split("_")[0]
    for attr in _BRANCHES.get(word, ()):
        child = getattr(layer, attr, None) if layer is not None else None
        if isinstance(child, nn.Module):
            return attr, child
    return None


def _attach_transformers(session: CaptureSession, name: str, m: nn.Module) -> Callable[[], None]:
    layer = _decoder_layer(session, name)
    branch = _branch_of(layer, name)
    removers = []

    def hook(module, args, kwargs, output):
        x = _first_arg(args, kwargs, "hidden_streams", "hidden_states", "x")
        if layer is not None:  # this site's input is the output streams of the site called before it in the layer
            waiting = session._pending_y.pop(id(layer), None)
            if waiting is not None:
                waiting.add_extra("y", x, "input of the next site in the decoder layer")
        if not session._wants(module):
            return
        if not isinstance(x, torch.Tensor) or not isinstance(output, tuple):
            return
        n = x.shape[-2]
        if len(output) >= 3 and isinstance(output[1], torch.Tensor) and tuple(output[1].shape[-2:]) == (n, n):
            # comb is [input stream, output stream]: the layer mixes with comb^T (paper H_res)
            rec = session._record(name, module, "comb")
            rec.add(x, output[1].transpose(-1, -2))
        else:  # no comb (HY-V4): the residual streams pass unmixed
            eye = torch.eye(n, dtype=torch.float32, device=x.device).expand(*x.shape[:-2], n, n)
            rec = session._record(name, module, "identity")
            rec.add(x, eye)
        rec.add_extra("h_post", output[0], "output post")
        rec.add_extra("branch_in", output[-1], "output collapsed")
        rec.skip("h_pre", "the module applies H_pre itself and returns only the collapsed branch input")
        if branch is None:
            rec.skip("f", f"no self_attn / mlp module next to {name}: the branch output is not seen")
        if layer is None:
            rec.skip("y", f"{name} has no parent decoder layer: the output streams are not seen")
        else:
            session._pending_y[id(layer)] = rec

    removers.append(m.register_forward_hook(hook, with_kwargs=True).remove)
    if branch is not None:
        attr, mod = branch

        def branch_hook(module, args, output):
            rec = session._by_module.get(id(m))
            if rec is not None:
                rec.add_extra("f", _first_tensor(output), f"output of {attr}")

        removers.append(mod.register_forward_hook(branch_hook).remove)
    if layer is not None and id(layer) not in session._hooked_layers:
        session._hooked_layers.add(id(layer))

        def layer_hook(module, args, output):
            waiting = session._pending_y.pop(id(module), None)
            if waiting is not None:
                waiting.add_extra("y", _first_tensor(output), "output of the decoder layer")

        removers.append(layer.register_forward_hook(layer_hook).remove)

    def undo() -> None:
        for r in removers:
            r()

    return undo


# Reference-repo classes whose math hcdiag.io.nanogpt_layout reproduces, by class name -> hyper_conn_type
_REF_CLASSES = {"ManifoldConstrainedHyperConnections": "mhc", "MHCAnalysis": "mhc", "MHCLite": "mhc_lite",
                "KromHC": "kromhc", "TBP_MHC": "tbp_mhc", "LSB_MHC": "tbp_mhc"}


def _lucidrains_convention(fn: Any, name: str) -> tuple[Convention | None, int]:
    """(convention, iters) of a hyper-connections mHC ``residual_mix_constraint_fn``; None = decided per call
    (mHCv2's triton kernel: log domain on CUDA, sinkhorn_knopps elsewhere)."""
    if isinstance(fn, functools.partial):
        iters = int(fn.keywords.get("iters", 20))
        fname = getattr(fn.func, "__name__", "")
        if fname == "sinkhorn_knopps":
            return Convention.LUCIDRAINS, iters
        if fname == "log_domain_sinkhorn_knopps":
            return Convention.LOG, iters
        if fname == "triton_sinkhorn":
            return None, iters
    raise UsageError(f"capture(): site {name} uses a custom residual_mix_constraint_fn ({fn!r}); hcdiag cannot "
                     "reproduce it, leave this site out with sites=[...]", option="sites")


@dataclass
class _LibrarySite:
    """How capture reads one lucidrains / reference-repo module: the hcdiag site built from its live parameters,
    residuals -> x (with ``residual_transform``), residuals -> streams (without it), the per-call Sinkhorn
    iterations of mHCv2's triton kernel (None otherwise), and why the update tensors cannot be recorded (None
    when they can)."""

    site: SiteModule
    to_x: Callable[[torch.Tensor], torch.Tensor]
    streams: Callable[[torch.Tensor], torch.Tensor]
    triton_iters: int | None
    no_update: str | None
    n: int


def _library_site(name: str, m: nn.Module) -> _LibrarySite:
    from hcdiag.io import lucidrains_layout as lr
    from hcdiag.io import nanogpt_layout as ng
    from hcdiag.io.reader import IGNORED_SUBTREES

    state = {k: v for k, v in m.state_dict(keep_vars=False).items() if not k.startswith(IGNORED_SUBTREES)}
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    cls_module = type(m).__module__
    channel_first = bool(getattr(m, "channel_first", False))
    no_update = None
    if channel_first:
        no_update = "channel_first module: its branch tensors are not in token order"
    if f"{cls_module.rsplit('.', 1)[-1]}.{type(m).__name__}" in lr.FORM_CLASSES.values():
        raise UsageError(f"capture(): site {name} is a {cls_module}.{type(m).__name__}: hcdiag reads its "
                         "checkpoints but does not record its forward pass; leave it out with sites=[...]",
                         option="sites")
    if cls_module.startswith("hyper_connections"):
        v2 = cls_module.endswith("mHCv2")
        force = "mhc-v2" if v2 else ("hc" if "dynamic_alpha_scale" in shapes else "mhc")
        plan = lr.plan_site(shapes, prefix=name + ".", force_cls=force)
        spec: SinkhornSpec | None = None
        per_call = None
        if plan.cls != "hc":
            conv, iters = _lucidrains_convention(m.residual_mix_constraint_fn, name)
            spec = SinkhornSpec(conv or Convention.LUCIDRAINS, iters, source="module")
            if conv is None:
                per_call = iters
        site = lr.build_site(plan, state, tanh=isinstance(getattr(m, "act", nn.Tanh()), nn.Tanh), spec=spec)
        s, f = plan.streams, plan.fracs
        transform = getattr(m, "residual_transform", None) if plan.cls != "hc" else None
        if f > 1 or int(getattr(m, "num_input_views", 1)) > 1:
            no_update = "num_fracs / num_input_views > 1: the branch reads and writes fractions, not n streams"

        def streams(r: torch.Tensor) -> torch.Tensor:
            if v2:  # [..., s, (f d)] -> [..., (s f), d]
                return r.reshape(*r.shape[:-2], s * f, r.shape[-1] // f)
            if channel_first:
                r = r.movedim(1, -1)
            bs, *mid, D = r.shape  # [(b s), ..., (f d)] -> [b, ..., (f s), d]
            r = r.reshape(bs // s, s, *mid, f, D // f).movedim(1, -2)
            return r.reshape(bs // s, *mid, f * s, D // f)

        def to_x(r: torch.Tensor) -> torch.Tensor:
            return streams(transform(r) if transform is not None else r)

        return _LibrarySite(site, to_x, streams, per_call, no_update, s * f)
    hc_type = _REF_CLASSES.get(type(m).__name__)
    if hc_type is None:
        raise UsageError(f"capture(): site {name} is a {type(m).__qualname__} ({cls_module}), a hyper-connection "
                         "class hcdiag cannot reproduce; leave it out with sites=[...]", option="sites")
    rplan = ng.plan_ref_site(shapes, hc_type=hc_type, prefix=name + ".")
    iters = int(getattr(m, "sinkhorn_iters", ng.DEFAULT_ITERS))
    ref_site = ng.build_ref_site(rplan, state, SinkhornSpec(Convention.LOG, iters, source="module"))
    n = rplan.n

    def to_x_ref(r: torch.Tensor) -> torch.Tensor:
        if channel_first:
            r = r.movedim(1, -1)
        bs, *mid, D = r.shape  # [(b s), ..., d] -> [b, ..., s, d]
        return r.reshape(bs // n, n, *mid, D).movedim(1, -2)

    return _LibrarySite(ref_site, to_x_ref, to_x_ref, None, no_update, n)


def _beta(out: Any) -> Any:
    """H_post (``beta``) from a width_connection's (branch_input, residuals, {"beta": ...}) return value."""
    if isinstance(out, tuple) and len(out) == 3 and isinstance(out[2], dict):
        return out[2].get("beta")
    return None


def _attach_width_connection(session: CaptureSession, name: str, m: nn.Module) -> Callable[[], None]:
    lib = _library_site(name, m)
    site, n = lib.site, lib.n
    saved = {k: m.__dict__.get(k) for k in ("width_connection", "depth_connection", "residual_mix_constraint_fn")}
    original = m.width_connection
    original_depth = getattr(m, "depth_connection", None)
    mix_fn = m.__dict__.get("residual_mix_constraint_fn")
    produced: list[torch.Tensor] = []  # the module's own H_res in the current width_connection call

    def width_connection(residuals, *args, **kwargs):
        rec = None
        if session._wants(m) and isinstance(residuals, torch.Tensor):
            with torch.no_grad():
                x = lib.to_x(residuals)
                if lib.triton_iters is not None:  # mHCv2 triton kernel: log domain on CUDA only
                    conv = Convention.LOG if x.is_cuda else Convention.LUCIDRAINS
                    spec = SinkhornSpec(conv, lib.triton_iters, source="module")
                    site.sinkhorn = spec
                    site._spec = spec  # type: ignore[attr-defined]  # a LucidrainsSite (mHCv2)
                h = site.to(x.device)(x.float()).res
            rec = session._record(name, m, "recomputed")
            rec.add(x, h)
        produced.clear()
        out = original(residuals, *args, **kwargs)
        if rec is not None:
            rec.skip("h_pre", "the module applies H_pre itself and returns only the branch input")
            if lib.no_update is not None:
                for key in ("f", "y", "branch_in", "h_post"):
                    rec.skip(key, lib.no_update)
            else:
                rec.add_extra("branch_in", _first_tensor(out), "width_connection branch input")
                rec.add_extra("h_post", _beta(out), "width_connection beta")
            if mix_fn is None:
                rec.skip("h_res_module", "the module has no residual_mix_constraint_fn (unconstrained HC)")
            elif len(produced) == 1 and lib.no_update is None:
                res = produced[0]  # [proposals, tokens..., input, output]
                rec.add_extra("h_res_module", res.mean(0).transpose(-1, -2), "residual_mix_constraint_fn")
        return out

    def depth_connection(branch_output, residuals, *args, **kwargs):
        out = original_depth(branch_output, residuals, *args, **kwargs)
        rec = session._by_module.get(id(m))
        if rec is not None and lib.no_update is None and isinstance(out, torch.Tensor):
            rec.add_extra("f", branch_output, "depth_connection branch output")
            rec.add_extra("y", lib.streams(out), "depth_connection output")
        return out

    def constraint(alpha, *args, **kwargs):
        res = mix_fn(alpha, *args, **kwargs)
        if isinstance(res, torch.Tensor) and res.ndim >= 3 and tuple(res.shape[-2:]) == (n, n):
            produced.append(res.detach())
        return res

    m.__dict__["width_connection"] = width_connection  # shadows the method: forward() finds it through self
    if callable(original_depth):
        m.__dict__["depth_connection"] = depth_connection
    if mix_fn is not None:
        m.__dict__["residual_mix_constraint_fn"] = constraint

    def undo() -> None:
        for key, value in saved.items():
            if value is None:
                m.__dict__.pop(key, None)
            else:
                m.__dict__[key] = value

    return undo


# ---------------------------------------------------------------------------------------------------------------
# issue 15: Qwen4-Exp, DeepSeek-V4.1, tokenbender's mHC, mhc-pytorch

_UNMIXED = "the decoder layer applies the update itself; capture records the site's maps only"


def _is_qwen4_exp(m: nn.Module) -> bool:
    # the final hyper_connection_mixer (use_combine=False) collapses the streams: not a residual site
    return type(m).__name__ == "Qwen4ExpTextGatedResidual" and getattr(m, "block_inject_weight", None) is not None


def _attach_qwen4_exp(session: CaptureSession, name: str, m: nn.Module) -> Callable[[], None]:
    lib: Any = m  # the library's attributes, untyped
    n, C = int(lib.hc_count), int(lib.hidden_size)

    def hook(module, args, kwargs, output):
        h = _first_arg(args, kwargs, "hyper_input")
        if not session._wants(module) or not isinstance(h, torch.Tensor):
            return
        if not isinstance(output, tuple) or len(output) != 3:
            return
        x = h.unflatten(-1, (n, C))
        rec = session._record(name, module, "identity")  # hyper_input is added back unmixed: H_res = I
        rec.add(x, torch.eye(n, dtype=torch.float32, device=x.device).expand(*x.shape[:-2], n, n))
        rec.add_extra("h_post", output[2], "output injection_weights")
        rec.add_extra("branch_in", output[0], "output mixed_input")
        rec.skip("h_pre", "Qwen4-Exp gates every channel of the normalised streams: no H_pre [n] to record")
        for key in ("f", "y"):
            rec.skip(key, _UNMIXED)

    return m.register_forward_hook(hook, with_kwargs=True).remove


def _is_deepseek_v41_layer(m: nn.Module) -> bool:
    return (type(m).__name__ == "DeepseekV41DecoderLayer" and callable(getattr(m, "hc_mixes", None))
            and isinstance(getattr(m, "hc_attn_fn", None), torch.Tensor))


def _attach_deepseek_v41(session: CaptureSession, name: str, m: nn.Module) -> Callable[[], None]:
    """DeepSeek-V4.1 keeps its mHC parameters on the decoder layer: ``hc_mixes`` (one call per site) is wrapped;
    the site is told apart by the fn it is called with (``hc_attn_fn`` / ``hc_ffn_fn``)."""
    original = m.hc_mixes
    keys = {kind: (id(m), kind) for kind in ("attn", "ffn")}

    def hc_mixes(hidden_streams, fn, scale, base, *args, **kwargs):
        out = original(hidden_streams, fn, scale, base, *args, **kwargs)
        kind = "attn" if fn is m.hc_attn_fn else "ffn" if fn is m.hc_ffn_fn else None
        if kind is None or not session._wants(m, keys[kind]) or not isinstance(out, tuple) or len(out) != 3:
            return out
        pre, post, comb = out
        rec = session._record(f"{name}.hc_{kind}", m, "comb", key=keys[kind])
        rec.add(hidden_streams, comb.transpose(-1, -2))  # out_k = sum_j comb[j, k] residual_j: H_res = comb^T
        rec.add_extra("h_pre", pre, "hc_mixes pre (the code collapses the next branch with it)")
        rec.add_extra("h_post", post, "hc_mixes post")
        for key in ("f", "y", "branch_in"):
            rec.skip(key, _UNMIXED)
        return out

    m.__dict__["hc_mixes"] = hc_mixes  # shadows the method: forward() finds it through self

    def undo() -> None:
        m.__dict__.pop("hc_mixes", None)

    return undo


def _is_tokenbender(m: nn.Module) -> bool:
    return callable(getattr(m, "width_connection", None)) and isinstance(m._parameters.get("H_res_logits"),
                                                                         torch.Tensor)


def _attach_tokenbender(session: CaptureSession, name: str, m: nn.Module) -> Callable[[], None]:
    from hcdiag.io.tokenbender_layout import DEFAULT_ITERS, DEFAULT_TAU, TokenbenderSite

    if getattr(m, "mhc_h_res_proj", "sinkhorn") != "sinkhorn":
        raise UsageError(f"capture(): site {name} uses mhc_h_res_proj={m.mhc_h_res_proj!r} (Newton-Schulz); "
                         "hcdiag cannot reproduce it, leave it out with sites=[...]", option="sites")
    tau = float(getattr(m, "sinkhorn_tau", getattr(m, "mhc_tau", DEFAULT_TAU)))
    iters = int(getattr(m, "sinkhorn_iters", getattr(m, "mhc_num_iters", DEFAULT_ITERS)))
    lib: Any = m  # the library's attributes, untyped
    n = int(lib.H_res_logits.shape[-1])
    channel_first = bool(getattr(m, "channel_first", False))
    original = lib.width_connection

    def site() -> TokenbenderSite:  # from the live parameters at call time (they may train between calls)
        alpha = m._parameters.get("H_res_alpha_logit")
        post = m._parameters.get("H_post_logits")
        return TokenbenderSite(lib.H_res_logits.detach(), lib.H_pre_logits.detach(),
                               None if post is None else post.detach(), None if alpha is None else alpha.detach(),
                               C=1, tau=tau, spec=SinkhornSpec(Convention.PAPER, iters, source="module"))

    def width_connection(residuals, *args, **kwargs):
        out = original(residuals, *args, **kwargs)
        if not session._wants(m) or not isinstance(residuals, torch.Tensor):
            return out
        with torch.no_grad():
            r = residuals.movedim(1, -1) if channel_first else residuals
            bs, *mid, D = r.shape  # [(b s), ..., d] -> [b, ..., s, d]
            x = r.reshape(bs // n, n, *mid, D).movedim(1, -2)
            pre, post, h = site().to(x.device)(x.double())
        rec = session._record(name, m, "recomputed")
        rec.add(x, h)
        rec.add_extra("h_pre", pre, "softmax(H_pre_logits)")
        beta = _beta(out)
        if beta is not None:
            rec.add_extra("h_post", beta.reshape(-1).expand(*x.shape[:-2], n), "width_connection beta")
        for key in ("f", "y", "branch_in"):
            rec.skip(key, "not recorded for tokenbender's mHC (H_res is recomputed from the live parameters)")
        return out

    m.__dict__["width_connection"] = width_connection

    def undo() -> None:
        m.__dict__.pop("width_connection", None)

    return undo


def _is_mhc_pytorch(m: nn.Module) -> bool:
    return (type(m).__name__ == "ManifoldHyperConnections" and hasattr(m, "num_streams")
            and all(isinstance(getattr(m, k, None), torch.Tensor) for k in ("alpha_res", "b_res", "b_pre")))


def _attach_mhc_pytorch(session: CaptureSession, name: str, m: nn.Module) -> Callable[[], None]:
    """mhc-pytorch's forward takes one stream x [..., dim] and expands it into n copies: those copies are the
    site's streams; its maps are recomputed from the live parameters (the package returns only the collapse)."""
    from hcdiag.io.mhc_pytorch_layout import DEFAULT_ITERS, PARAMS, MhcPytorchSite

    lib: Any = m  # the library's attributes, untyped
    n, C = int(lib.num_streams), int(lib.dim)

    def hook(module, args, kwargs, output):
        x1 = _first_arg(args, kwargs, "x")
        if not session._wants(module) or not isinstance(x1, torch.Tensor):
            return
        state = dict(module.state_dict())
        t = {k: state[k].detach() for k in PARAMS}
        site = MhcPytorchSite(t, n=n, C=C, norm_eps=torch.finfo(x1.dtype).eps,
                              spec=SinkhornSpec(Convention.LOG, DEFAULT_ITERS, source="module"))
        x = x1.unsqueeze(-2).expand(*x1.shape[:-1], n, C)
        with torch.no_grad():
            pre, post, h = site.to(x.device)(x.to(t["phi_res.weight"].dtype))
        rec = session._record(name, module, "recomputed")
        rec.add(x, h)
        rec.add_extra("h_pre", pre, "recomputed from the live parameters")
        rec.add_extra("h_post", post, "recomputed from the live parameters")
        for key in ("f", "y", "branch_in"):
            rec.skip(key, "mhc-pytorch collapses its streams inside forward: only the collapse is returned")

    return m.register_forward_hook(hook, with_kwargs=True).remove


def _adapter(m: nn.Module) -> Callable[[CaptureSession, str, nn.Module], Callable[[], None]] | None:
    if isinstance(m, SiteModule):
        return _attach_site_module
    if _is_transformers_hc(m):
        return _attach_transformers
    if _is_qwen4_exp(m):
        return _attach_qwen4_exp
    if _is_deepseek_v41_layer(m):
        return _attach_deepseek_v41
    if _is_tokenbender(m):  # before the lucidrains check: HyperConnections(mhc=True) also holds static_alpha
        return _attach_tokenbender
    if _is_mhc_pytorch(m):
        return _attach_mhc_pytorch
    if _is_width_connection_hc(m):
        return _attach_width_connection
    return None


def _select(model: nn.Module, sites: Iterable[str | nn.Module] | None) -> list[tuple[str, nn.Module, Any]]:
    found = []
    for name, m in model.named_modules():
        adapter = _adapter(m)
        if adapter is not None:
            found.append((name or type(m).__name__, m, adapter))
    if sites is None:
        return found
    wanted = list(sites)
    chosen, seen = [], set()
    for w in wanted:
        if isinstance(w, nn.Module):
            hits = [f for f in found if f[1] is w]
        else:
            hits = [f for f in found if f[0] == w or fnmatch.fnmatchcase(f[0], str(w))]
        if not hits:
            known = ", ".join(f[0] for f in found[:8]) + (" ..." if len(found) > 8 else "")
            raise UsageError(f"capture(): no hyper-connection module matches {w!r}; found: {known or 'none'}",
                             option="sites")
        for f in hits:
            if id(f[1]) not in seen:
                seen.add(id(f[1]))
                chosen.append(f)
    return chosen


@contextlib.contextmanager
def capture(
    model: nn.Module,
    path: str | os.PathLike[str],
    *,
    sites: Iterable[str | nn.Module] | None = None,
    max_tokens: int = DEFAULT_MAX_TOKENS,
) -> Iterator[CaptureSession]:
    """Hook every hyper-connection site of ``model`` (or those in ``sites``: module paths, glob patterns or
    module objects), record each call's stream input x and the H_res it used, and on a clean exit write one
    safetensors file to ``path`` (format in the module docstring). Nothing is written if the block raises.

    max_tokens caps the tokens kept per site (the first ones seen). Raises UsageError when the model has no
    site hcdiag knows, a ``sites`` entry matches nothing, or no site was called.
    """
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise UsageError(f"max_tokens must be an integer >= 1, got {max_tokens!r}", option="max_tokens")
    if not isinstance(model, nn.Module):
        raise UsageError(f"capture() needs a torch.nn.Module, got {type(model).__name__}", option="model")
    chosen = _select(model, sites)
    if not chosen:
        raise UsageError(f"capture(): {type(model).__name__} has no hyper-connection modules hcdiag knows "
                         "(hcdiag SiteModule, transformers *HyperConnection, hyper-connections / reference-repo "
                         "width_connection modules)", option="model")
    session = CaptureSession(Path(path), max_tokens)
    session.root = model
    undo: list[Callable[[], None]] = []
    try:
        for name, m, attach in chosen:
            undo.append(attach(session, name, m))
        yield session
    finally:
        for u in reversed(undo):
            u()
    session.write()


# ---------------------------------------------------------------------------------------------------------------
# Reading


def _bad(path: str, why: str) -> InputError:
    return InputError(f"{path}: {why}; record activations with hcdiag.capture.capture()", path=path)


def _str_dict(v: Any) -> dict[str, str]:
    return {str(k): str(w) for k, w in v.items()} if isinstance(v, dict) else {}


def _float_dtype(stored: str) -> bool:
    from hcdiag.io.source import torch_dtype_of

    dt = torch_dtype_of(stored)
    return dt is not None and dt.is_floating_point


def _optional(p: str, src: Any, e: dict, T: int, n: int, C: int) -> dict[str, tuple[str, tuple[int, ...]]]:
    """The optional tensors of site ``e`` (:data:`OPTIONAL`) that the file holds: name -> (key, shape), checked
    against the header's shapes and dtypes."""
    i, name = e["index"], e.get("name")
    keys = set(src.keys())
    out: dict[str, tuple[str, tuple[int, ...]]] = {}
    for key, letters in OPTIONAL.items():
        k = f"sites.{i}.{key}"
        if k not in keys:
            continue
        info = src.info(k)
        want = (T, *_tail(letters, n, C))
        if tuple(info.shape) != want or not _float_dtype(info.dtype):
            raise _bad(p, f"site {i} ({name}): {k} {tuple(info.shape)} is not a {list(want)} float tensor")
        out[key] = (k, tuple(info.shape))
    return out


def _info_fields(e: dict) -> dict[str, Any]:
    return dict(h_res_from=str(e.get("h_res_from", "")), library=str(e.get("library", "")),
                library_version=str(e.get("library_version", "")), recorded=_str_dict(e.get("recorded")),
                skipped=_str_dict(e.get("skipped")))


def _open(p: str) -> Any:
    """The file as a lazy :class:`~hcdiag.io.source.SafetensorsSource` (header parsed and validated against the
    file size; no tensor read); InputError "cannot read as safetensors" for anything else."""
    from hcdiag.io.source import NOT_A_CHECKPOINT, SafetensorsSource

    try:
        return SafetensorsSource(p, [Path(p)])
    except InputError as exc:
        first = (str(exc).splitlines() or [type(exc).__name__])[0].removeprefix(f"{p}: ")
        if first.startswith(f"{NOT_A_CHECKPOINT} (") and first.endswith(")"):
            first = first[len(NOT_A_CHECKPOINT) + 2 : -1]  # the reason alone
        raise _bad(p, f"cannot read as safetensors ({first[:200]})") from None


def read_activations(path: str | os.PathLike[str]) -> list[CapturedSite]:
    """The sites of an activations file written by :func:`capture`, in file order (index 0, 1, ...).

    Only the file's header and metadata are read here (and checked: format, version, site list, tensor
    shapes and dtypes); each site's tensors are read when accessed (:class:`CapturedSite`).

    Raises InputError for a missing file, a file that is not safetensors, another format or a newer version,
    or tensors / site list that do not fit together.
    """
    p = str(path)
    if not os.path.isfile(p):
        raise InputError(f"{p}: no such file; record activations with hcdiag.capture.capture()", path=p)
    src = _open(p)
    reader = _Reader(p, src)
    meta = src.metadata
    keys = set(src.keys())
    if meta.get("format") != FORMAT:
        raise _bad(p, f"not an hcdiag activations file (format={meta.get('format')!r}, expected {FORMAT!r})")
    if meta.get("version") != VERSION:
        raise _bad(p, f"activations format version {meta.get('version')!r}; this hcdiag reads {VERSION!r}")
    try:
        entries = json.loads(meta.get("sites", ""))
    except ValueError:
        raise _bad(p, "metadata 'sites' is not JSON") from None
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        raise _bad(p, "metadata 'sites' is not a list of objects")
    idx = [e.get("index") for e in entries]
    if sorted(i for i in idx if isinstance(i, int) and not isinstance(i, bool)) != list(range(len(entries))):
        raise _bad(p, f"site indices {idx} are not 0..{len(entries) - 1}")
    out = []
    for e in sorted(entries, key=lambda e: e["index"]):
        i, name = e["index"], e.get("name")
        if not isinstance(name, str):
            raise _bad(p, f"site {i} has no name")
        kx, kh = f"sites.{i}.x", f"sites.{i}.h_res"
        missing = [k for k in (kx, kh) if k not in keys]
        if missing:
            raise _bad(p, f"site {i} ({name}) has no tensor {missing[0]}")
        ix, ih = src.info(kx), src.info(kh)
        xs, hs = tuple(ix.shape), tuple(ih.shape)
        if (len(xs) != 3 or len(hs) != 3 or xs[0] != hs[0] or hs[1] != hs[2] or hs[1] != xs[1]
                or not _float_dtype(ix.dtype) or not _float_dtype(ih.dtype)):
            raise _bad(p, f"site {i} ({name}): x {xs} / h_res {hs} are not [T, n, C] / [T, n, n] float tensors")
        lazy = {"x": (kx, xs), "h_res": (kh, hs), **_optional(p, src, e, *xs)}
        out.append(CapturedSite(name, module_class=str(e.get("module_class", "")), index=i, reader=reader,
                                keys=lazy, **_info_fields(e)))
    return out

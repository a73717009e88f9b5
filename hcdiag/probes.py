"""Stream inputs x that dynamic H_res matrices are evaluated on (``--probe static | random | activations``).

Dimension letters: T tokens, n streams, C width of one stream.

A dynamic site computes H_res from the normalised stream state, H~_res = a_res * mat(x' phi_res) + b_res with
x' = RMSNorm(vec(x)) (mHC Eq. 7), so its doubly-stochastic error and gain depend on x. Three ways to choose x:

``static``
    x = 0 [1, n, C]. RMSNorm(0) = 0 * rsqrt(0 + eps) = 0 (every hcdiag module and the reference code keep an
    eps in the norm), so the dynamic terms vanish and the logits are the biases alone (b_res; transformers'
    ``base``). This is the matrix a site applies when the stream carries no signal, and the only one a purely
    static variant ever applies. One "token".

``random``
    T seeded synthetic tokens, x_tci ~ N(0, 1) i.i.d. (optionally Student-t with ``df`` degrees of freedom).
    Why this matches real residual statistics well enough: every variant reads x only through an RMSNorm
    (over vec(x) in mHC Eq. 7, per stream in the lucidrains-style code), and RMSNorm is scale invariant
    (RMSNorm(c x) = RMSNorm(x) for c > 0, up to its eps). So only the *direction* of x matters, never the
    residual stream's growing magnitude across depth. An isotropic Gaussian gives a direction uniform on the
    sphere: the maximum-entropy choice when nothing about the model's features is known, and each normalised
    entry then has unit RMS, as RMSNorm guarantees for real inputs too. What it does not reproduce is the
    anisotropy of trained residual streams (a few "massive activation" channels, low effective rank); those
    concentrate x' phi_res on fewer directions and can push the logits further than an isotropic probe does.
    ``df`` (heavier tails, e.g. 3) moves part of that way; ``activations`` is the faithful answer.
    Draws come from numpy's PCG64 seeded by (seed, site index) in float64 and are then cast, so a site's
    tokens are identical across dtypes, platforms and torch versions, and different sites see independent
    draws (different layers see different stream states).

    Two ways to draw them (``draw``; the JSON's probe dict states which was used as ``"draw"``):

    ``full``
        x [T, n, C] as above, then the site's own forward (RMSNorm and projection of T x nC values).
    ``projected``
        For a site that reads x only through z = RMSNorm(vec(x)) W^T, W [k, nC] (:meth:`SiteModule.linear_read`;
        the transformers-family sites, k = (n+2)n), z is drawn directly, exactly in distribution: with the thin
        QR W^T = Q R, g = vec(x) Q ~ N(0, I_k) and ||vec(x)||^2 = ||g||^2 + s with s ~ chi^2(nC - k) independent
        of g (the part of x orthogonal to W's rows), so z = (g R) rsqrt((||g||^2 + s) / nC + eps) is distributed
        as RMSNorm(vec(x)) W^T for x ~ N(0, I): T (k + 1) random numbers and T k^2 work instead of T nC and
        T nC k. Per token, g [k] and then s come from the same PCG64 stream (seed, site index), in float64;
        z is computed in float64 (R from the site's W in its compute dtype) and cast. The drawn numbers differ
        from ``full``'s (same distribution, other samples). Student-t (``df``) is not rotation invariant, so it
        is always drawn ``full``, as is every site without a linear read.
    ``auto`` (the default)
        ``projected`` where it saves work, nC >= :data:`AUTO_MIN_RATIO` x k (DeepSeek-V4-Flash: nC = 16384,
        k = 24), else ``full`` (tiny models, where the full draw costs about as much).

``activations FILE``
    Recorded stream inputs per site (:func:`hcdiag.capture.read_activations`: ``sites.{i}.x`` [T, n, C] and
    the model's own ``sites.{i}.h_res`` [T, n, n]). Captured sites are matched to the model's sites by name
    when every model site name is present in the file, else by order; the counts must agree. All recorded
    tokens are used (``tokens`` applies to the random probe only). Only the file's header is read up front;
    each site's tensors are read when that site is analysed, so one site's inputs are in memory at a time. A
    capture whose per-site working set would not fit in this machine's memory is refused before any tensor is
    read (InputError, one line: :func:`activations_probe_bytes`; capture fewer tokens with ``max_tokens``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from hcdiag.enums import Draw, DType, Probe
from hcdiag.errors import InputError, UsageError
from hcdiag.model import Site
from hcdiag.site import LinearRead, SiteEval, SiteModule

__all__ = [
    "ACTIVATIONS_ENTRY_BYTES",
    "AUTO_MIN_RATIO",
    "DRAWS",
    "ActivationsProbe",
    "ProbeBase",
    "RandomProbe",
    "StaticProbe",
    "activations_probe_bytes",
    "make_probe",
    "physical_memory_bytes",
    "random_probe_bytes",
    "torch_dtype",
]

_TORCH_DTYPES = {
    DType.FLOAT64: torch.float64,
    DType.FLOAT32: torch.float32,
    DType.BFLOAT16: torch.bfloat16,
}


def torch_dtype(dtype: DType | str | torch.dtype) -> torch.dtype:
    """:class:`DType` (or its string value, or a torch dtype) -> torch dtype; UsageError(option="--dtype")."""
    if isinstance(dtype, torch.dtype):
        if dtype not in _TORCH_DTYPES.values():
            raise UsageError(f"--dtype {dtype} is not supported; choose float64, float32 or bfloat16",
                             "--dtype")
        return dtype
    try:
        return _TORCH_DTYPES[DType(str(dtype).strip().lower())]
    except ValueError:
        known = ", ".join(d.value for d in DType)
        raise UsageError(f"--dtype {dtype!r} is not a dtype hcdiag computes in; choose one of: {known}",
                         "--dtype") from None


def _site_shape(site: Site) -> tuple[int, int]:
    return int(site.module.n), int(site.module.C)


#: the random probe's ways to draw (see the module docstring)
DRAWS = tuple(d.value for d in Draw)
#: ``auto`` draws ``projected`` where nC >= AUTO_MIN_RATIO x k (the full route costs about nC / k times more)
AUTO_MIN_RATIO = 32


@dataclass(frozen=True)
class ProbeBase:
    """What every probe offers: ``inputs(site, dtype) -> x [T, n, C]``, a description, a JSON dict."""

    kind: ClassVar[Probe]

    def prepare(self, sites: list[Site]) -> None:
        """Check the probe fits these sites before any work is done (no-op except for ``activations``)."""

    def inputs(self, site: Site, dtype: DType | str | torch.dtype = DType.FLOAT64) -> torch.Tensor:
        raise NotImplementedError

    def evaluate(self, site: Site, module: SiteModule, dtype: DType | str | torch.dtype = DType.FLOAT64) -> SiteEval:
        """``module`` (``site``'s module in the compute dtype ``dtype``) evaluated once on this probe's tokens
        (:meth:`SiteModule.evaluate`): what the analyses use, so a probe may skip building x."""
        return module.evaluate(self.inputs(site, dtype))

    def site_tokens(self, site: Site) -> int:
        """T: how many tokens :meth:`inputs` / :meth:`evaluate` give for ``site`` (subclasses answer without
        building them)."""
        return int(self.inputs(site).shape[0])

    def recorded_h_res(self, site: Site) -> torch.Tensor | None:
        """The model's own H_res for these inputs, [T, n, n] paper convention, when the probe recorded it."""
        return None

    def describe(self, sites: list[Site] | None = None) -> str:
        """One line for reports; ``sites``: the analysed sites, where the description depends on them."""
        raise NotImplementedError

    def to_dict(self, sites: list[Site] | None = None) -> dict[str, Any]:
        """JSON-able settings; ``sites`` as for :meth:`describe`."""
        raise NotImplementedError


@dataclass(frozen=True)
class StaticProbe(ProbeBase):
    """x = 0 [1, n, C]: the logits are the static biases alone (see the module docstring)."""

    kind: ClassVar[Probe] = Probe.STATIC

    @property
    def tokens(self) -> int:
        return 1

    def site_tokens(self, site: Site) -> int:
        return 1

    def inputs(self, site: Site, dtype: DType | str | torch.dtype = DType.FLOAT64) -> torch.Tensor:
        n, C = _site_shape(site)
        return torch.zeros(1, n, C, dtype=torch_dtype(dtype))

    def describe(self, sites: list[Site] | None = None) -> str:
        return "static (x = 0: bias logits alone)"

    def to_dict(self, sites: list[Site] | None = None) -> dict[str, Any]:
        return {"kind": self.kind.value, "tokens": 1}


@dataclass(frozen=True)
class RandomProbe(ProbeBase):
    """T synthetic tokens, x ~ N(0, 1) i.i.d. per entry (Student-t(df) with ``df``), seeded per site; drawn
    ``full`` or ``projected`` as ``draw`` says (see the module docstring)."""

    tokens: int = 256
    seed: int = 0
    df: float | None = None
    draw_mode: str = "auto"

    kind: ClassVar[Probe] = Probe.RANDOM

    def _rng(self, site_index: int) -> np.random.Generator:
        seq = np.random.SeedSequence([self.seed % 2**64, site_index])
        return np.random.Generator(np.random.PCG64(seq))

    def draw(self, site_index: int, n: int, C: int) -> np.ndarray:
        """The float64 tokens [T, n, C] of site ``site_index`` (PCG64 seeded by (seed, site_index)): the
        ``full`` draw."""
        rng = self._rng(site_index)
        if self.df is None:
            return rng.standard_normal((self.tokens, n, C))
        return rng.standard_t(self.df, (self.tokens, n, C))

    def draw_projected(self, site_index: int, k: int, width: int) -> tuple[np.ndarray, np.ndarray]:
        """The ``projected`` draw of site ``site_index`` for a read of ``k`` of ``width`` = nC dimensions:
        g [T, k] ~ N(0, 1) and then s [T] ~ chi^2(width - k), float64, from PCG64 seeded by (seed, site_index)."""
        rng = self._rng(site_index)
        g = rng.standard_normal((self.tokens, k))
        return g, rng.chisquare(width - k, self.tokens)

    def site_tokens(self, site: Site) -> int:
        return self.tokens

    def site_draw(self, site: Site) -> str:
        """``projected`` or ``full``: how this probe draws ``site``'s tokens (the module docstring says when)."""
        read = site.module.linear_read() if self.df is None and self.draw_mode != "full" else None
        if read is None:
            return "full"
        k, width = (int(d) for d in read.weight.shape)
        if k >= width or (self.draw_mode == "auto" and width < AUTO_MIN_RATIO * k):
            return "full"
        return "projected"

    def read_values(self, site_index: int, read: LinearRead) -> torch.Tensor:
        """z [T, k] float64 distributed as RMSNorm(vec(x)) W^T for the ``full`` draw's x (exact: see the
        module docstring), from :meth:`draw_projected`."""
        W = read.weight.detach().to(torch.float64)
        k, width = W.shape
        R = torch.linalg.qr(W.T, mode="reduced").R  # W^T = Q R, Q [nC, k] orthonormal columns
        g_np, s_np = self.draw_projected(site_index, k, width)
        g, s = torch.from_numpy(g_np), torch.from_numpy(s_np)
        mean_sq = (g.square().sum(-1) + s) / width  # ||vec(x)||^2 / nC
        return (g @ R) * torch.rsqrt(mean_sq + read.eps).unsqueeze(-1)

    def evaluate(self, site: Site, module: SiteModule, dtype: DType | str | torch.dtype = DType.FLOAT64) -> SiteEval:
        if self.site_draw(site) == "full":
            return module.evaluate(self.inputs(site, dtype))
        read = module.linear_read()
        assert read is not None
        return module.evaluate_read(self.read_values(site.index, read).to(torch_dtype(dtype)))

    def prepare(self, sites: list[Site]) -> None:
        """Refuse (UsageError naming --tokens) a token count whose arrays would not fit in this machine's
        memory, before anything is drawn: see :func:`random_probe_bytes`."""
        if not sites:
            return
        need = random_probe_bytes(self.tokens, sites, self)
        have = physical_memory_bytes()
        if have is None or need <= have:
            return
        per_token = random_probe_bytes(1, sites, self)
        limit = max(1, have // per_token)
        n, C = max((_site_shape(s) for s in sites), key=lambda nc: nc[0] * nc[1])
        raise UsageError(
            f"--tokens {self.tokens} needs about {_size(need)} ({_size(per_token)} per token: "
            f"the inputs of the widest site (n={n}, C={C}; {self._draws_text(sites)}), plus results of "
            f"{len(sites)} sites), more than this machine's {_size(have)}; use --tokens {limit} or fewer",
            "--tokens",
        )

    def inputs(self, site: Site, dtype: DType | str | torch.dtype = DType.FLOAT64) -> torch.Tensor:
        """The ``full`` draw as x [T, n, C] in ``dtype`` (whatever :meth:`site_draw` says)."""
        n, C = _site_shape(site)
        return torch.from_numpy(self.draw(site.index, n, C)).to(torch_dtype(dtype))

    def _draw_summary(self, sites: list[Site]) -> str:
        kinds = {self.site_draw(s) for s in sites}
        return kinds.pop() if len(kinds) == 1 else "mixed"

    def _draws_text(self, sites: list[Site]) -> str:
        return {"full": "drawn full", "projected": "drawn projected"}.get(self._draw_summary(sites),
                                                                           "drawn projected or full")

    def describe(self, sites: list[Site] | None = None) -> str:
        dist = "N(0, 1)" if self.df is None else f"Student-t(df={self.df:g})"
        how = ""
        if sites:
            summary = self._draw_summary(sites)
            how = {"full": "", "projected": ", drawn as RMSNorm(x) fn^T"}.get(
                summary, ", drawn as RMSNorm(x) fn^T where a site allows")
        return f"random ({self.tokens} tokens, seed {self.seed}, x ~ {dist}{how})"

    def to_dict(self, sites: list[Site] | None = None) -> dict[str, Any]:
        d: dict[str, Any] = {"kind": self.kind.value, "tokens": self.tokens, "seed": self.seed,
                             "distribution": "normal" if self.df is None else "student-t"}
        if self.df is not None:
            d["df"] = self.df
        d["draw_mode"] = self.draw_mode
        if sites:
            d["draw"] = self._draw_summary(sites)
            if d["draw"] == "mixed":
                d["draw_projected_sites"] = [s.name for s in sites if self.site_draw(s) == "projected"]
        return d


@dataclass(frozen=True)
class ActivationsProbe(ProbeBase):
    """Recorded stream inputs, one [T, n, C] tensor per site (``hcdiag.capture`` file). The file's header is
    read once; each site's tensors are read when :meth:`inputs` / :meth:`recorded_h_res` / :meth:`captured`'s
    attributes ask for them, so one site's inputs are in memory at a time."""

    path: str = ""
    _cache: dict[str, Any] = field(default_factory=dict, init=False, repr=False, compare=False)

    kind: ClassVar[Probe] = Probe.ACTIVATIONS

    def _captured(self) -> list[Any]:
        if "sites" not in self._cache:
            from hcdiag.capture import read_activations

            captured = list(read_activations(self.path))
            if not captured:
                raise UsageError(
                    f"activations file {self.path} holds no sites (expected keys sites.0.x, ...)",
                    "--activations",
                )
            self._cache["sites"] = captured
            self._cache["by_name"] = {c.name: c for c in captured}
        return self._cache["sites"]

    @property
    def tokens(self) -> int:
        """Tokens recorded for the first captured site."""
        return int(self._captured()[0].tokens)

    def prepare(self, sites: list[Site], *, entry_bytes: int | None = None) -> None:
        """Match every site to a captured one (shapes from the file's header; nothing is read), then refuse
        (InputError, one line) a capture whose analysis would not fit in this machine's memory: see
        :func:`activations_probe_bytes`; ``entry_bytes``: bytes held per recorded x entry while one site is
        analysed (default :data:`ACTIVATIONS_ENTRY_BYTES`; ``hcdiag verify`` holds more)."""
        captured = self._captured()
        if len(captured) != len(sites):
            raise UsageError(
                f"activations file {self.path} has {len(captured)} sites but the model has {len(sites)}; "
                "capture every HC site of this model (hcdiag.capture)",
                "--activations",
            )
        for site in sites:
            self._match(site)
        if not sites:
            return
        per_entry = ACTIVATIONS_ENTRY_BYTES if entry_bytes is None else int(entry_bytes)
        need = activations_probe_bytes(sites, self, per_entry)
        have = physical_memory_bytes()
        if have is None or need <= have:
            return
        widest = max(sites, key=lambda s: self.site_tokens(s) * per_entry * _site_shape(s)[0] * _site_shape(s)[1])
        T = self.site_tokens(widest)
        n, C = _site_shape(widest)
        limit = max(1, T * have // need)
        raise InputError(
            f"activations file {self.path}: analysing it needs about {_size(need)} (site {widest.name}: "
            f"{T} tokens of x [n={n}, C={C}] at {per_entry} bytes per entry while it is analysed, plus results of "
            f"{len(sites)} sites), more than this machine's {_size(have)}; capture fewer tokens "
            f"(hcdiag.capture.capture(..., max_tokens={limit}) or fewer)",
            path=self.path,
        )

    def _match(self, site: Site) -> Any:
        captured = self._captured()
        by_name = self._cache["by_name"]
        c = by_name.get(site.name)
        if c is None:
            if site.index >= len(captured):
                raise UsageError(
                    f"activations file {self.path} has no site {site.name!r} (and only {len(captured)} sites "
                    f"by order); capture every HC site of this model",
                    "--activations",
                )
            c = captured[site.index]
        n, C = _site_shape(site)
        shape = tuple(c.shape("x"))  # from the file's header: nothing is read
        if len(shape) != 3 or shape[1:] != (n, C) or shape[0] < 1:
            raise InputError(
                f"activations for site {site.name} have shape {shape}, expected [T, n={n}, C={C}]; "
                "was the file captured from this model?",
                path=self.path,
            )
        return c

    def inputs(self, site: Site, dtype: DType | str | torch.dtype = DType.FLOAT64) -> torch.Tensor:
        """x [T, n, C] of ``site`` in ``dtype``, read from the file now (one tensor; not kept here)."""
        return self._match(site).x.to(torch_dtype(dtype))

    def site_tokens(self, site: Site) -> int:
        return int(self._match(site).tokens)

    def captured(self, site: Site) -> Any:
        """The :class:`hcdiag.capture.CapturedSite` recorded for ``site`` (matched as :meth:`prepare` says)."""
        return self._match(site)

    def recorded_h_res(self, site: Site) -> torch.Tensor | None:
        h = getattr(self._match(site), "h_res", None)
        return None if h is None else h.to(torch.float64)

    def describe(self, sites: list[Site] | None = None) -> str:
        return f"activations ({Path(self.path).name}, {self.tokens} tokens)"

    def to_dict(self, sites: list[Site] | None = None) -> dict[str, Any]:
        return {"kind": self.kind.value, "path": self.path, "tokens": self.tokens}


def _size(nbytes: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if nbytes >= scale:
            return f"{nbytes / scale:.1f} {unit}"
    return f"{nbytes} bytes"


def _input_bytes(site: Site, probe: RandomProbe) -> int:
    """Bytes per token of one site's inputs: ``full`` x [n, C] drawn, cast and RMSNorm-ed (3 x 8 per entry);
    ``projected`` g [k] and s, z and its cast (4 x 8 per read value, plus one)."""
    if probe.site_draw(site) == "projected":
        read = site.module.linear_read()
        assert read is not None
        return 4 * 8 * (int(read.weight.shape[0]) + 1)
    n, C = _site_shape(site)
    return 3 * 8 * n * C


def _peak_bytes(sites: list[Site], tokens: Any, input_bytes: Any) -> int:
    """Peak bytes of an analysis that goes through ``sites`` one after another: the inputs of the widest site
    (``tokens(site)`` x ``input_bytes(site)`` bytes per token), plus logits and H_res [T, n, n] float64 that
    every site keeps (2 x 8 bytes per entry per site)."""
    widest = max(int(tokens(s)) * int(input_bytes(s)) for s in sites)
    kept = sum(int(tokens(s)) * 2 * 8 * n * n for s, (n, _) in ((s, _site_shape(s)) for s in sites))
    return widest + kept


def random_probe_bytes(tokens: int, sites: list[Site], probe: RandomProbe | None = None) -> int:
    """Peak bytes of a random-probe analysis of ``tokens`` tokens over ``sites``, estimated before any draw;
    ``probe`` says how each site is drawn (default: ``RandomProbe()``, draw ``auto``).

    Sites are analysed one after another, so the inputs count once, for the widest site: a ``full`` draw holds
    the float64 x [T, n, C], a copy in the compute dtype and the RMSNorm-ed copy (3 x 8 bytes per entry, float64
    bounding the others); a ``projected`` one g [T, k], s [T] and z [T, k] with its cast. Every site keeps its
    logits and H_res [T, n, n] float64 until the batched iterations search (2 x 8 bytes per entry per site).
    Start-up, the HC tensors and torch's temporaries of the [T, n, n] work are measured separately
    (bench/bench_production.py: the estimate is compared with the peak RSS there).
    """
    use = probe if probe is not None else RandomProbe()
    T = int(tokens)
    return _peak_bytes(sites, lambda s: T, lambda s: _input_bytes(s, use))


#: bytes per recorded x entry while one site is analysed (stochasticity, gain-sweep --from): the float32 x
#: as read from the file (4, its mapped pages; 4 more where it is stored in another dtype and converted), then
#: as the ``full`` random draw: x in float64, a copy in the compute dtype, the RMSNorm-ed copy (3 x 8)
ACTIVATIONS_ENTRY_BYTES = 2 * 4 + 3 * 8


def activations_probe_bytes(sites: list[Site], probe: ActivationsProbe,
                            entry_bytes: int = ACTIVATIONS_ENTRY_BYTES) -> int:
    """Peak bytes of an analysis of the recorded tokens of ``probe`` over ``sites``, from the file's header
    alone: as :func:`random_probe_bytes`, with each site's recorded token count and ``entry_bytes`` per
    x entry [n, C] of the widest site."""
    return _peak_bytes(sites, probe.site_tokens,
                       lambda s: entry_bytes * _site_shape(s)[0] * _site_shape(s)[1])


def physical_memory_bytes() -> int | None:
    """This machine's physical memory in bytes (None where the OS does not say)."""
    try:
        return int(os.sysconf("SC_PHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (AttributeError, OSError, ValueError):
        return None


def make_probe(
    kind: Probe | str,
    *,
    tokens: int | None = 256,
    seed: int = 0,
    activations: str | Path | None = None,
    df: float | None = None,
    draw: str = "auto",
) -> StaticProbe | RandomProbe | ActivationsProbe:
    """The probe named by ``kind``. ``tokens`` / ``seed`` / ``df`` / ``draw`` (``auto``, ``projected`` or
    ``full``: see the module docstring) apply to ``random``; ``activations`` (a file written by
    :mod:`hcdiag.capture`) is required by ``activations`` and ignored otherwise.

    Raises UsageError (one line, naming the option) for tokens < 1, a missing or unreadable activations file,
    df <= 0 or an unknown draw.
    """
    try:
        kind = Probe(str(kind).strip().lower())
    except ValueError:
        known = ", ".join(p.value for p in Probe)
        raise UsageError(f"--probe {kind!r} is unknown; choose one of: {known}", "--probe") from None
    if kind is Probe.STATIC:
        return StaticProbe()
    if kind is Probe.RANDOM:
        if tokens is None:
            tokens = 256
        if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 1:
            raise UsageError(f"--tokens must be an integer >= 1, got {tokens!r}", "--tokens")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise UsageError(f"--seed must be an integer, got {seed!r}", "--seed")
        if df is not None and not (isinstance(df, int | float) and df > 0 and np.isfinite(df)):
            raise UsageError(f"df must be a positive number of degrees of freedom, got {df!r}", "--df")
        if draw not in DRAWS:
            raise UsageError(f"draw {draw!r} is unknown; choose one of: {', '.join(DRAWS)}", "--draw")
        return RandomProbe(tokens=tokens, seed=seed, df=None if df is None else float(df), draw_mode=draw)
    if activations is None:
        raise UsageError("--probe activations needs --activations FILE (written by hcdiag.capture)",
                         "--activations")
    p = Path(activations)
    if not p.is_file():
        raise UsageError(f"activations file {p} does not exist; record one with hcdiag.capture",
                         "--activations")
    return ActivationsProbe(path=str(p))

"""``hcdiag verify``: does a model compute the hyper-connection it claims? (update equation, diagnoses, fingerprint)

Dimension letters: T tokens, S tokens of the fingerprint sample, n streams, C width of one stream, K iterations.

Inputs: a checkpoint (read through :func:`hcdiag.io.load`, sites as :class:`~hcdiag.site.SiteModule`) and an
activations file of a forward pass of the model (:mod:`hcdiag.capture`): per site and token the input streams
x_l [T, n, C], the branch output F_l [T, C], the output streams x_{l+1} [T, n, C], and the H_res / H_post (and
where returned the branch input) that the model's module produced. Captured sites are matched to checkpoint sites
as ``--probe activations`` matches them (:class:`hcdiag.probes.ActivationsProbe`).

Per site, in float64, with rel(a, b) = ||a - b||_F / ||b||_F over all recorded tokens:

``update (model)``       rel(H_res x + H_post^T F, x_{l+1}) with the matrices the model produced (mHC Eq. 3);
``update (recomputed)``  the same with the H_res, H_post that the checkpoint's parameters give under the
                         layout's convention (the site module's forward on x);
``branch input``         rel(H_pre x, branch input) with the recomputed H_pre, where the module returned its
                         branch input (transformers ``collapsed``, lucidrains ``branch_input``); a site whose
                         branch input is no stream-weighted sum gives its own
                         (:meth:`~hcdiag.site.SiteModule.branch_input`: Qwen4-Exp's channel-gated mean);
``H_res`` / ``H_post`` / ``H_pre``  rel(recomputed, model's) wherever the module exposed that matrix (not for
                         H_res where capture could only recompute it: lucidrains HC); where the update itself was
                         not recorded (hcdiag's own SiteModules compute the matrices only) these are the checks.
                         They matter at the first site too: its n streams are n copies of the embedding, and any
                         H_res with unit row sums maps them to themselves, so the update alone cannot see a change
                         of H_res there.

A site **conforms** when every check it has is at float32 rounding: at most :data:`TOLERANCE` =
:data:`TOL_FACTOR` x eps(float32) = 64 x 1.19e-7 = 7.6e-6. Why this size: the model computes in float32, so
each entry of x_{l+1} carries a relative rounding error of a few eps from the n + 1 products it sums, and the
recomputed matrices differ from the model's by the float32 rounding of its RMSNorm, projection and Sinkhorn
(measured: ~5e-8 for the update with the model's own matrices, ~1e-7 to 1e-6 with recomputed ones on the tiny
test models); the bugs this command is for move the residual by 1e-4 (a 10-iteration Sinkhorn) to 1 (a
transposed mix). ``tol`` overrides it.

When a site does not conform, **diagnoses** are tried in turn, each with its residual; the first that reaches the
tolerance names the site's diagnosis (later ones that reach it too are listed: at the first site, where the streams
are equal, a transposed and a skipped mix can look the same). Which set is tried depends on what failed:

* the update with the model's own matrices fails (the *layer* does not apply what its module produced): the mix
  transposed (``comb`` applied instead of ``comb^T``), the residual unmixed (H_res = I), H_post halved (without
  the factor 2) or with eps added; each an alternative prediction of x_{l+1} from the model's matrices;
* it holds but the recomputed matrices differ (the *module* computes other matrices than the checkpoint gives
  under the layout's convention): the same four on the recomputed matrices, the packed projection split in each
  other order of [pre, post, comb] (transformers layout only; scales in stored order, or permuted with the
  rows), a different Sinkhorn iteration count (1..100, the layout's convention) and the fingerprint's best
  candidate; each residual is the largest over the update and the module's exposed matrices.

The **fingerprint** asks which Sinkhorn choices reproduce the H_res the model used, from the logits the checkpoint
gives (site ``res_logits``) on S sampled tokens: start exp / exp - max / softmax + eps / sigmoid + eps, eps in the
denominators or not, pass order (columns or rows first, in paper axes), orientation (on H or on H^T), exp or log
domain, iterations 1..100. Candidates come from :func:`hcdiag.sinkhorn.sinkhorn` (conventions paper, log,
transformers, transformers-sigmoid (the earlier transformers DeepSeek-V4 start), lucidrains, each on the logits
and on their transpose). In exact
arithmetic the exp and log domains, and exp with or without the max subtracted, are the same map, so candidates
are grouped into classes (start, pass order, eps); the report names the best candidate, the other members of its
class (``equivalent``: told apart by rounding only), the runner-up (best candidate of another class or another
iteration count) and the best candidate of another class, each with its residual rel(H_candidate, H_model), the
layout's own candidate, the best of each family, how many candidates reach the tolerance (``matching``; near
convergence many iteration counts do: the recording then cannot tell them apart) and the span of iteration counts
of the best family that do. All Sinkhorn sites of one shape are fingerprinted together, one call per iterate.
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from itertools import permutations
from typing import Any

import torch

from hcdiag.enums import Convention, Exactness, Probe
from hcdiag.errors import UsageError
from hcdiag.model import LoadedModel, Site
from hcdiag.sinkhorn import TRANSFORMERS_DEFAULT_EPS, sinkhorn
from hcdiag.site import SinkhornSpec, SiteModule

__all__ = [
    "FINGERPRINT_TOKENS",
    "MAX_ITERS",
    "TOLERANCE",
    "TOL_FACTOR",
    "Candidate",
    "Diagnosis",
    "Fingerprint",
    "SiteVerification",
    "VerifyReport",
    "verify",
]

TOL_FACTOR = 64
TOLERANCE = TOL_FACTOR * torch.finfo(torch.float32).eps  # 7.6e-6
MAX_ITERS = 100  # iteration counts the fingerprint and the iterations diagnosis try: 1..MAX_ITERS
#: bytes per recorded x entry [n, C] that checking one site holds (the memory bound of
#: :meth:`hcdiag.probes.ActivationsProbe.prepare`): x and x_{l+1} in float64 (2 x 8), the predicted update
#: H_res x + H_post^T F, its two terms and the difference it is compared by (at most 3 x 8 at a time), and
#: F / branch input [T, C] in float64 with the float32 reads (at most 8)
VERIFY_ENTRY_BYTES = 6 * 8
FINGERPRINT_TOKENS = 64  # tokens (evenly spread over the recording) the fingerprint compares on

_F64 = torch.float64
_PARTS = ("pre", "post", "comb")
TRANSPOSED = "transposed mix (comb applied instead of comb^T)"
UNMIXED = "unmixed residual (H_res = I)"


# ---------------------------------------------------------------------------------------------------------------
# Result objects


@dataclass(frozen=True)
class Diagnosis:
    """One alternative tried on a non-conforming site: its name, residual (None: not applicable), and whether it
    reaches the tolerance (it explains what the model did)."""

    name: str
    residual: float | None
    explains: bool
    note: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "residual": self.residual, "explains": self.explains, "note": self.note}


@dataclass(frozen=True)
class Candidate:
    """One Sinkhorn candidate of the fingerprint: the family's choices, its iteration count and residual."""

    family: str  # e.g. "transformers", "paper (transposed)", "sigmoid (earlier transformers)"
    convention: str  # hcdiag convention name
    transposed: bool  # run on the logits' transpose (the other orientation), result transposed back
    start: str
    eps: float
    order: str  # pass order in paper axes, e.g. "columns, rows"
    domain: str
    iters: int
    residual: float

    @property
    def label(self) -> str:
        eps = f", eps {self.eps:g}" if self.eps else ""
        return f"{self.family} x{self.iters}{eps}"

    def to_dict(self) -> dict[str, Any]:
        return {"family": self.family, "convention": self.convention, "transposed": self.transposed,
                "start": self.start, "eps": self.eps, "order": self.order, "domain": self.domain,
                "iters": self.iters, "residual": self.residual, "label": self.label}


@dataclass(frozen=True)
class Fingerprint:
    """Which Sinkhorn choices reproduce the model's H_res (module docstring)."""

    best: Candidate
    equivalent: tuple[str, ...]  # other families equal to best's in exact arithmetic
    runner_up: Candidate | None
    other_class: Candidate | None
    tokens: int
    matches: bool  # best.residual <= tolerance
    matching: int = 0  # candidates (family, iterations) within the tolerance: > 1 means ties
    iters_matching: tuple[int, int] | None = None  # first and last iteration count of best's family within tol
    layout: Candidate | None = None  # the layout's own convention and iteration count
    by_family: dict[str, tuple[int, float]] = field(default_factory=dict)  # family -> (best iters, residual)
    tol: float = TOLERANCE

    @property
    def headline(self) -> Candidate:
        """What to show in one line: the layout's own candidate when it reproduces the model's H_res (ties to
        rounding are common near convergence), else the best candidate."""
        if self.layout is not None and self.layout.residual <= self.tol:
            return self.layout
        return self.best

    def describe(self) -> str:
        h = self.headline
        if h is self.layout:
            ties = f"; {self.matching} candidates match" if self.matching > 1 else ""
            return f"{h.label} (the layout's{ties})"
        return h.label + ("" if self.matches else f" (closest, residual {h.residual:.1e})")

    def to_dict(self) -> dict[str, Any]:
        return {"best": self.best.to_dict(), "equivalent": list(self.equivalent),
                "runner_up": None if self.runner_up is None else self.runner_up.to_dict(),
                "other_class": None if self.other_class is None else self.other_class.to_dict(),
                "layout": None if self.layout is None else self.layout.to_dict(),
                "headline": self.headline.label, "tokens": self.tokens, "matches": self.matches,
                "matching": self.matching,
                "iters_matching": None if self.iters_matching is None else list(self.iters_matching),
                "by_family": {k: {"iters": i, "residual": r} for k, (i, r) in self.by_family.items()}}


@dataclass(frozen=True)
class SiteVerification:
    """One site: checks (name -> residual), skipped checks (name -> why), diagnoses, fingerprint."""

    index: int
    name: str
    captured_name: str
    variant: str
    module_class: str
    library: str
    tokens: int
    n: int
    C: int
    conforms: bool
    checks: dict[str, float]
    skipped: dict[str, str]
    failing: tuple[str, ...]
    diagnoses: tuple[Diagnosis, ...] = ()
    diagnosis: str | None = None  # name of the first diagnosis that explains the site
    also_explained_by: tuple[str, ...] = ()  # later diagnoses that explain it as well (the data cannot choose)
    fingerprint: Fingerprint | None = None
    fingerprint_skipped: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"index": self.index, "name": self.name, "captured_name": self.captured_name,
                "variant": self.variant, "module_class": self.module_class, "library": self.library,
                "tokens": self.tokens, "n": self.n, "C": self.C, "conforms": self.conforms,
                "checks": dict(self.checks), "failing": list(self.failing), "skipped": dict(self.skipped),
                "diagnosis": self.diagnosis, "also_explained_by": list(self.also_explained_by),
                "diagnoses": [d.to_dict() for d in self.diagnoses],
                "fingerprint": None if self.fingerprint is None else self.fingerprint.to_dict(),
                "fingerprint_skipped": self.fingerprint_skipped}

    def row(self) -> dict[str, Any]:
        """One flat CSV row."""
        fp = self.fingerprint
        return {"index": self.index, "name": self.name, "conforms": self.conforms,
                "update_model": self.checks.get("update (model)"),
                "update_recomputed": self.checks.get("update (recomputed)"),
                "branch_input": self.checks.get("branch input"), "h_res": self.checks.get("H_res"),
                "h_post": self.checks.get("H_post"), "diagnosis": self.diagnosis or "",
                "fingerprint": "" if fp is None else fp.headline.label,
                "fingerprint_residual": None if fp is None else fp.headline.residual,
                "runner_up": "" if fp is None or fp.runner_up is None else fp.runner_up.label,
                "runner_up_residual": None if fp is None or fp.runner_up is None else fp.runner_up.residual}


@dataclass(frozen=True)
class VerifyReport:
    path: str
    activations: str
    layout: str
    tolerance: float
    sites: tuple[SiteVerification, ...]
    verdict: str
    notes: tuple[str, ...] = ()

    @property
    def conforms(self) -> bool:
        return all(s.conforms for s in self.sites)

    def failing(self) -> list[str]:
        return [s.name for s in self.sites if not s.conforms]

    def rows(self) -> list[dict[str, Any]]:
        return [s.row() for s in self.sites]

    def to_dict(self) -> dict[str, Any]:
        return {"command": "verify", "path": self.path, "activations": self.activations, "layout": self.layout,
                "tolerance": self.tolerance, "conforms": self.conforms, "failing": self.failing(),
                "verdict": self.verdict, "sites": [s.to_dict() for s in self.sites], "notes": list(self.notes)}


# ---------------------------------------------------------------------------------------------------------------
# Sinkhorn candidates


@dataclass(frozen=True)
class _Family:
    name: str
    convention: str
    transposed: bool
    start: str
    order: str
    domain: str
    eps: float
    klass: tuple[str, str, bool]  # (start class, pass order, eps): equal in exact arithmetic

    def iterates(self, logits: torch.Tensor, K: int) -> Iterator[tuple[int, torch.Tensor]]:
        """(k, H_k) for k = 1..K, paper orientation."""
        lg = logits.transpose(-1, -2) if self.transposed else logits
        back: Callable[[torch.Tensor], torch.Tensor] = (lambda m: m.transpose(-1, -2)) if self.transposed \
            else (lambda m: m)
        if self.eps:  # transformers(-sigmoid): each k from scratch (an eps start cannot restart from a matrix)
            for k in range(1, K + 1):
                yield k, back(sinkhorn(lg, self.convention, k, eps=self.eps).matrix)
        else:  # no eps: one iteration from log(H_k) is iteration k + 1 (the starts are scale invariant)
            m = sinkhorn(lg, self.convention, 1).matrix
            yield 1, back(m)
            for k in range(2, K + 1):
                m = sinkhorn(m.log(), self.convention, 1).matrix
                yield k, back(m)


_ORDERS = {False: "columns, rows", True: "rows, columns"}  # paper convention's order on H; flipped on H^T


def _families(eps: float) -> list[_Family]:
    out = []
    for t in (False, True):
        suffix = " (transposed)" if t else ""
        cr, rc = _ORDERS[t], _ORDERS[not t]
        out += [
            _Family("paper" + suffix, Convention.PAPER.value, t, "exp", cr, "exp", 0.0, ("exp", cr, False)),
            _Family("log" + suffix, Convention.LOG.value, t, "exp", rc, "log", 0.0, ("exp", rc, False)),
            _Family("lucidrains" + suffix, Convention.LUCIDRAINS.value, t, "exp - max", rc, "exp", 0.0,
                    ("exp", rc, False)),
            _Family("transformers" + suffix, Convention.TRANSFORMERS.value, t, "softmax + eps", cr, "exp", eps,
                    ("exp", cr, True)),
            _Family("sigmoid (earlier transformers)" + suffix, Convention.TRANSFORMERS_SIGMOID.value, t,
                    "sigmoid + eps", rc, "exp", eps, ("sigmoid", rc, True)),
        ]
    return out


def _rel(a: torch.Tensor, ref: torch.Tensor) -> float:
    den = float(ref.norm())
    num = float((a - ref).norm())
    return num / den if den > 0 else (0.0 if num == 0 else float("inf"))


def _pick(res: torch.Tensor, fams: list[_Family], tol: float, tokens: int,
          layout: tuple[str, int] | None) -> tuple[Fingerprint, dict[tuple[str, int], float]]:
    """Best, equivalent, runner-up and other-class candidates from residuals [families, K] of one site."""
    K = res.shape[1]

    def cand(i: int, k: int) -> Candidate:
        f = fams[i]
        return Candidate(f.name, f.convention, f.transposed, f.start, f.eps, f.order, f.domain, k + 1,
                         float(res[i, k]))

    bi, bk = divmod(int(torch.argmin(res)), K)
    same = torch.tensor([f.klass == fams[bi].klass for f in fams])
    masked = res.clone()
    masked[same, bk] = float("inf")
    ri, rk = divmod(int(torch.argmin(masked)), K)
    other = res.clone()
    other[same] = float("inf")
    oi, ok = divmod(int(torch.argmin(other)), K)
    best = cand(bi, bk)
    own = None
    if layout is not None and layout[1] <= K:
        own = next((cand(i, layout[1] - 1) for i, f in enumerate(fams) if f.name == layout[0]), None)
    by_family = {}
    for i, f in enumerate(fams):
        k = int(torch.argmin(res[i]))
        by_family[f.name] = (k + 1, float(res[i, k]))
    fp = Fingerprint(
        best=best,
        equivalent=tuple(f.name for j, f in enumerate(fams) if same[j] and j != bi),
        runner_up=cand(ri, rk) if torch.isfinite(masked[ri, rk]) else None,
        other_class=cand(oi, ok) if torch.isfinite(other[oi, ok]) else None,
        tokens=tokens,
        matches=best.residual <= tol,
        matching=int((res <= tol).sum()),
        iters_matching=_span(res[bi] <= tol),
        layout=own,
        by_family=by_family,
        tol=tol,
    )
    table = {(f.name, k + 1): float(res[i, k]) for i, f in enumerate(fams) for k in range(K)}
    return fp, table


def _span(hits: torch.Tensor) -> tuple[int, int] | None:
    ks = hits.nonzero().flatten()
    return None if ks.numel() == 0 else (int(ks[0]) + 1, int(ks[-1]) + 1)


def _fingerprints(logits: torch.Tensor, H_model: torch.Tensor, eps: float, tol: float, K: int,
                  layouts: list[tuple[str, int] | None]) -> list[tuple[Fingerprint, dict[tuple[str, int], float]]]:
    """Fingerprints of G sites at once: logits and the model's H_res [G, S, n, n] (paper orientation).

    All sites of a group go through each candidate together (one Sinkhorn call per iterate, not per site):
    the transformers families restart from the logits for every k, K (K + 1) / 2 iterations in all."""
    fams = _families(eps)
    G = logits.shape[0]
    res = torch.full((len(fams), K, G), float("inf"), dtype=_F64)
    den = H_model.flatten(1).norm(dim=1)
    with torch.no_grad():
        for i, fam in enumerate(fams):
            for k, m in fam.iterates(logits, K):
                r = (m - H_model).flatten(1).norm(dim=1) / den
                res[i, k - 1] = torch.nan_to_num(r, nan=float("inf"))  # NaN (0 after underflow, then log) never wins
    return [_pick(res[:, :, g], fams, tol, int(logits.shape[1]), layouts[g]) for g in range(G)]


# ---------------------------------------------------------------------------------------------------------------
# One site


@dataclass
class _Data:
    """A site's recorded tensors in float64 (None: not recorded) and the checkpoint's recomputation."""

    x: torch.Tensor
    H_model: torch.Tensor
    post_model: torch.Tensor | None
    pre_model: torch.Tensor | None
    F: torch.Tensor | None
    y: torch.Tensor | None
    branch_in: torch.Tensor | None
    pre: torch.Tensor
    post: torch.Tensor
    res: torch.Tensor
    H_exposed: bool  # H_model is what the module produced (not capture's recomputation)
    module: SiteModule  # the checkpoint's site, in float64: its branch input for an H_pre
    skipped: dict[str, str] = field(default_factory=dict)

    @property
    def has_update(self) -> bool:
        return self.F is not None and self.y is not None

    def predict(self, H: torch.Tensor, post: torch.Tensor) -> torch.Tensor:
        """H_res x + H_post^T F: [T, n, C] (mHC Eq. 3)."""
        assert self.F is not None
        return H @ self.x + post.unsqueeze(-1) * self.F.unsqueeze(-2)

    def layer_residual(self, H: torch.Tensor, post: torch.Tensor) -> float:
        """How well (H_res, H_post) applied by the layer explain the recorded output streams."""
        assert self.y is not None
        return _rel(self.predict(H, post), self.y)

    def branch_residual(self, pre: torch.Tensor, module: SiteModule | None = None) -> float:
        """How well ``module``'s branch input for H_pre ``pre`` (default: the checkpoint's site) reproduces the
        recorded one."""
        assert self.branch_in is not None
        return _rel((module or self.module).branch_input(self.x, pre), self.branch_in)

    def module_residual(self, H: torch.Tensor, post: torch.Tensor, pre: torch.Tensor | None = None,
                        module: SiteModule | None = None) -> float:
        """How well matrices computed some other way (by ``module``, default the checkpoint's site) reproduce
        what the module produced: the largest of the residuals against the model's H_res (where the module
        exposes it), H_post, H_pre or branch input, and the update residual (where the update was recorded)."""
        r = [_rel(H, self.H_model)] if self.H_exposed else []
        if self.post_model is not None:
            r.append(_rel(post, self.post_model))
        if pre is not None and self.pre_model is not None:
            r.append(_rel(pre, self.pre_model))
        if pre is not None and self.branch_in is not None:
            r.append(self.branch_residual(pre, module))
        if self.has_update:
            r.append(self.layer_residual(H, post))
        return max(r) if r else float("nan")


def _opt(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.to(_F64)


def _data(site: Site, captured: Any, x: torch.Tensor) -> _Data:
    m = site.module.in_dtype(_F64)
    with torch.no_grad():
        out = m(x)
    T, n = x.shape[0], x.shape[1]
    res = out.res.expand(T, n, n) if out.res.ndim == 2 else out.res
    pre = out.pre.expand(T, n) if out.pre.ndim == 1 else out.pre
    post = out.post.expand(T, n) if out.post.ndim == 1 else out.post
    skipped = dict(captured.skipped)
    H_mod = captured.h_res_module
    if H_mod is None and captured.h_res_from == "recomputed":
        skipped["model H_res"] = ("the module does not expose its mixing matrix: the model-matrix check uses the "
                                  "H_res capture recomputed from the module's live parameters")
    H_model = (H_mod if H_mod is not None else captured.h_res).to(_F64)
    exposed = H_mod is not None or captured.h_res_from != "recomputed"
    return _Data(x=x, H_model=H_model, post_model=_opt(captured.h_post), pre_model=_opt(captured.h_pre),
                 F=_opt(captured.f), y=_opt(captured.y), branch_in=_opt(captured.branch_in),
                 pre=pre.to(_F64), post=post.to(_F64), res=res.to(_F64), H_exposed=exposed, module=m,
                 skipped=skipped)


def _checks(d: _Data) -> dict[str, float]:
    checks: dict[str, float] = {}
    if d.has_update:
        assert d.y is not None
        if d.post_model is not None:
            checks["update (model)"] = d.layer_residual(d.H_model, d.post_model)
        else:
            d.skipped.setdefault("update (model)", "H_post was not recorded")
        checks["update (recomputed)"] = d.layer_residual(d.res, d.post)
    else:
        why = d.skipped.get("y") or d.skipped.get("f") or "F / x_{l+1} were not recorded"
        d.skipped.setdefault("update (model)", why)
        d.skipped.setdefault("update (recomputed)", why)
    if d.H_exposed:
        checks["H_res"] = _rel(d.res, d.H_model)
    if d.post_model is not None:
        checks["H_post"] = _rel(d.post, d.post_model)
    if d.pre_model is not None:
        checks["H_pre"] = _rel(d.pre, d.pre_model)
    if d.branch_in is not None:
        checks["branch input"] = d.branch_residual(d.pre)
    elif d.pre_model is None:
        d.skipped.setdefault("branch input", d.skipped.get("branch_in", "the branch input was not recorded"))
    return checks


def _split_sites(module: Any) -> list[tuple[str, Any]]:
    """The transformers packed projection read in each other order of [pre, post, comb]: (name, site module)."""
    n = int(module.n)
    size = {"pre": n, "post": n, "comb": n * n}
    out = []
    for order in permutations(_PARTS):
        if order == _PARTS:
            continue
        # rows stored in `order` are re-packed so that the standard [pre, post, comb] split reads them
        bounds, start = {}, 0
        for part in order:
            bounds[part] = (start, start + size[part])
            start += size[part]
        rows = torch.cat([torch.arange(*bounds[p]) for p in _PARTS])
        for scale_too in (False, True):
            scale = module.scale
            if scale_too:
                scale = module.scale[torch.tensor([order.index(p) for p in _PARTS])]
            site = type(module)(module.fn[rows], module.base[rows], scale, n=n, C=int(module.C),
                                norm_eps=module.norm_eps, hc_eps=module.hc_eps, sinkhorn=module.sinkhorn)
            name = f"split order [{', '.join(order)}]" + (" (scales too)" if scale_too else "")
            out.append((name, site))
    return out


def _is_packed(module: Any) -> bool:
    return all(isinstance(getattr(module, a, None), torch.Tensor) for a in ("fn", "base", "scale")) and \
        module.scale.shape == (3,) and hasattr(module, "hc_eps")


def _sinkhorn_spec(site: Site) -> SinkhornSpec | None:
    spec = getattr(site.module, "sinkhorn", None)
    if Exactness(getattr(site.module, "exactness", Exactness.UNCONSTRAINED)) is not Exactness.SINKHORN:
        return None
    return spec


def _sample(T: int, S: int) -> torch.Tensor:
    if T <= S:
        return torch.arange(T)
    return torch.linspace(0, T - 1, S).round().long()


def _layout_family(spec: SinkhornSpec) -> str:
    return str(Convention(spec.convention).value)


def _layout_candidate(spec: SinkhornSpec | None) -> tuple[str, int] | None:
    return None if spec is None else (_layout_family(spec), int(spec.iters))


def _layer_diagnoses(d: _Data, eps: float, tol: float) -> list[Diagnosis]:
    """The layer does not apply its module's matrices as the update says: alternatives on the model's own."""
    assert d.post_model is not None
    H, post = d.H_model, d.post_model
    eye = torch.eye(H.shape[-1], dtype=_F64).expand_as(H)
    tries = [(TRANSPOSED, H.transpose(-1, -2), post), (UNMIXED, eye, post),
             ("H_post without the factor 2", H, post / 2), (f"H_post with eps ({eps:g}) added", H, post + eps)]
    return [_diag(name, d.layer_residual(h, p), tol) for name, h, p in tries]


def _module_diagnoses(site: Site, d: _Data, spec: SinkhornSpec | None, logits: torch.Tensor | None,
                      fp: Fingerprint | None, table: dict[tuple[str, int], float], eps: float,
                      tol: float) -> list[Diagnosis]:
    """The module's matrices are not the checkpoint's under the layout's convention: alternatives recomputed."""
    eye = torch.eye(d.res.shape[-1], dtype=_F64).expand_as(d.res)
    out = [_diag(TRANSPOSED, d.module_residual(d.res.transpose(-1, -2), d.post, d.pre), tol),
           _diag(UNMIXED, d.module_residual(eye, d.post, d.pre), tol)]
    module = site.module
    if _is_packed(module) and spec is not None:
        for name, alt in _split_sites(module):
            alt64 = alt.in_dtype(_F64)
            o = alt64(d.x)
            out.append(_diag(name, d.module_residual(o.res, o.post, o.pre, alt64), tol))
    else:
        out.append(Diagnosis("split order of the packed projection", None, False,
                             "not applicable: the layout has no packed [pre, post, comb] projection"))
    out.append(_diag("H_post without the factor 2", d.module_residual(d.res, d.post / 2, d.pre), tol))
    out.append(_diag(f"H_post with eps ({eps:g}) added", d.module_residual(d.res, d.post + eps, d.pre), tol))
    if spec is None or logits is None:
        out.append(Diagnosis("different iteration count", None, False, "not applicable: no Sinkhorn at this site"))
        return out
    fam = _layout_family(spec)
    scores = {k: r for (f, k), r in table.items() if f == fam and k != spec.iters}
    if scores:
        k = min(scores, key=lambda j: scores[j])
        H = module.in_dtype(_F64).res_from_logits(logits, SinkhornSpec(spec.convention, k, spec.eps))
        out.append(_diag(f"iterations {k} (layout: {spec.iters})", d.module_residual(H, d.post, d.pre), tol))
    if fp is not None and (fp.best.family != fam or fp.best.iters != spec.iters):
        out.append(_diag(f"Sinkhorn {fp.best.label}",
                         d.module_residual(_candidate_matrix(fp.best, logits), d.post, d.pre), tol,
                         "the fingerprint's best candidate, on every token"))
    return out


def _diag(name: str, r: float, tol: float, note: str = "") -> Diagnosis:
    return Diagnosis(name, r, r <= tol, note)


def _candidate_matrix(c: Candidate, logits: torch.Tensor) -> torch.Tensor:
    fam = next(f for f in _families(c.eps or TRANSFORMERS_DEFAULT_EPS) if f.name == c.family)
    fam = _Family(fam.name, fam.convention, fam.transposed, fam.start, fam.order, fam.domain, c.eps, fam.klass)
    last = logits
    for _, m in fam.iterates(logits, c.iters):
        last = m
    return last


@dataclass
class _Pending:
    """Phase 1 of a site: its checks and the fingerprint sample, before the batched fingerprint."""

    site: Site
    captured: Any
    checks: dict[str, float]
    skipped: dict[str, str]
    failing: tuple[str, ...]
    spec: SinkhornSpec | None
    sample: tuple[torch.Tensor, torch.Tensor] | None  # (logits, model H_res) [S, n, n]
    fp_skipped: str | None
    fingerprint: Fingerprint | None = None
    table: dict[tuple[str, int], float] = field(default_factory=dict)


def _check_site(site: Site, captured: Any, x: torch.Tensor, *, tol: float, fingerprint: bool,
                fingerprint_tokens: int) -> _Pending:
    d = _data(site, captured, x)
    checks = _checks(d)
    failing = tuple(k for k, v in checks.items() if not v <= tol)
    spec = _sinkhorn_spec(site)
    sample, fp_skipped = None, None
    if spec is None:
        what = "H_res = I" if getattr(site.module, "exactness", None) == Exactness.IDENTITY else "not a Sinkhorn H_res"
        fp_skipped = f"no Sinkhorn at this site ({site.variant}: {what})"
    elif fingerprint or failing:
        idx = _sample(int(x.shape[0]), fingerprint_tokens)
        with torch.no_grad():
            logits = site.module.in_dtype(_F64).res_logits(x[idx])
        if logits is not None and tuple(logits.shape[-2:]) == tuple(d.H_model.shape[-2:]):
            sample = (logits, d.H_model[idx])
        else:
            fp_skipped = "the site module gives no [n, n] Sinkhorn logits"
    else:
        fp_skipped = "not asked for (fingerprint=False)"
    return _Pending(site, captured, checks, d.skipped, failing, spec, sample, fp_skipped)


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    """torch on one intra-op thread for the duration (restored after). The fingerprint is thousands of ops on
    [G, 64, n, n] tensors; with 2 threads on a shared machine each op waits in a barrier for a descheduled thread
    (measured 10x slower). The same reasoning as hcdiag.gain's single-thread section (to share, later)."""
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(prev)


def _fingerprint_all(pending: list[_Pending], tol: float, K: int) -> None:
    groups: dict[tuple[Any, ...], list[_Pending]] = {}
    for p in pending:
        if p.sample is not None and p.spec is not None:
            eps = p.spec.eps if p.spec.eps > 0 else TRANSFORMERS_DEFAULT_EPS
            groups.setdefault((tuple(p.sample[0].shape), eps), []).append(p)
    for (_, eps), ps in groups.items():
        with _one_thread():
            results = _fingerprints(torch.stack([p.sample[0] for p in ps]),  # type: ignore[index]
                                    torch.stack([p.sample[1] for p in ps]), eps, tol, K,  # type: ignore[index]
                                    [_layout_candidate(p.spec) for p in ps])
        for p, (fp, table) in zip(ps, results, strict=True):
            p.fingerprint, p.table = fp, table


def _finish_site(p: _Pending, read_x: Callable[[], torch.Tensor], tol: float) -> SiteVerification:
    """Phase 3: the diagnoses of a site that does not conform (its tensors are read again, ``read_x()`` giving the
    stream input in float64: nothing of the size of the recording is kept across sites; a conforming site reads
    nothing)."""
    site, captured = p.site, p.captured
    diags: list[Diagnosis] = []
    diagnosis = None
    also: tuple[str, ...] = ()
    T, n, C = (int(d) for d in captured.shape("x"))
    if p.failing:
        x = read_x()
        d = _data(site, captured, x)
        eps = float(getattr(site.module, "hc_eps", TRANSFORMERS_DEFAULT_EPS))
        if "update (model)" in p.failing:
            diags = _layer_diagnoses(d, eps, tol)
        else:
            logits = None
            if p.spec is not None:
                with torch.no_grad():
                    logits = site.module.in_dtype(_F64).res_logits(x)
            diags = _module_diagnoses(site, d, p.spec, logits, p.fingerprint, p.table, eps, tol)
        hits = [g.name for g in diags if g.explains]
        diagnosis = hits[0] if hits else None
        also = tuple(hits[1:])
    return SiteVerification(
        index=site.index, name=site.name, captured_name=captured.name, variant=site.variant,
        module_class=captured.module_class, library=f"{captured.library} {captured.library_version}".strip(),
        tokens=T, n=n, C=C, conforms=not p.failing, checks=p.checks,
        skipped=p.skipped, failing=p.failing, diagnoses=tuple(diags), diagnosis=diagnosis, also_explained_by=also,
        fingerprint=p.fingerprint, fingerprint_skipped=p.fp_skipped,
    )


# ---------------------------------------------------------------------------------------------------------------
# Verdict


def _names(names: list[str], limit: int = 8) -> str:
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _conform_text(sites: list[SiteVerification], tol: float) -> str:
    """What conforming sites were shown to do: the update equation where it was recorded, else the matrices
    the module exposed."""
    updated = [s for s in sites if "update (recomputed)" in s.checks]
    law = ("the recorded output streams follow x_(l+1) = H_res x_l + H_post^T F_l with the model's matrices "
           "and with those the checkpoint gives")
    maps = ("what the module produced (H_res, H_post, H_pre or branch input, where recorded) equals what the "
            "checkpoint gives")
    rounding = f"to {tol:.2g} (float32 rounding)"
    if len(updated) == len(sites):
        return f"{law}, {rounding}"
    if not updated:
        return f"{maps}, {rounding}; the update itself was not recorded (see the skipped checks)"
    rest = [s.name for s in sites if "update (recomputed)" not in s.checks]
    return (f"at {len(updated)} site(s) {law}; at {_names(rest)} (no update recorded) {maps}; {rounding}")


def _verdict(sites: list[SiteVerification], tol: float) -> str:
    bad = [s for s in sites if not s.conforms]
    fps: dict[str, list[str]] = {}
    for s in sites:
        if s.fingerprint is not None:
            fps.setdefault(s.fingerprint.describe(), []).append(s.name)
    fp_text = ""
    if fps:
        parts = [f"{label} at {len(v)} site(s)" for label, v in sorted(fps.items(), key=lambda kv: -len(kv[1]))]
        fp_text = " Sinkhorn fingerprint of the model's H_res: " + "; ".join(parts) + "."
    if not bad:
        return f"All {len(sites)} sites conform: {_conform_text(sites, tol)}.{fp_text}"
    groups: dict[str, list[str]] = {}
    for s in bad:
        groups.setdefault(s.diagnosis or "unexplained by every diagnosis tried", []).append(s.name)
    model_bad = [s.name for s in bad if "update (model)" in s.failing]
    parts = [f"{_names(v)}: {k}" for k, v in groups.items()]
    why = ""
    if model_bad:
        why = (f" At {_names(model_bad)} the layer does not apply the matrices its own module produced "
               "(the update with the model's matrices fails).")
    elif any("update (recomputed)" in s.failing or "H_res" in s.failing for s in bad):
        why = (" The layers apply their modules' matrices consistently, but those differ from what the "
               "checkpoint's parameters give under the layout's convention.")
    return (f"{len(bad)} of {len(sites)} sites do not conform (tolerance {tol:.2g}). " + "; ".join(parts) + "."
            + why + fp_text)


# ---------------------------------------------------------------------------------------------------------------
# Public API


def verify(
    model: LoadedModel | str | os.PathLike[str],
    activations: str | os.PathLike[str],
    *,
    tol: float | None = None,
    fingerprint: bool = True,
    fingerprint_tokens: int = FINGERPRINT_TOKENS,
    max_iters: int = MAX_ITERS,
    layout: str | None = None,
    options: Any = None,
) -> VerifyReport:
    """Check every site's recorded update against the update equation (module docstring).

    model: a :class:`LoadedModel` or a checkpoint path (read with :func:`hcdiag.io.load`, ``layout`` /
    ``options`` passed on). activations: a file written by :func:`hcdiag.capture.capture` during a forward pass
    of that model. tol: conformance threshold (default :data:`TOLERANCE`). fingerprint: compute the Sinkhorn
    fingerprint at every Sinkhorn site (always done at non-conforming ones), on ``fingerprint_tokens`` tokens,
    iterations 1..``max_iters``. Returns :class:`VerifyReport`; raises UsageError / InputError for bad inputs.
    """
    from hcdiag.probes import ActivationsProbe, make_probe

    tol = TOLERANCE if tol is None else tol
    if not (isinstance(tol, int | float) and tol > 0):
        raise UsageError(f"--tol {tol!r} must be a positive number, e.g. {TOLERANCE:.1e}", "--tol")
    for value, option in ((fingerprint_tokens, "--fingerprint-tokens"), (max_iters, "--max-iters")):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise UsageError(f"{option} must be an integer >= 1, got {value!r}", option)
    if not isinstance(model, LoadedModel):
        from hcdiag.io.base import LoadOptions
        from hcdiag.io.load import load

        model = load(str(model), layout=layout, options=options or LoadOptions())
    probe = make_probe(Probe.ACTIVATIONS, activations=str(activations))
    assert isinstance(probe, ActivationsProbe)
    probe.prepare(model.sites, entry_bytes=VERIFY_ENTRY_BYTES)
    tol = float(tol)
    # one site's tensors at a time: the captured sites read each tensor from the file when asked for it
    pending = [_check_site(site, probe.captured(site), probe.inputs(site, _F64), tol=tol, fingerprint=fingerprint,
                           fingerprint_tokens=fingerprint_tokens) for site in model.sites]
    _fingerprint_all(pending, tol, max_iters)
    sites = [_finish_site(p, functools.partial(probe.inputs, p.site, _F64), tol) for p in pending]
    notes = []
    libs = sorted({s.library for s in sites if s.library})
    if libs:
        notes.append("recorded with " + ", ".join(libs))
    return VerifyReport(path=model.path, activations=str(activations), layout=model.layout, tolerance=tol,
                        sites=tuple(sites), verdict=_verdict(sites, tol), notes=tuple(notes))

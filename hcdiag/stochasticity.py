"""How far each site's H_res is from doubly stochastic, why, and what to change (``hcdiag stochasticity``).

Dimension letters: L sites, T tokens (probe inputs), n streams, C width of one stream, k Sinkhorn iterations.
Every matrix is in paper convention (mHC Eq. 3: row i = output stream i).

Per site (SPEC sections 3 and 4):

* Sinkhorn sites (mHC): logits = ``module.res_logits(x)`` [T, n, n] in the chosen dtype, checked finite,
  projected with the *effective* Sinkhorn spec (``--iters`` / ``--convention`` from the CLI > the checkpoint's
  metadata > the paper default, 20 iterations of the ``paper`` convention; each setting's source is recorded).
  Row / column errors max_i |sum_j H_ij - 1| and max_j |sum_i H_ij - 1| per token, their distribution over
  tokens (p50, p99, max), the logit range, and the iterations each token needs to reach ``tol``.
* Exact variants (mHC-lite, KromHC, TBP): H_res from ``res_from_logits(res_logits(x))``; the error must be at
  rounding level, anything more is a bug in the model code.
* Identity sites (plain residual, iHC): H_res = I, reported for completeness.
* Unconstrained sites (HC): the doubly-stochastic error does not apply (verdict "n/a: unconstrained"); their
  spectral norm and gains are what matters.

Gains for every site: G_f = max_i |sum_j H_ij|, G_b = max_j |sum_i H_ij| (mHC Sec. 3.1), in both averaging
modes of mHC Fig. 3 (SPEC sec. 4): the mean of per-token gains, and the gain of the token-mean matrix.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, fields, replace
from typing import Any

import torch

from hcdiag.enums import Convention, DType, Exactness, Probe
from hcdiag.errors import InputError, UsageError
from hcdiag.metrics import (
    ABSORPTION_RANGE_F32,
    UNDERFLOW_RANGE_F32,
    ZERO_RANGE_F32,
    ds_error,
    gain_backward,
    gain_forward,
    logit_range,
    percentiles,
    sigma2,
    spectral_norm,
)
from hcdiag.model import LoadedModel, Site
from hcdiag.probes import ProbeBase, make_probe, torch_dtype
from hcdiag.sinkhorn import (
    effective_spec,
    exact_axis,
    iters_to_tol_detail,
    parse_convention,
    sinkhorn,
)
from hcdiag.site import SinkhornSpec, SiteEval, SiteModule, res_tensor_keys

__all__ = [
    "CURVE_ITERS",
    "ITERS_TO_TOL_LIMIT",
    "SCHEMA_VERSION",
    "ConvergenceCurve",
    "Dist",
    "MeanMatrix",
    "SiteStochasticity",
    "StochasticityReport",
    "StochasticitySummary",
    "analyze_matrices",
    "analyze_stochasticity",
    "rounding_bound",
]

SCHEMA_VERSION = 1
CURVE_ITERS = 100  # convergence curves run to max(100, the site's iterations)
NEAR_PERMUTATION = 1e-3  # perm_distance below which the advice calls H_res a near-permutation
CURVE_SITES = 3  # curves are kept for this many worst Sinkhorn sites
ITERS_TO_TOL_LIMIT = 1000  # iterations-needed search stops here (reported as "not reached")
_BATCH_ELEMENTS = 1 << 22  # logits entries per stacked iterations-needed run (bounds the stacked copy only)

VERDICT_OK = "ok"
VERDICT_FLOOR = "ok (at the eps floor)"  # within tol of the sums' eps floor, though not within tol of 1
VERDICTS_OK = (VERDICT_OK, VERDICT_FLOOR)
VERDICT_OVER = "over tolerance"
VERDICT_NA = "n/a: unconstrained"
VERDICT_NONFINITE = "non-finite H_res"


# ----------------------------------------------------------------------------------------------------
# Result objects


@dataclass(frozen=True)
class Dist:
    """Distribution over tokens of a per-matrix quantity: median, 99th percentile (linear interp.), max."""

    p50: float
    p99: float
    max: float


@dataclass(frozen=True)
class SiteStochasticity:
    """One row: one HC site, all numbers over the probe's T tokens.

    row_err / col_err: distribution over tokens of max_i |sum_j H_ij - 1| / max_j |sum_i H_ij - 1|.
    row_err_mean / col_err_mean: mean over tokens of the mean over rows / columns of |sum - 1|.
    min_entry: smallest entry over all tokens (negative: outside the Birkhoff polytope).
    logit_range_*: max - min of the pre-Sinkhorn logits per matrix (Sinkhorn sites only); logit_max: the
    largest logit (the ``paper`` convention exponentiates it without subtracting the max).
    over_absorption_f32 / over_underflow_f32: matrices whose logit range exceeds 16.64 (float32 absorbs the
    small entries: 1 + e^-R == 1) / 87.34 (e^-R below float32's smallest normal).
    iters_to_tol_p50 / _max: iterations (in the convention's meaning) each token needs to reach ``tol`` on
    both axes; None where some (p50: most) tokens do not get there in 1000 (iters_to_tol_unreached: how many).
    iters_to_tol_never: of those, tokens that provably never get there (their state repeats with the error
    above the target). iters_to_tol_estimate / _rate: over the other unreached tokens with a steady decay, the
    median estimated iteration count (extrapolated from each one's measured contraction rate) and the median
    rate per iteration; None where there is none.
    gain_f_mean / gain_b_mean: mean over tokens of per-token gains; gain_*_max: max over tokens;
    gain_*_of_mean: gain of the token-mean matrix. row_sums_of_mean / col_sums_of_mean: sums of that matrix.
    spectral_norm_max / sigma2_max: largest / second singular value, max over tokens (Sinkhorn's error shrinks
    by about sigma_2^2 per iteration near its limit, Knight 2008, so sigma_2 near 1 means slow convergence).
    recorded_diff: with ``--probe activations``, max |H recomputed - H recorded by the model|; recorded_tol:
    the float32 rounding of the recomputed matrix (8 n eps_f32 max(1, max |H|), as :func:`rounding_bound`), above
    which the advice says that the two disagree (the model records in float32).
    temperature: the Sinkhorn temperature tau the logits were divided by (None: the codebase has none).
    perm_distance: max over tokens of max |H - P|, P the permutation matrix of each row's largest entry (None
    where those entries do not form a permutation): near 0 means Sinkhorn returned a near-permutation.
    h_pre_mean / h_post_mean: token mean of H_pre / H_post [n] (what the branch reads / writes per stream), also
    averaged over the rows of a multi-row H_pre / H_post (branch inputs, views, fractions).
    eps_floor: where the convention adds eps to its denominators, converged sums settle eps below 1 on both
    axes (measured: 1 - eps to 1e-10 relative); the verdict asks for ``worst <= tol + eps_floor``.
    res_tensors: the checkpoint's stored tensors that this site's H_res logits are computed from.
    """

    index: int
    name: str
    variant: str
    exactness: str
    n: int
    tokens: int
    verdict: str
    convention: str | None = None
    convention_source: str | None = None
    iters: int | None = None
    iters_source: str | None = None
    eps: float | None = None
    eps_source: str | None = None
    row_err: Dist | None = None
    col_err: Dist | None = None
    row_err_mean: float | None = None
    col_err_mean: float | None = None
    min_entry: float | None = None
    logit_range_p50: float | None = None
    logit_range_max: float | None = None
    logit_max: float | None = None
    over_absorption_f32: int | None = None
    over_underflow_f32: int | None = None
    iters_to_tol_p50: int | None = None
    iters_to_tol_max: int | None = None
    iters_to_tol_unreached: int | None = None
    iters_to_tol_never: int | None = None
    iters_to_tol_estimate: float | None = None
    iters_to_tol_rate: float | None = None
    gain_f_mean: float = float("nan")
    gain_f_max: float = float("nan")
    gain_f_of_mean: float = float("nan")
    gain_b_mean: float = float("nan")
    gain_b_max: float = float("nan")
    gain_b_of_mean: float = float("nan")
    spectral_norm_max: float = float("nan")
    sigma2_max: float = float("nan")
    spectral_norm_of_mean: float = float("nan")
    row_sums_of_mean: tuple[float, ...] = ()
    col_sums_of_mean: tuple[float, ...] = ()
    recorded_diff: float | None = None
    recorded_tol: float | None = None
    temperature: float | None = None
    perm_distance: float | None = None
    h_pre_mean: tuple[float, ...] = ()
    h_post_mean: tuple[float, ...] = ()
    eps_floor: float | None = None
    res_tensors: tuple[str, ...] = ()

    @property
    def applicable(self) -> bool:
        """False for unconstrained (HC) sites: their row and column errors are reported (how far H_res is from
        doubly stochastic), but no constraint promises them small, so they get no verdict and no worst error."""
        return self.exactness != Exactness.UNCONSTRAINED.value and self.row_err is not None

    @property
    def worst_error(self) -> float | None:
        """max over tokens and over both axes; None where not applicable."""
        if not self.applicable or self.row_err is None or self.col_err is None:
            return None
        return max(self.row_err.max, self.col_err.max)

    @property
    def worst_axis(self) -> str | None:
        if not self.applicable or self.row_err is None or self.col_err is None:
            return None
        return "rows" if self.row_err.max >= self.col_err.max else "columns"

    def to_dict(self) -> dict[str, Any]:
        """Flat (CSV-friendly) dict: row_err / col_err expand to row_err_p50, row_err_p99, row_err_max, ..."""
        d: dict[str, Any] = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if f.name in ("row_err", "col_err"):
                for q in ("p50", "p99", "max"):
                    d[f"{f.name}_{q}"] = None if v is None else getattr(v, q)
            elif isinstance(v, tuple):
                d[f.name] = list(v)
            else:
                d[f.name] = v
        d["worst_error"] = self.worst_error
        return d


@dataclass(frozen=True)
class ConvergenceCurve:
    """Errors after each Sinkhorn iteration k = 1..K for one site (max and median over tokens)."""

    index: int
    name: str
    convention: str
    iters: int  # the site's own iteration count (marked on plots)
    eps: float
    row_err_max: tuple[float, ...]
    col_err_max: tuple[float, ...]
    row_err_p50: tuple[float, ...]
    col_err_p50: tuple[float, ...]

    def to_dict(self) -> dict[str, Any]:
        return {
            f.name: (list(v) if isinstance(v := getattr(self, f.name), tuple) else v) for f in fields(self)
        }


@dataclass(frozen=True)
class MeanMatrix:
    """A site's token-mean H_res (mHC Fig. 8 style heatmap), with its row and column sums."""

    index: int
    name: str
    matrix: tuple[tuple[float, ...], ...]
    row_sums: tuple[float, ...]
    col_sums: tuple[float, ...]
    tokens: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "name": self.name,
            "matrix": [list(r) for r in self.matrix],
            "row_sums": list(self.row_sums),
            "col_sums": list(self.col_sums),
            "tokens": self.tokens,
        }


@dataclass(frozen=True)
class StochasticitySummary:
    """Across sites. worst_*: the applicable site with the largest error (max over tokens and both axes);
    median_error: median over applicable sites of that per-site worst error; over_tol: sites whose verdict is
    not ok. exact_axis: the paper axis the Sinkhorn convention's last pass makes exact ("rows" / "columns";
    "mixed" if sites differ; None without Sinkhorn sites). advice: plain-language lines where numbers call
    for them."""

    sites: int
    applicable: int
    over_tol: int
    tol: float
    worst_site: str | None
    worst_index: int | None
    worst_error: float | None
    worst_axis: str | None
    median_error: float | None
    conventions: tuple[str, ...]
    exact_axis: str | None
    advice: tuple[str, ...]

    def to_dict(self) -> dict[str, Any]:
        return {
            f.name: (list(v) if isinstance(v := getattr(self, f.name), tuple) else v) for f in fields(self)
        }


@dataclass(frozen=True)
class StochasticityReport:
    """What :func:`analyze_stochasticity` returns. ``to_dict()`` is the JSON document (schema_version 1)."""

    path: str
    layout: str
    probe: dict[str, Any]
    probe_description: str
    dtype: str
    source_dtype: str
    tol: float
    sites: tuple[SiteStochasticity, ...]
    summary: StochasticitySummary
    curves: tuple[ConvergenceCurve, ...] = ()
    heatmaps: tuple[MeanMatrix, ...] = ()
    notes: tuple[str, ...] = ()
    settings: dict[str, Any] = field(default_factory=dict)
    #: one line per kind of undefined value (null / NaN) the report holds, naming the sites; printed on stderr
    warnings: tuple[str, ...] = ()

    def exceeds(self, threshold: float) -> list[str]:
        """Names of the sites whose error (max over tokens and both axes) is above ``threshold``
        (``--fail-above``). Unconstrained sites never count; non-finite errors always do."""
        if not (isinstance(threshold, int | float) and math.isfinite(threshold) and threshold >= 0):
            raise UsageError(f"--fail-above must be a finite number >= 0, got {threshold!r}", "--fail-above")
        out = []
        for s in self.sites:
            w = s.worst_error
            if w is not None and (not math.isfinite(w) or w > threshold):
                out.append(s.name)
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema_version": SCHEMA_VERSION,
            "command": "stochasticity",
            "path": self.path,
            "layout": self.layout,
            "probe": dict(self.probe),
            "probe_description": self.probe_description,
            "dtype": self.dtype,
            "source_dtype": self.source_dtype,
            "tol": self.tol,
            "settings": dict(self.settings),
            "summary": self.summary.to_dict(),
            "sites": [s.to_dict() for s in self.sites],
            "curves": [c.to_dict() for c in self.curves],
            "heatmaps": [h.to_dict() for h in self.heatmaps],
            "notes": list(self.notes),
            "warnings": list(self.warnings),
        }


# ----------------------------------------------------------------------------------------------------
# Helpers


def rounding_bound(dtype: torch.dtype, n: int) -> float:
    """Error an exactly doubly-stochastic construction may show from rounding alone: 8 n eps(dtype).

    A sum of n entries each rounded to relative eps/2 is off by at most about n eps/2; the factor 16 leaves
    room for rounding inside the construction (softmax, Kronecker products, the TBP chart's remainders).
    float64, n = 4: 7.1e-15; float32: 3.8e-06; bfloat16: 0.25.
    """
    return 8.0 * n * torch.finfo(dtype).eps


def recorded_tolerance(H: torch.Tensor) -> float:
    """How far a recomputed H_res [..., n, n] may sit from the model's recorded (float32) one by rounding alone:
    float32 rounding of the matrix, scaled by its largest entry when that exceeds 1."""
    H64 = H.to(torch.float64)
    scale = max(1.0, _f(H64.abs().max())) if bool(torch.isfinite(H64).all()) else 1.0
    return rounding_bound(torch.float32, H.shape[-1]) * scale


def recorded_mismatch_cause(exactness: str) -> str:
    """The likely cause when a recomputed H_res differs from the recorded one, by the site's exactness value."""
    if exactness == Exactness.SINKHORN.value:
        return ("check --convention and --iters: the model may run another Sinkhorn than the one its checkpoint "
                "or config states (or states none)")
    return "check the layout's options (e.g. --hc-tanh / --no-hc-tanh for hyper-connections HC sites)"


def _f(t: torch.Tensor) -> float:
    return float(t.item())


def _dist(values: torch.Tensor) -> Dist:
    """values [T] -> Dist. Non-finite values (NaN from overflow) count as +inf, so they are never hidden."""
    v = values.to(torch.float64)
    v = torch.where(torch.isfinite(v), v, torch.full_like(v, math.inf))
    p = percentiles(v, (50, 99))
    return Dist(p50=_f(p["p50"]), p99=_f(p["p99"]), max=_f(p["max"]))


def _lower_median(v: torch.Tensor) -> float:
    s = v.sort().values
    return float(s[(s.numel() - 1) // 2].item())


def _fmt(x: float) -> str:
    return f"{x:.1e}" if x != 0 else "0"


@dataclass
class _SiteWork:
    """What a site's analysis keeps for the report-level steps (curves, heatmaps)."""

    row: SiteStochasticity
    mean: torch.Tensor  # token-mean H_res [n, n] float64
    logits: torch.Tensor | None = None  # Sinkhorn logits [T, n, n] (for convergence curves)
    spec: SinkhornSpec | None = None


def _matrix_stats(H: torch.Tensor) -> dict[str, Any]:
    """Gains, spectral norms, token-mean sums of H [T, n, n] (any dtype; metrics compute in float64)."""
    H64 = H.to(torch.float64)
    finite = bool(torch.isfinite(H64).all())
    Hm = H64.mean(dim=0)
    gf, gb = gain_forward(H64), gain_backward(H64)
    return {
        "gain_f_mean": _f(gf.mean()),
        "gain_f_max": _f(gf.max()),
        "gain_f_of_mean": _f(gain_forward(Hm)),
        "gain_b_mean": _f(gb.mean()),
        "gain_b_max": _f(gb.max()),
        "gain_b_of_mean": _f(gain_backward(Hm)),
        "spectral_norm_max": _f(spectral_norm(H64).max()) if finite else math.inf,
        "sigma2_max": _f(sigma2(H64).max()) if finite else math.inf,
        "spectral_norm_of_mean": _f(spectral_norm(Hm)) if finite else math.inf,
        "row_sums_of_mean": tuple(float(v) for v in Hm.sum(dim=-1)),
        "col_sums_of_mean": tuple(float(v) for v in Hm.sum(dim=-2)),
        "mean": Hm,
    }


def _ds_stats(H: torch.Tensor) -> dict[str, Any]:
    """Row / column error distributions over tokens of H [T, n, n]."""
    e = ds_error(H)
    return {
        "row_err": _dist(e.row_err_max),
        "col_err": _dist(e.col_err_max),
        "row_err_mean": _f(e.row_err_mean.mean()),
        "col_err_mean": _f(e.col_err_mean.mean()),
        "min_entry": _f(e.min_entry.min()),
    }


def eps_floor(spec: SinkhornSpec | None) -> float:
    """The error floor of a Sinkhorn convention: sums settle eps below 1 on both axes when every denominator
    gets + eps (transformers' hc_eps); 0 for conventions without eps."""
    return float(spec.eps) if spec is not None and spec.eps > 0 else 0.0


def _verdict(exactness: Exactness, worst: float, tol: float, bound: float, floor: float = 0.0) -> str:
    """ok / ok (at the eps floor) / over tolerance / non-finite. Sinkhorn sites are judged against tol above
    their eps floor (a converged site cannot get nearer to 1 than that); exact and identity sites against
    tol or the rounding bound of the compute dtype, whichever is larger."""
    if not math.isfinite(worst):
        return VERDICT_NONFINITE
    if exactness is Exactness.SINKHORN:
        if worst <= tol:
            return VERDICT_OK
        return VERDICT_FLOOR if worst <= tol + floor else VERDICT_OVER
    # exact / identity: rounding at the compute dtype is not a failure, whatever tol asks for
    return VERDICT_OK if worst <= max(tol, bound) else VERDICT_OVER


def _check_logits(logits: torch.Tensor, site: Site, path: str, probe: str) -> None:
    bad = ~torch.isfinite(logits)
    if bool(bad.any()):
        n_nan, n_inf = int(torch.isnan(logits).sum()), int(torch.isinf(logits).sum())
        raise InputError(
            f"site {site.name} ({site.variant}): H_res logits have {n_nan} NaN and {n_inf} Inf values of "
            f"{logits.numel()} on the {probe} probe; this site's parameters in the checkpoint are not finite",
            path=path,
        )


def _analyze_site(
    site: Site,
    m: SiteModule,
    ev: SiteEval,
    T: int,
    tdtype: torch.dtype,
    *,
    iters: int | None,
    convention: Convention | str | None,
    eps: float | None,
    tol: float,
    path: str,
    probe_name: str,
    recorded: torch.Tensor | None,
    sources: dict[str, str] | None = None,
) -> _SiteWork:
    """One site's row from ``ev``: ``m`` (its module in ``tdtype``) evaluated once on the probe's T tokens."""
    module = site.module
    exactness = Exactness(getattr(module, "exactness", Exactness.UNCONSTRAINED))
    n = int(module.n)
    base: dict[str, Any] = dict(
        index=site.index, name=site.name, variant=site.variant, exactness=exactness.value, n=n, tokens=T
    )
    extra: dict[str, Any] = {}
    logits_keep: torch.Tensor | None = None
    spec: SinkhornSpec | None = None
    with torch.no_grad():
        if exactness is Exactness.SINKHORN:
            logits = ev.logits
            if logits is None or logits.shape[-2:] != (n, n):
                shape = None if logits is None else tuple(logits.shape)
                raise InputError(
                    f"site {site.name} ({site.variant}) is a Sinkhorn site but res_logits gave "
                    f"{shape}, not [T, {n}, {n}]",
                    path=path,
                )
            _check_logits(logits, site, path, probe_name)
            spec, src = effective_spec(
                getattr(module, "sinkhorn", None),
                iters=iters,
                convention=convention,
                eps=eps,
                sources=sources,
            )
            H = m.res_from_logits(logits, spec)
            # [T, p, n, n]: p proposals whose projections the site averages (lucidrains
            # num_dynamic_alpha_proposals); per token the widest proposal's range
            proposals = logits.ndim > 3  # tokens [T, n, C] give logits [T, n, n]
            lr = logit_range(logits).flatten(1).amax(-1) if proposals else logit_range(logits)
            lp = percentiles(lr, (50,))
            extra = dict(
                convention=spec.convention.value,
                convention_source=src["convention"],
                iters=spec.iters,
                iters_source=src["iters"],
                eps=spec.eps,
                eps_source=src["eps"],
                logit_range_p50=_f(lp["p50"]),
                logit_range_max=_f(lp["max"]),
                logit_max=_f(logits.to(torch.float64).max()),
                over_absorption_f32=int((lr > ABSORPTION_RANGE_F32).sum()),
                over_underflow_f32=int((lr > UNDERFLOW_RANGE_F32).sum()),
            )  # iters_to_tol_*: filled in by _fill_iters_to_tol, batched over sites
            # a mean of projections has no single logit matrix to iterate: no curve, no iterations-to-tol
            logits_keep = None if proposals else logits.detach()
        else:
            logits = ev.logits if exactness is Exactness.EXACT else None
            if logits is not None:
                _check_logits(logits, site, path, probe_name)
                H = m.res_from_logits(logits)
            elif ev.res is not None:
                H = ev.res
            else:  # SiteEval gives H_res or its logits
                assert ev.logits is not None
                H = m.res_from_logits(ev.logits)
            H = (H.expand(T, n, n) if H.ndim == 2 else H).detach()  # a parameter's view keeps requires_grad
            if exactness is Exactness.UNCONSTRAINED:
                _check_logits(H, site, path, probe_name)
    ms = _matrix_stats(H)
    mean = ms.pop("mean")
    extra.update(_ds_stats(H))
    if exactness is not Exactness.UNCONSTRAINED:
        worst = max(extra["row_err"].max, extra["col_err"].max)
        extra["eps_floor"] = eps_floor(spec) if spec is not None else None
        verdict = _verdict(exactness, worst, tol, rounding_bound(H.dtype, n), extra["eps_floor"] or 0.0)
    else:
        verdict = VERDICT_NA
    if recorded is not None:
        rec = recorded.to(torch.float64)
        if rec.shape == H.shape:
            H64 = H.to(torch.float64)
            extra["recorded_diff"] = _f((H64 - rec).abs().max())
            extra["recorded_tol"] = recorded_tolerance(H64)
    extra.update(_pre_post(ev, n))
    if exactness is not Exactness.UNCONSTRAINED:
        extra["perm_distance"] = _perm_distance(H)
    extra["temperature"] = getattr(module, "temperature", None)
    keys = res_tensor_keys(module, [t.key for t in site.tensors])
    row = SiteStochasticity(**base, verdict=verdict, **extra, **ms, res_tensors=tuple(keys))
    return _SiteWork(row=row, mean=mean, logits=logits_keep, spec=spec)


def _perm_distance(H: torch.Tensor) -> float | None:
    """max over tokens of max |H - P| for H [T, n, n], P the 0/1 matrix of each row's largest entry; None where
    for some token those entries are not a permutation (two rows peak in the same column)."""
    H64 = H.to(torch.float64)
    if not bool(torch.isfinite(H64).all()):
        return None
    idx = H64.argmax(dim=-1)  # [T, n]
    n = H64.shape[-1]
    if not bool((torch.sort(idx, dim=-1).values == torch.arange(n)).all()):
        return None
    P = torch.nn.functional.one_hot(idx, n).to(H64.dtype)
    return _f((H64 - P).abs().max())


def _pre_post(ev: SiteEval, n: int) -> dict[str, tuple[float, ...]]:
    """Token means of the site's H_pre and H_post [n] on the probe's tokens (``ev``: one evaluation); a multi-row
    H_pre / H_post [..., r, n] is averaged over its r rows too."""
    pre, post = (t.detach().to(torch.float64).reshape(-1, n).mean(0) for t in (ev.pre, ev.post))
    return {"h_pre_mean": tuple(float(v) for v in pre), "h_post_mean": tuple(float(v) for v in post)}


def _iters_fields(its: torch.Tensor, estimate: torch.Tensor, rate: torch.Tensor) -> dict[str, Any]:
    """iters_to_tol_detail output [T] (its -1: not reached) -> the row's iters_to_tol_* fields."""
    reached = its >= 0
    its_f = torch.where(reached, its.to(torch.float64), torch.full_like(its, math.inf, dtype=torch.float64))
    med = _lower_median(its_f)
    est, rt = estimate[~reached], rate[~reached]
    steady = torch.isfinite(est)
    return {
        "iters_to_tol_p50": int(med) if math.isfinite(med) else None,
        "iters_to_tol_max": int(its.max()) if bool(reached.all()) else None,
        "iters_to_tol_unreached": int((~reached).sum()),
        "iters_to_tol_never": int(torch.isinf(est).sum()),
        "iters_to_tol_estimate": _lower_median(est[steady]) if bool(steady.any()) else None,
        "iters_to_tol_rate": _lower_median(rt[steady]) if bool(steady.any()) else None,
    }


def _fill_iters_to_tol(works: list[_SiteWork], tol: float) -> None:
    """Iterations each token needs to reach ``tol``, for every Sinkhorn site: one batched iters_to_tol run per
    (convention, eps, logits shape) group instead of one 1000-iteration loop per site."""
    groups: dict[tuple, list[int]] = {}
    for i, w in enumerate(works):
        if w.logits is not None and w.spec is not None:
            key = (w.spec.convention, w.spec.eps, tuple(w.logits.shape), w.logits.dtype)
            groups.setdefault(key, []).append(i)
    for (conv, eps, shape, _dt), idx in groups.items():
        # the engine iterates cache-sized blocks whatever the batch (below torch's parallel grain with
        # intra-op threads) and stops each matrix on its own, so the cost is linear in sites x tokens
        per = max(1, _BATCH_ELEMENTS // max(1, math.prod(shape)))
        for start in range(0, len(idx), per):
            chunk = idx[start : start + per]
            stacked = torch.stack([works[i].logits for i in chunk])  # type: ignore[misc]  # [L_g, T, n, n]
            # the target sits tol above the eps floor, as the verdict does: with eps in the denominators the
            # sums never get nearer to 1 than eps, so "reach tol" alone is unreachable for tol <= eps
            d = iters_to_tol_detail(stacked, conv, tol + eps, eps=eps, max_iters=ITERS_TO_TOL_LIMIT)
            for j, i in enumerate(chunk):
                works[i].row = replace(works[i].row, **_iters_fields(d.iters[j], d.estimate[j], d.rate[j]))


def _curve(work: _SiteWork) -> ConvergenceCurve:
    assert work.logits is not None and work.spec is not None
    spec = work.spec
    k = max(CURVE_ITERS, spec.iters)
    with torch.no_grad():
        res = sinkhorn(work.logits, spec.convention, k, eps=spec.eps, record=True)
    assert res.row_err_history is not None and res.col_err_history is not None
    rh = res.row_err_history.to(torch.float64).reshape(res.row_err_history.shape[0], -1)
    ch = res.col_err_history.to(torch.float64).reshape(res.col_err_history.shape[0], -1)
    return ConvergenceCurve(
        index=work.row.index,
        name=work.row.name,
        convention=spec.convention.value,
        iters=spec.iters,
        eps=spec.eps,
        row_err_max=tuple(float(v) for v in rh.amax(dim=1)),
        col_err_max=tuple(float(v) for v in ch.amax(dim=1)),
        row_err_p50=tuple(float(v) for v in rh.median(dim=1).values),
        col_err_p50=tuple(float(v) for v in ch.median(dim=1).values),
    )


def _heatmaps(works: Sequence[_SiteWork]) -> tuple[MeanMatrix, ...]:
    """Token-mean H_res of the first, middle and last sites (mHC Fig. 8)."""
    L = len(works)
    picks = sorted({0, L // 2, L - 1}) if L else []
    out = []
    for i in picks:
        w = works[i]
        M = w.mean
        out.append(
            MeanMatrix(
                index=w.row.index,
                name=w.row.name,
                matrix=tuple(tuple(float(v) for v in r) for r in M),
                row_sums=tuple(float(v) for v in M.sum(dim=-1)),
                col_sums=tuple(float(v) for v in M.sum(dim=-2)),
                tokens=w.row.tokens,
            )
        )
    return tuple(out)


def _worst_first(rows: Sequence[SiteStochasticity]) -> list[SiteStochasticity]:
    return sorted((r for r in rows if r.worst_error is not None), key=lambda r: -_key(r.worst_error))


def _key(v: float | None) -> float:
    if v is None:
        return -math.inf
    return v if math.isfinite(v) else math.inf


def _axis_state(err: float, floor: float, bound: float, tol: float) -> str:
    """How an axis's worst error reads: exact to rounding, at the eps floor (within tol of it), or off."""
    if err <= bound:
        return "exact to rounding"
    if floor > 0 and err <= floor + tol:
        return f"at the eps floor ({_fmt(floor)}; up to {_fmt(err)})"
    return f"off by up to {_fmt(err)}"


def _rate_clause(rs: Sequence[SiteStochasticity], target: float, err: float, done: int) -> str:
    """Why the unreached tokens are slow, only from what was measured: tokens whose state repeats above the
    target never get there; the others contract at the measured rate (the estimate the table shows), which
    near the limit is about sigma_2^2 (Knight 2008). sigma_2 near 1 means a near-permutation or nearly
    block-diagonal H_res; that is said only when sigma_2 >= 0.9."""
    s2 = max(r.sigma2_max for r in rs)
    shape = " (near-permutation or nearly block-diagonal H_res)" if math.isfinite(s2) and s2 >= 0.9 else ""
    parts = []
    never = sum(r.iters_to_tol_never or 0 for r in rs)
    if never:
        parts.append(f"{never} settle above it (their state repeats), so more iterations do not help")
    steady = [r for r in rs if r.iters_to_tol_rate is not None and r.iters_to_tol_estimate is not None]
    if steady:
        rate = max(r.iters_to_tol_rate or 0.0 for r in steady)
        need = max(r.iters_to_tol_estimate or 0.0 for r in steady)
        who = "the others" if never else "they"
        parts.append(f"{who} shrink by a measured {rate:.4f} per iteration (about {need:,.0f} iterations "
                     f"in all; sigma_2 of H_res reaches {s2:.4f}{shape})")
    elif math.isfinite(s2) and err > target and s2 >= 0.9:
        parts.append(f"sigma_2 of H_res reaches {s2:.4f}{shape}")
    return "; " + "; ".join(parts) if parts else ""


def _advice_group(rs: Sequence[SiteStochasticity], tol: float, dtype: torch.dtype) -> list[str]:
    """Sinkhorn sites over tolerance that share (convention, iters, eps): what is off, and why."""
    r0 = rs[0]
    conv, it, floor = r0.convention or "", r0.iters or 0, r0.eps_floor or 0.0
    exact = exact_axis(conv)
    other = "columns" if exact == "rows" else "rows"
    worst = max(rs, key=lambda r: _key(r.worst_error))

    def axis_max(axis: str) -> float:
        return max(_key((r.row_err if axis == "rows" else r.col_err).max) for r in rs)  # type: ignore[union-attr]

    bound = rounding_bound(dtype, r0.n)
    err_other, err_exact = axis_max(other), axis_max(exact)
    line = (f"{other} {_axis_state(err_other, floor, bound, tol)} after {it} iterations ({conv} convention, "
            f"site {worst.name}); {exact} {_axis_state(err_exact, floor, bound, tol)}")
    if err_exact > max(bound, floor + tol):
        line += f" although the last pass normalises {exact}"
    unreached = sum(r.iters_to_tol_unreached or 0 for r in rs)
    target = tol + floor
    if unreached:
        total = sum(r.tokens for r in rs)
        line += (f"; {unreached} of {total} matrices (at {sum(1 for r in rs if r.iters_to_tol_unreached)} "
                 f"site(s)) do not reach {_fmt(target)} within {ITERS_TO_TOL_LIMIT} iterations")
        line += _rate_clause(rs, target, err_other, it)
    elif all(r.iters_to_tol_max is not None for r in rs):
        need = max(r.iters_to_tol_max or 0 for r in rs)
        line += f"; {need} iterations reach {_fmt(target)} on these inputs"
    return [line]


def _fix_logits(site: SiteStochasticity, *, log_domain_helps: bool) -> str:
    """What to change: the temperature or the logits' scale, plus the log domain where it helps (an entry that
    underflows to 0 in an exp-domain Sinkhorn stays 0; absorption below rounding happens in either domain, and a
    site already iterated in the log domain has nothing to gain)."""
    keys = site.res_tensors
    named = f"the H_res logits' tensors ({', '.join(keys)})" if keys else "the scale of the H_res logits"
    if site.temperature is not None:
        R = site.logit_range_max or 0.0
        return (f"the logits are the stored ones divided by the temperature tau = {site.temperature:g} (stored "
                f"range {R * site.temperature:.3g}): raise tau or shrink {named}")
    if log_domain_helps and site.convention != Convention.LOG.value:
        return f"shrink {named} or run the Sinkhorn in the log domain (hcdiag: --convention log)"
    return f"shrink {named}"


def _advice(rows: Sequence[SiteStochasticity], tol: float, dtype: torch.dtype) -> list[str]:
    out: list[str] = []
    sk = [r for r in rows if r.exactness == Exactness.SINKHORN.value]

    # 1. Sinkhorn sites over tolerance, one line per (convention, iters, eps) group
    groups: dict[tuple[str, int, float], list[SiteStochasticity]] = {}
    for r in sk:
        if r.verdict == VERDICT_OVER:  # non-finite sites get their own line below
            groups.setdefault((r.convention or "", r.iters or 0, r.eps or 0.0), []).append(r)
    for rs in groups.values():
        out += _advice_group(rs, tol, dtype)
    floors = sorted({r.eps_floor for r in sk if r.eps_floor})
    if floors and tol <= 10 * floors[-1]:
        at = sum(1 for r in sk if r.verdict == VERDICT_FLOOR)
        out.append(
            f"eps = {', '.join(f'{e:g}' for e in floors)} in every Sinkhorn denominator: converged sums settle "
            f"eps below 1 on both axes (the eps floor), so verdicts and iterations-to-tolerance ask for errors "
            f"within tol = {tol:g} of that floor" + (f"; {at} site(s) are ok at the floor" if at else "")
        )

    # 2. logit range / overflow (Sinkhorn sites)
    ranged = [r for r in sk if r.logit_range_max is not None]
    if ranged:
        r = max(ranged, key=lambda r: r.logit_range_max or 0.0)
        R = r.logit_range_max or 0.0
        if R > UNDERFLOW_RANGE_F32:
            out.append(
                f"logit range up to {R:.3g} at site {r.name}: exp() underflows in float32 (range > "
                f"{UNDERFLOW_RANGE_F32:.1f}: the small entries fall below the smallest normal float32, exactly 0 "
                f"past {ZERO_RANGE_F32:.0f}; in an exp-domain Sinkhorn a zero entry stays 0 through every pass, "
                f"in the log domain H_res = exp(result) still has them); {_fix_logits(r, log_domain_helps=True)}"
            )
        elif R > ABSORPTION_RANGE_F32:
            out.append(
                f"logit range up to {R:.3g} at site {r.name}: in float32 the small entries fall below "
                f"rounding of the large ones (range > {ABSORPTION_RANGE_F32:.1f}, in the exp and the log domain "
                f"alike), so Sinkhorn returns near-permutations with vanishing gradients; "
                f"{_fix_logits(r, log_domain_helps=False)}"
            )
        paper = [r for r in sk if r.convention == Convention.PAPER.value and r.logit_max is not None]
        if paper:
            r = max(paper, key=lambda r: r.logit_max or 0.0)
            f32_max = math.log(torch.finfo(torch.float32).max)
            if (r.logit_max or 0.0) > f32_max:
                out.append(
                    f"largest logit {r.logit_max:.3g} at site {r.name} overflows exp() in float32 under "
                    f"the paper convention, which does not subtract the max (limit {f32_max:.1f}); "
                    "a model running it in float32 gets inf/NaN there"
                )

    # 2b. Sinkhorn returned near-permutations (a large logit range collapses it onto a vertex of the polytope)
    perm = [r for r in sk if r.perm_distance is not None and r.perm_distance < NEAR_PERMUTATION]
    if perm:
        r = max(perm, key=lambda r: r.perm_distance or 0.0)
        out.append(
            f"H_res is a near-permutation at {len(perm)} of {len(sk)} Sinkhorn site(s) (within "
            f"{_fmt(r.perm_distance or 0.0)} of a permutation matrix, e.g. site {r.name}"
            + (f", logit range {r.logit_range_max:.3g}" if r.logit_range_max is not None else "")
            + "): the streams are routed, not mixed, and the derivatives of H_res with respect to its logits are "
            "of that order (s (1 - s) per entry s), so training leaves such an H_res where it is"
        )

    # 3. exact variants above rounding
    for r in rows:
        if r.exactness == Exactness.EXACT.value and r.worst_error is not None:
            bound = rounding_bound(dtype, r.n)
            if r.worst_error > bound:
                out.append(
                    f"exact variant {r.variant} shows {_fmt(r.worst_error)} error at site {r.name}: that is "
                    f"a bug in the model code, not rounding ({dtype_name(dtype)} rounding stays below "
                    f"{_fmt(bound)})"
                )
        if r.min_entry is not None and r.exactness != Exactness.UNCONSTRAINED.value and r.min_entry < -1e-6:
            out.append(
                f"site {r.name} has a negative entry {r.min_entry:.2e}: H_res leaves the Birkhoff polytope"
            )

    # 4. non-finite results
    nonfinite = [r.name for r in rows if r.verdict == VERDICT_NONFINITE]
    if nonfinite:
        fix = "--convention log (log domain) or lucidrains (subtracts the max)"
        if dtype != torch.float64:
            fix += ", or --dtype float64"
        out.append(
            f"H_res is NaN/Inf at {len(nonfinite)} site(s) ({', '.join(nonfinite[:4])}): the projection "
            f"overflowed exp(); use {fix}"
        )

    # 5. unconstrained sites
    hc = [r for r in rows if r.exactness == Exactness.UNCONSTRAINED.value]
    if hc:
        g = max(hc, key=lambda r: _key(max(r.gain_f_max, r.gain_b_max)))
        out.append(
            f"{len(hc)} unconstrained (HC) site(s): doubly-stochastic error does not apply; single-site "
            f"gains reach G_f = {g.gain_f_max:.3g}, G_b = {g.gain_b_max:.3g} (site {g.name}); compose them "
            "with hcdiag gain-sweep --from"
        )

    # 6. recorded activations disagree with the recomputation
    rec = [r for r in rows if r.recorded_diff is not None and r.recorded_diff > (r.recorded_tol or 0.0)]
    if rec:
        r = max(rec, key=lambda r: r.recorded_diff or 0.0)
        cause = recorded_mismatch_cause(r.exactness)
        out.append(
            f"recomputed H_res differs from the model's recorded one by up to {r.recorded_diff:.2g} at {len(rec)} "
            f"site(s) (worst {r.name}), above float32 rounding of the recomputed matrix "
            f"({_fmt(r.recorded_tol or 0.0)}): the model projects differently; {cause}"
        )
    return out


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _summary(rows: Sequence[SiteStochasticity], tol: float, dtype: torch.dtype) -> StochasticitySummary:
    app = [r for r in rows if r.applicable]
    ranked = _worst_first(app)
    worst = ranked[0] if ranked else None
    errs = sorted(_key(r.worst_error) for r in app)
    median = None
    if errs:
        mid = len(errs) // 2
        median = errs[mid] if len(errs) % 2 else 0.5 * (errs[mid - 1] + errs[mid])
    convs = tuple(sorted({r.convention for r in rows if r.convention}))
    axes = {exact_axis(c) for c in convs}
    ex = None if not axes else (axes.pop() if len(axes) == 1 else "mixed")
    return StochasticitySummary(
        sites=len(rows),
        applicable=len(app),
        over_tol=sum(1 for r in app if r.verdict not in VERDICTS_OK),
        tol=tol,
        worst_site=worst.name if worst else None,
        worst_index=worst.index if worst else None,
        worst_error=worst.worst_error if worst else None,
        worst_axis=worst.worst_axis if worst else None,
        median_error=median,
        conventions=convs,
        exact_axis=ex,
        advice=tuple(_advice(rows, tol, dtype)),
    )


def _undefined(rows: Sequence[SiteStochasticity], summary: StochasticitySummary) -> tuple[str, ...]:
    """Warnings for the values a table / JSON shows as blank / null / NaN, naming the sites: a report with no
    constrained site has no worst or median error; without a Sinkhorn site, logit range, iterations to tol and
    the exact axis do not apply; a non-finite error is named wherever it occurs."""

    def names(rs: Sequence[SiteStochasticity]) -> str:
        shown = ", ".join(f"{r.name} ({r.exactness})" for r in rs[:4])
        return shown + (f" and {len(rs) - 4} more" if len(rs) > 4 else "")

    out = []
    if rows and not summary.applicable:
        out.append(f"no site has a doubly-stochastic constraint ({names(rows)}): the summary's worst and median "
                   "error are null")
    elif rows and not summary.conventions:
        out.append(f"no Sinkhorn site ({names(rows)}): logit range, iterations to tol and exact axis do not apply "
                   "(blank in the table, null in JSON)")
    bad = [r for r in rows if r.worst_error is not None and not math.isfinite(r.worst_error)]
    if bad:
        out.append(f"non-finite doubly-stochastic error at {names(bad)}")
    return tuple(out)


def _check_tol(tol: float) -> float:
    if isinstance(tol, bool) or not isinstance(tol, int | float) or not math.isfinite(tol) or tol <= 0:
        raise UsageError(f"--tol must be a positive number, e.g. 1e-6; got {tol!r}", "--tol")
    return float(tol)


def _finish(
    works: list[_SiteWork],
    *,
    path: str,
    layout: str,
    probe: dict[str, Any],
    probe_description: str,
    tdtype: torch.dtype,
    source_dtype: str,
    tol: float,
    notes: list[str],
    settings: dict[str, Any],
) -> StochasticityReport:
    _fill_iters_to_tol(works, tol)
    rows = tuple(w.row for w in works)
    summary = _summary(rows, tol, tdtype)
    sk = [w for w in works if w.logits is not None]
    sk.sort(key=lambda w: -_key(w.row.worst_error))
    curves = tuple(_curve(w) for w in sk[:CURVE_SITES])
    if summary.exact_axis in ("rows", "columns"):
        other = "columns" if summary.exact_axis == "rows" else "rows"
        floor = max((r.eps_floor or 0.0 for r in rows), default=0.0)
        exact, part = ("at the eps floor (eps below 1)", "rest of the") if floor > 0 else ("exact to rounding", "whole")
        notes.append(
            f"{', '.join(summary.conventions)} convention: the last Sinkhorn pass normalises paper "
            f"{summary.exact_axis}, so {summary.exact_axis} are {exact} and the {part} "
            f"doubly-stochastic error sits in the {other} (matrices in paper convention: row i builds "
            "output stream i)"
        )
    return StochasticityReport(
        path=path,
        layout=layout,
        probe=probe,
        probe_description=probe_description,
        dtype=dtype_name(tdtype),
        source_dtype=source_dtype,
        tol=tol,
        sites=rows,
        summary=summary,
        curves=curves,
        heatmaps=_heatmaps(works),
        notes=tuple(notes),
        settings=settings,
        warnings=_undefined(rows, summary),
    )


# ----------------------------------------------------------------------------------------------------
# Public API


def analyze_stochasticity(
    model: LoadedModel,
    *,
    probe: ProbeBase | Probe | str = Probe.STATIC,
    tokens: int = 256,
    seed: int = 0,
    iters: int | None = None,
    convention: Convention | str | None = None,
    dtype: DType | str | torch.dtype = DType.FLOAT64,
    tol: float = 1e-6,
    eps: float | None = None,
) -> StochasticityReport:
    """Doubly-stochastic error, logit range, iterations needed and gains of every site of ``model``.

    probe: a probe object (:func:`hcdiag.probes.make_probe`) or a kind (``static`` / ``random``, built with
    ``tokens`` and ``seed``). iters / convention / eps: CLI overrides of the Sinkhorn spec (None: the
    checkpoint's, else the paper's 20 iterations of ``paper``). dtype: compute precision of logits and
    projection (metrics are then taken in float64). tol: verdict threshold and target of iterations-needed.

    Raises InputError naming the site for NaN/Inf logits, UsageError for bad options.
    """
    tol = _check_tol(tol)
    tdtype = torch_dtype(dtype)
    if convention is not None:
        convention = parse_convention(convention)
    if iters is not None and (isinstance(iters, bool) or not isinstance(iters, int) or iters < 1):
        raise UsageError(f"--iters must be an integer >= 1, got {iters!r}", "--iters")
    if not isinstance(probe, ProbeBase):
        probe = make_probe(probe, tokens=tokens, seed=seed)
    probe.prepare(model.sites)
    desc = probe.describe(model.sites)
    works: list[_SiteWork] = []
    for site in model.sites:
        m = site.module.in_dtype(tdtype)
        with torch.no_grad():
            ev = probe.evaluate(site, m, tdtype)  # one RMSNorm + projection (or projected draw) per site
        works.append(
            _analyze_site(
                site,
                m,
                ev,
                probe.site_tokens(site),
                tdtype,
                iters=iters,
                convention=convention,
                eps=eps,
                tol=tol,
                path=model.path,
                probe_name=probe.kind.value,
                recorded=probe.recorded_h_res(site),
                sources=dict(model.settings_source),
            )
        )
    notes = list(getattr(model, "notes", []) or [])
    if tdtype == torch.bfloat16:
        notes.append(
            "bfloat16: logits and exact constructions are computed in bfloat16; Sinkhorn iterates in "
            "float32 on the bfloat16 logits (as torch does for half-precision input)"
        )
    settings: dict[str, Any] = {}
    sk_rows = [w.row for w in works if w.spec is not None]
    for key in ("convention", "iters", "eps"):
        # the effective Sinkhorn settings and where they came from ({"value", "source"}; "mixed" if sites differ)
        vals = {(getattr(r, key), getattr(r, f"{key}_source")) for r in sk_rows}
        if len(vals) == 1:
            v, src = vals.pop()
            settings[key] = {"value": v, "source": src}
        elif vals:
            settings[key] = {"value": "mixed", "source": ", ".join(sorted({str(sv) for _, sv in vals}))}
    settings.update(
        {
            "overrides": {
                "iters": iters,
                "convention": None if convention is None else Convention(convention).value,
                "eps": eps,
            },
            "iters_to_tol_limit": ITERS_TO_TOL_LIMIT,
            "curve_iters": CURVE_ITERS,
            "settings_source": dict(model.settings_source),
        }
    )
    return _finish(
        works,
        path=model.path,
        layout=model.layout,
        probe=probe.to_dict(model.sites),
        probe_description=desc,
        tdtype=tdtype,
        source_dtype=model.source_dtype,
        tol=tol,
        notes=notes,
        settings=settings,
    )


def analyze_matrices(
    Hs: torch.Tensor,
    names: Sequence[str] | None = None,
    *,
    tol: float = 1e-6,
    exactness: Exactness | str | None = None,
    path: str = "<matrices>",
) -> StochasticityReport:
    """The same report for given H_res matrices (paper convention): Hs [L, n, n] or [L, T, n, n].

    Used to reproduce published numbers (mHC Fig. 8). names default to ``H_1 .. H_L``. ``exactness``
    ``unconstrained`` marks every matrix n/a (HC); otherwise the error is compared with ``tol``. No logits, so
    no logit range, iterations-needed or convergence curves.
    """
    tol = _check_tol(tol)
    if not isinstance(Hs, torch.Tensor) or Hs.ndim not in (3, 4) or Hs.shape[-1] != Hs.shape[-2]:
        shape = tuple(Hs.shape) if isinstance(Hs, torch.Tensor) else type(Hs).__name__
        raise InputError(
            f"matrices must be [L, n, n] or [L, T, n, n] with square H_res, got {shape}", path=path
        )
    H4 = (Hs.unsqueeze(1) if Hs.ndim == 3 else Hs).to(torch.float64)
    L, T, n = H4.shape[0], H4.shape[1], H4.shape[-1]
    if names is None:
        names = [f"H_{i + 1}" for i in range(L)]
    names = list(names)
    if len(names) != L:
        raise UsageError(f"{len(names)} names for {L} matrices; give one name per matrix", "names")
    ex = Exactness(exactness) if exactness is not None else Exactness.SINKHORN
    works = []
    for i in range(L):
        H = H4[i]
        if not bool(torch.isfinite(H).all()):
            raise InputError(f"matrix {names[i]} has NaN/Inf entries", path=path)
        ms = _matrix_stats(H)
        mean = ms.pop("mean")
        extra: dict[str, Any] = {}
        if ex is Exactness.UNCONSTRAINED:
            verdict = VERDICT_NA
        else:
            extra = _ds_stats(H)
            worst = max(extra["row_err"].max, extra["col_err"].max)
            verdict = VERDICT_OK if worst <= tol else VERDICT_OVER
        row = SiteStochasticity(
            index=i,
            name=names[i],
            variant="given",
            exactness=ex.value if exactness is not None else "given",
            n=n,
            tokens=T,
            verdict=verdict,
            **extra,
            **ms,
        )
        works.append(_SiteWork(row=row, mean=mean))
    return _finish(
        works,
        path=path,
        layout="matrices",
        probe={"kind": "given", "tokens": T},
        probe_description="given",
        tdtype=torch.float64,
        source_dtype="float64",
        tol=tol,
        notes=[],
        settings={},
    )

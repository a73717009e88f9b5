"""Gain of H_res products across depth (mHC Sec. 3.1, Figs. 3, 7, 8): synthetic stacks and real checkpoints.

Dimension letters: L sites (HC sub-layers, 2 per block: attn_0, ffn_0, attn_1, ...; SPEC sec. 1), S seeds
(independent stacks), T tokens, n streams, C width of one stream, K the shape of one site's H_res logits.

Everything is in paper convention (mHC Eq. 3): x_{l+1} = H_l x_l + ..., so depth composites put later sites on
the left. With sites numbered 1..L:

    forward composite at l   F_l = H_l ... H_1      (what the input x_1 has gone through when it reaches l)
    backward composite at l  B_l = H_L ... H_l      (what a gradient at the top has gone through down to l)

and the Amax Gain Magnitudes (mHC Sec. 3.1; SPEC sec. 4) G_f(M) = max_i |sum_j M_ij| (rows: forward signal),
G_b(M) = max_j |sum_i M_ij| (columns: backward gradient). The curves of mHC Fig. 3(b) / 7(b) are
G_f(F_l) and G_b(B_l).

Precision: H_res is always *built* in float64. With ``dtype`` float32 / bfloat16 each H_l is cast to that dtype
and every product is rounded to it (torch's matmul, as a model in that precision computes the stream mixing);
the metrics are then evaluated in float64 on those rounded composites.

Tokens (dynamic variants, mHC Fig. 3 averages "over all tokens in a selected sequence" without saying how;
SPEC sec. 4 asks for both readings). With T > 1 every site has one H_{l,t} per token and two sets of curves are
reported:

    ``curves``            per-token composites F_{l,t} = H_{l,t} ... H_{1,t}: each metric is computed per token,
                          then averaged over the T tokens (per seed), then median / min / max over seeds
                          ("mean of per-token gains"; ``token_min`` / ``token_max``: extremes over seeds x tokens)
    ``token_mean_curves`` the token-mean matrix per site, Hbar_l = mean_t H_{l,t}, is multiplied instead:
                          metrics of Hbar_l ... Hbar_1 ("gain of the token-mean matrix"), then over seeds.

Token t of a synthetic stack is one random stream state per site (like the ``random`` probe, independent
across sites); in a checkpoint it is probe token t at every site.
"""

from __future__ import annotations

import copy
import math
import queue
import time
import zlib
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from hcdiag.enums import Convention, DType, Exactness
from hcdiag.errors import InputError, UsageError
from hcdiag.site import SinkhornSpec

__all__ = [
    "BWD_METRICS",
    "FWD_METRICS",
    "MAX_STACK_BYTES",
    "METRICS",
    "SCHEMA_VERSION",
    "SITE_METRICS",
    "STATS",
    "GainReport",
    "VariantGain",
    "depth_metrics",
    "gain_from_model",
    "gain_sweep",
]

SCHEMA_VERSION = 1

#: metric name -> what it measures. Site index l runs 1..L; F_l = H_l ... H_1, B_l = H_L ... H_l.
METRICS: dict[str, str] = {
    "site_gain_fwd": "G_f(H_l) = max_i |sum_j (H_l)_ij|, single site",
    "site_gain_bwd": "G_b(H_l) = max_j |sum_i (H_l)_ij|, single site",
    "site_row_err": "max_i |sum_j (H_l)_ij - 1|, single site",
    "site_col_err": "max_j |sum_i (H_l)_ij - 1|, single site",
    "gain_fwd": "G_f(F_l), forward composite F_l = H_l ... H_1 (mHC Fig. 3b/7b forward signal gain)",
    "gain_bwd": "G_b(B_l), backward composite B_l = H_L ... H_l (mHC Fig. 3b/7b backward gradient gain)",
    "fwd_gain_bwd": "G_b(F_l): column sums of the forward composite",
    "bwd_gain_fwd": "G_f(B_l): row sums of the backward composite",
    "spectral_norm": "sigma_1(F_l)",
    "sigma2": "sigma_2(F_l); -> 0 with dist_uniform -> 0 is stream collapse to J/n",
    "dist_uniform": "||F_l - J/n||_F",
    "dist_identity": "||F_l - I||_F",
    "row_err": "max_i |sum_j (F_l)_ij - 1|",
    "col_err": "max_j |sum_i (F_l)_ij - 1|",
    "min_entry": "min_ij (F_l)_ij",
}
SITE_METRICS = ("site_gain_fwd", "site_gain_bwd", "site_row_err", "site_col_err")
FWD_METRICS = (
    "gain_fwd",
    "fwd_gain_bwd",
    "spectral_norm",
    "sigma2",
    "dist_uniform",
    "dist_identity",
    "row_err",
    "col_err",
    "min_entry",
)
BWD_METRICS = ("gain_bwd", "bwd_gain_fwd")
#: over seeds (after the token mean): median (numpy's, the mean of the middle two for even S), min, max
STATS = ("median", "min", "max")
TOKEN_STATS = ("token_min", "token_max")  # extremes over seeds x tokens (per-token curves, T > 1 only)

#: Refuse synthetic stacks whose float64 H_res alone would exceed this (sites x seeds x tokens x n^2 x 8 bytes).
MAX_STACK_BYTES = 4 * 1024**3

_TORCH_DTYPES = {DType.FLOAT64: torch.float64, DType.FLOAT32: torch.float32, DType.BFLOAT16: torch.bfloat16}
_CHUNK_ELEMS = 1 << 17  # matrix entries per chunk of sites (1 MB in float64): keeps the work in cache

Progress = Callable[[str, int, int], None]


# ------------------------------------------------------------------------------------------------------------
# Result objects


@dataclass(frozen=True)
class VariantGain:
    """Curves of one variant (or one checkpoint).

    curves[metric][stat]: float64 arrays [L] (index 0 = site 1); stats are :data:`STATS` (+ :data:`TOKEN_STATS`
    when T > 1). token_mean_curves: same layout for the token-mean-matrix reading, None when T = 1.
    heatmaps: [n, n] composites of one representative seed (``heatmap_seed``: the median seed by the final
    composite's max(G_f, G_b)): ``site_1`` = H_1, ``first_half`` = H_{L/2} ... H_1, ``second_half`` =
    H_L ... H_{L/2+1}, ``all`` = H_L ... H_1 (mHC Fig. 8); with T > 1 from the token-mean matrices.
    status: ``ok`` or ``skipped`` (``reason`` says why). notes: what the numbers mean for this variant;
    warnings: what may make them misleading (composites that overflowed the accumulation dtype). stack: the
    float64 H_res stack [L, S, T, n, n] when asked for (``keep_stacks=True``), never serialised.
    """

    name: str
    exactness: str
    status: str
    reason: str = ""
    sinkhorn: dict[str, Any] | None = None
    curves: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)
    token_mean_curves: dict[str, dict[str, np.ndarray]] | None = None
    heatmaps: dict[str, np.ndarray] = field(default_factory=dict)
    heatmap_seed: int | None = None
    notes: tuple[str, ...] = ()
    elapsed_s: float = 0.0
    warnings: tuple[str, ...] = ()
    stack: torch.Tensor | None = field(default=None, repr=False, compare=False)

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def to_dict(self) -> dict[str, Any]:
        def curves_dict(c: dict[str, dict[str, np.ndarray]] | None) -> dict | None:
            if c is None:
                return None
            return {m: {s: np.asarray(v, dtype=np.float64).tolist() for s, v in st.items()} for m, st in c.items()}

        return {
            "name": self.name,
            "exactness": self.exactness,
            "status": self.status,
            "reason": self.reason,
            "sinkhorn": self.sinkhorn,
            "elapsed_s": round(self.elapsed_s, 4),
            "notes": list(self.notes),
            "warnings": list(self.warnings),
            "curves": curves_dict(self.curves) if self.ok else None,
            "token_mean_curves": curves_dict(self.token_mean_curves),
            "heatmap_seed": self.heatmap_seed,
            "heatmaps": {k: np.asarray(v, dtype=np.float64).tolist() for k, v in self.heatmaps.items()},
        }


@dataclass(frozen=True)
class GainReport:
    """Result of :func:`gain_sweep` / :func:`gain_from_model`.

    inputs: the settings (JSON-ready). site_names: [L] (attn_0, ffn_0, ...). variants: one
    :class:`VariantGain` each, in the order asked. notes: one-line remarks (what was averaged, precision, ...).
    """

    inputs: dict[str, Any]
    site_names: tuple[str, ...]
    variants: tuple[VariantGain, ...]
    elapsed_s: float
    notes: tuple[str, ...] = ()

    @property
    def sites(self) -> int:
        return len(self.site_names)

    def variant(self, name: str) -> VariantGain:
        for v in self.variants:
            if v.name == name:
                return v
        known = ", ".join(v.name for v in self.variants)
        raise UsageError(f"no variant {name!r} in this report; it has: {known}", option="--variants")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready document (schema_version 1): arrays as lists, index 0 = site 1."""
        return {
            "schema_version": SCHEMA_VERSION,
            "command": "gain-sweep",
            "inputs": self.inputs,
            "sites": self.sites,
            "site_names": list(self.site_names),
            "metrics": dict(METRICS),
            "stats": list(STATS),
            "elapsed_s": round(self.elapsed_s, 4),
            "notes": list(self.notes),
            "variants": [v.to_dict() for v in self.variants],
        }

    def curve_rows(self) -> list[dict[str, Any]]:
        """Every curve of the JSON document in long form (``gain-sweep --csv``): one row per (variant, curves,
        site, metric, statistic); ``curves`` is the JSON key (``curves`` or ``token_mean_curves``), site_index
        1-based. Values are the float64 curve entries (inf / nan kept)."""
        rows: list[dict[str, Any]] = []
        for v in self.variants:
            for key, curves in (("curves", v.curves if v.ok else None), ("token_mean_curves", v.token_mean_curves)):
                for metric, stats in (curves or {}).items():
                    for stat, values in stats.items():
                        rows.extend(
                            {"variant": v.name, "site": self.site_names[i], "site_index": i + 1, "curves": key,
                             "metric": metric, "statistic": stat, "value": float(x)}
                            for i, x in enumerate(np.asarray(values, dtype=np.float64))
                        )
        return rows

    def table_rows(self, depths: int | Sequence[int] | None = None) -> list[dict[str, Any]]:
        """Rows for a table / CSV: per variant the first site, every k-th, the last and the worst one.

        depths: k (an int >= 1), or explicit 1-based site indices, or None (k chosen for about 10 rows).
        "worst" is the site where a composite gain (median or extreme over seeds, forward or backward) is
        farthest from 1 in log scale. Values: medians over seeds unless the key says ``_max`` / ``_min``.
        """
        L = self.sites
        if L == 0:
            return []
        if depths is None:
            picked = _every(L, max(1, math.ceil(L / 10)))
        elif isinstance(depths, bool):
            raise UsageError(f"--every {depths!r} is not a number of sites", option="--every")
        elif isinstance(depths, int):
            if depths < 1:
                raise UsageError(f"--every {depths} must be >= 1 (a row every k sites)", option="--every")
            picked = _every(L, depths)
        else:
            picked = sorted({int(d) for d in depths})
            bad = [d for d in picked if not 1 <= d <= L]
            if bad:
                raise UsageError(f"site {bad[0]} is outside 1..{L}", option="--every")
        rows: list[dict[str, Any]] = []
        for v in self.variants:
            if not v.ok:
                continue
            worst = _worst_site(v)
            tags: dict[int, list[str]] = {}
            for d in picked:
                tags.setdefault(d, []).append("first" if d == 1 else "last" if d == L else "every")
            if worst is not None:
                tags.setdefault(worst, []).append("worst")
            for d in sorted(tags):
                named = [t for t in dict.fromkeys(tags[d]) if t != "every"]
                rows.append(_row(self, v, d, ",".join(named) or "every"))
        return rows


def _every(L: int, k: int) -> list[int]:
    return sorted({1, L, *range(k, L + 1, k)})


def _log_dev(a: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        d = np.abs(np.log(np.abs(a)))
    return np.nan_to_num(d, nan=np.inf)


_WORST_MIN_LOG_DEV = 1e-12  # |log G| below this is rounding (exact variants): no "worst" row then


def _worst_site(v: VariantGain) -> int | None:
    """1-based site whose composite gain is farthest from 1 (log scale); None when all are 1 to rounding."""
    parts = [_log_dev(v.curves[m][s]) for m in ("gain_fwd", "gain_bwd") for s in ("median", "min", "max")]
    dev = np.max(np.stack(parts), axis=0)
    return int(np.argmax(dev)) + 1 if dev.max() > _WORST_MIN_LOG_DEV else None


def _row(report: GainReport, v: VariantGain, d: int, tag: str) -> dict[str, Any]:
    i = d - 1
    c = v.curves

    def g(metric: str, stat: str = "median") -> float:
        return float(c[metric][stat][i])

    row: dict[str, Any] = {
        "variant": v.name,
        "site": d,
        "name": report.site_names[i],
        "tag": tag,
        "site_gain_fwd": g("site_gain_fwd"),
        "site_gain_bwd": g("site_gain_bwd"),
        "gain_fwd": g("gain_fwd"),
        "gain_fwd_max": g("gain_fwd", "max"),
        "gain_fwd_min": g("gain_fwd", "min"),
        "gain_bwd": g("gain_bwd"),
        "gain_bwd_max": g("gain_bwd", "max"),
        "gain_bwd_min": g("gain_bwd", "min"),
        "spectral_norm": g("spectral_norm"),
        "sigma2": g("sigma2"),
        "dist_uniform": g("dist_uniform"),
        "dist_identity": g("dist_identity"),
        "row_err_max": g("row_err", "max"),
        "col_err_max": g("col_err", "max"),
    }
    if v.token_mean_curves is not None:
        row["gain_fwd_tokmean"] = float(v.token_mean_curves["gain_fwd"]["median"][i])
        row["gain_bwd_tokmean"] = float(v.token_mean_curves["gain_bwd"]["median"][i])
    return row


# ------------------------------------------------------------------------------------------------------------
# Metrics along depth (the numerical core; batched over everything but depth)


def _sums(M: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Row sums and column sums of M [..., n, n] -> ([..., n], [..., n]), as matrix-vector products (a
    reduction over dim -2 is several times slower on CPU; the result is the same sum, in another order)."""
    ones = torch.ones((M.shape[-1], 1), dtype=M.dtype)
    return (M @ ones).squeeze(-1), (ones.mT @ M).squeeze(-2)


def _fwd_chunk_metrics(buf: torch.Tensor) -> dict[str, torch.Tensor]:
    """Metrics of forward composites buf [k, B, n, n] float64 -> each [k, B].

    A composite with an inf or NaN entry overflowed the accumulation dtype (inf, then inf - inf = NaN in later
    products): its gains, spectral norm, distances and errors are reported as inf (IEEE's overflow), its sigma_2
    and min entry as NaN (unknown), and LAPACK never sees it.
    """
    n = buf.shape[-1]
    bad = ~torch.isfinite(buf).all(dim=-1).all(dim=-1)
    any_bad = bool(bad.any())
    if any_bad:
        buf = buf.masked_fill(bad[..., None, None], 0.0)
    rs, cs = _sums(buf)
    s = torch.linalg.svdvals(buf)
    eye = torch.eye(n, dtype=buf.dtype)
    out = {
        "gain_fwd": rs.abs().amax(-1),
        "fwd_gain_bwd": cs.abs().amax(-1),
        "spectral_norm": s[..., 0],
        "sigma2": s[..., 1] if n > 1 else torch.zeros_like(s[..., 0]),
        "dist_uniform": torch.linalg.matrix_norm(buf - 1.0 / n),
        "dist_identity": torch.linalg.matrix_norm(buf - eye),
        "row_err": (rs - 1).abs().amax(-1),
        "col_err": (cs - 1).abs().amax(-1),
        "min_entry": buf.amin((-2, -1)),
    }
    if any_bad:
        for m, v in out.items():
            v.masked_fill_(bad, math.nan if m in ("sigma2", "min_entry") else math.inf)
    return out


def _gain_or_inf(sums: torch.Tensor) -> torch.Tensor:
    """max |sum| over the last dim; inf where a sum is not finite (the composite overflowed)."""
    g = sums.abs().amax(-1)
    return g.masked_fill(~torch.isfinite(sums).all(dim=-1), math.inf)


def _overflow_note(name: str, curves: dict[str, dict[str, np.ndarray]], dt: DType) -> str | None:
    """A note when some composite overflowed the accumulation dtype (its metrics are then inf / NaN)."""
    fwd = ~np.isfinite(curves["gain_fwd"]["max"])
    bwd = ~np.isfinite(curves["gain_bwd"]["max"])
    if not (fwd.any() or bwd.any()):
        return None
    where = []
    if fwd.any():
        where.append(f"forward from site {int(np.argmax(fwd)) + 1}")
    if bwd.any():
        where.append(f"backward from site {len(bwd) - int(np.argmax(bwd[::-1]))} down")
    top = float(torch.finfo(_TORCH_DTYPES[dt]).max)
    return (
        f"{name}: composites overflow {dt.value} (max {top:.2g}) in the worst seed, {' and '.join(where)}: "
        "gains, spectral norm and distances there are inf, sigma_2 NaN"
    )


def _site_chunk_metrics(buf: torch.Tensor) -> dict[str, torch.Tensor]:
    rs, cs = _sums(buf)
    return {
        "site_gain_fwd": rs.abs().amax(-1),
        "site_gain_bwd": cs.abs().amax(-1),
        "site_row_err": (rs - 1).abs().amax(-1),
        "site_col_err": (cs - 1).abs().amax(-1),
    }


@dataclass(frozen=True)
class DepthMetrics:
    """Per-site metric values, not yet reduced: values[metric] float64 [L, B] (B = every matrix batch
    element: seeds x tokens). first_half / second_half / all: the composites [B, n, n] float64
    (H_{L/2}...H_1, H_L...H_{L/2+1}, H_L...H_1; None where the range is empty)."""

    values: dict[str, np.ndarray]
    first_half: torch.Tensor | None
    second_half: torch.Tensor | None
    all: torch.Tensor


def depth_metrics(H: torch.Tensor, dtype: DType | str = DType.FLOAT64, *, threads: int | None = None) -> DepthMetrics:
    """Every metric of :data:`METRICS` at every depth, for a stack H [L, B, n, n] (paper convention).

    H is cast to ``dtype`` (float64 / float32 / bfloat16) and the composites F_l = H_l ... H_1 (forward) and
    B_l = H_L ... H_l (backward) are accumulated in it, one rounded matmul per site; metrics are computed in
    float64 from the rounded matrices. Cost: 2L batched matmuls and L x B SVDs of n x n.

    Work split (``threads`` workers, default torch's intra-op thread count; results do not depend on it): this
    thread walks the forward chain into chunk buffers of cache size; each full chunk goes to a worker that
    computes its metrics (the SVDs are most of the cost) while the chain goes on; one more thread walks the
    backward chain. A buffer returns to the free list when its worker is done with it.
    """
    if not isinstance(H, torch.Tensor) or H.ndim != 4 or H.shape[-1] != H.shape[-2] or H.shape[0] < 1:
        shape = tuple(H.shape) if isinstance(H, torch.Tensor) else type(H).__name__
        raise UsageError(f"H must be an [L >= 1, B, n, n] stack, got {shape}", option="H")
    tdt = _TORCH_DTYPES[_dtype(dtype)]
    f64 = torch.float64
    L, B, n, _ = H.shape
    H = H.detach()
    chunk = max(1, _CHUNK_ELEMS // max(1, B * n * n))
    values: dict[str, np.ndarray] = {m: np.empty((L, B)) for m in METRICS}
    workers = max(1, threads if threads is not None else torch.get_num_threads())
    half = L // 2
    first_half: torch.Tensor | None = None

    def metrics(buf: torch.Tensor, hq: torch.Tensor, a: int, b: int) -> None:
        # everything about sites a..b-1 (hq: H[a:b] in tdt) whose forward composites are in buf[: b - a]; then
        # buf is free again
        try:
            for m, val in _site_chunk_metrics(hq.to(f64)).items():
                values[m][a:b] = val.numpy()
            for m, val in _fwd_chunk_metrics(buf[: b - a]).items():
                values[m][a:b] = val.numpy()
        finally:
            free.put(buf)

    pool = ThreadPoolExecutor(max_workers=workers + 1) if workers > 1 else None
    n_bufs = 2 * workers + 1 if pool is not None else 1
    free: queue.SimpleQueue[torch.Tensor] = queue.SimpleQueue()
    for _ in range(min(n_bufs, -(-L // chunk))):
        free.put(torch.empty((chunk, B, n, n), dtype=f64))
    pending: list[Future[None]] = []
    try:
        bwd = pool.submit(_backward, H, tdt, chunk, values) if pool is not None else None
        P: torch.Tensor | None = None  # F_{a-1} at the start of each chunk, in tdt (its own storage)
        for a in range(0, L, chunk):
            b = min(L, a + chunk)
            buf = free.get()
            hq = H[a:b].to(tdt)
            for i in range(b - a):
                if P is None:
                    P = hq[i]
                    buf[i].copy_(P)
                elif tdt == f64:
                    P = torch.matmul(hq[i], P, out=buf[i])  # P (buf[i-1] or a clone) is not buf[i]
                else:
                    P = torch.matmul(hq[i], P)  # rounded to tdt, as the model would
                    buf[i].copy_(P)
                if a + i == half - 1:
                    first_half = buf[i].clone()
            assert P is not None
            P = P.clone()  # buf goes to a worker and is reused
            if pool is None:
                metrics(buf, hq, a, b)
            else:
                pending.append(pool.submit(metrics, buf, hq, a, b))
                pending = _drop_done(pending)
        assert P is not None
        all_sites = P.to(f64)
        second_half = bwd.result() if bwd is not None else _backward(H, tdt, chunk, values)
        for f in pending:
            f.result()
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)
    return DepthMetrics(values, first_half, second_half, all_sites)


def _drop_done(futures: list[Future[None]]) -> list[Future[None]]:
    """The futures not done yet; a done one's exception is raised here."""
    running = []
    for f in futures:
        if f.done():
            f.result()
        else:
            running.append(f)
    return running


def _backward(H: torch.Tensor, tdt: torch.dtype, chunk: int, values: dict[str, np.ndarray]) -> torch.Tensor | None:
    """Backward composites B_l = B_{l+1} H_l walking down from the top (only their sums are needed); fills
    values["gain_bwd"], values["bwd_gain_fwd"]; returns B_{L/2+1} = H_L ... H_{L/2+1} (None when L = 1)."""
    f64 = torch.float64
    L, B, n, _ = H.shape
    half = L // 2
    second_half: torch.Tensor | None = None
    rows = torch.empty((chunk, B, n), dtype=f64)
    cols = torch.empty((chunk, B, n), dtype=f64)
    ones = torch.ones((n, 1), dtype=f64)
    Q: torch.Tensor | None = None
    for b in range(L, 0, -chunk):
        a = max(0, b - chunk)
        hq = H[a:b].to(tdt)
        for i in range(b - a - 1, -1, -1):
            Q = hq[i] if Q is None else torch.matmul(Q, hq[i])  # rounded to tdt at every product
            q64 = Q.to(f64)
            if a + i == half and half > 0:
                second_half = q64.clone()
            torch.matmul(q64, ones, out=rows[i].unsqueeze(-1))
            torch.matmul(ones.mT, q64, out=cols[i].unsqueeze(-2))
        values["gain_bwd"][a:b] = _gain_or_inf(cols[: b - a]).numpy()
        values["bwd_gain_fwd"][a:b] = _gain_or_inf(rows[: b - a]).numpy()
    return second_half


def _reduce(values: dict[str, np.ndarray], S: int, T: int, token_stats: bool) -> dict[str, dict[str, np.ndarray]]:
    """[L, S*T] per metric -> token mean per seed -> median / min / max over seeds (+ token extremes)."""
    out: dict[str, dict[str, np.ndarray]] = {}
    for m, v in values.items():
        v3 = v.reshape(v.shape[0], S, T)
        per_seed = v3.mean(axis=2)
        st = {"median": np.median(per_seed, axis=1), "min": per_seed.min(axis=1), "max": per_seed.max(axis=1)}
        if token_stats:
            st["token_min"] = v3.min(axis=(1, 2))
            st["token_max"] = v3.max(axis=(1, 2))
        out[m] = st
    return out


def _curves_from_stack(
    H: torch.Tensor, dtype: DType, *, threads: int | None = None
) -> tuple[dict, dict | None, dict[str, np.ndarray], int]:
    """H [L, S, T, n, n] float64 -> (curves, token_mean_curves or None, heatmaps, heatmap seed)."""
    L, S, T, n, _ = H.shape
    per_tok = depth_metrics(H.reshape(L, S * T, n, n), dtype, threads=threads)
    curves = _reduce(per_tok.values, S, T, token_stats=T > 1)
    if T > 1:
        Hbar = H.mean(dim=2)  # token-mean matrix per site and seed, float64, then cast/multiplied like H
        mean_m = depth_metrics(Hbar, dtype, threads=threads)
        tm_curves: dict | None = _reduce(mean_m.values, S, 1, token_stats=False)
        heat_src, heat_H1 = mean_m, Hbar[0]
    else:
        tm_curves = None
        heat_src, heat_H1 = per_tok, H[0, :, 0]
    # representative seed: median (lower) of max(G_f, G_b) of the whole-depth composite
    final = heat_src.all
    score = torch.maximum(final.sum(-1).abs().amax(-1), final.sum(-2).abs().amax(-1))
    order = torch.argsort(score, stable=True)
    s_med = int(order[(order.numel() - 1) // 2])
    tdt = _TORCH_DTYPES[dtype]
    heat: dict[str, np.ndarray] = {"site_1": heat_H1[s_med].to(tdt).to(torch.float64).numpy().copy()}
    if heat_src.first_half is not None:
        heat["first_half"] = heat_src.first_half[s_med].numpy().copy()
    if heat_src.second_half is not None:
        heat["second_half"] = heat_src.second_half[s_med].numpy().copy()
    heat["all"] = final[s_med].numpy().copy()
    return curves, tm_curves, heat, s_med


# ------------------------------------------------------------------------------------------------------------
# Validation helpers


@contextmanager
def _torch_single_thread() -> Iterator[int]:
    """torch intra-op work on one thread for the duration (restored after); yields the previous count.

    Why: the work here is many small ops (one site of matrices at a time). With 2 OpenMP threads, every such op
    ends in a barrier, and on a machine shared with another busy process the barrier waits for a descheduled
    thread: measured 100x slower per op (15 ms instead of 0.1 ms for a column normalisation of 256 16x16
    matrices). Parallelism comes instead from splitting the SVDs over a pool of ``threads`` Python threads,
    which never wait on each other.
    """
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield prev
    finally:
        torch.set_num_threads(prev)


def _dtype(dtype: DType | str) -> DType:
    try:
        return DType(str(dtype.value if isinstance(dtype, DType) else dtype).strip().lower())
    except ValueError:
        known = ", ".join(d.value for d in DType)
        raise UsageError(f"--dtype {dtype!r} is not supported; choose one of: {known}", option="--dtype") from None


def _int_opt(value: object, option: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise UsageError(f"{option} must be an integer >= {minimum}, got {value!r}", option=option)
    if value < minimum:
        raise UsageError(f"{option} {value} is out of range: it must be >= {minimum}", option=option)
    return int(value)


def _convention(convention: Convention | str | None) -> Convention | None:
    from hcdiag.sinkhorn import parse_convention

    return None if convention is None else parse_convention(convention, option="--convention")


def _sinkhorn_override(base: SinkhornSpec | None, iters: int | None, conv: Convention | None) -> SinkhornSpec | None:
    """The spec a Sinkhorn site projects with (None for a site without Sinkhorn): :func:`effective_spec`."""
    if base is None:
        return None
    from hcdiag.sinkhorn import effective_spec

    return effective_spec(base, iters=iters, convention=conv)[0]


def _spec_dict(spec: SinkhornSpec | None) -> dict[str, Any] | None:
    if spec is None:
        return None
    from hcdiag.sinkhorn import exact_axis

    conv = Convention(spec.convention)
    return {
        "convention": conv.value,
        "iters": int(spec.iters),
        "eps": float(spec.eps),
        "source": spec.source,
        "exact_axis": exact_axis(conv),
    }


def _site_names(L: int) -> tuple[str, ...]:
    return tuple(f"{kind}_{b}" for b in range((L + 1) // 2) for kind in ("attn", "ffn"))[:L]


def _variant_seeds(seed: int, name: str) -> np.random.SeedSequence:
    """The root of a variant's random streams, seeded by (seed, crc32(variant name)): independent, reproducible
    streams per variant (the same on every platform and torch version, like the ``random`` probe)."""
    return np.random.SeedSequence([seed % 2**63, zlib.crc32(name.encode())])


def _site_generators(root: np.random.SeedSequence, L: int) -> list[np.random.Generator]:
    """One generator per site: child i of ``root`` (numpy's spawn keys), SFC64 bits. A site's draws do not
    depend on how sites are chunked or on which thread draws them; SFC64 (numpy's fast, statistically sound
    generator) measured 1.6x faster than PCG64 for the 134 M normals of a 2048-site x 256-seed x 16^2 stack."""
    return [np.random.Generator(np.random.SFC64(child)) for child in root.spawn(L)]


# ------------------------------------------------------------------------------------------------------------
# Building synthetic stacks


def _perturbs_res(spec: Any, n: int, C: int, kf: tuple[int, ...] | None) -> bool:
    """Whether perturb_(parts=("res",)) changes this variant's H_res (False for identity / iHC: H_res = I)."""
    m = spec.build(n, C, layer_index=0, kron_factors=kf, dtype=torch.float64)
    x0 = torch.zeros(n, C, dtype=torch.float64)
    with torch.no_grad():
        before = m.forward(x0).res.detach().clone()
        m.perturb_(1.0, torch.Generator().manual_seed(0), parts=("res",))
        return not torch.equal(before, m.forward(x0).res.detach())


def _check_finite(H: torch.Tensor, name: str, scale: float) -> None:
    if not bool(torch.isfinite(H).all()):
        raise UsageError(
            f"{name}: H_res has non-finite entries at --logit-scale {scale:g} (float64 overflow: exp in the "
            "projection, or the noise itself); lower --logit-scale",
            option="--logit-scale",
        )


class _Workspace:
    """One float64 buffer for the H_res stacks of successive variants of a sweep (grown when too small).

    Why: a stack is large (2048 sites x 256 seeds x 16 x 16 float64 = 1 GiB) and the first write to fresh memory
    is the expensive part (a page fault per 4 KiB: measured 1.5-2.3 s per GiB on these VMs, against 0.05 s to
    rewrite it), so every variant after the first reuses the pages. Only when the stacks are not kept.
    """

    def __init__(self) -> None:
        self._buf = torch.empty(0, dtype=torch.float64)

    def take(self, shape: tuple[int, ...]) -> torch.Tensor:
        size = math.prod(shape)
        if self._buf.numel() < size:
            self._buf = torch.empty(0, dtype=torch.float64)  # release the old pages before asking for more
            self._buf = torch.empty(size, dtype=torch.float64)
        return self._buf[:size].view(shape)


def _empty(shape: tuple[int, ...], workspace: _Workspace | None) -> torch.Tensor:
    return workspace.take(shape) if workspace is not None else torch.empty(shape, dtype=torch.float64)


@dataclass
class _Stack:
    H: torch.Tensor  # [L, S, T, n, n] float64
    constant: bool  # every site, seed and token has the same H_res (built once, S = T = 1 internally)


@torch.no_grad()
def _build_stack(
    spec: Any,
    *,
    n: int,
    C: int,
    L: int,
    S: int,
    T: int,
    perturb: bool,
    scale: float,
    sk_spec: SinkhornSpec | None,
    kf: tuple[int, ...] | None,
    root: np.random.SeedSequence,
    progress: Callable[[int, int], None] | None = None,
    threads: int = 1,
    workspace: _Workspace | None = None,
) -> _Stack:
    """H_res stack [L, S, T, n, n] float64 for one variant (S = T = 1 when ``constant``).

    T = 1: the static probe x = 0 (the dynamic terms vanish; SPEC Probe.STATIC). One module gives the static
    logits z0 = res_logits(0) (or, for sites without logits, H_res = forward(0).res itself). Perturbation adds
    N(0, scale^2) to every entry, independently per (site, seed) - exactly what ``perturb_(scale,
    parts=("res",))`` does to the static H_res logits / weights, since at x = 0 the bias *is* the logit - drawn
    here in batched form, one [S, K] draw per site from that site's own stream (:func:`_site_generators`). Then
    one vectorised res_from_logits per chunk of sites, chunks spread over ``threads`` workers. Without
    perturbation every site is the same matrix: built once (``constant``).
    T > 1: per (site, seed) the module is reset to its init, perturbed with parts ("res", "dynamic") (so the
    tokens matter: every variant's token projections start at 0) and evaluated on T tokens x ~ N(0, 1)
    [T, n, C]: a Python loop over L x S module states, the tokens batched.
    """
    module = spec.build(n, C, layer_index=0, kron_factors=kf, dtype=torch.float64)
    module.eval()
    x0 = torch.zeros(n, C, dtype=torch.float64)
    z0 = module.res_logits(x0)
    if T == 1:
        noisy = perturb and (z0 is not None or _perturbs_res(spec, n, C, kf))
        if z0 is None:
            base = module.forward(x0).res.detach().to(torch.float64)
        else:
            z0 = z0.detach().to(torch.float64)
            base = module.res_from_logits(z0, sk_spec).detach().to(torch.float64)
        _check_finite(base, spec.name, scale)
        if not noisy:
            if progress:
                progress(L, L)
            return _Stack(base.expand(L, 1, 1, n, n).clone(), constant=True)
        K = tuple(z0.shape) if z0 is not None else (n, n)
        center = z0 if z0 is not None else base
        out = _empty((L, S, 1, n, n), workspace)
        dest = out.view(L, S, n, n)
        gens = _site_generators(root, L)
        step = max(1, module.projection_batch // max(1, S * max(math.prod(K), n * n)))

        def fill(a: int, b: int) -> None:
            # sites a..b-1: one [S, K] draw per site from its own stream, scaled around init, then projected
            with torch.no_grad():  # grad mode is thread-local: pool threads start with it on
                if z0 is None:  # the noisy matrix is H_res itself: draw straight into the stack
                    d = dest[a:b].numpy()
                    for i in range(b - a):
                        gens[a + i].standard_normal(out=d[i])
                    dest[a:b].mul_(scale).add_(center)
                else:
                    noise = np.empty((b - a, S, *K))
                    for i in range(b - a):
                        gens[a + i].standard_normal(out=noise[i])
                    Z = torch.from_numpy(noise).mul_(scale).add_(center)
                    dest[a:b] = module.res_from_logits(Z, sk_spec)
            _check_finite(dest[a:b], spec.name, scale)

        # chunks of sites go to the pool's threads (numpy's draws, Sinkhorn and the charts release the GIL)
        _run_chunks(fill, L, step, threads, progress)
        return _Stack(out, constant=False)

    # T > 1: a loop over (site, seed) module states; the tokens of one (site, seed) are batched. Sites go to the
    # pool's threads in chunks, each thread with its own copy of the module (perturb_ changes it in place); site
    # i draws its tokens and (through a torch generator seeded from it) its perturbation from its own stream.
    out = _empty((L, S, T, n, n), workspace)
    gens = _site_generators(root, L)
    init = [p.detach().clone() for p in module.parameters()]

    def sites(a: int, b: int) -> None:
        with torch.no_grad():
            m = copy.deepcopy(module)
            params = list(m.parameters())
            for layer in range(a, b):
                g = gens[layer]
                gen = torch.Generator().manual_seed(int(g.integers(2**62)))  # perturb_ draws from torch
                xs = torch.from_numpy(g.standard_normal((S, T, n, C)))
                logits: list[torch.Tensor] = []
                for s in range(S):
                    for p, p0 in zip(params, init, strict=True):
                        p.copy_(p0)
                    if perturb:
                        m.perturb_(scale, gen, parts=("res", "dynamic"))
                    z = m.res_logits(xs[s])
                    if z is None:
                        out[layer, s] = m.forward(xs[s]).res.detach().to(torch.float64)
                    else:
                        logits.append(z.detach().to(torch.float64))
                if logits:
                    # the site's S x T logits in one call, from the init state (res_from_logits reads only
                    # constants of the module: the Sinkhorn spec, TBP's delta_logit, which perturb_ leaves alone)
                    for p, p0 in zip(params, init, strict=True):
                        p.copy_(p0)
                    out[layer] = m.res_from_logits(torch.stack(logits), sk_spec).to(torch.float64)
                _check_finite(out[layer], spec.name, scale)

    step = max(1, -(-L // (8 * threads)))  # a few chunks per thread: progress moves, threads stay balanced
    _run_chunks(sites, L, step, threads, progress)
    return _Stack(out, constant=False)


def _run_chunks(
    work: Callable[[int, int], None], L: int, step: int, threads: int, progress: Callable[[int, int], None] | None
) -> None:
    """work(a, b) for the chunks [a, b) of range(L), on ``threads`` pool threads (inline for one); progress in
    depth order, from this thread."""
    bounds = [(a, min(L, a + step)) for a in range(0, L, step)]
    if threads <= 1:
        for a, b in bounds:
            work(a, b)
            if progress:
                progress(b, L)
        return
    pool = ThreadPoolExecutor(max_workers=threads)
    try:
        futures = [pool.submit(work, a, b) for a, b in bounds]
        for fut, (_, b) in zip(futures, bounds, strict=True):
            fut.result()
            if progress:
                progress(b, L)
    finally:
        pool.shutdown(cancel_futures=True)


# ------------------------------------------------------------------------------------------------------------
# Public entry points


def _sweep_variants(
    specs: list[Any],
    *,
    n: int,
    C: int,
    L: int,
    seeds: int,
    tokens: int,
    perturb: bool,
    scale: float,
    iters: int | None,
    conv: Convention | None,
    kf: tuple[int, ...] | None,
    dt: DType,
    seed: int,
    progress: Progress | None,
    keep_stacks: bool,
    threads: int,
) -> tuple[list[VariantGain], bool]:
    results: list[VariantGain] = []
    any_sinkhorn = False
    workspace = None if keep_stacks else _Workspace()
    for spec in specs:
        t0 = time.perf_counter()
        vkf = kf if spec.accepts_kron_factors else None
        exact = Exactness(spec.exactness).value
        if not spec.practical(n, vkf):
            # the variant's own parameter-count notes say why ("impractical: 20,922,789,888,000 ...")
            why = [t for t in spec.param_count(n, C, kron_factors=vkf).notes if t.startswith("impractical")]
            reason = f"n = {n}: " + (why[0] if why else "impractical at this n")
            results.append(VariantGain(spec.name, exact, "skipped", reason=reason))
            continue
        try:
            probe_module = spec.build(n, C, layer_index=0, kron_factors=vkf, dtype=torch.float64)
        except UsageError as exc:
            results.append(VariantGain(spec.name, exact, "skipped", reason=str(exc)))
            continue
        sk = _sinkhorn_override(probe_module.sinkhorn, iters, conv)
        any_sinkhorn = any_sinkhorn or sk is not None
        root = _variant_seeds(seed, spec.name)

        label = f"{spec.name}: {L} sites x {seeds} seeds"

        def sub(done: int, tot: int, _label: str = label) -> None:
            # one progress task per variant: sites built (0..L), then the depth products (L..2L)
            if progress is not None:
                progress(_label, done, 2 * tot)

        sub(0, L)
        st = _build_stack(
            spec, n=n, C=C, L=L, S=seeds, T=tokens, perturb=perturb, scale=scale, sk_spec=sk, kf=vkf, root=root,
            progress=sub, threads=threads, workspace=workspace,
        )
        sub(L, L)
        curves, tm, heat, s_med = _curves_from_stack(st.H, dt, threads=threads)
        notes = _variant_notes(spec.name, st, sk, tokens)
        overflow = _overflow_note(spec.name, curves, dt)
        H_full = st.H.expand(L, seeds, tokens, n, n) if st.constant else st.H
        results.append(
            VariantGain(
                spec.name, exact, "ok", sinkhorn=_spec_dict(sk), curves=curves, token_mean_curves=tm,
                heatmaps=heat, heatmap_seed=s_med, notes=tuple(notes), elapsed_s=time.perf_counter() - t0,
                warnings=(overflow,) if overflow else (),
                stack=H_full if keep_stacks else None,
            )
        )
        sub(2 * L, L)
    return results, any_sinkhorn


def gain_sweep(
    *,
    layers: int = 64,
    variants: Sequence[str] | None = None,
    n: int = 4,
    C: int = 64,
    init: str = "paper",
    logit_scale: float = 0.0,
    seeds: int = 1,
    tokens: int = 1,
    iters: int | None = None,
    convention: Convention | str | None = None,
    dtype: DType | str = DType.FLOAT64,
    seed: int = 0,
    kron_factors: Sequence[int] | None = None,
    progress: Progress | None = None,
    keep_stacks: bool = False,
    threads: int | None = None,
) -> GainReport:
    """Gains across depth of synthetic stacks: ``layers`` blocks = L = 2 * layers HC sites per variant.

    init ``paper``: every site at its variant's published initialisation (no randomness: all seeds agree).
    init ``perturb``: N(0, logit_scale^2) around init on the static H_res logits / weights, independently per
    site and seed (:meth:`perturb_` part "res"; with tokens > 1 also part "dynamic", the token projections).
    iters / convention replace the Sinkhorn settings of Sinkhorn variants (mhc: paper convention, 20 iters).
    Skips (with the reason) variants that are impractical at this n (mHC-lite beyond n = 6).

    progress(label, done, total): one task per variant (sites built, then the products). keep_stacks: keep the
    float64 H_res stack [L, S, T, n, n] on each :class:`VariantGain` (for checks; memory!). threads: SVD and
    projection worker threads (default: torch's thread count); torch's own ops run single-threaded meanwhile
    (see :func:`_torch_single_thread`). Results do not depend on ``threads``.
    Returns a :class:`GainReport`; raises UsageError naming the option for bad values.
    """
    from hcdiag import registry

    t_start = time.perf_counter()
    layers = _int_opt(layers, "--layers", 1)
    seeds = _int_opt(seeds, "--seeds", 1)
    tokens = _int_opt(tokens, "--tokens", 1)
    n = _int_opt(n, "--n", 1)
    C = _int_opt(C, "--C", 1)
    seed = _int_opt(seed, "--seed", 0)
    if iters is not None:
        iters = _int_opt(iters, "--iters", 1)
    conv = _convention(convention)
    dt = _dtype(dtype)
    if init not in ("paper", "perturb"):
        raise UsageError(f"--init {init!r} is not one of: paper, perturb", option="--init")
    try:
        scale = float(logit_scale)
    except (TypeError, ValueError):
        raise UsageError(f"--logit-scale must be a number, got {logit_scale!r}", option="--logit-scale") from None
    if not math.isfinite(scale) or scale < 0:
        raise UsageError(f"--logit-scale {logit_scale!r} must be finite and >= 0", option="--logit-scale")
    if init == "perturb" and scale == 0:
        raise UsageError("--init perturb needs --logit-scale S > 0 (the std of the noise)", option="--logit-scale")
    if init == "paper" and scale != 0:
        raise UsageError(
            f"--logit-scale {scale:g} only applies with --init perturb; pass --init perturb", option="--logit-scale"
        )
    perturb = init == "perturb"

    names = list(dict.fromkeys(variants)) if variants is not None else list(registry.names())
    if not names:
        raise UsageError("--variants is empty; name at least one variant", option="--variants")
    specs = [registry.get(v, option="--variants") for v in names]
    kf = tuple(int(f) for f in kron_factors) if kron_factors is not None else None
    if kf is not None and not any(s.accepts_kron_factors for s in specs):
        raise UsageError(
            "--kron-factors applies only to kromhc, which is not among --variants", option="--kron-factors"
        )
    for s in specs:
        s.validate(n, C, kf if s.accepts_kron_factors else None)

    L = 2 * layers
    need = L * seeds * tokens * n * n * 8
    if need > MAX_STACK_BYTES:
        raise UsageError(
            f"the H_res stack needs {need / 1e9:.2f} GB (2 x {layers} sites x {seeds} seeds x {tokens} tokens x "
            f"n^2 x 8 bytes; limit {MAX_STACK_BYTES / 1e9:.2f} GB); lower --seeds, --tokens or --layers",
            option="--seeds",
        )

    with _torch_single_thread() as prev_threads:
        workers = threads if threads is not None else prev_threads
        results, any_sinkhorn = _sweep_variants(
            specs, n=n, C=C, L=L, seeds=seeds, tokens=tokens, perturb=perturb, scale=scale, iters=iters, conv=conv,
            kf=kf, dt=dt, seed=seed, progress=progress, keep_stacks=keep_stacks, threads=workers,
        )
    if all(not r.ok for r in results):
        raise UsageError(
            f"every requested variant is impractical at n = {n}: "
            + "; ".join(f"{r.name}: {r.reason}" for r in results),
            option="--n",
        )

    inputs: dict[str, Any] = {
        "source": "synthetic",
        "layers": layers,
        "sites": L,
        "variants": names,
        "n": n,
        "C": C,
        "init": init,
        "logit_scale": scale,
        "seeds": seeds,
        "tokens": tokens,
        "iters": iters,
        "convention": conv.value if conv else None,
        "dtype": dt.value,
        "seed": seed,
        "kron_factors": list(kf) if kf else None,
        "perturb_parts": (["res", "dynamic"] if tokens > 1 else ["res"]) if perturb else [],
        "token_inputs": "x ~ N(0, 1) [T, n, C] per site and seed" if tokens > 1 else "x = 0 (static probe)",
    }
    notes = _report_notes(dt, tokens, seeds, perturb)
    if (iters is not None or conv is not None) and not any_sinkhorn:
        notes.append("--iters / --convention ignored: no Sinkhorn variant among --variants")
    return GainReport(inputs, _site_names(L), tuple(results), time.perf_counter() - t_start, tuple(notes))


def _report_notes(dt: DType, tokens: int, seeds: int, perturb: bool) -> list[str]:
    notes = [
        "site l = 1..L in depth order (attn_0, ffn_0, attn_1, ...); gain_fwd = G_f(H_l...H_1), "
        "gain_bwd = G_b(H_L...H_l) (mHC Sec. 3.1, Figs. 3b/7b)",
    ]
    if dt is DType.FLOAT64:
        notes.append("products accumulated in float64")
    else:
        notes.append(
            f"H_res built in float64, cast to {dt.value}, every product rounded to {dt.value} (what a {dt.value} "
            "model computes); metrics evaluated in float64 on those matrices"
        )
    if tokens == 1:
        notes.append("tokens = 1: static probe x = 0, H_res from the static logits / weights alone")
    else:
        notes.append(
            f"tokens = {tokens}: curves = mean over tokens of per-token composite metrics (H_l,t ... H_1,t), then "
            "over seeds; token_mean_curves = metrics of the composite of token-mean matrices (mean_t H_l,t)"
        )
    if seeds > 1 and not perturb and tokens == 1:
        notes.append("--init paper has no randomness: every seed gives the same stack")
    if seeds > 1:
        notes.append(f"stats over {seeds} seeds: median, min, max (worst)")
    return notes


def _variant_notes(name: str, st: _Stack, sk: SinkhornSpec | None, tokens: int) -> list[str]:
    notes: list[str] = []
    H = st.H
    n = H.shape[-1]
    if bool(torch.equal(H, torch.eye(n, dtype=H.dtype).expand_as(H))):
        notes.append(f"{name}: H_res = I at every site (the plain pre-norm residual): every gain is exactly 1")
    elif st.constant:
        notes.append(f"{name}: the same H_res at every site (init, no noise): composites are its powers")
    if sk is not None:
        d = _spec_dict(sk)
        assert d is not None
        other = "columns" if d["exact_axis"] == "rows" else "rows"
        g_exact = "G_f" if d["exact_axis"] == "rows" else "G_b"
        notes.append(
            f"{name}: Sinkhorn {d['convention']}, {d['iters']} iters: paper {d['exact_axis']} exact, so {g_exact} "
            f"of every composite is 1 to rounding; the doubly-stochastic error sits in the {other}"
        )
    if tokens > 1 and H.shape[2] > 1 and bool((H == H[:, :, :1]).all()):
        notes.append(f"{name}: H_res does not depend on the token here (both averaging modes agree)")
    return notes


def _model_stack(
    model: Any, sites: list[Any], probe: Any, iters: int | None, conv: Convention | None
) -> tuple[torch.Tensor, list[dict[str, Any] | None]]:
    """H_res of every site of ``model`` on the probe's tokens: [L, 1, T, n, n] float64, and each site's spec."""
    mats: list[torch.Tensor] = []
    specs_used: list[dict[str, Any] | None] = []
    for site in sites:
        m = site.module.in_dtype(torch.float64)
        with torch.no_grad():
            ev = probe.evaluate(site, m, DType.FLOAT64)  # one evaluation (or the probe's projected draw)
            z = ev.logits
            sk = _sinkhorn_override(m.sinkhorn, iters, conv)
            H = ev.res if z is None else m.res_from_logits(z, sk)  # SiteEval: res is None only with logits
        assert H is not None
        H = H.detach().to(torch.float64)
        if H.ndim == 2:
            H = H.unsqueeze(0)
        mats.append(H)
        specs_used.append(_spec_dict(sk))
    first_at: dict[int, str] = {}  # stream count n -> the first site that has it
    for site, h in zip(sites, mats, strict=True):
        first_at.setdefault(h.shape[-1], site.name)
    if len(first_at) != 1:
        where = ", ".join(f"{k} at {name}" for k, name in first_at.items())
        raise InputError(
            f"{model.path}: sites have different stream counts n ({where}); a product across depth needs one n "
            "(use `hcdiag stochasticity` for per-site numbers)",
            path=str(model.path),
        )
    Ts = {h.shape[0] for h in mats}
    if len(Ts) != 1:
        raise InputError(
            f"{model.path}: the probe gives different token counts per site ({sorted(Ts)}); per-token products "
            "need the same tokens at every site",
            path=str(model.path),
        )
    stack = torch.stack(mats).unsqueeze(1)  # [L, 1, T, n, n]
    finite = torch.isfinite(stack).flatten(1).all(dim=1)
    if not bool(finite.all()):
        bad = [sites[i].name for i in range(len(sites)) if not bool(finite[i])]
        more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
        raise InputError(
            f"{model.path}: H_res is NaN/Inf at site(s) {', '.join(bad[:3])}{more} (the projection overflowed); "
            f"`hcdiag stochasticity {model.path}` shows the logits and a convention that avoids it",
            path=str(model.path),
        )
    return stack, specs_used


def _recorded_warning(sites: list[Any], probe: Any, stack: torch.Tensor) -> str | None:
    """With H_res recorded by the model (``--probe activations``): one line naming the site where the
    recomputation differs most from the recorded matrices, if any site differs by more than float32 rounding
    of the recomputed matrix (stochasticity's threshold); else None."""
    from hcdiag.stochasticity import recorded_mismatch_cause, recorded_tolerance

    over: list[tuple[float, float, Any]] = []
    for site, H in zip(sites, stack[:, 0], strict=True):
        rec = probe.recorded_h_res(site)
        if rec is None or rec.shape != H.shape:
            continue
        diff, tol = float((H - rec.to(torch.float64)).abs().max()), recorded_tolerance(H)
        if diff > tol:
            over.append((diff, tol, site))
    if not over:
        return None
    diff, tol, site = max(over, key=lambda t: t[0])
    exactness = Exactness(getattr(site.module, "exactness", Exactness.UNCONSTRAINED)).value
    return (
        f"recomputed H_res differs from the model's recorded one by up to {diff:.2g} at {len(over)} site(s) "
        f"(worst {site.name}), above float32 rounding of the recomputed matrix ({tol:.2g}): the gains below are "
        f"not the model's; {recorded_mismatch_cause(exactness)}"
    )


def gain_from_model(
    model: Any,
    *,
    probe: Any = None,
    tokens: int | None = None,
    seed: int | None = None,
    iters: int | None = None,
    convention: Convention | str | None = None,
    dtype: DType | str = DType.FLOAT64,
    keep_stacks: bool = False,
    threads: int | None = None,
) -> GainReport:
    """The same curves for a real checkpoint (``--from CKPT``): its sites in depth order, the probe's tokens as
    the batch (one "seed").

    H_res per site: ``module.res_logits(x)`` then ``module.res_from_logits`` (Sinkhorn sites project with their
    own spec, or with --iters / --convention replacing its fields), or ``module.forward(x).res`` for sites
    without logits (identity, HC). Computed in float64 (modules stored in another dtype are copied to float64).
    probe: a probe object (:func:`hcdiag.probes.make_probe`) or a probe kind; tokens / seed build a probe kind
    and are otherwise taken from the probe.
    """
    from hcdiag.enums import Probe
    from hcdiag.probes import ProbeBase, make_probe

    t_start = time.perf_counter()
    if iters is not None:
        iters = _int_opt(iters, "--iters", 1)
    conv = _convention(convention)
    dt = _dtype(dtype)
    if probe is None:
        probe = Probe.STATIC
    if not isinstance(probe, ProbeBase):
        kw: dict[str, Any] = {"seed": seed if seed is not None else 0}
        if tokens is not None:
            kw["tokens"] = tokens
        probe = make_probe(probe, **kw)
    sites = list(model.sites)
    if not sites:
        raise InputError(f"{model.path}: no HC sites to multiply", path=str(model.path))
    probe.prepare(sites)

    with _torch_single_thread() as prev_threads:
        stack, specs_used = _model_stack(model, sites, probe, iters, conv)
        L, _, T, n, _ = stack.shape
        workers = threads if threads is not None else prev_threads
        curves, tm, heat, _ = _curves_from_stack(stack, dt, threads=workers)

    variants = sorted({s.variant for s in sites})
    name = variants[0] if len(variants) == 1 else "mixed:" + ",".join(variants)
    uniq_specs = [d for d in dict.fromkeys(repr(d) for d in specs_used)]
    sk_first = next((d for d in specs_used if d is not None), None)
    exactness = sorted({Exactness(getattr(s.module, "exactness", Exactness.UNCONSTRAINED)).value for s in sites})
    vnotes = _variant_notes(name, _Stack(stack, constant=False), None, T)
    if sk_first is not None:
        other = "columns" if sk_first["exact_axis"] == "rows" else "rows"
        vnotes.append(
            f"{name}: Sinkhorn {sk_first['convention']}, {sk_first['iters']} iters ({sk_first['source']}): paper "
            f"{sk_first['exact_axis']} exact, the error sits in the {other}"
        )
    if len(uniq_specs) > 1:
        vnotes.append(f"{name}: sites use different Sinkhorn settings")
    overflow = _overflow_note(name, curves, dt)
    recorded = _recorded_warning(sites, probe, stack)
    result = VariantGain(
        name, "/".join(exactness), "ok", sinkhorn=sk_first, curves=curves, token_mean_curves=tm, heatmaps=heat,
        heatmap_seed=0, notes=tuple(vnotes), elapsed_s=time.perf_counter() - t_start,
        warnings=tuple(w for w in (overflow, recorded) if w),
        stack=stack if keep_stacks else None,
    )
    probe_dict = probe.to_dict(sites) if hasattr(probe, "to_dict") else {"kind": str(probe)}
    inputs: dict[str, Any] = {
        "source": "checkpoint",
        "path": str(model.path),
        "layout": model.layout,
        "sites": L,
        "blocks": len({s.block for s in sites}),
        "n": int(model.n),
        "C": int(model.C),
        "probe": probe_dict,
        "tokens": T,
        "seeds": 1,
        "iters": iters,
        "convention": conv.value if conv else None,
        "dtype": dt.value,
        "source_dtype": model.source_dtype,
        "settings_source": dict(model.settings_source),
    }
    notes = _report_notes(dt, T, 1, False)[:2]
    notes.append(f"probe: {probe.describe(sites)}")
    if T > 1:
        notes.append(
            f"tokens = {T}: curves = mean over tokens of per-token composite metrics (token t at every site), "
            "token_mean_curves = metrics of the composite of token-mean matrices"
        )
    if (iters is not None or conv is not None) and sk_first is None:
        notes.append("--iters / --convention ignored: the checkpoint has no Sinkhorn sites")
    notes.extend(model.notes)
    names = tuple(s.name for s in sites)
    return GainReport(inputs, names, (result,), time.perf_counter() - t_start, tuple(notes))

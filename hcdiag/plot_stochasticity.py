"""PNG figures for a :class:`~hcdiag.stochasticity.StochasticityReport` (``hcdiag stochasticity --plot``).

Dimension letters: L sites, n streams, k Sinkhorn iterations.

Three figures, each written atomically (temporary name in the output directory, then ``os.replace``):

* ``stochasticity_error_per_site.png``: row and column error (max over tokens) per site, log y, tol line.
* ``stochasticity_convergence.png``: error after each Sinkhorn iteration 1..100 for the worst sites (max over
  tokens, both axes, log y), the site's configured iteration count marked.
* ``stochasticity_heatmaps.png``: token-mean H_res of the first, middle and last sites in the style of mHC
  Fig. 8, entries annotated to 2 decimals, row sums in a right margin column, column sums in a bottom row.

matplotlib is imported inside :func:`plot_stochasticity` only, so ``import hcdiag`` stays light. Figures are
built with ``matplotlib.figure.Figure`` and rendered by the Agg canvas, without pyplot: no global backend or
figure state is touched (safe inside a notebook).
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hcdiag.errors import UsageError

if TYPE_CHECKING:
    from hcdiag.stochasticity import StochasticityReport

__all__ = ["plot_stochasticity"]

DPI = 200
_FLOOR = 1e-17  # exact zeros drawn here on log axes (below float64 rounding of 1, ~1.1e-16)


def _title_suffix(report: StochasticityReport) -> str:
    rows = [s for s in report.sites if s.convention]
    convs = sorted({s.convention for s in rows if s.convention})
    iters = sorted({s.iters for s in rows if s.iters is not None})
    parts = []
    if convs:
        parts.append(f"convention {', '.join(convs)}")
    if iters:
        parts.append(f"{', '.join(str(i) for i in iters)} iterations")
    parts.append(f"probe: {report.probe_description}")
    parts.append(report.dtype)
    return "; ".join(parts)


def _save(fig: Any, path: Path) -> Path:
    """Write ``fig`` as PNG under ``path`` atomically."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        fig.savefig(tmp, dpi=DPI, format="png", bbox_inches="tight")
        os.replace(tmp, path)
    except OSError as exc:
        try:
            tmp.unlink()
        except OSError:
            pass
        raise UsageError(
            f"cannot write {path}: {exc.strerror}; choose a writable --output-dir", "--output-dir"
        ) from None
    return path


def _floor(v: float | None) -> float:
    if v is None or not math.isfinite(v):
        return math.nan
    return max(v, _FLOOR)


def _plot_per_site(report: StochasticityReport, plt: Any, out: Path) -> Path | None:
    sites = [s for s in report.sites if s.applicable]
    if not sites:
        return None
    x = [s.index for s in sites]
    fig = plt.Figure(figsize=(max(6.0, min(16.0, 0.16 * len(sites) + 4)), 4.0))
    ax = fig.subplots()
    ax.semilogy(
        x,
        [_floor(s.row_err.max if s.row_err else None) for s in sites],
        "o-",
        ms=3.5,
        lw=1.2,
        label="rows: max_i |sum_j H_ij - 1|",
        color="tab:blue",
    )
    ax.semilogy(
        x,
        [_floor(s.col_err.max if s.col_err else None) for s in sites],
        "s-",
        ms=3.5,
        lw=1.2,
        label="columns: max_j |sum_i H_ij - 1|",
        color="tab:orange",
    )
    ax.axhline(report.tol, color="0.4", ls="--", lw=0.9, label=f"tol = {report.tol:.0e}")
    na = [s.index for s in report.sites if not s.applicable]
    for i in na:
        ax.axvline(i, color="0.85", lw=0.8, zorder=0)
    if na:
        ax.plot([], [], color="0.85", lw=2, label="unconstrained site (n/a)")
    if len(sites) <= 24:
        ax.set_xticks(x)
        ax.set_xticklabels([s.name for s in sites], rotation=60, ha="right", fontsize=7)
        ax.set_xlabel("site")
    else:
        ax.set_xlabel("site index (attn_0, ffn_0, attn_1, ...)")
    ax.set_ylabel("doubly-stochastic error (max over tokens)")
    ax.set_title(f"H_res error per site\n{_title_suffix(report)}", fontsize=9)
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    path = _save(fig, out / "stochasticity_error_per_site.png")
    return path


def _plot_convergence(report: StochasticityReport, plt: Any, out: Path) -> Path | None:
    curves = [c for c in report.curves if any(math.isfinite(v) for v in (*c.row_err_max, *c.col_err_max))]
    if not curves:
        return None
    fig = plt.Figure(figsize=(7.0, 4.2))
    ax = fig.subplots()
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for j, c in enumerate(curves):
        k = list(range(1, len(c.row_err_max) + 1))
        col = colors[j % len(colors)]
        ax.semilogy(k, [_floor(v) for v in c.row_err_max], "-", color=col, lw=1.4, label=f"{c.name}: rows")
        ax.semilogy(
            k, [_floor(v) for v in c.col_err_max], "--", color=col, lw=1.4, label=f"{c.name}: columns"
        )
    iters = sorted({c.iters for c in curves})
    for it in iters:
        ax.axvline(it, color="0.5", ls=":", lw=1.0)
        ax.annotate(
            f"{it} iters",
            (it, 1.0),
            xycoords=("data", "axes fraction"),
            xytext=(3, -12),
            textcoords="offset points",
            fontsize=7,
            color="0.35",
        )
    ax.axhline(report.tol, color="0.4", ls="-.", lw=0.9, label=f"tol = {report.tol:.0e}")
    ax.set_xlabel("Sinkhorn iterations")
    ax.set_ylabel("error after k iterations (max over tokens)")
    ax.set_xlim(1, max(len(c.row_err_max) for c in curves))
    ax.set_title(
        f"Sinkhorn convergence, worst {len(curves)} site(s)\n{_title_suffix(report)}", fontsize=9
    )
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(fontsize=7, loc="best", ncol=2 if len(curves) > 1 else 1)
    path = _save(fig, out / "stochasticity_convergence.png")
    return path


def _plot_heatmaps(report: StochasticityReport, plt: Any, out: Path) -> Path | None:
    import numpy as np
    from matplotlib.colors import TwoSlopeNorm

    maps = report.heatmaps
    if not maps:
        return None
    n = max(len(h.matrix) for h in maps)
    size = max(2.6, 0.55 * (n + 1) + 0.8)
    fig = plt.Figure(figsize=(size * len(maps) + 0.9, size + 0.7), layout="constrained")
    axes = fig.subplots(1, len(maps), squeeze=False)

    def scale(M: Any) -> tuple[Any, str]:
        # each panel its own colour scale: an HC matrix (entries ~5) would wash out an mHC one (entries <= 1);
        # signed matrices get a diverging map centred on 0
        finite = M[np.isfinite(M)]
        if finite.size == 0:
            return plt.Normalize(vmin=0.0, vmax=1.0), "Blues"
        lo, hi = float(finite.min()), float(finite.max())
        if lo < 0 < hi:
            return TwoSlopeNorm(vcenter=0.0, vmin=lo, vmax=hi), "RdBu_r"
        return plt.Normalize(vmin=min(lo, 0.0), vmax=max(hi, 1.0)), "Blues"

    annotate = n <= 12
    fs = 7 if n <= 6 else 5
    for ax, h in zip(axes[0], maps, strict=True):
        M = np.asarray(h.matrix, dtype=float)
        k = M.shape[0]
        norm, cmap = scale(M)
        im = ax.imshow(M, cmap=cmap, norm=norm, extent=(-0.5, k - 0.5, k - 0.5, -0.5))
        # margins: row sums right (column k), column sums below (row k), drawn as grey cells
        for i in range(k):
            ax.add_patch(plt.Rectangle((k - 0.5, i - 0.5), 1, 1, color="0.92", ec="white"))
            ax.add_patch(plt.Rectangle((i - 0.5, k - 0.5), 1, 1, color="0.92", ec="white"))
            if annotate:
                ax.text(k, i, f"{h.row_sums[i]:.2f}", ha="center", va="center", fontsize=fs, weight="bold")
                ax.text(i, k, f"{h.col_sums[i]:.2f}", ha="center", va="center", fontsize=fs, weight="bold")
        if annotate:
            for i in range(k):
                for j in range(k):
                    v = M[i, j]
                    dark = abs(norm(v) - 0.5) > 0.3 if cmap == "RdBu_r" else norm(v) > 0.6
                    ax.text(
                        j,
                        i,
                        f"{v:.2f}",
                        ha="center",
                        va="center",
                        fontsize=fs,
                        color="white" if dark else "black",
                    )
        ax.set_xlim(-0.5, k + 0.5)
        ax.set_ylim(k + 0.5, -0.5)
        ax.axhline(k - 0.5, color="0.3", lw=0.8, zorder=3)
        ax.axvline(k - 0.5, color="0.3", lw=0.8, zorder=3)
        ticks = list(range(k + 1))
        ax.set_xticks(ticks)
        ax.set_xticklabels([str(j) for j in range(k)] + ["row\nsum"], fontsize=7)
        ax.set_yticks(ticks)
        ax.set_yticklabels([str(i) for i in range(k)] + ["col\nsum"], fontsize=7)
        ax.set_xlabel("input stream j", fontsize=8)
        if ax is axes[0][0]:
            ax.set_ylabel("output stream i", fontsize=8)
        ax.set_title(f"{h.name} (site {h.index})", fontsize=9)
        for sp in ax.spines.values():
            sp.set_visible(False)
        fig.colorbar(im, ax=ax, shrink=0.75, label="entry (token mean)" if ax is axes[0][-1] else None)
    fig.suptitle(
        f"Token-mean H_res, paper convention (row i builds output stream i)\n{_title_suffix(report)}",
        fontsize=9,
    )
    path = _save(fig, out / "stochasticity_heatmaps.png")
    return path


def plot_stochasticity(report: StochasticityReport, out_dir: str | os.PathLike[str]) -> list[Path]:
    """Write the report's figures into ``out_dir`` (must exist); return the paths written, in order:
    error per site (if any site is constrained), convergence (if any Sinkhorn site), heatmaps (any site)."""
    import types

    import matplotlib
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.colors import Normalize
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    def figure(**kw: Any) -> Any:
        fig = Figure(**kw)
        FigureCanvasAgg(fig)
        return fig

    # the few names the plotting helpers need, without pyplot's global state
    plt = types.SimpleNamespace(
        Figure=figure, Rectangle=Rectangle, Normalize=Normalize, rcParams=matplotlib.rcParams
    )

    out = Path(out_dir)
    if not out.is_dir():
        raise UsageError(
            f"output directory {out} does not exist; create it or choose another", "--output-dir"
        )
    written: list[Path] = []
    with matplotlib.rc_context({"font.size": 8, "axes.titlesize": 9, "figure.dpi": 100}):
        for fn in (_plot_per_site, _plot_convergence, _plot_heatmaps):
            p = fn(report, plt, out)
            if p is not None:
                written.append(p)
    return written

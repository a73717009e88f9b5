"""Figures for a :class:`~hcdiag.stochasticity.StochasticityReport` (``hcdiag stochasticity --plot``).

Dimension letters: L sites, n streams, k Sinkhorn iterations.

Three figures (``--fig-format`` png, svg or pdf), each written atomically:

* ``stochasticity_error_per_site``: row and column error (max over tokens) per site, log y, tol line.
* ``stochasticity_convergence``: error after each Sinkhorn iteration 1..100 for the worst sites (max over
  tokens, both axes, log y), the sites' configured iteration count marked.
* ``stochasticity_heatmaps``: token-mean H_res of the first, middle and last sites in the style of mHC
  Fig. 8: one colour scale for all panels, row and column sums written as their deviation from 1.

Exact zeros are marked on the bottom edge of log axes (:func:`hcdiag.plot_common.log_curve`). matplotlib is
imported inside the functions (Agg canvas, no pyplot), so ``import hcdiag`` stays light.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hcdiag.errors import UsageError
from hcdiag.plot_common import (
    RC,
    FigOptions,
    MatrixPanel,
    draw_matrices,
    legend_columns,
    log_curve,
    log_limits,
    new_figure,
    panel_size,
    save,
    settle,
    site_axis,
    wrap,
    zero_handle,
)

if TYPE_CHECKING:
    from hcdiag.stochasticity import StochasticityReport

__all__ = ["plot_stochasticity", "stochasticity_figures"]


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


def _value(v: float | None) -> float:
    return math.nan if v is None or not math.isfinite(v) else v


def _over_tokens(report: StochasticityReport) -> str:
    """What the plotted error is taken over: ``max over 64 tokens``, nothing with one token (static probe)."""
    tokens = sorted({s.tokens for s in report.sites})
    return "" if tokens == [1] else f"max over {', '.join(str(t) for t in tokens)} tokens"


def _title(fig: Any, text: str) -> None:
    fig.suptitle(wrap(text, fig, 9), fontsize=9)


def _legend(fig: Any, ax: Any, zeros: bool) -> None:
    handles, labels = ax.get_legend_handles_labels()
    if zeros:
        handles.append(zero_handle())
        labels.append(handles[-1].get_label())
    fig.legend(handles, labels, loc="outside lower center", ncol=legend_columns(fig, labels), fontsize=7)
    settle(fig)


def _fig_per_site(report: StochasticityReport, opts: FigOptions) -> Any | None:
    sites = [s for s in report.sites if s.applicable]
    if not sites:
        return None
    L = len(report.sites)
    fig = new_figure((max(6.0, min(16.0, 0.16 * L + 4)), 4.6), opts)
    ax = fig.subplots()
    x = [s.index for s in sites]
    rows = [_value(s.row_err.max if s.row_err else None) for s in sites]
    cols = [_value(s.col_err.max if s.col_err else None) for s in sites]
    zeros = log_curve(ax, x, rows, marker="o", ms=3.5, lw=1.2, color="tab:blue",
                      label="rows: max_i |sum_j H_ij - 1|")
    zeros |= log_curve(ax, x, cols, marker="s", ms=3.5, lw=1.2, color="tab:orange", linestyle="--",
                       label="columns: max_j |sum_i H_ij - 1|")
    ax.axhline(report.tol, color="0.4", ls=":", lw=1.0, label=f"tol = {report.tol:.0e}")
    na = [s.index for s in report.sites if not s.applicable]
    for i in na:
        ax.axvline(i, color="0.85", lw=3, zorder=0)
    if na:
        ax.plot([], [], color="0.85", lw=3, label="unconstrained site (n/a)")
    first = min(s.index for s in report.sites)
    site_axis(ax, [s.name for s in sorted(report.sites, key=lambda s: s.index)], first)
    over = _over_tokens(report)
    if log_limits(ax, [rows, cols], [report.tol]):
        ax.set_ylabel(f"error ({over + ', ' if over else ''}log)")
    else:
        ax.set_ylabel(f"error{' (' + over + ')' if over else ''}: all exactly 0")
    ax.grid(True, which="major", alpha=0.3)
    _title(fig, f"H_res doubly-stochastic error per site\n{_title_suffix(report)}")
    _legend(fig, ax, zeros)
    return fig


def _fig_convergence(report: StochasticityReport, opts: FigOptions) -> Any | None:
    curves = [c for c in report.curves if any(math.isfinite(v) for v in (*c.row_err_max, *c.col_err_max))]
    if not curves:
        return None
    import matplotlib

    fig = new_figure((7.0, 5.0), opts)
    ax = fig.subplots()
    colors = matplotlib.rcParams["axes.prop_cycle"].by_key()["color"]
    zeros = False
    arrays = []
    for j, c in enumerate(curves):
        k = list(range(1, len(c.row_err_max) + 1))
        col = colors[j % len(colors)]
        rows, cols = [_value(v) for v in c.row_err_max], [_value(v) for v in c.col_err_max]
        zeros |= log_curve(ax, k, rows, linestyle="-", color=col, lw=1.4, label=f"{c.name}: rows")
        zeros |= log_curve(ax, k, cols, linestyle="--", color=col, lw=1.4, label=f"{c.name}: columns")
        arrays += [rows, cols]
    for it in sorted({c.iters for c in curves}):
        ax.axvline(it, color="0.5", ls=":", lw=1.0)
    ax.plot([], [], color="0.5", ls=":", lw=1.0,
            label="configured iterations (" + ", ".join(str(i) for i in sorted({c.iters for c in curves})) + ")")
    ax.axhline(report.tol, color="0.4", ls="-.", lw=0.9, label=f"tol = {report.tol:.0e}")
    ax.set_xlabel("Sinkhorn iterations k")
    log_limits(ax, arrays, [report.tol])
    over = _over_tokens(report)
    ax.set_ylabel(f"error after k iterations{' (' + over + ')' if over else ''}")
    ax.set_xlim(1, max(len(c.row_err_max) for c in curves))
    ax.grid(True, which="major", alpha=0.3)
    _title(fig, f"Sinkhorn convergence, worst {len(curves)} site(s)\n{_title_suffix(report)}")
    _legend(fig, ax, zeros)
    return fig


def _fig_heatmaps(report: StochasticityReport, opts: FigOptions) -> Any | None:
    maps = report.heatmaps
    if not maps:
        return None
    n = max(len(h.matrix) for h in maps)
    fig = new_figure(panel_size(n, len(maps)), opts)
    tokens = sorted({h.tokens for h in maps})
    what = "H_res" if tokens == [1] else f"token-mean H_res ({', '.join(str(t) for t in tokens)} tokens)"
    _title(fig, f"{what}, paper convention (row i builds output stream i)\n{_title_suffix(report)}")
    draw_matrices(fig, [MatrixPanel(h.matrix, h.name) for h in maps], label="entry")
    return fig


def stochasticity_figures(report: StochasticityReport, opts: FigOptions | None = None) -> dict[str, Any]:
    """The report's figures by file stem (matplotlib Figures, not yet written): error per site (if any site is
    constrained), convergence (if any Sinkhorn site), heatmaps (any site)."""
    import matplotlib

    opts = opts or FigOptions()
    figs: dict[str, Any] = {}
    with matplotlib.rc_context(RC):
        for stem, fn in (
            ("stochasticity_error_per_site", _fig_per_site),
            ("stochasticity_convergence", _fig_convergence),
            ("stochasticity_heatmaps", _fig_heatmaps),
        ):
            fig = fn(report, opts)
            if fig is not None:
                figs[stem] = fig
    return figs


def plot_stochasticity(
    report: StochasticityReport, out_dir: str | os.PathLike[str], opts: FigOptions | None = None
) -> list[Path]:
    """Write the report's figures into ``out_dir`` (must exist); return the paths written, in order."""
    out = Path(out_dir)
    if not out.is_dir():
        raise UsageError(f"output directory {out} does not exist; create it or choose another", "--output-dir")
    opts = opts or FigOptions()
    import matplotlib

    with matplotlib.rc_context(RC):
        return [save(fig, out, stem, opts) for stem, fig in stochasticity_figures(report, opts).items()]

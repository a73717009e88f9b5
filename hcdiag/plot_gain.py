"""Figures of a :class:`hcdiag.gain.GainReport`, in the style of mHC Figs. 3, 7 and 8.

Dimension letters: L sites (x axis, labelled with the table's site names attn_0, ffn_0, ...), n streams
(heatmaps are n x n), S seeds, T tokens.

What a figure says is what the data hold: a band only when there is a spread (over S > 1 seeds, else over
T > 1 tokens) and the legend says over what; variants whose curves coincide share one legend entry
("a = b (coincide)"); the others carry their own colour, line style and staggered markers, so curves close
together stay distinguishable. Log axes mark exact zeros on their bottom edge. One legend per figure, placed
by constrained layout outside the axes. matplotlib is imported inside the functions (Agg canvas, no pyplot),
so ``import hcdiag`` stays light; files are written atomically in ``--fig-format``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from hcdiag.plot_common import (
    RC,
    FigOptions,
    MatrixPanel,
    draw_matrices,
    group_label,
    groups,
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
    from hcdiag.gain import GainReport, VariantGain

__all__ = ["gain_figures", "plot_gain"]

# one fixed colour / marker per variant (registry display order), so figures of different runs agree
_COLORS = {
    "identity": "#7f7f7f",
    "hc-static": "#d62728",
    "hc-dynamic": "#ff7f0e",
    "mhc": "#1f77b4",
    "mhc-lite": "#2ca02c",
    "kromhc": "#9467bd",
    "tbp": "#8c564b",
    "ihc": "#17becf",
}
_STYLES = ["-", "--", "-.", ":"]
_MARKERS = ["o", "s", "^", "D", "v", "P", "X", "*"]
_FALLBACK = ["#e377c2", "#bcbd22", "#393b79", "#637939", "#8c6d31", "#843c39"]


def gain_figures(report: GainReport, opts: FigOptions | None = None) -> dict[str, Any]:
    """The figures of ``report`` by file stem (matplotlib Figures, not yet written):

    gain-sites              single-site G_f(H_l), G_b(H_l) per site (mHC Figs. 3a / 7a)
    gain-composite          G_f(H_l...H_1), G_b(H_L...H_l) per site (mHC Figs. 3b / 7b); log y when a value
                            exceeds 10, then a second row with the bounded variants on a linear axis
    gain-collapse           sigma_2, ||F - J/n||_F, ||F - I||_F and the doubly-stochastic error of F_l
    gain-heatmap-<variant>  H_1 and the composites of the first half, second half and all sites, one colour
                            scale, row and column sums as deviations from 1 (mHC Fig. 8)
    """
    import matplotlib

    opts = opts or FigOptions()
    ok = [v for v in report.variants if v.ok]
    figs: dict[str, Any] = {}
    if not ok:
        return figs
    with matplotlib.rc_context(RC):
        figs["gain-sites"] = _fig_sites(report, ok, opts)
        figs["gain-composite"] = _fig_composite(report, ok, opts)
        figs["gain-collapse"] = _fig_collapse(report, ok, opts)
        for v in ok:
            figs[f"gain-heatmap-{_slug(v.name)}"] = _fig_heatmaps(report, v, opts)
    return figs


def plot_gain(report: GainReport, out_dir: str | os.PathLike[str], opts: FigOptions | None = None) -> list[Path]:
    """Write :func:`gain_figures` into ``out_dir`` (created if missing); return the paths, in order."""
    import matplotlib

    from hcdiag.fileio import ensure_dir

    out = ensure_dir(out_dir)
    opts = opts or FigOptions()
    with matplotlib.rc_context(RC):
        return [save(fig, out, stem, opts) for stem, fig in gain_figures(report, opts).items()]


# ------------------------------------------------------------------------------------------------------------
# what the curves are


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "-" for c in name)


def _spread(report: GainReport) -> tuple[tuple[str, str] | None, str, str]:
    """(band statistics or None, what the line is, what the band is)."""
    S = int(report.inputs.get("seeds") or 1)
    T = int(report.inputs.get("tokens") or 1)
    if S > 1:
        return ("min", "max"), f"median over {S} seeds", f"band: min to max over {S} seeds"
    if T > 1:
        return ("token_min", "token_max"), f"mean over {T} tokens", f"band: min to max over {T} tokens"
    return None, "", ""


def _style(report: GainReport, name: str) -> dict[str, Any]:
    names = [v.name for v in report.variants]
    i = names.index(name) if name in names else 0
    L = report.sites
    step = max(1, L // 8)
    return {
        "color": _COLORS.get(name, _FALLBACK[i % len(_FALLBACK)]),
        "linestyle": _STYLES[i % len(_STYLES)],
        "linewidth": 1.5,
        "marker": _MARKERS[i % len(_MARKERS)],
        "markersize": 4,
        # staggered markers: curves on top of each other still show every variant's marker
        "markevery": ((i * step) // max(1, len(names)), step),
    }


def _subtitle(report: GainReport, only: VariantGain | None = None) -> str:
    """One line naming n, L, init / scale, seeds, tokens, Sinkhorn settings (of ``only``, else of every
    variant) and dtype."""
    inp = report.inputs
    L = report.sites
    parts = [f"n = {inp.get('n')}"]
    tokens = int(inp.get("tokens") or 1)
    if inp.get("source") == "checkpoint":
        parts.append(f"L = {L} sites ({Path(str(inp.get('path'))).name}, layout {inp.get('layout')})")
        probe = inp.get("probe") or {}
        parts.append(f"probe {probe.get('kind', '?')}, {tokens} token{'s' if tokens != 1 else ''}")
    else:
        parts.append(f"L = {L} sites ({inp.get('layers')} blocks)")
        init = inp.get("init")
        parts.append(f"init {init}" + (f", s = {inp.get('logit_scale'):g}" if init == "perturb" else ""))
        seeds = int(inp.get("seeds") or 1)
        parts.append(f"{seeds} seed{'s' if seeds != 1 else ''}")
        if tokens > 1:
            parts.append(f"{tokens} tokens")
    pool = [only] if only is not None else list(report.variants)
    sk = sorted({f"{d['convention']}, {d['iters']} iters" for v in pool if (d := v.sinkhorn)})
    if sk:
        parts.append("Sinkhorn " + "; ".join(sk))
    elif only is None:
        parts.append("no Sinkhorn sites")
    parts.append(str(inp.get("dtype")))
    return ", ".join(parts)


def _title(fig: Any, text: str) -> None:
    fig.suptitle(wrap(text, fig, 10), fontsize=10)


def _skipped(report: GainReport) -> str:
    skipped = [f"{v.name} ({v.reason.split(';')[0].split('(')[0].strip()})" for v in report.variants if not v.ok]
    return ("skipped: " + "; ".join(skipped)) if skipped else ""


def _metric_arrays(v: VariantGain, metrics: tuple[str, ...], band: tuple[str, str] | None) -> list[np.ndarray]:
    stats = ("median", *(band or ()))
    out = [v.curves[m][s] for m in metrics for s in stats]
    if v.token_mean_curves is not None:
        out += [v.token_mean_curves[m]["median"] for m in metrics if m in v.token_mean_curves]
    return out


class _Panels:
    """The variants of one figure grouped by coincidence; draws and builds the one figure legend."""

    def __init__(self, report: GainReport, ok: list[VariantGain], metrics: tuple[str, ...]) -> None:
        self.report = report
        self.band, self.line_what, self.band_what = _spread(report)
        by_name = {v.name: v for v in ok}
        self.groups = groups(list(by_name), lambda name: _metric_arrays(by_name[name], metrics, self.band))
        self.shown = [by_name[g[0]] for g in self.groups]  # one representative per group
        self.labels = {g[0]: group_label(g) for g in self.groups}
        self.zeros = False
        self.token_mean = False

    def curve(self, ax: Any, x: np.ndarray, st: dict[str, np.ndarray], style: dict[str, Any], log: bool) -> None:
        y = st["median"]
        if log:
            self.zeros |= log_curve(ax, x, y, **style)
        else:
            ax.plot(x, y, **style)
        if self.band and not np.array_equal(st[self.band[0]], st[self.band[1]], equal_nan=True):
            lo, hi = st[self.band[0]], st[self.band[1]]
            if log:
                lo, hi = np.where(lo > 0, lo, np.nan), np.where(hi > 0, hi, np.nan)
            ax.fill_between(x, lo, hi, color=style["color"], alpha=0.16, linewidth=0)

    def legend(self, fig: Any) -> None:
        from matplotlib.lines import Line2D
        from matplotlib.patches import Patch

        handles: list[Any] = []
        for v in self.shown:
            st = {k: val for k, val in _style(self.report, v.name).items() if k != "markevery"}
            handles.append(Line2D([], [], label=wrap(self.labels[v.name], fig, 7, share=0.3), **st))
        if self.line_what:
            handles.append(Line2D([], [], color="0.3", label=f"line: {self.line_what}"))
        if self.band and any(_has_spread(v, self.band) for v in self.shown):
            handles.append(Patch(color="0.3", alpha=0.16, label=self.band_what))
        if self.token_mean:
            handles.append(Line2D([], [], color="0.3", linestyle=":", linewidth=1.1,
                                  label="dotted: composite of the token-mean matrices"))
        if self.zeros:
            handles.append(zero_handle())
        if skipped := _skipped(self.report):  # in the legend, so that constrained layout keeps it clear
            handles.append(Line2D([], [], linestyle="none", label=wrap(skipped, fig, 7, share=0.3)))
        ncol = legend_columns(fig, [h.get_label() for h in handles])
        fig.legend(handles=handles, loc="outside lower center", ncol=ncol)
        settle(fig)


def _has_spread(v: VariantGain, band: tuple[str, str]) -> bool:
    return any(not np.array_equal(st[band[0]], st[band[1]], equal_nan=True) for st in v.curves.values())


def _wants_log(arrays: list[np.ndarray]) -> bool:
    vals = np.concatenate([np.asarray(a, dtype=float).ravel() for a in arrays])
    vals = vals[np.isfinite(vals)]
    pos = vals[vals > 0]
    if pos.size == 0 or (vals < 0).any():
        return False
    return bool(pos.max() > 10 or pos.max() / pos.min() > 100)


def _linear_limits(ax: Any, arrays: list[np.ndarray], pad_min: float = 0.02) -> None:
    vals = np.concatenate([np.asarray(a, dtype=float).ravel() for a in arrays])
    vals = vals[np.isfinite(vals)]
    lo, hi = (float(vals.min()), float(vals.max())) if vals.size else (0.0, 1.0)
    pad = max(pad_min, 0.08 * (hi - lo))
    ax.set_ylim(lo - pad, hi + pad)


def _y_axis(ax: Any, arrays: list[np.ndarray], force_log: bool = False) -> None:
    """Log y (``log_limits``) when asked or when the values span orders of magnitude, else linear."""
    if not ((force_log or _wants_log(arrays)) and log_limits(ax, arrays)):
        _linear_limits(ax, arrays)
    ax.grid(True, which="major", alpha=0.3)


def _panel_arrays(p: _Panels, group: list[VariantGain], metric: str) -> list[np.ndarray]:
    stats = ("median", *(p.band or ()))
    return [v.curves[metric][s] for v in group for s in stats]


def _coincide_note(p: _Panels, metric: str) -> str:
    """Groups that coincide in this panel only (beyond the figure's own groups), for the panel title."""
    by_name = {v.name: v for v in p.shown}
    stats = ("median", *(p.band or ()))
    local = groups(list(by_name), lambda name: [by_name[name].curves[metric][s] for s in stats])
    joined = [" = ".join(g) for g in local if len(g) > 1]
    return ("\ncoincide here: " + "; ".join(joined)) if joined else ""


# ------------------------------------------------------------------------------------------------------------
# figures


def _fig_sites(report: GainReport, ok: list[VariantGain], opts: FigOptions) -> Any:
    metrics = ("site_gain_fwd", "site_gain_bwd")
    p = _Panels(report, ok, metrics)
    fig = new_figure((13, 5.0), opts)
    axes = fig.subplots(1, 2)
    _title(fig, f"Single-site gain (Amax Gain Magnitude of H_l)\n{_subtitle(report)}")
    x = np.arange(1, report.sites + 1)
    for ax, metric, what in (
        (axes[0], "site_gain_fwd", "forward gain  G_f(H_l) = max_i |row sum|"),
        (axes[1], "site_gain_bwd", "backward gain  G_b(H_l) = max_j |column sum|"),
    ):
        arrays = _panel_arrays(p, p.shown, metric)
        log = _wants_log(arrays)
        for v in p.shown:
            p.curve(ax, x, v.curves[metric], _style(report, v.name), log)
        _y_axis(ax, arrays)
        ax.set_title(wrap(what + _coincide_note(p, metric), fig, 8.5, share=0.5))
        ax.set_ylabel("gain")
        site_axis(ax, report.site_names, first=1)
    p.legend(fig)
    return fig


def _fig_composite(report: GainReport, ok: list[VariantGain], opts: FigOptions) -> Any:
    """Top row: every variant (log y when needed). When unbounded variants (gain > 10) share the figure with
    bounded ones, a second row repeats the bounded ones on a linear axis, as mHC shows HC (Fig. 3) and mHC
    (Fig. 7) apart: otherwise mHC's 1.6 is a flat line under HC's 3000."""
    metrics = ("gain_fwd", "gain_bwd")
    p = _Panels(report, ok, metrics)

    def peak(v: VariantGain) -> float:
        return float(max(np.nanmax(v.curves["gain_fwd"]["max"]), np.nanmax(v.curves["gain_bwd"]["max"])))

    bounded = [v for v in p.shown if peak(v) <= 10]
    split = 0 < len(bounded) < len(p.shown)
    nrows = 2 if split else 1
    fig = new_figure((13, 4.6 * nrows + 0.6), opts)
    axes = np.atleast_2d(fig.subplots(nrows, 2))
    how = f" ({p.line_what}{', ' + p.band_what if p.band else ''})" if p.line_what else ""
    _title(fig, f"Composite gain across depth{how}\n{_subtitle(report)}")
    x = np.arange(1, report.sites + 1)
    rows = [(p.shown, "")] + ([(bounded, "bounded variants only, linear axis: ")] if split else [])
    for r, (group, prefix) in enumerate(rows):
        for ax, metric, what in (
            (axes[r][0], "gain_fwd", "forward  G_f(H_l ... H_1)"),
            (axes[r][1], "gain_bwd", "backward  G_b(H_L ... H_l)"),
        ):
            arrays = _panel_arrays(p, group, metric)
            log = r == 0 and _wants_log(arrays)
            for v in group:
                st = _style(report, v.name)
                p.curve(ax, x, v.curves[metric], st, log)
                if v.token_mean_curves is not None:
                    p.token_mean = True
                    thin = {**st, "linestyle": ":", "linewidth": 1.1, "marker": None}
                    tm = v.token_mean_curves[metric]["median"]
                    if log:
                        p.zeros |= log_curve(ax, x, tm, **thin)
                    else:
                        ax.plot(x, tm, **thin)
                    arrays.append(tm)
            if log:
                _y_axis(ax, arrays, force_log=True)
            else:
                _linear_limits(ax, arrays, pad_min=0.02 if r == 0 else 0.002)
                ax.grid(True, alpha=0.3)
            ax.set_title(wrap(prefix + what + (_coincide_note(p, metric) if r == 0 else ""), fig, 8.5, share=0.5))
            ax.set_ylabel("composite gain")
            site_axis(ax, report.site_names, first=1)
    p.legend(fig)
    return fig


def _fig_collapse(report: GainReport, ok: list[VariantGain], opts: FigOptions) -> Any:
    panels = [
        ("sigma2", "second singular value  sigma_2(F_l)"),
        ("dist_uniform", "distance to uniform mixing  ||F_l - J/n||_F"),
        ("dist_identity", "distance to identity  ||F_l - I||_F"),
        ("ds_err", "doubly-stochastic error of F_l: max |row sum - 1| (solid), max |col sum - 1| (dotted)"),
    ]
    metrics = ("sigma2", "dist_uniform", "dist_identity", "row_err", "col_err")
    p = _Panels(report, ok, metrics)
    fig = new_figure((13, 8.5), opts)
    axes = fig.subplots(2, 2).ravel()
    _title(fig, f"Forward composite F_l = H_l ... H_1: stream collapse and doubly-stochastic error\n"
                f"{_subtitle(report)}")
    x = np.arange(1, report.sites + 1)
    for ax, (metric, title) in zip(axes, panels, strict=True):
        if metric == "ds_err":
            arrays = [v.curves[m]["max"] for v in p.shown for m in ("row_err", "col_err")]
            log = log_limits(ax, arrays)  # errors span rounding (1e-16) to overflow: always log when possible
            for v in p.shown:
                st = _style(report, v.name)
                for m, ls in (("row_err", "-"), ("col_err", ":")):
                    y = v.curves[m]["max"]
                    if log:
                        p.zeros |= log_curve(ax, x, y, **{**st, "linestyle": ls})
                    else:
                        ax.plot(x, y, **{**st, "linestyle": ls})
            if not log:
                _linear_limits(ax, arrays)
                title += "\nall exactly 0"
            ax.grid(True, which="major", alpha=0.3)
            note = ""
        else:
            arrays = _panel_arrays(p, p.shown, metric)
            log = _wants_log(arrays)
            for v in p.shown:
                p.curve(ax, x, v.curves[metric], _style(report, v.name), log)
            _y_axis(ax, arrays, force_log=log)
            note = _coincide_note(p, metric)
        ax.set_title(wrap(title + note, fig, 8.5, share=0.5))
        site_axis(ax, report.site_names, first=1)
    p.legend(fig)
    return fig


def _fig_heatmaps(report: GainReport, v: VariantGain, opts: FigOptions) -> Any:
    L = report.sites
    h = L // 2
    names = report.site_names
    titles = {
        "site_1": f"H_1\n(site {names[0]})",
        "first_half": f"H_{h} ... H_1\n(sites {names[0]} ... {names[h - 1]})",
        "second_half": f"H_{L} ... H_{h + 1}\n(sites {names[h]} ... {names[L - 1]})",
        "all": f"H_{L} ... H_1\n(all {L} sites)",
    }
    keys = [k for k in ("site_1", "first_half", "second_half", "all") if k in v.heatmaps]
    mats = [np.asarray(v.heatmaps[k], dtype=float) for k in keys]
    fig = new_figure(panel_size(int(mats[0].shape[0]), len(keys)), opts)
    seed_note = ""
    if report.inputs.get("source") != "checkpoint" and (report.inputs.get("seeds") or 1) > 1:
        seed_note = f"; seed {v.heatmap_seed} (median by final max(G_f, G_b))"
    tok = "token-mean matrices; " if v.token_mean_curves is not None else ""
    _title(fig, f"{v.name}: H_res and depth composites, paper convention (row i = output stream i){seed_note}\n"
                f"{tok}{_subtitle(report, v)}")
    panels = []
    for k, M in zip(keys, mats, strict=True):
        t = titles[k] + ("\noverflowed: inf / NaN entries (grey)" if not np.isfinite(M).all() else "")
        panels.append(MatrixPanel(M, t))
    draw_matrices(fig, panels, label="entry")
    return fig

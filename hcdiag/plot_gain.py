"""PNG plots of a :class:`hcdiag.gain.GainReport`, in the style of mHC Figs. 3, 7 and 8.

Dimension letters: L sites (x axis, 1..L), n streams (heatmaps are n x n).

matplotlib is imported inside the plotting function (Agg canvas, no pyplot, no global backend switch), so
``import hcdiag`` stays light and a missing matplotlib only fails the ``--plot`` call. Files are written to a
temporary name and renamed into place.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from hcdiag.gain import GainReport, VariantGain

__all__ = ["plot_gain"]

DPI = 200
# one fixed colour / line style per variant (registry display order), so figures of different runs agree
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
_FALLBACK = ["#e377c2", "#bcbd22", "#393b79", "#637939", "#8c6d31", "#843c39"]


def plot_gain(report: GainReport, out_dir: str | Path) -> list[Path]:
    """Write the gain figures for ``report`` into ``out_dir``; return their paths.

    gain-sites.png       single-site G_f(H_l), G_b(H_l) vs site (mHC Figs. 3a / 7a)
    gain-composite.png   G_f(H_l...H_1), G_b(H_L...H_l) vs site, median over seeds with a min-max band
                         (mHC Figs. 3b / 7b); log y-axis when a value exceeds 10
    gain-collapse.png    sigma_2, ||F - J/n||_F, ||F - I||_F and the doubly-stochastic error of F_l = H_l...H_1
    gain-heatmap-<variant>.png   H_1 and the composites of the first half, second half and all sites, with
                         row sums (right) and column sums (bottom) (mHC Fig. 8)
    """
    from matplotlib.figure import Figure  # noqa: F401  (fails here, politely, without matplotlib)

    from hcdiag.fileio import ensure_dir

    out = ensure_dir(out_dir)
    ok = [v for v in report.variants if v.ok]
    files: list[Path] = []
    if not ok:
        return files
    files.append(_save(_fig_sites(report, ok), out / "gain-sites.png"))
    files.append(_save(_fig_composite(report, ok), out / "gain-composite.png"))
    files.append(_save(_fig_collapse(report, ok), out / "gain-collapse.png"))
    for v in ok:
        files.append(_save(_fig_heatmaps(report, v), out / f"gain-heatmap-{_slug(v.name)}.png"))
    return files


# ------------------------------------------------------------------------------------------------------------
# helpers


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "-" for c in name)


def _save(fig: Any, path: Path) -> Path:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    from hcdiag.fileio import atomic_write

    FigureCanvasAgg(fig)
    return atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=DPI), option="--output-dir")


def _style(report: GainReport, name: str) -> dict[str, Any]:
    names = [v.name for v in report.variants]
    i = names.index(name) if name in names else 0
    color = _COLORS.get(name, _FALLBACK[i % len(_FALLBACK)])
    return {"color": color, "linestyle": _STYLES[i % len(_STYLES)], "linewidth": 1.6}


def _subtitle(report: GainReport, only: VariantGain | None = None) -> str:
    """One line naming n, L, init / scale, seeds, tokens, Sinkhorn settings (of ``only``, else of every
    variant) and dtype."""
    inp = report.inputs
    L = report.sites
    parts = [f"n = {inp.get('n')}"]
    if inp.get("source") == "checkpoint":
        parts.append(f"L = {L} sites ({Path(str(inp.get('path'))).name}, layout {inp.get('layout')})")
        probe = inp.get("probe") or {}
        parts.append(f"probe {probe.get('kind', '?')}, {inp.get('tokens')} tokens")
    else:
        parts.append(f"L = {L} sites ({inp.get('layers')} blocks)")
        init = inp.get("init")
        parts.append(f"init {init}" + (f", s = {inp.get('logit_scale'):g}" if init == "perturb" else ""))
        parts.append(f"{inp.get('seeds')} seeds")
        if (inp.get("tokens") or 1) > 1:
            parts.append(f"{inp.get('tokens')} tokens")
    pool = [only] if only is not None else list(report.variants)
    sk = sorted({f"{d['convention']}, {d['iters']} iters" for v in pool if (d := v.sinkhorn)})
    if sk:
        parts.append("Sinkhorn " + "; ".join(sk))
    elif only is None:
        parts.append("no Sinkhorn sites")
    parts.append(str(inp.get("dtype")))
    return ", ".join(parts)


def _footer(fig: Any, report: GainReport) -> None:
    skipped = [f"{v.name} ({v.reason.split(';')[0].split('(')[0].strip()})" for v in report.variants if not v.ok]
    if skipped:
        fig.text(0.01, 0.005, "skipped: " + "; ".join(skipped), fontsize=7, color="#555555", ha="left", va="bottom")


def _band(ax: Any, x: np.ndarray, st: dict[str, np.ndarray], style: dict[str, Any], label: str) -> None:
    ax.plot(x, st["median"], label=label, **style)
    if not np.array_equal(st["min"], st["max"]):
        ax.fill_between(x, st["min"], st["max"], color=style["color"], alpha=0.18, linewidth=0)


def _finalise_y(ax: Any, arrays: list[np.ndarray]) -> None:
    vals = np.concatenate([np.asarray(a, dtype=float).ravel() for a in arrays])
    vals = vals[np.isfinite(vals)]
    if vals.size and (vals.max() > 10 or (vals.min() > 0 and vals.min() < 0.1)) and vals.min() > 0:
        ax.set_yscale("log")
    else:
        lo, hi = (float(vals.min()), float(vals.max())) if vals.size else (0.0, 1.0)
        pad = max(0.02, 0.08 * (hi - lo))
        ax.set_ylim(lo - pad, hi + pad)
    ax.grid(True, which="major", alpha=0.3)


def _label(v: VariantGain, metric: str, stat: str = "median") -> str:
    last = float(v.curves[metric][stat][-1])
    peak = float(np.max(v.curves[metric]["max"]))
    return f"{v.name} (last {_fmt(last)}, max {_fmt(peak)})"


def _fmt(x: float) -> str:
    if not math.isfinite(x):
        return str(x)
    a = abs(x)
    if a != 0 and (a >= 1e4 or a < 1e-3):
        return f"{x:.2e}"
    return f"{x:.4g}"


# ------------------------------------------------------------------------------------------------------------
# figures


def _two_panel(report: GainReport, title: str) -> tuple[Any, Any, Any]:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(13, 5.2), layout="constrained")
    axes = fig.subplots(1, 2, sharex=True)
    fig.suptitle(f"{title}\n{_subtitle(report)}", fontsize=11)
    return fig, axes[0], axes[1]


def _fig_sites(report: GainReport, ok: list[VariantGain]) -> Any:
    fig, ax_f, ax_b = _two_panel(report, "Single-site gain (Amax Gain Magnitude of H_l)")
    x = np.arange(1, report.sites + 1)
    for v in ok:
        st = _style(report, v.name)
        _band(ax_f, x, v.curves["site_gain_fwd"], st, _label(v, "site_gain_fwd"))
        _band(ax_b, x, v.curves["site_gain_bwd"], st, _label(v, "site_gain_bwd"))
    for ax, metric, what in (
        (ax_f, "site_gain_fwd", "forward gain  G_f(H_l) = max_i |row sum|"),
        (ax_b, "site_gain_bwd", "backward gain  G_b(H_l) = max_j |column sum|"),
    ):
        _finalise_y(ax, [v.curves[metric][s] for v in ok for s in ("min", "max")])
        ax.set_title(what, fontsize=10)
        ax.set_xlabel("site index l (2 sites per block)")
        ax.set_ylabel("gain")
        ax.legend(fontsize=7, loc="best", framealpha=0.85)
    _footer(fig, report)
    return fig


def _fig_composite(report: GainReport, ok: list[VariantGain]) -> Any:
    """Top row: every variant (log y when needed). When unbounded variants (gain > 10) share the figure with
    bounded ones, a second row repeats the bounded ones on a linear axis, as mHC shows HC (Fig. 3) and mHC
    (Fig. 7) apart: otherwise mHC's 1.6 is a flat line under HC's 3000."""
    from matplotlib.figure import Figure

    def peak(v: VariantGain) -> float:
        return float(max(np.nanmax(v.curves["gain_fwd"]["max"]), np.nanmax(v.curves["gain_bwd"]["max"])))

    bounded = [v for v in ok if peak(v) <= 10]
    split = 0 < len(bounded) < len(ok)
    nrows = 2 if split else 1
    fig = Figure(figsize=(13, 5.2 * nrows), layout="constrained")
    axes = np.atleast_2d(fig.subplots(nrows, 2, sharex=True))
    fig.suptitle("Composite gain across depth (median over seeds, band: min to max)\n" + _subtitle(report),
                 fontsize=11)
    x = np.arange(1, report.sites + 1)
    rows = [(ok, "")] + ([(bounded, "bounded variants only, linear axis: ")] if split else [])
    for r, (group, prefix) in enumerate(rows):
        ax_f, ax_b = axes[r]
        for v in group:
            st = _style(report, v.name)
            _band(ax_f, x, v.curves["gain_fwd"], st, _label(v, "gain_fwd"))
            _band(ax_b, x, v.curves["gain_bwd"], st, _label(v, "gain_bwd"))
            if v.token_mean_curves is not None:
                thin = {**st, "linestyle": ":", "linewidth": 1.2}
                lab = f"{v.name}, token-mean matrices"
                ax_f.plot(x, v.token_mean_curves["gain_fwd"]["median"], label=lab, **thin)
                ax_b.plot(x, v.token_mean_curves["gain_bwd"]["median"], label=lab, **thin)
        for ax, metric, what in (
            (ax_f, "gain_fwd", "forward  G_f(H_l ... H_1)"),
            (ax_b, "gain_bwd", "backward  G_b(H_L ... H_l)"),
        ):
            arrays = [v.curves[metric][s] for v in group for s in ("min", "max")]
            if r == 0:
                _finalise_y(ax, arrays)
            else:
                vals = np.concatenate(arrays)
                lo, hi = float(np.nanmin(vals)), float(np.nanmax(vals))
                pad = max(0.002, 0.08 * (hi - lo))
                ax.set_ylim(lo - pad, hi + pad)
                ax.grid(True, alpha=0.3)
            ax.set_title(prefix + what, fontsize=10)
            ax.set_xlabel("site index l (2 sites per block)")
            ax.set_ylabel("composite gain")
            ax.legend(fontsize=7, loc="best", framealpha=0.85)
    _footer(fig, report)
    return fig


def _fig_collapse(report: GainReport, ok: list[VariantGain]) -> Any:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(13, 8.5), layout="constrained")
    axes = fig.subplots(2, 2, sharex=True).ravel()
    fig.suptitle(f"Forward composite F_l = H_l ... H_1: stream collapse and doubly-stochastic error\n"
                 f"{_subtitle(report)}", fontsize=11)
    x = np.arange(1, report.sites + 1)
    panels = [
        ("sigma2", "second singular value  sigma_2(F_l)"),
        ("dist_uniform", "distance to uniform mixing  ||F_l - J/n||_F"),
        ("dist_identity", "distance to identity  ||F_l - I||_F"),
        ("ds_err", "doubly-stochastic error: max |row sum - 1| (solid), max |col sum - 1| (dotted)"),
    ]
    for ax, (metric, title) in zip(axes, panels, strict=True):
        arrays: list[np.ndarray] = []
        for v in ok:
            st = _style(report, v.name)
            if metric == "ds_err":
                r, c = v.curves["row_err"]["max"], v.curves["col_err"]["max"]
                ax.plot(x, np.maximum(r, 1e-17), label=f"{v.name} rows", **st)
                ax.plot(x, np.maximum(c, 1e-17), label=f"{v.name} cols",
                        **{**st, "linestyle": ":", "linewidth": 2.0})
                arrays += [np.maximum(r, 1e-17), np.maximum(c, 1e-17)]
            else:
                # floor at 1e-17 so exact zeros (identity: ||F - I|| = 0) stay on a log axis
                floored = {k: np.maximum(a, 1e-17) for k, a in v.curves[metric].items()}
                _band(ax, x, floored, st, v.name)
                arrays += [floored["min"], floored["max"]]
        vals = np.concatenate(arrays)
        vals = vals[np.isfinite(vals)]
        positive = vals[vals > 0]
        if metric == "ds_err" or (positive.size and positive.max() / max(positive.min(), 1e-300) > 100):
            ax.set_yscale("log")
            ax.grid(True, which="major", alpha=0.3)
        else:
            _finalise_y(ax, arrays)
        ax.set_title(title, fontsize=9.5)
        ax.set_xlabel("site index l (2 sites per block)")
        ax.legend(fontsize=6.5, loc="best", ncol=2 if metric == "ds_err" else 1)
    _footer(fig, report)
    return fig


def _fig_heatmaps(report: GainReport, v: VariantGain) -> Any:
    from matplotlib.figure import Figure

    L = report.sites
    h = L // 2
    titles = {
        "site_1": "H_1 (site 1)",
        "first_half": f"H_{h} ... H_1 (sites 1-{h})",
        "second_half": f"H_{L} ... H_{h + 1} (sites {h + 1}-{L})",
        "all": f"H_{L} ... H_1 (all {L} sites)",
    }
    keys = [k for k in ("site_1", "first_half", "second_half", "all") if k in v.heatmaps]
    n = int(np.asarray(v.heatmaps[keys[0]]).shape[0])
    cell = 0.62 if n <= 4 else 0.45 if n <= 8 else 0.32
    side = max(3.4, cell * (n + 1.3))
    fig = Figure(figsize=(side * len(keys) + 0.8, side + 1.3), layout="constrained")
    seed_note = ""
    if report.inputs.get("source") != "checkpoint" and (report.inputs.get("seeds") or 1) > 1:
        seed_note = f"; seed {v.heatmap_seed} (median by final max(G_f, G_b))"
    tok = "token-mean matrices; " if v.token_mean_curves is not None else ""
    fig.suptitle(
        f"{v.name}: H_res and depth composites, paper convention (row i = output stream i){seed_note}\n"
        f"{tok}{_subtitle(report, v)}",
        fontsize=10,
    )
    sub = fig.add_gridspec(1, len(keys))
    for j, key in enumerate(keys):
        _heatmap(fig, sub[0, j], np.asarray(v.heatmaps[key], dtype=float), titles[key])
    return fig


def _num(x: float, decimals: int = 2) -> str:
    return f"{x:.{decimals}f}"


def _heatmap(fig: Any, spec: Any, M: np.ndarray, title: str) -> None:
    """M with its row sums in a column on the right and column sums in a row below (mHC Fig. 8).

    Sum cells are shaded by their deviation from 1 on a fixed scale (white at 1, full colour at +-0.5), so
    rounding-level errors stay white and an mHC-like 0.41 / 1.50 stands out.
    """
    n = M.shape[0]
    ok = np.isfinite(M)  # False where a composite overflowed
    if not ok.all():
        title = f"{title}\noverflowed: inf / NaN entries"
        M = np.where(ok, M, np.nan)
    big = float(np.abs(M[ok]).max()) if ok.any() else 0.0
    k = int(math.floor(math.log10(big))) if big >= 1e3 and math.isfinite(big) else 0
    if k:
        M = M / 10.0**k  # show mantissas; the title carries the factor
        title = f"{title}  [x 1e{k}]"
    gs = spec.subgridspec(2, 2, width_ratios=[n, 1.3], height_ratios=[n, 1.0], wspace=0.03, hspace=0.03)
    ax = fig.add_subplot(gs[0, 0])
    ax_r = fig.add_subplot(gs[0, 1], sharey=ax)
    ax_c = fig.add_subplot(gs[1, 0], sharex=ax)
    rows, cols = M.sum(axis=1), M.sum(axis=0)
    finite = M[ok]
    lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    if lo < -1e-6:
        m = max(abs(lo), abs(hi)) or 1.0
        cmap, vmin, vmax = "RdBu_r", -m, m
    else:
        cmap, vmin, vmax = "Blues", 0.0, max(hi, 1e-12)
    ax.imshow(M, cmap=cmap, vmin=vmin, vmax=vmax, aspect="auto")
    # entries are written into the cells up to n = 8; beyond, 4-point numbers in n^2 cells are unreadable in a
    # figure and drawing them (1,024 texts a figure at n = 16) cost 1.4 s per variant; the sums stay written
    fs = 8 if n <= 4 else 6.5 if n <= 8 else 0
    if fs:
        for i in range(n):
            for j in range(n):
                val = M[i, j]
                frac = (val - vmin) / (vmax - vmin) if vmax > vmin else 0.0
                dark = frac > 0.6 or (cmap == "RdBu_r" and frac < 0.2)
                ax.text(j, i, _num(val), ha="center", va="center", fontsize=fs, color="white" if dark else "black")
    if not fs and finite.size:  # no numbers in the cells: say what the colour scale spans
        which = "entries" if finite.size == M.size else "finite entries"
        title = f"{title}\n{which} {lo:.3g} to {hi:.3g}"
    ax.set_title(title, fontsize=8.5)
    tick_fs = 7 if n <= 8 else 5
    ax.set_xticks(range(n), [str(i + 1) for i in range(n)], fontsize=tick_fs)
    ax.set_yticks(range(n), [str(i + 1) for i in range(n)], fontsize=tick_fs)
    ax.tick_params(length=0, labelbottom=False, labeltop=True)
    ax.set_xlabel("input stream j", fontsize=7)
    ax.xaxis.set_label_position("top")
    ax.set_ylabel("output stream i", fontsize=7)
    for axm, sums, shape in ((ax_r, rows, (n, 1)), (ax_c, cols, (1, n))):
        dev = (sums - 1).reshape(shape)
        axm.imshow(dev, cmap="PuOr_r", vmin=-0.5, vmax=0.5, aspect="auto")
        axm.tick_params(length=0, labelleft=False, labelbottom=False, labeltop=False)
        sfs = fs or (4.0 if n <= 16 else 0)
        if sfs:
            for k, s_ in enumerate(sums):
                i, j = (k, 0) if shape == (n, 1) else (0, k)
                strong = abs(float(s_) - 1) > 0.3
                axm.text(j, i, _num(float(s_), 3), ha="center", va="center", fontsize=sfs,
                         fontweight="bold", color="white" if strong else "black")
    ax_r.set_title("row sums", fontsize=6.5)
    ax_r.set_xticks([])
    ax_c.set_yticks([])
    ax_c.set_xlabel("column sums", fontsize=6.5)
    corner = fig.add_subplot(gs[1, 1])
    corner.axis("off")

"""Pieces shared by hcdiag's figures (:mod:`hcdiag.plot_gain`, :mod:`hcdiag.plot_stochasticity`).

Dimension letters: n streams (matrices are n x n, paper convention: row i builds output stream i), L sites.

What is shared, so that every figure follows the same rules:

* :class:`FigOptions` and :func:`new_figure` / :func:`save`: one size (``--fig-size``), one format
  (``--fig-format png|svg|pdf``), constrained layout (matplotlib places titles, legends and colourbars; no
  hand-tuned offsets), written atomically through :func:`hcdiag.fileio.atomic_write`.
* :func:`matrix_norm` and :func:`draw_matrices`: one colour scale and one colourbar per figure, so the same
  entry has the same colour in every panel; a diverging map centred on 0 when an entry is negative; row and
  column sums written as their deviation from 1 (``-2.3e-03``), which is the error hcdiag reports.
* :func:`log_curve`: on log axes exact zeros are marked on the bottom edge (never drawn at a fake floor), and
  :func:`tidy_log_axis` labels a narrow log range (values all near 1e-6) with distinct ticks.
* :func:`site_axis`: sites are labelled with the names the tables use (attn_0, ffn_0, ...).

matplotlib and numpy are imported inside the functions; importing this module costs nothing.
"""

from __future__ import annotations

import math
import textwrap
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hcdiag.enums import FigFormat
from hcdiag.errors import UsageError

__all__ = [
    "DPI",
    "RC",
    "FigOptions",
    "deviation_text",
    "draw_matrices",
    "legend_columns",
    "log_curve",
    "new_figure",
    "parse_fig_size",
    "save",
    "settle",
    "site_axis",
    "tidy_log_axis",
    "wrap",
]

#: matplotlib settings every hcdiag figure is built under (matplotlib.rc_context(RC)); Any: rc_context wants
#: its own Literal keys
RC: Any = {"font.size": 8, "axes.titlesize": 8.5, "legend.fontsize": 7}
DPI = 100  # PNG resolution; svg / pdf are vector (--fig-format) and the choice for a paper
ZERO_MARKER = "v"
_FIG_SIZE_MAX = 100.0  # inches; beyond this a typo (--fig-size 640x480 meant in pixels)


@dataclass(frozen=True)
class FigOptions:
    """How figures are written: ``fmt`` (file format and suffix), ``size`` ((width, height) in inches for
    every figure, None: each figure's own default), ``dpi`` (PNG resolution)."""

    fmt: FigFormat = FigFormat.PNG
    size: tuple[float, float] | None = None
    dpi: int = DPI


def parse_fig_size(text: str | None) -> tuple[float, float] | None:
    """``"8x5"`` or ``"8,5"`` (inches) -> (8.0, 5.0); UsageError naming --fig-size otherwise."""
    if text is None:
        return None
    parts = text.lower().replace(",", "x").split("x")
    try:
        w, h = (float(p) for p in parts)
    except ValueError:
        raise UsageError(f"--fig-size {text!r} is not WIDTHxHEIGHT in inches, e.g. 8x5", "--fig-size") from None
    if not (0.5 <= w <= _FIG_SIZE_MAX and 0.5 <= h <= _FIG_SIZE_MAX):
        raise UsageError(
            f"--fig-size {text!r}: width and height must lie in 0.5..{_FIG_SIZE_MAX:g} inches, e.g. 8x5",
            "--fig-size",
        )
    return (w, h)


def new_figure(default_size: tuple[float, float], opts: FigOptions) -> Any:
    """A pyplot-free Figure with an Agg canvas and constrained layout (no global matplotlib state)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=opts.size or default_size, dpi=opts.dpi, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def save(fig: Any, out_dir: Path, stem: str, opts: FigOptions) -> Path:
    """Write ``fig`` to ``out_dir/stem.<fmt>`` atomically; return the path."""
    from hcdiag.fileio import atomic_write

    fmt = str(opts.fmt)
    # no creation date in svg / pdf: the same report gives the same bytes
    meta: dict[str, Any] = {"Date": None} if fmt == "svg" else {"CreationDate": None} if fmt == "pdf" else {}
    return atomic_write(
        out_dir / f"{stem}.{fmt}",
        lambda tmp: fig.savefig(tmp, format=fmt, dpi=opts.dpi, metadata=meta),
        option="--output-dir",
    )


def settle(fig: Any) -> None:
    """After layout: wrap each axes title to its axes' width and thin the labelled ticks of a log y axis whose
    labels would touch (short panels at a small --fig-size)."""
    from matplotlib.ticker import FixedLocator

    fig.draw_without_rendering()
    for ax in fig.axes:
        title = ax.title
        if title.get_text():
            width_pt = ax.get_window_extent().width * 72 / fig.dpi
            chars = max(12, int(width_pt / (0.6 * title.get_fontsize())))
            title.set_text("\n".join(textwrap.fill(line, chars, break_on_hyphens=False)
                                     for line in title.get_text().split("\n")))
        if ax.get_yscale() in ("log", "linear") and ax.get_ylabel():  # line plots (heatmaps have no y scale)
            height_pt = ax.get_window_extent().height * 72 / fig.dpi
            lo, hi = sorted(ax.get_ylim())
            shown = [t for t in ax.yaxis.get_majorticklocs() if lo <= t <= hi]
            fs = ax.yaxis.get_ticklabels()[0].get_fontsize() if ax.yaxis.get_ticklabels() else 8.0
            if len(shown) > 2 and height_pt / (len(shown) - 1) < 1.6 * fs:
                k = math.ceil(1.6 * fs * (len(shown) - 1) / max(height_pt, 1.0))
                ax.yaxis.set_major_locator(FixedLocator(shown[::k]))


def wrap(text: str, fig: Any, fontsize: float, share: float = 1.0) -> str:
    """``text`` wrapped to the width of ``share`` of the figure (each line wrapped separately)."""
    width_pt = fig.get_figwidth() * 72 * share
    chars = max(20, int(width_pt / (0.55 * fontsize)))
    return "\n".join(textwrap.fill(line, chars, break_on_hyphens=False) for line in text.split("\n"))


def legend_columns(fig: Any, labels: Sequence[str], fontsize: float = 7.0) -> int:
    """How many legend columns fit across the figure for these labels (multi-line labels: longest line)."""
    longest = max((len(line) for lab in labels for line in lab.split("\n")), default=10)
    entry_pt = longest * 0.55 * fontsize + 3.5 * fontsize  # text + handle + padding
    return max(1, min(len(labels), int(fig.get_figwidth() * 72 * 0.95 // entry_pt)))


# ------------------------------------------------------------------------------------------------------ axes


def site_axis(ax: Any, names: Sequence[str], first: int = 0) -> None:
    """Label integer x positions ``first .. first + L - 1`` with the site names (as many as fit; the ticks
    count from the first site, so attn_0, attn_2, ... rather than ffn_1, ffn_3, ...)."""
    from matplotlib.ticker import FuncFormatter, MaxNLocator

    L = len(names)

    class SiteLocator(MaxNLocator):
        def tick_values(self, vmin: float, vmax: float) -> Any:
            return [t + first for t in super().tick_values(vmin - first, vmax - first)]

    def name(x: float, _pos: int | None = None) -> str:
        i = round(x) - first
        return names[i] if abs(x - round(x)) < 1e-9 and 0 <= i < L else ""

    ax.xaxis.set_major_locator(SiteLocator(nbins="auto", integer=True, steps=[1, 2, 4, 5, 10]))
    ax.xaxis.set_major_formatter(FuncFormatter(name))
    ax.tick_params(axis="x", labelrotation=90)
    ax.set_xlim(first - 0.5, first + L - 0.5)
    ax.set_xlabel("site")


def log_curve(ax: Any, x: Any, y: Any, **style: Any) -> bool:
    """Plot ``y`` against ``x`` on a log y axis: positive values as a line, exact zeros as ``v`` markers on the
    bottom edge (a log axis has no 0). Returns whether a zero was marked."""
    import numpy as np

    x = np.asarray(x, dtype=float)
    y = np.asarray(y, dtype=float)
    ax.plot(x, np.where(y > 0, y, np.nan), **style)
    zero = y == 0
    if zero.any():
        ax.plot(
            x[zero], np.zeros(int(zero.sum())), transform=ax.get_xaxis_transform(), linestyle="none",
            marker=ZERO_MARKER, markersize=5, color=style.get("color"), clip_on=False, zorder=5,
        )
    return bool(zero.any())


def zero_handle() -> Any:
    """Legend entry for the markers that :func:`log_curve` puts on the bottom edge."""
    from matplotlib.lines import Line2D

    return Line2D([], [], linestyle="none", marker=ZERO_MARKER, color="0.3", label="exactly 0 (bottom edge)")


def tidy_log_axis(ax: Any) -> None:
    """Ticks a reader can use on a log y axis that spans few decades: under one decade (values all near 1e-6,
    where every default tick would read 1e-6) a handful of linearly spaced ticks; under three decades
    1-2-5 ticks; all labelled as plain numbers (``2e-06``, ``5``), minor ticks unlabelled."""
    from matplotlib.ticker import FixedLocator, FuncFormatter, LogLocator, MaxNLocator, NullFormatter

    lo, hi = ax.get_ylim()
    if not (lo > 0 and hi > lo):
        return
    span = math.log10(hi / lo)
    if span >= 3.0:
        return
    if span < 1.0:
        ticks = [t for t in MaxNLocator(nbins=5).tick_values(lo, hi) if lo <= t <= hi and t > 0]
        if len(ticks) < 2:
            return
        ax.yaxis.set_major_locator(FixedLocator(ticks))
    else:
        ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 3.0) if span < 2.0 else (1.0,)))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _p: f"{v:.3g}"))
    ax.yaxis.set_minor_formatter(NullFormatter())


def log_limits(ax: Any, arrays: Sequence[Any], extra: Sequence[float] = ()) -> bool:
    """Log y axis spanning the positive values of ``arrays`` (and ``extra``, e.g. a tolerance line); linear
    when nothing is positive (all exact zeros). Returns whether the axis is log."""
    import numpy as np

    vals = np.concatenate([np.asarray(a, dtype=float).ravel() for a in arrays] + [np.asarray(extra, dtype=float)])
    pos = vals[np.isfinite(vals) & (vals > 0)]
    if pos.size == 0:
        return False
    ax.set_yscale("log")
    lo, hi = float(pos.min()), float(pos.max())
    if hi / lo < 1.5:  # a flat line: give it some room
        lo, hi = lo / 1.25, hi * 1.25
    ax.set_ylim(lo / 10 ** (0.06 * max(1.0, math.log10(hi / lo))), hi * 10 ** (0.06 * max(1.0, math.log10(hi / lo))))
    tidy_log_axis(ax)
    return True


# -------------------------------------------------------------------------------------------------- matrices


def deviation_text(d: float) -> str:
    """A sum's deviation from 1 with two significant digits (``-2.3e-03``), ``0`` when exact."""
    if d == 0:
        return "0"
    if not math.isfinite(d):
        return str(d)
    return f"{d:+.1e}"


def entry_text(v: float) -> str:
    if not math.isfinite(v):
        return str(v)
    return f"{v:.2f}" if abs(v) < 10 else f"{v:.3g}"


def matrix_norm(mats: Sequence[Any]) -> tuple[Any, Any, str]:
    """One colour scale for every matrix of a figure: (norm, cmap, what the scale is).

    Entries all >= 0: sequential ``Blues`` from 0 to max(1, largest entry). A negative entry: diverging
    ``RdBu_r`` symmetric around 0. Symmetric-log when the largest magnitude exceeds 10 (HC composites reach
    1e10; a linear scale would paint every other entry white), linear within +-1.
    """
    import matplotlib
    import numpy as np
    from matplotlib.colors import Normalize, SymLogNorm

    vals = np.concatenate([np.asarray(M, dtype=float).ravel() for M in mats])
    vals = vals[np.isfinite(vals)]
    lo = float(vals.min()) if vals.size else 0.0
    hi = float(vals.max()) if vals.size else 1.0
    signed = lo < 0
    top = max(abs(lo), abs(hi), 1.0)
    name = "RdBu_r" if signed else "Blues"
    cmap = matplotlib.colormaps[name].with_extremes(bad="0.55")  # inf / NaN entries (overflow) in grey
    vmin = -top if signed else 0.0
    if top > 10:
        return SymLogNorm(linthresh=1.0, linscale=1.0, vmin=vmin, vmax=top, base=10), cmap, "symmetric log scale"
    return Normalize(vmin=vmin, vmax=top), cmap, "linear scale"


@dataclass(frozen=True)
class MatrixPanel:
    """One panel of a matrix figure: ``matrix`` [n, n] and its ``title``."""

    matrix: Any
    title: str


def panel_size(n: int, panels: int) -> tuple[float, float]:
    """Default figure size (inches) for ``panels`` matrices of size n, a colourbar and a two-line title."""
    cell = 0.5 if n <= 4 else 0.4 if n <= 8 else 0.26 if n <= 16 else 0.16
    side = cell * (n + 2) + 0.9
    return (side * panels + 1.3, side + 1.1)


def _grid(fig: Any, n: int, panels: int) -> tuple[int, int]:
    """(rows, columns) of panels that gives the largest cells in this figure (one row at the default size);
    of layouts within 5 % of the largest cells, the one with the fewest empty slots."""
    W, H = fig.get_figwidth() - 1.3, fig.get_figheight() - 1.1  # colourbar, suptitle
    options = []
    for cols in range(panels, 0, -1):
        rows = math.ceil(panels / cols)
        options.append((min(W / cols - 0.9, H / rows - 1.2) / (n + 2), rows * cols - panels, rows, cols))
    best = max(o[0] for o in options)
    _, _, rows, cols = min((o for o in options if o[0] >= 0.95 * best), key=lambda o: (o[1], -o[0]))
    return rows, cols


def draw_matrices(fig: Any, panels: Sequence[MatrixPanel], *, label: str = "entry") -> list[Any]:
    """Draw each panel's matrix with its row sums (right strip) and column sums (bottom strip) as deviations
    from 1, one colour scale and one colourbar for all. Returns the matrix axes.

    Entries are written into the cells while n <= 8 (beyond, n^2 numbers are unreadable and slow to draw);
    font sizes follow the cells' size after layout, and panels wrap into rows when ``--fig-size`` is narrow,
    so texts do not collide.
    """
    import numpy as np
    from matplotlib.cm import ScalarMappable

    mats = [np.asarray(p.matrix, dtype=float) for p in panels]
    norm, cmap, scale = matrix_norm(mats)
    n = max(M.shape[0] for M in mats)
    rows, cols = _grid(fig, n, len(panels))
    grid = fig.subplots(rows, cols, squeeze=False)
    axes = list(grid.ravel()[: len(panels)])
    for ax in grid.ravel()[len(panels):]:
        ax.remove()
    for ax, M, p in zip(axes, mats, panels, strict=True):
        _matrix_frame(ax, M, norm, cmap, p.title)
    for r in range(rows):
        grid[r][0].set_ylabel("output stream i")
    fig.colorbar(ScalarMappable(norm=norm, cmap=cmap), ax=axes, shrink=0.8,
                 label=f"{label} ({scale}, same in every panel)")
    settle(fig)  # runs the layout (the cells' size in points is now known) and wraps titles to their panel
    for ax, M in zip(axes, mats, strict=True):
        _matrix_texts(ax, M, norm, cmap)
    return axes


def _matrix_frame(ax: Any, M: Any, norm: Any, cmap: Any, title: str) -> None:
    """Matrix cells [0, n) x [0, n), a 2-unit strip of row sums on the right, of column sums below."""
    from matplotlib.patches import Rectangle

    n = M.shape[0]
    ax.imshow(M, cmap=cmap, norm=norm, extent=(-0.5, n - 0.5, n - 0.5, -0.5), interpolation="nearest")
    for k in range(n):
        ax.add_patch(Rectangle((n - 0.5, k - 0.5), 2, 1, facecolor="0.93", edgecolor="white", lw=0.8))
        ax.add_patch(Rectangle((k - 0.5, n - 0.5), 1, 2, facecolor="0.93", edgecolor="white", lw=0.8))
    ax.set_xlim(-0.5, n + 1.5)
    ax.set_ylim(n + 1.5, -0.5)
    ax.set_aspect("equal")
    step = 1 if n <= 8 else max(1, n // 4)
    idx = list(range(0, n, step))
    ax.set_xticks(idx, [str(i + 1) for i in idx])
    ax.set_yticks(idx, [str(i + 1) for i in idx])
    ax.tick_params(length=0)
    ax.set_xlabel("input stream j")
    for sp in ax.spines.values():
        sp.set_visible(False)
    ax.axvline(n - 0.5, color="0.3", lw=0.8)
    ax.axhline(n - 0.5, color="0.3", lw=0.8)
    ax.set_title(title)


def _fit(along_pt: float, across_pt: float, chars: int, cap: float = 8.0) -> float:
    """Largest font size (pt, <= cap) at which ``chars`` characters fit in a box ``along_pt`` long (the text's
    direction) and ``across_pt`` wide."""
    return min(cap, 0.85 * along_pt / (0.62 * max(chars, 1)), 0.6 * across_pt)


_CORNER = "sums - 1:\nrows \u2192\ncolumns \u2193"  # explains the strips, in the empty corner


def _matrix_texts(ax: Any, M: Any, norm: Any, cmap: Any) -> None:
    import numpy as np

    n = M.shape[0]
    box = ax.get_window_extent()
    # 0.92: a title that settle() wrapped onto more lines shortens the panel a little at the next layout
    cell_pt = 0.92 * min(box.width / (n + 2), box.height / (n + 2)) * 72 / ax.figure.dpi
    ax.tick_params(labelsize=min(8.0, 0.8 * cell_pt))
    entries = [[entry_text(float(v)) for v in row] for row in M]
    fs = _fit(cell_pt, cell_pt, max(len(t) for r in entries for t in r)) if n <= 8 else 0.0
    if fs >= 4.5:
        for i in range(n):
            for j in range(n):
                v = M[i, j]
                r, g, b, _ = cmap(norm(v)) if np.isfinite(v) else (0.55, 0.55, 0.55, 1)
                dark = 0.299 * r + 0.587 * g + 0.114 * b < 0.5
                ax.text(j, i, entries[i][j], ha="center", va="center", fontsize=fs,
                        color="white" if dark else "black")
    with np.errstate(invalid="ignore", over="ignore"):
        rows, cols = M.sum(axis=1) - 1.0, M.sum(axis=0) - 1.0
    texts = [deviation_text(float(d)) for d in (*rows, *cols)]
    # a strip cell is 2 cells long and 1 cell across: the text runs along its length
    sfs = _fit(2 * cell_pt, cell_pt, max(len(t) for t in texts))
    if sfs >= 4.0:
        for k in range(n):
            ax.text(n + 0.5, k, texts[k], ha="center", va="center", fontsize=sfs, gid="row_dev")
            ax.text(k, n + 0.5, texts[n + k], ha="center", va="center", fontsize=sfs, rotation=90,
                    gid="col_dev")
        cfs = min(sfs, 0.85 * 2 * cell_pt / 3 / 1.25, _fit(2 * cell_pt, 2 * cell_pt, 10))  # 3 lines in 2 x 2
        ax.text(n + 0.5, n + 0.5, _CORNER, ha="center", va="center", fontsize=cfs, color="0.3",
                linespacing=1.25)
    else:  # strips too small for numbers: the largest deviations go under the panel
        worst_r = float(np.nanmax(np.abs(rows))) if np.isfinite(rows).any() else math.nan
        worst_c = float(np.nanmax(np.abs(cols))) if np.isfinite(cols).any() else math.nan
        width_pt = box.width * 72 / ax.figure.dpi
        ax.set_xlabel(f"input stream j\nmax |row sum - 1| {deviation_text(worst_r).lstrip('+')}\n"
                      f"max |col sum - 1| {deviation_text(worst_c).lstrip('+')}",
                      fontsize=min(8.0, 0.9 * width_pt / (0.62 * 26)))


# ---------------------------------------------------------------------------------------------- coincidence


def coincide(arrays_a: Sequence[Any], arrays_b: Sequence[Any], rtol: float = 1e-9) -> bool:
    """Whether two curves (lists of arrays) are equal to ``rtol`` everywhere (NaN = NaN, inf = inf)."""
    import numpy as np

    for a, b in zip(arrays_a, arrays_b, strict=True):
        a = np.asarray(a, dtype=float)
        b = np.asarray(b, dtype=float)
        if a.shape != b.shape or not np.allclose(a, b, rtol=rtol, atol=0.0, equal_nan=True):
            return False
    return True


def groups(names: Sequence[str], curves: Callable[[str], Sequence[Any]]) -> list[list[str]]:
    """Partition ``names`` (order kept) into groups whose ``curves(name)`` coincide."""
    out: list[list[str]] = []
    for name in names:
        for g in out:
            if coincide(curves(g[0]), curves(name)):
                g.append(name)
                break
        else:
            out.append([name])
    return out


def group_label(group: Sequence[str]) -> str:
    return group[0] if len(group) == 1 else " = ".join(group) + " (coincide)"

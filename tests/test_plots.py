"""The figures of ``--plot`` (hcdiag.plot_gain, hcdiag.plot_stochasticity) checked as a reader would check them.

Each property is read from the real matplotlib Figure objects that the CLI writes (or from the files), and
compared with an independent computation: numpy on the report's own matrices and curves, the renderer's text
bounding boxes, the file formats' magic bytes. Agg canvas, tiny inputs.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest
import torch

matplotlib = pytest.importorskip("matplotlib")
from cli_runner import run_cli  # noqa: E402
from matplotlib.text import Text  # noqa: E402

from hcdiag.gain import gain_sweep  # noqa: E402
from hcdiag.io import load  # noqa: E402
from hcdiag.plot_common import FigOptions  # noqa: E402
from hcdiag.plot_gain import gain_figures  # noqa: E402
from hcdiag.plot_stochasticity import stochasticity_figures  # noqa: E402
from hcdiag.stochasticity import analyze_matrices, analyze_stochasticity  # noqa: E402

SAMPLES = Path(__file__).resolve().parent.parent / "samples"


@pytest.fixture(scope="module")
def perturbed():
    """Unbounded (hc-static) next to exact variants, 2 seeds: bands, log axes, exact zeros (identity)."""
    return gain_sweep(layers=3, variants=["identity", "hc-static", "mhc", "kromhc"], n=4, C=4, init="perturb",
                      logit_scale=1.0, seeds=2)


@pytest.fixture(scope="module")
def one_seed():
    return gain_sweep(layers=2, variants=["hc-static"], n=4, C=4, init="perturb", logit_scale=0.5, seeds=1)


@pytest.fixture(scope="module")
def paper_init():
    """At the paper initialisation these variants are all exact: their gain curves coincide."""
    return gain_sweep(layers=1, variants=["identity", "hc-static", "kromhc"], n=4, C=4)


@pytest.fixture(scope="module")
def mhc_report():
    return analyze_stochasticity(load(str(SAMPLES / "mhc.safetensors")))


# the figures, built once per module (each test only reads them)
@pytest.fixture(scope="module")
def perturbed_figs(perturbed):
    return gain_figures(perturbed)


@pytest.fixture(scope="module")
def mhc_figs(mhc_report):
    return stochasticity_figures(mhc_report)


def _texts(fig) -> list[Text]:
    """Every text the renderer draws: non-empty, visible, tick labels only for ticks inside the view."""
    fig.canvas.draw()
    tick_labels, out = set(), []
    for ax in fig.axes:
        for axis in (ax.xaxis, ax.yaxis):
            lo, hi = sorted(axis.get_view_interval())
            for tick in axis.get_major_ticks() + axis.get_minor_ticks():
                for lab in (tick.label1, tick.label2):
                    tick_labels.add(id(lab))
                    if lab.get_visible() and lab.get_text().strip() and lo <= tick.get_loc() <= hi:
                        out.append(lab)
    out += [t for t in fig.findobj(Text)
            if id(t) not in tick_labels and t.get_visible() and t.get_text().strip()]
    return out


def _collisions(fig) -> tuple[list[tuple[str, str]], list[str]]:
    """(pairs of texts whose boxes intersect by more than half a pixel each way, texts outside the figure)."""
    r = fig.canvas.get_renderer()
    boxes = [(t.get_text(), t.get_window_extent(r)) for t in _texts(fig)]
    pairs = [(a, b) for (a, ba), (b, bb) in itertools.combinations(boxes, 2)
             if min(ba.x1, bb.x1) - max(ba.x0, bb.x0) > 0.5 and min(ba.y1, bb.y1) - max(ba.y0, bb.y0) > 0.5]
    fb = fig.bbox
    outside = [t for t, b in boxes if b.x0 < fb.x0 - 1 or b.y0 < fb.y0 - 1 or b.x1 > fb.x1 + 1 or b.y1 > fb.y1 + 1]
    return pairs, outside


def _all_text(fig) -> str:
    return "\n".join(t.get_text() for t in _texts(fig))


def _colorbars(fig) -> list:
    return [ax for ax in fig.axes if ax.get_label() == "<colorbar>"]


def _images(fig) -> list:
    return [im for ax in fig.axes if ax.get_label() != "<colorbar>" for im in ax.get_images()]


# --------------------------------------------------------------------------------------------------- heatmaps


def test_gain_heatmap_one_colour_scale_one_colourbar(perturbed, perturbed_figs) -> None:
    v = perturbed.variant("hc-static")
    fig = perturbed_figs["gain-heatmap-hc-static"]
    ims = _images(fig)
    mats = [np.asarray(v.heatmaps[k], dtype=float) for k in ("site_1", "first_half", "second_half", "all")]
    assert len(ims) == 4 and len(_colorbars(fig)) == 1
    assert len({id(im.norm) for im in ims}) == 1 and len({im.cmap.name for im in ims}) == 1
    norm = ims[0].norm
    # hc-static has negative entries: a diverging map centred on 0 that holds every entry of every panel
    top = max(float(np.abs(M).max()) for M in mats)
    assert (np.concatenate([M.ravel() for M in mats]) < 0).any()
    assert norm.vmin == -norm.vmax and norm.vmax >= top and float(norm(0.0)) == pytest.approx(0.5)
    assert ims[0].cmap.name.startswith("RdBu")
    # the same value has the same colour in every panel
    value = float(mats[0][0, 0])
    colours = {tuple(np.round(im.cmap(im.norm(value)), 12)) for im in ims}
    assert len(colours) == 1


def test_nonnegative_matrices_use_a_sequential_scale_from_zero(mhc_report, mhc_figs) -> None:
    fig = mhc_figs["stochasticity_heatmaps"]
    ims = _images(fig)
    mats = [np.asarray(h.matrix) for h in mhc_report.heatmaps]
    assert min(float(M.min()) for M in mats) >= 0
    assert len(ims) == len(mats) == 3 and len(_colorbars(fig)) == 1 and len({id(im.norm) for im in ims}) == 1
    assert ims[0].norm.vmin == 0 and ims[0].norm.vmax >= max(float(M.max()) for M in mats)
    assert ims[0].cmap.name.startswith("Blues")


def _sum_texts(fig, gid: str) -> list[list[str]]:
    axes = [ax for ax in fig.axes if ax.get_label() != "<colorbar>" and ax.get_images()]
    return [[t.get_text() for t in ax.texts if t.get_gid() == gid] for ax in axes]


def _check_deviation(text: str, expected: float) -> None:
    if text == "0":
        assert expected == 0.0
        return
    assert text[0] in "+-" and "e" in text, text  # "-2.3e-03", never "1.00"
    assert float(text) == pytest.approx(expected, rel=0.05, abs=0)  # two significant digits


def test_sums_are_written_as_deviation_from_one(mhc_report, mhc_figs, perturbed, perturbed_figs) -> None:
    fig = mhc_figs["stochasticity_heatmaps"]
    rows, cols = _sum_texts(fig, "row_dev"), _sum_texts(fig, "col_dev")
    for h, r, c in zip(mhc_report.heatmaps, rows, cols, strict=True):
        M = np.asarray(h.matrix, dtype=np.float64)
        for text, d in zip(r, M.sum(axis=1) - 1, strict=True):
            _check_deviation(text, float(d))
        for text, d in zip(c, M.sum(axis=0) - 1, strict=True):
            _check_deviation(text, float(d))
    # the mHC sample's column error is ~1e-4: it must be visible in the figure, not rounded to 1.00
    assert any(abs(float(t)) > 1e-5 for col in cols for t in col if t != "0")
    v = perturbed.variant("mhc")
    fig = perturbed_figs["gain-heatmap-mhc"]
    keys = ("site_1", "first_half", "second_half", "all")
    for k, r, c in zip(keys, _sum_texts(fig, "row_dev"), _sum_texts(fig, "col_dev"), strict=True):
        M = np.asarray(v.heatmaps[k], dtype=np.float64)
        assert len(r) == len(c) == 4
        for text, d in zip(r + c, np.concatenate([M.sum(axis=1) - 1, M.sum(axis=0) - 1]), strict=True):
            _check_deviation(text, float(d))


# ----------------------------------------------------------------------------------------------- layout


@pytest.mark.parametrize("size", [None, (8.0, 6.0)], ids=["default", "8x6"])
def test_no_text_overlaps(size, perturbed, mhc_report, perturbed_figs, mhc_figs) -> None:
    if size is None:
        figs = {**mhc_figs, **perturbed_figs}
    else:
        opts = FigOptions(size=size)
        figs = {**stochasticity_figures(mhc_report, opts), **gain_figures(perturbed, opts)}
    assert len(figs) == 3 + 3 + 4
    for stem, fig in figs.items():
        pairs, outside = _collisions(fig)
        assert not pairs, f"{stem}: overlapping texts {pairs[:3]}"
        assert not outside, f"{stem}: texts outside the figure {outside[:3]}"


def test_fig_size_is_every_figure_size(mhc_report) -> None:
    for fig in stochasticity_figures(mhc_report, FigOptions(size=(6.5, 4.5))).values():
        assert tuple(fig.get_size_inches()) == (6.5, 4.5)


# ------------------------------------------------------------------------------------------------ legends


def test_one_seed_has_no_band_and_no_median(one_seed) -> None:
    for stem, fig in gain_figures(one_seed).items():
        text = _all_text(fig)
        assert "median" not in text and "band" not in text, stem
        assert not [c for ax in fig.axes for c in ax.collections if type(c).__name__ == "FillBetweenPolyCollection"
                    or type(c).__name__ == "PolyCollection"], stem


def test_seeds_give_a_band_said_to_be_over_seeds(perturbed, perturbed_figs) -> None:
    fig = perturbed_figs["gain-composite"]
    text = _all_text(fig)
    assert "median over 2 seeds" in text and "band: min to max over 2 seeds" in text
    hc = perturbed.variant("hc-static").curves["gain_fwd"]
    assert not np.array_equal(hc["min"], hc["max"])  # there is a spread to show


def test_coinciding_curves_are_said_to_coincide(paper_init, perturbed_figs) -> None:
    names = ["identity", "hc-static", "kromhc"]
    curves = [paper_init.variant(n).curves["gain_fwd"]["median"] for n in names]
    assert all(np.allclose(c, curves[0], rtol=1e-9, atol=0) for c in curves)  # independently: they coincide
    legend = "\n".join(t.get_text() for t in gain_figures(paper_init)["gain-composite"].legends[0].get_texts())
    assert " = ".join(names) + " (coincide)" in legend.replace("\n", " ")
    # perturbed: hc-static grows, so it has its own entry, and the exact variants still share one
    legend = [t.get_text().replace("\n", " ") for t in perturbed_figs["gain-composite"].legends[0].get_texts()]
    assert "hc-static" in legend
    assert "identity = mhc = kromhc (coincide)" in legend or "identity = kromhc (coincide)" in legend


def test_exact_zeros_are_marked_not_floored(perturbed, perturbed_figs) -> None:
    fig = perturbed_figs["gain-collapse"]
    ax = next(a for a in fig.axes if "distance to identity" in a.get_title())
    assert ax.get_yscale() == "log"
    zeros = int((perturbed.variant("identity").curves["dist_identity"]["median"] == 0).sum())
    assert zeros == perturbed.sites  # identity: ||I - I|| = 0 at every site
    on_edge = [ln for ln in ax.get_lines() if ln.get_transform() == ax.get_xaxis_transform()]
    assert sum(len(ln.get_xdata()) for ln in on_edge) >= zeros
    assert all(np.all(np.asarray(ln.get_ydata()) == 0) for ln in on_edge)  # on the bottom edge
    data = [np.asarray(ln.get_ydata(), dtype=float) for ln in ax.get_lines() if ln not in on_edge]
    smallest = min(float(np.nanmin(d[d > 0])) for d in data if (d > 0).any())
    positive = np.concatenate([v.curves["dist_identity"]["median"] for v in perturbed.variants])
    assert smallest == float(positive[positive > 0].min())  # nothing drawn below the data (no 1e-17 floor)
    assert "exactly 0" in _all_text(fig)


def test_narrow_log_range_gets_distinct_ticks() -> None:
    """Errors all near 1e-6 (transformers models at their hc_eps floor): the y axis must not read 1e-6 alone."""
    err = torch.tensor([1.0e-6, 1.1e-6, 1.3e-6, 1.2e-6], dtype=torch.float64)
    Hs = torch.eye(4, dtype=torch.float64).repeat(4, 1, 1) * (1 + err).view(4, 1, 1)
    report = analyze_matrices(Hs)
    fig = stochasticity_figures(report)["stochasticity_error_per_site"]
    fig.canvas.draw()
    ax = fig.axes[0]
    lo, hi = ax.get_ylim()
    labels = [t.get_text() for t, loc in zip(ax.get_yticklabels(), ax.get_yticks(), strict=True) if lo <= loc <= hi]
    assert len(set(labels)) >= 3 and all(labels), labels
    values = [float(s) for s in labels]
    assert len(set(values)) == len(values)


def test_site_names_are_the_tables_names(perturbed, perturbed_figs, mhc_report, mhc_figs) -> None:
    for stem in ("gain-sites", "gain-composite", "gain-collapse"):
        fig = perturbed_figs[stem]
        fig.canvas.draw()
        for ax in fig.axes:
            labels = {t.get_text() for t in ax.get_xticklabels() if t.get_text()}
            assert labels and labels <= set(perturbed.site_names), (stem, labels)
            assert "attn_0" in labels
    titles = [ax.get_title() for ax in mhc_figs["stochasticity_heatmaps"].axes
              if ax.get_images() and ax.get_label() != "<colorbar>"]
    assert titles == [h.name for h in mhc_report.heatmaps] == ["attn_0", "attn_4", "ffn_7"]


# -------------------------------------------------------------------------------------------------- CLI


MAGIC = {"png": b"\x89PNG\r\n\x1a\n", "svg": b"<?xml", "pdf": b"%PDF-"}


def test_cli_fig_size_png(tmp_path: Path) -> None:
    res = run_cli("stochasticity", SAMPLES / "mhc.safetensors", "--plot", "-o", tmp_path, "--fig-format", "png",
                  "--fig-size", "6x4")
    assert res.returncode == 0, res.stderr
    files = sorted(tmp_path.glob("stochasticity_*.png"))
    assert [f.name for f in files] == [f"stochasticity_{k}.png" for k in ("convergence", "error_per_site", "heatmaps")]
    for f in files:
        assert f.read_bytes().startswith(MAGIC["png"])
        assert matplotlib.image.imread(f).shape[:2] == (400, 600)  # --fig-size 6x4 inches at 100 dpi
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


@pytest.mark.parametrize("fmt", ["svg", "pdf"])
def test_vector_formats_are_valid_files(fmt: str, tmp_path: Path) -> None:
    from hcdiag.enums import FigFormat
    from hcdiag.plot_stochasticity import plot_stochasticity

    report = analyze_matrices(torch.eye(3, dtype=torch.float64).repeat(2, 1, 1))
    files = plot_stochasticity(report, tmp_path, FigOptions(fmt=FigFormat(fmt)))
    assert [f.name for f in files] == [f"stochasticity_error_per_site.{fmt}", f"stochasticity_heatmaps.{fmt}"]
    for f in files:
        data = f.read_bytes()
        assert data.startswith(MAGIC[fmt])
        if fmt == "svg":
            assert b"<svg" in data[:2000] and data.rstrip().endswith(b"</svg>")
        else:
            assert data.rstrip().endswith(b"%%EOF")


@pytest.mark.parametrize("bad", ["abc", "640x480", "8x", "0x5"])
def test_cli_bad_fig_size_is_a_usage_error(bad: str, tmp_path: Path) -> None:
    res = run_cli("gain-sweep", "--layers", "1", "--plot", "-o", tmp_path, "--fig-size", bad)
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "--fig-size" in lines[0] and "8x5" in lines[0]
    assert not list(tmp_path.iterdir())  # refused before computing or writing anything


def test_gain_from_checkpoint_figures_name_sites(tmp_path: Path) -> None:
    res = run_cli("gain-sweep", "--from", SAMPLES / "hc-dynamic.safetensors", "--plot", "-o", tmp_path,
                  "--fig-format", "svg")
    assert res.returncode == 0, res.stderr
    names = sorted(f.name for f in tmp_path.glob("*.svg"))
    assert names == ["gain-collapse.svg", "gain-composite.svg", "gain-heatmap-hc-dynamic.svg", "gain-sites.svg"]
    assert b"<!-- attn_0 -->" in (tmp_path / "gain-sites.svg").read_bytes()  # svg keeps each text as a comment

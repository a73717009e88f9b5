"""Rich rendering of result objects for the terminal. Only the CLI imports this module.

Tables go to stdout; progress and warnings go to stderr, so ``--json`` output and shell pipes stay clean.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from rich import box
from rich.cells import cell_len
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text


def _width() -> int | None:
    """Console width of stdout: $COLUMNS when set (also when piped); a terminal's own width; otherwise unbounded,
    so piped output (``| head``, ``> file``, README pastes) holds every table whole, one line per row."""
    import os
    import sys

    cols = os.environ.get("COLUMNS")
    if cols:
        try:
            return max(20, int(cols))
        except ValueError:
            pass
    return None if sys.stdout.isatty() else UNBOUNDED


#: width of a console that never wraps (stdout not a terminal and no $COLUMNS)
UNBOUNDED = 100_000

out = Console(highlight=False, soft_wrap=False, width=_width())
err = Console(stderr=True, highlight=False)


def set_quiet(quiet: bool = True) -> None:
    """Start of a run: --quiet (no tables, notes, progress or warnings; errors and failed checks are printed by
    the CLI) and the stdout width taken anew from $COLUMNS / the terminal, so that nothing a run set outlives it
    when main() runs several times in one process."""
    out.quiet = quiet
    err.quiet = quiet
    out.width = _width()  # type: ignore[assignment]  # None: rich detects the terminal's width


def note(msg: str) -> None:
    """One informational line on stderr (e.g. which files were written); silent with --quiet."""
    err.print(escape(msg), soft_wrap=True)


# ------------------------------------------------------------------------------------------------------ tables


Cell = str | Text


def _pack(cols: list[int], cost: list[int], room: int) -> list[list[int]]:
    """``cols`` in order, cut into consecutive blocks whose costs sum to at most ``room`` (each col fits)."""
    blocks: list[list[int]] = [[]]
    used = 0
    for k in cols:
        if blocks[-1] and used + cost[k] > room:
            blocks.append([])
            used = 0
        blocks[-1].append(k)
        used += cost[k]
    return blocks if blocks[0] else []


class Grid:
    """A table that never cuts a cell. Cells are whole values (markup strings or :class:`Text`).

    :meth:`show` prints one Rich table when it fits the console; otherwise it folds: the first ``keys`` columns
    (what names a row) are repeated in every block and the other columns are spread over as few blocks as fit;
    when even one column beside the keys does not fit, every row becomes a record of ``column: value`` lines.
    Columns named in ``wrap`` hold prose: they may wrap between words (down to 24 columns), never lose a word.
    """

    def __init__(self, title: str, columns: Sequence[tuple[str, str]], keys: int = 1,
                 wrap: Sequence[str] = ()) -> None:
        self.title = title
        self.columns = list(columns)  # (header, justify)
        self.keys = keys
        self.wrap = {k for k, (h, _) in enumerate(self.columns) if h in wrap}
        self.rows: list[tuple[list[Text], str | None, bool]] = []  # cells, style, section before
        self._section = False

    def add_row(self, *cells: Cell, style: str | None = None) -> None:
        texts = [c if isinstance(c, Text) else Text.from_markup(c) for c in cells]
        self.rows.append((texts, style, self._section))
        self._section = False

    def add_section(self) -> None:
        self._section = bool(self.rows)

    def _widths(self) -> list[int]:
        w = [cell_len(h) for h, _ in self.columns]
        for cells, _, _ in self.rows:
            for k, c in enumerate(cells):
                parts = c.plain.split() if k in self.wrap else c.plain.split("\n")
                w[k] = max(w[k], max((cell_len(p) for p in parts), default=0))
        return [max(x, 24) if k in self.wrap else x for k, x in enumerate(w)]

    def _table(self, cols: list[int]) -> Table:
        t = Table(box=box.HEAVY_HEAD)
        for k in cols:
            header, just = self.columns[k]
            t.add_column(header, justify=just, no_wrap=k not in self.wrap, overflow="fold")  # type: ignore[arg-type]
        for cells, style, section in self.rows:
            if section:
                t.add_section()
            t.add_row(*[cells[k] for k in cols], style=style)
        return t

    def blocks(self, width: int) -> list[list[int]] | None:
        """Column indices per block that fit ``width``, as even as the fewest blocks allow; None when a key
        column and one more do not fit."""
        w = self._widths()
        cost = [x + 3 for x in w]  # padding 1 + 1 and one rule per column; + 1 for the left edge
        keys = list(range(min(self.keys, len(w))))
        base = 1 + sum(cost[k] for k in keys)
        rest = list(range(len(keys), len(w)))
        if any(base + cost[k] > width for k in rest):
            return None
        fewest = len(_pack(rest, cost, width - base))
        lo = max([cost[k] for k in rest], default=0)  # the narrowest limit that gives that many blocks
        hi = width - base
        while lo < hi:
            mid = (lo + hi) // 2
            lo, hi = (lo, mid) if len(_pack(rest, cost, mid)) <= fewest else (mid + 1, hi)
        return [keys + b for b in _pack(rest, cost, hi)]

    def show(self, console: Console | None = None) -> None:
        console = console or out
        console.print(Text.from_markup(self.title), soft_wrap=console.width >= UNBOUNDED)
        blocks = self.blocks(console.width)
        if blocks is None:
            self._records(console)
            return
        for b, cols in enumerate(blocks):
            if len(blocks) > 1:
                shown = ", ".join(self.columns[k][0] or "tag" for k in cols[self.keys :])
                console.print(f"part {b + 1} of {len(blocks)} (wider than {console.width} columns): {escape(shown)}",
                              style="dim")
            console.print(self._table(cols), crop=False)

    def _records(self, console: Console) -> None:
        """One record per row: the key cells on a line, then one ``column: value`` line per other cell."""
        console.print(f"(one record per row: the table is wider than {console.width} columns)", style="dim")
        for cells, style, _ in self.rows:
            key = Text(" ").join(c for c in cells[: self.keys] if c.plain)
            console.print(key, style="bold")
            for (header, _), c in zip(self.columns[self.keys :], cells[self.keys :], strict=True):
                if c.plain:
                    console.print(Text("  ") + Text(f"{header}: ", style="dim") + c, style=style or "")


def _int(v: int | None) -> str:
    return "" if v is None else f"{v:,}"


def _sci(v: float | None, digits: int = 1) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "n/a"
    if v == 0:
        return "0"
    if not math.isfinite(v):
        return str(v)
    return f"{v:.{digits}e}"  # one format for a whole column, so magnitudes line up


def _pct(v: float) -> str:
    return f"{100 * v:.3g}%" if v < 10 else f"{v:.3g}x"


# ------------------------------------------------------------------------------------------------------ params


def params(report: Any) -> None:
    inp = report.inputs
    cols = [("variant", "left"), ("exact?", "left")]
    cols += [(c, "right") for c in ("H_pre", "H_post", "H_res", "norm", "per site", "per model", "overhead")]
    t = Grid(f"HC parameters per site and per model: n = {inp.n}, C = {inp.C:,}, "
             f"{inp.layers} block(s) = {inp.sites} sites, {inp.form.value} form", [*cols, ("growth", "left")])
    notes: list[str] = []
    for r in report.rows:
        name = escape(r.variant) + ("" if r.practical else " [red](impractical)[/red]")
        t.add_row(name, str(r.exactness.value), _int(r.pre), _int(r.post), _int(r.res), _int(r.norm),
                  _int(r.per_site), _int(r.per_model), _pct(r.overhead), escape(r.growth))
        if r.effective is not None:
            e = r.effective
            t.add_row(f"  {escape(r.variant)} (effective)", "", _int(e.pre), _int(e.post), _int(e.res),
                      _int(e.norm), _int(e.per_site), _int(e.per_model), _pct(e.overhead), "", style="dim")
        for note in r.notes:
            notes.append(f"{r.variant}: {note}")
    t.show()
    out.print(f"baseline: {escape(report.baseline)} "
              f"({inp.baseline_params:,} parameters for {inp.layers} block(s)).", style="dim")
    if any(not r.practical for r in report.rows):
        out.print("impractical: counted exactly in integer arithmetic, never allocated.", style="dim")
    for note in notes:
        out.print(escape(note), style="dim")


# ---------------------------------------------------------------------------------------------------- variants


def variants(specs: Sequence[Any]) -> None:
    t = Grid("Variants", [("name", "left"), ("H_res", "left"), ("growth", "left"), ("summary", "left")],
             wrap=["summary"])
    for s in specs:
        t.add_row(escape(s.name), str(s.exactness.value), escape(s.growth), escape(s.summary))
    t.show()


# ---------------------------------------------------------------------------------------------------- progress


@contextmanager
def progress_reporter(enabled: bool = True) -> Iterator[Callable[[str, int, int], None] | None]:
    """A ``progress(label, done, total)`` callback drawing a bar on stderr (None when disabled)."""
    if not enabled or not err.is_terminal:
        yield None
        return
    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  TimeElapsedColumn(), console=err, transient=True) as prog:
        tasks: dict[str, Any] = {}

        def cb(label: str, done: int, total: int) -> None:
            if label not in tasks:
                tasks[label] = prog.add_task(label, total=total)
            prog.update(tasks[label], completed=done, total=total)

        yield cb


def dim(msg: str) -> None:
    out.print(escape(msg), style="dim")


def warn(msg: str) -> None:
    err.print(Text(f"hcdiag: {msg}", style="yellow"), soft_wrap=True)  # one line, however narrow the terminal


# ------------------------------------------------------------------------------------------------ stochasticity


def _verdict_style(verdict: str) -> str:
    if verdict.startswith("ok"):
        return "green"
    if verdict.startswith("n/a"):
        return "dim"
    return "red"


def stochasticity(report: Any) -> None:
    s = report.summary
    st = report.settings or {}
    title = (f"Doubly-stochastic error per site: {escape(report.path)} ({escape(report.layout)} layout), "
             f"probe {escape(report.probe_description)}, {report.dtype}, paper convention")
    sites = report.sites
    # columns that would repeat one value on every row are stated once below the table instead
    show_n = len({r.n for r in sites}) > 1
    show_sk = len({(r.convention, r.iters) for r in sites}) > 1
    show_variant = len({r.variant for r in sites}) > 1
    cols = [("site", "left")]
    cols += [("variant", "left")] if show_variant else []
    cols += [("n", "right")] if show_n else []
    cols += [("sinkhorn", "left")] if show_sk else []
    cols += [("row p50", "right"), ("row max", "right"), ("col p50", "right"), ("col max", "right"),
             ("min entry", "right"), ("logit range", "right"), ("iters to tol", "right"), ("G_f", "right"),
             ("G_b", "right"), ("verdict", "left")]
    t = Grid(title, cols)
    for r in sites:
        lr = "" if r.logit_range_max is None else f"{r.logit_range_max:.3g}"
        itt = ""
        if r.iters_to_tol_max is not None:
            itt = f"{r.iters_to_tol_p50}/{r.iters_to_tol_max}"
        elif r.iters_to_tol_unreached:  # about N iterations at the measured rate; never: the state repeats
            itt = ">1000"
            if r.iters_to_tol_estimate is not None:
                est = r.iters_to_tol_estimate
                itt = (f"~{est:.0f}" if est < 1e6 else f"~{est:.1e}") + f" @{r.iters_to_tol_rate:.4f}"
            elif r.iters_to_tol_never == r.iters_to_tol_unreached:
                itt = "never"
        cells = [escape(r.name)]
        cells += [escape(r.variant)] if show_variant else []
        cells += [str(r.n)] if show_n else []
        cells += [escape(f"{r.convention} x{r.iters}" if r.convention else "-")] if show_sk else []
        cells += [
            _sci(r.row_err.p50 if r.row_err else None), _sci(r.row_err.max if r.row_err else None),
            _sci(r.col_err.p50 if r.col_err else None), _sci(r.col_err.max if r.col_err else None),
            _sci(r.min_entry), lr, itt, f"{r.gain_f_mean:.4g}", f"{r.gain_b_mean:.4g}",
        ]
        t.add_row(*cells, Text(r.verdict, style=_verdict_style(r.verdict)))
    t.show()
    if sites and not (show_variant and show_n and show_sk):
        same = []
        if not show_variant:
            same.append(f"variant {sites[0].variant}")
        if not show_n:
            same.append(f"n = {sites[0].n}")
        if not show_sk and sites[0].convention:
            same.append(f"sinkhorn {sites[0].convention}, {sites[0].iters} iterations")
        out.print(escape("every site: " + ", ".join(same)), style="dim")
    out.print("row / col: max |sum - 1| over one matrix's rows / columns, p50 and max over tokens. "
              "G_f / G_b: Amax gain (mHC Sec. 3.1), mean over tokens. iters to tol: p50/max over tokens.",
              style="dim")
    lines = [f"sites: {s.sites} ({s.applicable} with a doubly-stochastic constraint), "
             f"{s.over_tol} over tolerance {s.tol:g}"]
    if s.worst_site is not None:
        lines.append(f"worst: {s.worst_site} ({s.worst_axis}, {_sci(s.worst_error)}); median site error "
                     f"{_sci(s.median_error)}")
    if s.conventions:
        lines.append(f"sinkhorn: {', '.join(s.conventions)}; exact axis in paper convention: {s.exact_axis}")
    for key, val in st.items():
        if isinstance(val, dict) and "value" in val:
            lines.append(f"{key}: {val['value']} (from {val.get('source', '?')})")
    for line in lines:
        out.print(escape(line))
    for a in s.advice:
        out.print(Text("advice: " + a, style="yellow"))
    for note in report.notes:
        out.print(escape(note), style="dim")


# ----------------------------------------------------------------------------------------------------- inspect


def _bytes(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.3g} {unit}"
        n /= 1000  # type: ignore[assignment]
    return str(n)


def inspect(report: Any) -> None:
    out.print(f"[bold]{escape(report.path)}[/bold]")
    out.print(f"layout: {escape(report.layout)} ({escape(report.layout_reason)})")
    out.print(f"n = {report.n} streams, C = {report.C}, {len(report.sites)} sites in {report.blocks} block(s), "
              f"stored as {report.source_dtype}")
    conv = "-" if report.convention is None else f"{report.convention}, {report.iters} iterations"
    if report.eps:
        conv += f", eps {report.eps:g}"
    out.print(f"sinkhorn: {escape(conv)}")
    for key, src in sorted(report.settings_source.items()):
        out.print(f"  {escape(key)}: from {escape(str(src))}", style="dim")
    t = Grid("sites (depth order; matrices converted to paper convention)",
             [(c, "right" if c in ("#", "params") else "left")
              for c in ("#", "site", "variant", "H_res", "tensors", "params", "check")], keys=2, wrap=["check"])
    for s in report.sites:
        tensors = "\n".join(f"{escape(ti.key)} {list(ti.shape)} {ti.dtype}" for ti in s.tensors)
        style = "green" if s.param_match else ("red" if s.param_match is False else "dim")
        t.add_row(str(s.index), escape(s.name), escape(s.variant), escape(s.exactness), tensors, _int(s.params),
                  Text(s.param_check, style=style))
    t.show()
    out.print(f"HC parameters: {report.total_params:,}; HC tensors {_bytes(report.hc_bytes)} of "
              f"{_bytes(report.bytes_total)} in the checkpoint (the analyses read only these); "
              f"read now: {_bytes(report.bytes_read)} (headers only)")
    if report.unmatched_keys:
        out.print(Text(f"{len(report.unmatched_keys)} HC-looking tensor(s) matched no rule "
                       "(describe them with --layout-file, see docs/layout-file.md):", style="yellow"))
        for ti in report.unmatched_keys[:20]:
            out.print(f"  {escape(ti.key)} {list(ti.shape)} {ti.dtype}")
    for note in report.notes:
        out.print(escape(note), style="dim")


# -------------------------------------------------------------------------------------------------- gain-sweep


def gain(report: Any, rows: Sequence[dict[str, Any]]) -> None:
    inp = report.inputs
    desc = ", ".join(f"{k} {v}" for k, v in inp.items() if v is not None and not isinstance(v, dict | list))
    cols = ["variant", "site", "", "G_f site", "G_b site", "G_f composite", "G_b composite", "G_b worst seed",
            "sigma_2", "||.-J/n||", "row err", "col err"]
    tokmean = any("gain_fwd_tokmean" in r for r in rows)
    if tokmean:
        cols[7:7] = ["G_f (token-mean H)", "G_b (token-mean H)"]
    t = Grid(f"Composite gains across depth ({report.sites} sites): {escape(desc)}",
             [(c, "left" if c in ("variant", "") else "right") for c in cols], keys=3)
    last = None
    for r in rows:
        first = r["variant"] != last
        if first and last is not None:
            t.add_section()
        last = r["variant"]
        cells: list[str | Text] = [escape(r["variant"]) if first else "", f"{r['site']} {escape(r['name'])}",
                 Text(r["tag"].replace("every", ""), style="red" if "worst" in r["tag"] else "dim"),
                 _g(r["site_gain_fwd"]), _g(r["site_gain_bwd"]), _g(r["gain_fwd"]), _g(r["gain_bwd"])]
        if tokmean:
            cells += [_g(r.get("gain_fwd_tokmean")), _g(r.get("gain_bwd_tokmean"))]
        cells += [_g(r["gain_bwd_max"]), _g(r["sigma2"]), _g(r["dist_uniform"]), _sci(r["row_err_max"]),
                  _sci(r["col_err_max"])]
        t.add_row(*cells)
    t.show()
    out.print("G_f / G_b: Amax gain magnitude (mHC Sec. 3.1): max |signed row / column sum|. composite: forward "
              "H_l...H_1, backward H_L...H_l. Medians over seeds; 'worst seed' = max over seeds. row/col err: "
              "max over seeds of the composite's doubly-stochastic error.", style="dim")
    for v in report.variants:
        if not v.ok:
            out.print(Text(f"{v.name}: skipped: {v.reason}", style="yellow"))
    for note in report.notes:
        out.print(escape(note), style="dim")
    out.print(f"elapsed: {report.elapsed_s:.2f} s", style="dim")


def _g(v: float | None) -> str:
    if v is None:
        return ""
    if not math.isfinite(v):
        return str(v)
    a = abs(v)
    if a != 0 and (a < 1e-3 or a >= 1e5):
        return f"{v:.3e}"
    return f"{v:.6g}"

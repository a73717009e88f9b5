"""Rich rendering of result objects for the terminal. Only the CLI imports this module.

Tables go to stdout; progress and warnings go to stderr, so ``--json`` output and shell pipes stay clean.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text


def _width() -> int | None:
    # Piped output (README pastes, CI logs) would wrap at 80 columns; tables here are wider than that.
    import os
    import sys

    if sys.stdout.isatty():
        return None
    try:
        return max(40, int(os.environ.get("COLUMNS", "160")))
    except ValueError:
        return 160


out = Console(highlight=False, soft_wrap=False, width=_width())
err = Console(stderr=True, highlight=False)


def _int(v: int | None) -> str:
    return "" if v is None else f"{v:,}"


def _sci(v: float | None, digits: int = 1) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "n/a"
    if v == 0:
        return "0"
    a = abs(v)
    if 1e-3 <= a < 1e4:
        return f"{v:.4g}"
    return f"{v:.{digits}e}"


def _pct(v: float) -> str:
    return f"{100 * v:.3g}%" if v < 10 else f"{v:.3g}x"


# ------------------------------------------------------------------------------------------------------ params


def params(report: Any) -> None:
    inp = report.inputs
    t = Table(
        title=f"HC parameters per site and per model: n = {inp.n}, C = {inp.C:,}, "
        f"{inp.layers} block(s) = {inp.sites} sites, {inp.form.value} form",
        title_justify="left",
    )
    for col in ("variant", "H_res", "H_pre", "H_post", "H_res", "norm", "per site", "per model", "overhead",
                "growth"):
        t.add_column(col, justify="left" if col in ("variant", "growth") else "right")
    t.columns[1].header = "exact?"
    t.columns[1].justify = "left"
    notes: list[str] = []
    for r in report.rows:
        name = r.variant + ("" if r.practical else " [red](impractical)[/red]")
        t.add_row(name, str(r.exactness.value), _int(r.pre), _int(r.post), _int(r.res), _int(r.norm),
                  _int(r.per_site), _int(r.per_model), _pct(r.overhead), escape(r.growth))
        if r.effective is not None:
            e = r.effective
            t.add_row(f"  {r.variant} (effective)", "", _int(e.pre), _int(e.post), _int(e.res), _int(e.norm),
                      _int(e.per_site), _int(e.per_model), _pct(e.overhead), "", style="dim")
        for note in r.notes:
            notes.append(f"{r.variant}: {note}")
    out.print(t)
    out.print(f"overhead = per model / baseline; baseline: {escape(report.baseline)} "
              f"({inp.baseline_params:,} parameters for {inp.layers} block(s)).", style="dim")
    if any(not r.practical for r in report.rows):
        out.print("impractical: counted exactly in integer arithmetic, never allocated.", style="dim")
    for note in notes:
        out.print(escape(note), style="dim")


# ---------------------------------------------------------------------------------------------------- variants


def variants(specs: Sequence[Any]) -> None:
    t = Table(title="Variants", title_justify="left")
    t.add_column("name")
    t.add_column("H_res")
    t.add_column("growth")
    t.add_column("summary")
    for s in specs:
        t.add_row(s.name, str(s.exactness.value), escape(s.growth), escape(s.summary))
    out.print(t)


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


def warn(msg: str) -> None:
    err.print(Text(f"hcdiag: {msg}", style="yellow"))

"""Rendered tables against golden files (tests/golden/*.txt), as torchinfo does.

The numbers in these tables are checked against independent oracles elsewhere (test_cli_params.py against
SPEC section 5); this file guards the rendering itself. After an intended change of layout, rewrite the golden
files with ``HCDIAG_UPDATE_GOLDEN=1 python -m pytest tests/test_golden_tables.py`` and review the diff.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
from cli_runner import run_cli

GOLDEN = Path(__file__).parent / "golden"
SAMPLES = Path(__file__).resolve().parent.parent / "samples"
CASES = {
    "params_n8_C4096": ["params", "--n", "8", "--C", "4096"],
    "params_n4_C2560_30blocks_paper": ["params", "--n", "4", "--C", "2560", "--layers", "30", "--form", "paper"],
}


@pytest.fixture()
def fixed_width(monkeypatch):
    monkeypatch.setenv("COLUMNS", "160")  # each run reads $COLUMNS, as a user's terminal sets it


@pytest.mark.parametrize("name", sorted(CASES))
def test_table_matches_golden(name, fixed_width):
    p = run_cli(*CASES[name])
    assert p.returncode == 0, p.stderr
    text = "\n".join(line.rstrip() for line in p.stdout.splitlines()) + "\n"
    path = GOLDEN / f"{name}.txt"
    if os.environ.get("HCDIAG_UPDATE_GOLDEN"):
        path.write_text(text)
    assert text == path.read_text()


#: every command's table at three terminal widths (issue 11): folded into blocks, never a cut cell
WIDE_CASES = {
    "params": ["params", "--n", "8", "--C", "4096"],
    "stochasticity": ["stochasticity", "samples/mhc.safetensors"],
    "gain-sweep": ["gain-sweep", "--layers", "4", "--variants", "hc-static,mhc,kromhc", "--seeds", "2"],
    "gain-sweep-from": ["gain-sweep", "--from", "samples/hc-dynamic.safetensors"],
    "inspect": ["inspect", "samples/kromhc.safetensors"],
    "variants": ["variants"],
}
WIDTHS = (80, 120, 200)


@pytest.fixture()
def width(request, monkeypatch):
    monkeypatch.setenv("COLUMNS", str(request.param))
    return request.param


def _normalise(text: str) -> str:
    """Trailing blanks dropped; wall-clock times (``elapsed: 0.02 s``) masked."""
    text = re.sub(r"elapsed: [0-9.]+ s", "elapsed: <t> s", text)
    return "\n".join(line.rstrip() for line in text.splitlines()) + "\n"


@pytest.mark.parametrize("width", WIDTHS, indirect=True)
@pytest.mark.parametrize("name", sorted(WIDE_CASES))
def test_every_command_at_every_width(name, width, monkeypatch):
    monkeypatch.chdir(SAMPLES.parent)  # sample paths relative to the repository, as the README runs them
    p = run_cli(*WIDE_CASES[name])
    assert p.returncode == 0, p.stderr
    text = _normalise(p.stdout)
    assert "\u2026" not in text  # no cell or line cut with an ellipsis
    assert max(len(line) for line in text.splitlines()) <= width
    path = GOLDEN / f"{name}_{width}cols.txt"
    if os.environ.get("HCDIAG_UPDATE_GOLDEN"):
        path.write_text(text)
    assert text == path.read_text()

"""Rendered tables against golden files (tests/golden/*.txt), as torchinfo does.

The numbers in these tables are checked against independent oracles elsewhere (test_cli_params.py against
SPEC section 5); this file guards the rendering itself. After an intended change of layout, rewrite the golden
files with ``HCDIAG_UPDATE_GOLDEN=1 python -m pytest tests/test_golden_tables.py`` and review the diff.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from cli_runner import run_cli

GOLDEN = Path(__file__).parent / "golden"
CASES = {
    "params_n8_C4096": ["params", "--n", "8", "--C", "4096"],
    "params_n4_C2560_30blocks_paper": ["params", "--n", "4", "--C", "2560", "--layers", "30", "--form", "paper"],
}


@pytest.fixture()
def fixed_width():
    from hcdiag import render

    old = render.out.width
    render.out.width = 160
    yield
    render.out.width = old


@pytest.mark.parametrize("name", sorted(CASES))
def test_table_matches_golden(name, fixed_width):
    p = run_cli(*CASES[name])
    assert p.returncode == 0, p.stderr
    text = "\n".join(line.rstrip() for line in p.stdout.splitlines()) + "\n"
    path = GOLDEN / f"{name}.txt"
    if os.environ.get("HCDIAG_UPDATE_GOLDEN"):
        path.write_text(text)
    assert text == path.read_text()

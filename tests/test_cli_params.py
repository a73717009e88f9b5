"""`hcdiag params` end to end: the console entry point, JSON on stdout, exit codes and one-line errors.

Expected numbers are SPEC section 5's published table (independent of hcdiag's code) and HC App. B.
"""

from __future__ import annotations

import csv
import json
import subprocess
import sys

import pytest
from cli_runner import run_cli

# (variant, n, C) -> per-site total in the reference-code form, SPEC section 5
CODE_FORM = {
    ("mhc", 4, 2560): 256_027, ("mhc", 8, 4096): 2_654_291,
    ("mhc-lite", 4, 2560): 337_955, ("mhc-lite", 8, 4096): 1_321_803_155,
    ("kromhc", 4, 2560): 133_135, ("kromhc", 8, 4096): 753_689,
    ("tbp", 4, 2560): 256_028, ("tbp", 8, 4096): 2_654_292,
    ("hc-static", 4, 2560): 24, ("hc-static", 8, 4096): 80,
    ("hc-dynamic", 4, 2560): 15_386, ("hc-dynamic", 8, 4096): 41_042,
}
TBP_EFFECTIVE = {(4, 2560): 184_341, (8, 4096): 2_162_757}
PAPER_MHC = {(4, 2560): 245_787, (8, 4096): 2_621_523}


run = run_cli


@pytest.fixture(scope="module")
def docs() -> dict[tuple[int, int, str], dict]:
    out = {}
    for n, C in [(4, 2560), (8, 4096)]:
        for form in ("code", "paper"):
            p = run("params", "--n", str(n), "--C", str(C), "--form", form, "--json")
            assert p.returncode == 0, p.stderr
            out[(n, C, form)] = json.loads(p.stdout)  # stdout is exactly one JSON document
    return out


@pytest.mark.parametrize("key", sorted(CODE_FORM))
def test_code_form_matches_spec(docs, key):
    variant, n, C = key
    rows = {r["variant"]: r for r in docs[(n, C, "code")]["rows"]}
    assert rows[variant]["per_site"] == CODE_FORM[key]


@pytest.mark.parametrize("nc", [(4, 2560), (8, 4096)])
def test_paper_form_mhc_and_tbp_effective(docs, nc):
    n, C = nc
    paper = {r["variant"]: r for r in docs[(n, C, "paper")]["rows"]}
    code = {r["variant"]: r for r in docs[(n, C, "code")]["rows"]}
    assert paper["mhc"]["per_site"] == PAPER_MHC[nc]
    assert code["tbp"]["effective"]["per_site"] == TBP_EFFECTIVE[nc]


def test_published_model_totals():
    # HC App. B: OLMo-1B, C = 2048, 16 blocks (32 sites), n = 4: SHC 768, DHC 394,048
    p = run("params", "--n", "4", "--C", "2048", "--layers", "16", "--variants", "hc-static,hc-dynamic", "--json")
    rows = {r["variant"]: r["per_model"] for r in json.loads(p.stdout)["rows"]}
    assert rows == {"hc-static": 768, "hc-dynamic": 394_048}
    # mHC 27B: C = 2560, 30 blocks, n = 4, paper form: 60 x 245,787
    p = run("params", "--n", "4", "--C", "2560", "--layers", "30", "--variants", "mhc", "--form", "paper", "--json")
    assert json.loads(p.stdout)["rows"][0]["per_model"] == 14_747_220


def test_impractical_sizes_are_exact_integers():
    p = run("params", "--n", "12", "--C", "4096", "--variants", "mhc-lite", "--json")
    row = json.loads(p.stdout)["rows"][0]
    f12 = 479_001_600
    # H_pre, H_post: n^2 C + n + 1 each; H_res: n! nC + n! + 1; norm nC (SPEC section 5, code form)
    assert row["per_site"] == 2 * (144 * 4096 + 13) + f12 * 12 * 4096 + f12 + 1 + 12 * 4096
    assert row["practical"] is False


def test_csv_and_output_dir(tmp_path):
    p = run("params", "--n", "4", "--C", "2560", "--csv", str(tmp_path / "p.csv"), "-o", str(tmp_path / "out"))
    assert p.returncode == 0, p.stderr
    rows = list(csv.DictReader((tmp_path / "p.csv").open()))
    assert {r["variant"]: int(r["per_site"]) for r in rows}["kromhc"] == 133_135
    assert json.loads((tmp_path / "out" / "params.json").read_text())["inputs"]["n"] == 4
    assert not [f for f in tmp_path.rglob("*.tmp")]


@pytest.mark.parametrize(
    "args, option",
    [
        (["--n", "0"], "--n"),
        (["--n", "-3"], "--n"),
        (["--C", "abc"], "--C"),
        (["--n", "8", "--kron-factors", "3,3"], "--kron-factors"),
        (["--variants", "nope"], "--variants"),
        (["--form", "xyz"], "--form"),
        (["--layers", "0"], "--layers"),
    ],
)
def test_bad_options_one_line_exit_2(args, option):
    p = run("params", *args)
    assert p.returncode == 2
    assert p.stdout == ""
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1, p.stderr
    assert option in lines[0] and "Traceback" not in p.stderr


def test_version_and_help():
    from hcdiag import __version__

    # the real entry point, once, in a subprocess
    p = subprocess.run([sys.executable, "-m", "hcdiag", "--version"], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0 and p.stdout.strip() == f"hcdiag {__version__}"
    h = run("params", "--help")
    assert h.returncode == 0 and "hcdiag params --n 8 --C 4096" in h.stdout

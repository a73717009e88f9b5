"""CLI conventions and what a person sees (issue 11): whole cells at 80 columns, complete CSV files with their
column meanings, `--csv -`, `-h`, `-q`, completion, flags without a value metavar, start-up without torch.

The numbers are checked against the JSON document of the same run (the tables and CSV must carry what it
holds), formatted here with the format each column states; the JSON's own numbers are checked against
independent oracles in test_cli_params.py, test_gain*.py and test_stochasticity.py.
"""

from __future__ import annotations

import csv
import io
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
from cli_runner import run_cli

SAMPLES = Path(__file__).resolve().parent.parent / "samples"
MHC = SAMPLES / "mhc.safetensors"
COMMANDS = ("params", "stochasticity", "gain-sweep", "inspect", "verify", "track", "variants")


@pytest.fixture()
def at80(monkeypatch):
    monkeypatch.setenv("COLUMNS", "80")  # each run reads $COLUMNS, as a user's terminal sets it


def _lines_with(text: str, key: str) -> str:
    """Every output line that names ``key`` as a whole cell (folded tables repeat the key in every block)."""
    return "\n".join(line for line in text.splitlines() if f" {key} " in line)


def _sci(v: float | None) -> str:
    if v is None:
        return "n/a"
    return "0" if v == 0 else f"{v:.1e}"


# ---- whole cells at 80 columns: every JSON value of the rows shown appears ----------------------------------


def test_params_at_80_columns_shows_every_count(at80):
    table = run_cli("params", "--n", "8", "--C", "4096")
    doc = json.loads(run_cli("params", "--n", "8", "--C", "4096", "--json").stdout)
    assert table.returncode == 0 and "\u2026" not in table.stdout
    assert max(len(line) for line in table.stdout.splitlines()) <= 80
    for row in doc["rows"]:
        lines = _lines_with(table.stdout, row["variant"])
        for key in ("pre", "post", "res", "norm", "per_site", "per_model"):
            assert f" {row[key]:,} " in lines, (row["variant"], key)
        pct = row["overhead"] * 100
        assert (f"{pct:.3g}%" if row["overhead"] < 10 else f"{row['overhead']:.3g}x") in lines
        assert row["exactness"] in lines and row["growth"] in lines


def test_stochasticity_at_80_columns_shows_every_site_value(at80):
    table = run_cli("stochasticity", MHC)
    doc = json.loads(run_cli("stochasticity", MHC, "--json").stdout)
    assert table.returncode == 0 and "\u2026" not in table.stdout
    assert max(len(line) for line in table.stdout.splitlines()) <= 80
    for s in doc["sites"]:
        lines = _lines_with(table.stdout, s["name"])
        for key in ("row_err_p50", "row_err_max", "col_err_p50", "col_err_max", "min_entry"):
            assert f" {_sci(s[key])} " in lines, (s["name"], key)
        assert f" {s['logit_range_max']:.3g} " in lines
        assert f" {s['gain_f_mean']:.4g} " in lines and f" {s['gain_b_mean']:.4g} " in lines
        assert s["verdict"] in lines


def test_gain_sweep_from_at_80_columns_shows_every_value_of_the_rows_shown(at80):
    table = run_cli("gain-sweep", "--from", MHC)
    doc = json.loads(run_cli("gain-sweep", "--from", MHC, "--json").stdout)
    assert table.returncode == 0 and "\u2026" not in table.stdout
    assert max(len(line) for line in table.stdout.splitlines()) <= 80
    curves = doc["variants"][0]["curves"]

    def g(v: float) -> str:
        a = abs(v)
        return f"{v:.3e}" if a != 0 and (a < 1e-3 or a >= 1e5) else f"{v:.6g}"

    shown = 0
    for i, name in enumerate(doc["site_names"]):
        lines = _lines_with(table.stdout, f"{i + 1} {name}")
        if not lines:
            continue  # the table samples sites; the CSV holds them all
        shown += 1
        for metric, stat in (("site_gain_fwd", "median"), ("site_gain_bwd", "median"), ("gain_fwd", "median"),
                             ("gain_bwd", "median"), ("gain_bwd", "max"), ("sigma2", "median"),
                             ("dist_uniform", "median")):
            assert f" {g(curves[metric][stat][i])} " in lines, (name, metric, stat)
        for metric in ("row_err", "col_err"):
            assert f" {_sci(curves[metric]['max'][i])} " in lines, (name, metric)
    assert shown >= 3


# ---- complete CSV -----------------------------------------------------------------------------------------------


def _num(text: str) -> float:
    return float(text)


def test_gain_sweep_csv_is_every_curve_value_in_long_form(tmp_path):
    args = ["gain-sweep", "--layers", "3", "--variants", "hc-static,mhc", "--seeds", "2", "--tokens", "2", "--C", "4"]
    doc = json.loads(run_cli(*args, "--json").stdout)
    p = run_cli(*args, "--csv", tmp_path / "g.csv")
    assert p.returncode == 0, p.stderr
    rows = list(csv.DictReader((tmp_path / "g.csv").open()))
    expected = {}
    for v in doc["variants"]:
        for key in ("curves", "token_mean_curves"):
            for metric, stats in (v[key] or {}).items():
                for stat, values in stats.items():
                    for i, x in enumerate(values):
                        expected[(v["name"], key, doc["site_names"][i], metric, stat)] = (i + 1, x)
    got = {(r["variant"], r["curves"], r["site"], r["metric"], r["statistic"]): r for r in rows}
    assert len(got) == len(rows) == len(expected)  # one row per (variant, curves, site, metric, statistic)
    assert set(got) == set(expected)
    for k, (index, x) in expected.items():
        r = got[k]
        assert int(r["site_index"]) == index
        value = _num(r["value"])
        assert (not math.isfinite(value)) if x is None else value == x, k  # JSON null <-> inf / nan
    meta = json.loads((tmp_path / "g.csv-metadata.json").read_text())
    cols = [c["name"] for c in meta["tableSchema"]["columns"]]
    assert cols == list(rows[0]) and all(c["dc:description"] for c in meta["tableSchema"]["columns"])
    assert meta["url"] == "g.csv"


def test_stochasticity_csv_holds_every_site_and_says_what_each_column_means(tmp_path):
    doc = json.loads(run_cli("stochasticity", MHC, "--json").stdout)
    p = run_cli("stochasticity", MHC, "--csv", tmp_path / "s.csv")
    assert p.returncode == 0, p.stderr
    rows = list(csv.DictReader((tmp_path / "s.csv").open()))
    assert [r["name"] for r in rows] == [s["name"] for s in doc["sites"]]
    for r, s in zip(rows, doc["sites"], strict=True):
        assert _num(r["col_err_max"]) == s["col_err_max"] and _num(r["min_entry"]) == s["min_entry"]
    meta = json.loads((tmp_path / "s.csv-metadata.json").read_text())
    described = {c["name"]: c["dc:description"] for c in meta["tableSchema"]["columns"]}
    assert list(described) == list(rows[0])
    vague = [c for c, d in described.items() if not d or "see the field of the same name" in d]
    assert not vague, f"describe these stochasticity columns in hcdiag/columns.py COLUMNS: {vague}"


@pytest.mark.parametrize("args", [["params", "--n", "4", "--C", "64"], ["variants"], ["inspect", MHC],
                                  ["gain-sweep", "--from", MHC], ["track", MHC]], ids=lambda a: a[0])
def test_every_csv_column_is_described(tmp_path, args):
    p = run_cli(*args, "--csv", tmp_path / "x.csv")
    assert p.returncode == 0, p.stderr
    header = next(csv.reader((tmp_path / "x.csv").open()))
    meta = json.loads((tmp_path / "x.csv-metadata.json").read_text())
    described = {c["name"]: c["dc:description"] for c in meta["tableSchema"]["columns"]}
    assert list(described) == header
    vague = [c for c, d in described.items() if not d or "see the field of the same name" in d]
    assert not vague, f"describe these {args[0]} columns in hcdiag/columns.py COLUMNS: {vague}"


@pytest.mark.parametrize("args", [["params", "--n", "4", "--C", "64"], ["variants"], ["inspect", MHC],
                                  ["stochasticity", MHC], ["gain-sweep", "--from", MHC], ["track", MHC]],
                         ids=lambda a: a[0])
def test_csv_dash_writes_the_csv_to_stdout_and_nothing_else(tmp_path, args):
    p = run_cli(*args, "--csv", "-")
    assert p.returncode == 0, p.stderr
    f = tmp_path / "x.csv"
    assert run_cli(*args, "--csv", f).returncode == 0
    assert p.stdout == f.read_text()  # the same CSV, no table around it
    assert not Path("-").exists()
    assert list(csv.DictReader(io.StringIO(p.stdout)))


def test_json_and_csv_dash_together_are_refused():
    p = run_cli("params", "--json", "--csv", "-")
    assert p.returncode == 2 and p.stdout == ""
    assert len(p.stderr.strip().splitlines()) == 1 and "--csv" in p.stderr


@pytest.mark.parametrize("args", [["inspect", MHC], ["variants"]], ids=lambda a: a[0])
def test_inspect_and_variants_have_csv_and_output_dir(tmp_path, args):
    name = args[0]
    p = run_cli(*args, "-o", tmp_path / "out")
    assert p.returncode == 0, p.stderr
    doc = json.loads((tmp_path / "out" / f"{name}.json").read_text())
    rows = list(csv.DictReader((tmp_path / "out" / f"{name}.csv").open()))
    key = "sites" if name == "inspect" else "variants"
    assert [r["name"] for r in rows] == [s["name"] for s in doc[key]]
    assert (tmp_path / "out" / f"{name}.csv-metadata.json").exists()


# ---- conventions --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_h_json_csv_and_o(command):
    h = run_cli(command, "-h")
    assert h.returncode == 0 and "Usage:" in h.stdout
    for opt in ("--json", "--csv", "--output-dir", "-o", "--quiet", "-q"):
        assert opt in h.stdout, (command, opt)


def test_root_help_offers_completion_and_h():
    h = run_cli("-h")
    assert h.returncode == 0
    assert "--install-completion" in h.stdout and "--show-completion" in h.stdout


@pytest.mark.parametrize("command", COMMANDS)
def test_flags_show_no_value_metavar(command):
    import typer

    from hcdiag import cli

    root = typer.main.get_command(cli.app)
    cli._flags_without_metavar(root)
    cmd = root.commands[command]
    help_opt = cmd.get_help_option(typer.Context(cmd, info_name=command, help_option_names=["-h", "--help"]))
    flags = [p for p in (*cmd.params, help_opt) if getattr(p, "is_flag", False)]
    assert flags and all(p.metavar == "" for p in flags)
    assert "<bool>" not in run_cli(command, "--help").stdout


def test_quiet_prints_nothing_but_asked_for_outputs(tmp_path):
    q = run_cli("gain-sweep", "--layers", "2", "--variants", "mhc", "-q", "-o", tmp_path)
    assert q.returncode == 0 and q.stdout == "" and q.stderr == ""
    assert (tmp_path / "gain-sweep.json").exists()
    j = run_cli("params", "--quiet", "--json")
    assert json.loads(j.stdout)["command"] == "params" and j.stderr == ""
    failed = run_cli("stochasticity", MHC, "-q", "--fail-above", "1e-9")
    assert failed.returncode == 1 and failed.stdout == "" and "check failed" in failed.stderr


def test_params_n0_is_still_one_clean_line():
    p = run_cli("params", "--n", "0", "--C", "64")
    assert p.returncode == 2 and p.stdout == ""
    assert len(p.stderr.strip().splitlines()) == 1 and "--n" in p.stderr and "Traceback" not in p.stderr


# ---- gain-sweep's default perturbation (mHC Figs. 3 and 7) -----------------------------------------------------


def test_bare_gain_sweep_shows_hc_growing_and_doubly_stochastic_variants_bounded():
    # the documented default, N(0, 0.2^2) on the static H_res logits, at a shallower stack to keep the suite fast
    doc = json.loads(run_cli("gain-sweep", "--layers", "32", "--variants", "hc-static,mhc,kromhc,tbp",
                             "--json").stdout)
    assert doc["inputs"]["init"] == "perturb" and doc["inputs"]["logit_scale"] == 0.2
    peak = {v["name"]: max(max(v["curves"]["gain_fwd"]["median"]), max(v["curves"]["gain_bwd"]["median"]))
            for v in doc["variants"]}
    assert peak["hc-static"] > 10
    assert all(peak[v] < 1.05 for v in ("mhc", "kromhc", "tbp")), peak
    from hcdiag import cli

    assert cli.GAIN_DEFAULT_SCALE == 0.2 and "0.2" in run_cli("gain-sweep", "--help").stdout


def test_init_paper_keeps_the_exact_initialisation():
    doc = json.loads(run_cli("gain-sweep", "--layers", "4", "--init", "paper", "--json").stdout)
    assert doc["inputs"]["init"] == "paper" and doc["inputs"]["logit_scale"] == 0
    for v in doc["variants"]:
        if v["name"] in ("identity", "mhc-lite", "kromhc", "tbp", "ihc"):
            assert all(abs(g - 1) < 1e-12 for g in v["curves"]["gain_fwd"]["median"]), v["name"]
    bad = run_cli("gain-sweep", "--layers", "4", "--init", "paper", "--logit-scale", "0.5")
    assert bad.returncode == 2 and "--logit-scale" in bad.stderr


# ---- start-up without torch ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("args", [["params", "--n", "8", "--C", "4096"], ["variants"]], ids=lambda a: a[0])
def test_params_and_variants_import_neither_torch_nor_numpy(args):
    code = (
        "import sys, runpy\n"
        f"sys.argv = ['hcdiag', *{args!r}]\n"
        "try:\n    runpy.run_module('hcdiag', run_name='__main__')\n"
        "except SystemExit as e:\n    assert not e.code, e.code\n"
        "heavy = [m for m in ('torch', 'numpy') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert "mhc" in p.stdout


def test_shell_completion_completes_commands_and_options():
    import os

    def complete(words: str, cword: int) -> str:
        env = {**os.environ, "_HCDIAG_COMPLETE": "complete_bash", "COMP_WORDS": words, "COMP_CWORD": str(cword)}
        p = subprocess.run([sys.executable, "-m", "hcdiag"], env=env, capture_output=True, text=True, timeout=120)
        assert p.returncode == 0, p.stderr
        return p.stdout

    assert complete("hcdiag par", 1).split() == ["params"]
    assert "--init" in complete("hcdiag gain-sweep --in", 2).split()


def test_each_run_takes_its_own_width(monkeypatch):
    """No state outlives a run: a second main() in one process follows its own $COLUMNS (issue 10)."""
    widths = []
    for cols in ("200", "80", "120"):
        monkeypatch.setenv("COLUMNS", cols)
        p = run_cli("params", "--n", "8", "--C", "4096")
        assert p.returncode == 0, p.stderr
        widths.append(max(len(line) for line in p.stdout.splitlines()))
    assert widths[1] <= 80 < widths[2] <= 120 < widths[0] <= 200

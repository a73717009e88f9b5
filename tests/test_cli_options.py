"""Options that do not apply are usage errors (exit 2, one line naming the option), never silently ignored."""

from __future__ import annotations

from pathlib import Path

import pytest
from cli_runner import run_cli

MHC = Path(__file__).resolve().parent.parent / "samples" / "mhc.safetensors"

SYNTHETIC_ONLY = [["--layers", "10"], ["--variants", "mhc"], ["--logit-scale", "1"], ["--seeds", "8"],
                  ["--init", "paper"], ["--n", "4"], ["-C", "8"], ["--kron-factors", "2,2"]]


def _one_line_usage_error(p, option: str) -> None:
    assert p.returncode == 2, (p.returncode, p.stderr)
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and option in lines[0] and "does not apply" in lines[0], p.stderr
    assert p.stdout == ""


@pytest.mark.parametrize("opt", SYNTHETIC_ONLY, ids=lambda o: o[0])
def test_gain_sweep_from_refuses_synthetic_stack_options(opt):
    _one_line_usage_error(run_cli("gain-sweep", "--from", MHC, *opt), opt[0] if opt[0] != "-C" else "--C")


@pytest.mark.parametrize("opt", [["--probe", "random"], ["--activations", str(MHC)], ["--state-key", "model"]],
                         ids=lambda o: o[0])
def test_synthetic_gain_sweep_refuses_checkpoint_options(opt):
    _one_line_usage_error(run_cli("gain-sweep", "--layers", "2", *opt), opt[0])


@pytest.mark.parametrize("command", [["stochasticity", MHC], ["gain-sweep", "--from", MHC]], ids=lambda c: c[0])
@pytest.mark.parametrize("opt", [["--tokens", "5"], ["--seed", "1"], ["--activations", str(MHC)]], ids=lambda o: o[0])
def test_probe_options_need_their_probe(command, opt):
    _one_line_usage_error(run_cli(*command, *opt), opt[0])


def test_the_same_options_with_their_probe_run():
    assert run_cli("stochasticity", MHC, "--probe", "random", "--tokens", "5", "--seed", "1").returncode == 0
    assert run_cli("gain-sweep", "--layers", "2", "--seeds", "2", "--tokens", "2").returncode == 0


@pytest.mark.parametrize("command", [["stochasticity", MHC], ["gain-sweep", "--layers", "2"],
                                     ["track", MHC]], ids=lambda c: c[0])
@pytest.mark.parametrize("opt", [["--fig-format", "svg"], ["--fig-size", "8x5"]], ids=lambda o: o[0])
def test_figure_options_need_plot(command, opt):
    _one_line_usage_error(run_cli(*command, *opt), opt[0])


@pytest.mark.parametrize("command", [["stochasticity", MHC], ["gain-sweep", "--from", MHC], ["track", MHC]],
                         ids=lambda c: c[0])
def test_iters_past_the_cli_bound_is_a_usage_error_not_a_hang(command):
    """--iters 10^8 would run for hours; each command refuses it with one line naming the bound (exit 2)."""
    from hcdiag.cli import MAX_CLI_ITERS

    p = run_cli(*command, "--iters", str(100_000_000))
    assert p.returncode == 2, (p.returncode, p.stderr)
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and "--iters" in lines[0] and f"{MAX_CLI_ITERS}" in lines[0], p.stderr
    assert p.stdout == ""

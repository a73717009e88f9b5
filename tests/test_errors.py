"""Error boundaries through the real CLI: a bug inside hcdiag is exit 4 with one "internal error" line, a bad
file is exit 3 with the reader's own line, and HCDIAG_DEBUG=1 shows the traceback on both paths.

The bug is injected by monkeypatching a helper of the lucidrains layout to raise KeyError, on a checkpoint
written by the real ``hyper-connections`` package.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from cli_runner import run_cli
from hyper_connections.manifold_constrained_hyper_connections import ManifoldConstrainedHyperConnections as MHC
from safetensors.torch import save_file

from hcdiag.io import lucidrains_layout

INTERNAL = "hcdiag: internal error: KeyError: 'injected'; rerun with HCDIAG_DEBUG=1 for the traceback"
COMMANDS = (["inspect"], ["stochasticity"], ["gain-sweep", "--from"], ["stochasticity", "--json"])


@pytest.fixture(scope="module")
def mhc_file(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    net = torch.nn.ModuleDict({"attn_hc": MHC(4, dim=8, layer_index=0), "ff_hc": MHC(4, dim=8, layer_index=1)})
    path = tmp_path_factory.mktemp("lucidrains") / "mhc.safetensors"
    save_file({k: v.detach().contiguous() for k, v in net.state_dict().items()}, str(path))
    return path


def _boom(*args, **kwargs):
    raise KeyError("injected")


@pytest.fixture(autouse=True)
def _no_debug(monkeypatch):
    monkeypatch.delenv("HCDIAG_DEBUG", raising=False)


def test_the_checkpoint_reads_cleanly(mhc_file):
    for cmd in COMMANDS:
        r = run_cli(*cmd, mhc_file)
        assert r.returncode == 0 and r.stderr == "", (cmd, r.stderr)


@pytest.mark.parametrize("where", ["build_site", "_is_lucidrains_group"])  # load(), detect()
@pytest.mark.parametrize("cmd", COMMANDS, ids=" ".join)
def test_a_bug_in_a_reader_is_an_internal_error(mhc_file, monkeypatch, where, cmd):
    monkeypatch.setattr(lucidrains_layout, where, _boom)
    r = run_cli(*cmd, mhc_file)
    assert r.returncode == 4
    assert r.stderr.splitlines() == [INTERNAL] and r.stdout == ""


def test_a_bug_after_reading_is_an_internal_error(mhc_file, monkeypatch):
    """Not exit 3 because a file was read earlier in the same process (the CLI kept that in a global once)."""
    import hcdiag.stochasticity

    assert run_cli("inspect", mhc_file).returncode == 0
    monkeypatch.setattr(hcdiag.stochasticity, "analyze_stochasticity", _boom)
    r = run_cli("stochasticity", mhc_file)
    assert r.returncode == 4 and r.stderr.splitlines() == [INTERNAL]


def test_debug_shows_the_traceback_of_a_bug(mhc_file, monkeypatch):
    monkeypatch.setattr(lucidrains_layout, "build_site", _boom)
    monkeypatch.setenv("HCDIAG_DEBUG", "1")
    r = run_cli("stochasticity", mhc_file)
    assert r.returncode == 4
    lines = r.stderr.splitlines()
    assert lines[0] == "Traceback (most recent call last):" and lines[-1] == INTERNAL
    assert "in _boom" in r.stderr and "KeyError: 'injected'" in lines[-2]


def test_a_bad_file_is_exit_3_and_debug_shows_what_the_reader_caught(tmp_path, monkeypatch):
    bad = tmp_path / "ckpt.pt"
    bad.write_bytes(b"PK\x03\x04" + bytes(range(256)) * 4)  # a damaged zip archive
    r = run_cli("inspect", bad)
    assert r.returncode == 3 and len(r.stderr.splitlines()) == 1
    assert r.stderr.startswith(f"hcdiag: error: {bad}: not a PyTorch or safetensors checkpoint (torch.load failed")
    monkeypatch.setenv("HCDIAG_DEBUG", "1")
    r = run_cli("inspect", bad)
    assert r.returncode == 3 and "Traceback" in r.stderr
    # the torch.load error the reader turned into an InputError is shown too, then the same one line
    assert "During handling of the above exception" in r.stderr and "InputError" in r.stderr
    assert r.stderr.splitlines()[-1].startswith("hcdiag: error: ")


def test_a_usage_error_under_debug_keeps_its_exit_code(monkeypatch):
    monkeypatch.setenv("HCDIAG_DEBUG", "1")
    r = run_cli("params", "--n", "0")
    assert r.returncode == 2 and "Traceback" in r.stderr and r.stderr.splitlines()[-1].startswith("hcdiag: error:")


def test_a_real_process_exits_4_and_debug_prints_the_traceback(mhc_file):
    """The installed entry point, not the in-process runner: exit status and stderr of a real interpreter."""
    code = (
        "import sys\n"
        "from hcdiag.io import lucidrains_layout\n"
        "def boom(*a, **k):\n"
        "    raise KeyError('injected')\n"
        "lucidrains_layout.build_site = boom\n"
        "from hcdiag.cli import main\n"
        "main(sys.argv[1:])\n"
    )
    env = {**os.environ, "HCDIAG_DEBUG": "1"}
    r = subprocess.run([sys.executable, "-c", code, "stochasticity", str(mhc_file)], capture_output=True, text=True,
                       env=env, timeout=120)  # fmt: skip
    assert r.returncode == 4 and r.stdout == ""
    assert r.stderr.startswith("Traceback") and r.stderr.splitlines()[-1] == INTERNAL


@pytest.mark.parametrize("exc", [MemoryError(), RuntimeError(
    "[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate memory: you tried to "
    "allocate 40000000000000 bytes. Error code 12 (Cannot allocate memory)")], ids=["python", "torch"])
def test_running_out_of_memory_while_reading_is_not_a_damaged_file(mhc_file, monkeypatch, exc) -> None:
    """torch's CPU allocator raises the RuntimeError above (torch 2.13, ``torch.empty(10**13)``)."""
    from hcdiag.io import source

    def oom(*args, **kwargs):
        raise exc

    monkeypatch.setattr(source, "_convert", oom)
    p = run_cli("stochasticity", mhc_file)
    assert p.returncode == 4 and "damaged" not in p.stderr, p.stderr
    assert p.stderr.startswith(f"hcdiag: error: out of memory ({type(exc).__name__})"), p.stderr
    assert p.stderr.count("\n") == 1


def test_torchs_allocator_failure_is_recognised() -> None:
    from hcdiag.errors import is_out_of_memory

    with pytest.raises(RuntimeError) as e:
        torch.empty(1 << 62, dtype=torch.uint8)
    assert is_out_of_memory(e.value), str(e.value)
    assert not is_out_of_memory(RuntimeError("shape mismatch"))

"""Recorded activations are read one site, one tensor at a time (issue 14 item 4).

A capture of a real model (transformers DeepSeek-V4, recorded by :func:`hcdiag.capture.capture` in
tests/e2e_layouts.py) is read through :func:`read_activations` / ``--probe activations``: only the header until a
tensor is asked for, then exactly that tensor; the values are the file's; the CLI's numbers match the library
module's own H_res on the recorded x (and verify's update residual the recorded tensors); a capture whose
per-site working set would not fit is refused in one line, exit 3, before any tensor is read.
"""

from __future__ import annotations

import json
import re
import weakref

import numpy as np
import pytest
import safetensors
import torch
from cli_runner import run_cli
from safetensors import safe_open
from safetensors.torch import load_file

from hcdiag.capture import OPTIONAL, read_activations

pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    from e2e_layouts import deepseek_v4

    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield deepseek_v4(tmp_path_factory.mktemp("dsv4"))
    torch.set_num_threads(old)


class Reads:
    """Every tensor read from a safetensors file (``safe_open(...).get_tensor``), with its bytes."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.keys: list[str] = []
        self.bytes = 0
        real = safetensors.safe_open
        log = self

        class Counting:
            def __init__(self, *args, **kwargs) -> None:
                self._f = real(*args, **kwargs)

            def __enter__(self):
                return self

            def __exit__(self, *exc) -> None:
                self._f.__exit__(*exc)

            def __getattr__(self, name):
                return getattr(self._f, name)

            def get_tensor(self, key):
                t = self._f.get_tensor(key)
                log.keys.append(key)
                log.bytes += t.numel() * t.element_size()
                return t

        monkeypatch.setattr(safetensors, "safe_open", Counting)


def _loaded_model(case):
    from hcdiag.io.load import load

    return load(str(case.path))


def test_header_only_until_a_tensor_is_asked_for(case, monkeypatch) -> None:
    from hcdiag.probes import make_probe

    model = _loaded_model(case)
    reads = Reads(monkeypatch)
    sites = read_activations(case.activations)
    probe = make_probe("activations", activations=case.activations)
    probe.prepare(model.sites)
    assert probe.tokens == 6 and [probe.site_tokens(s) for s in model.sites] == [6] * len(model.sites)
    assert reads.keys == []  # header and metadata only
    reader = sites[0]._reader  # the file's reader: its own count agrees
    assert reader.bytes_read == 0 and reader.source.header_bytes > 0

    site = sites[1]
    assert site.shape("x") == (6, 4, 32) and (site.tokens, site.n, site.C) == (6, 4, 32)
    x = site.x
    assert reads.keys == ["sites.1.x"] and reads.bytes == 6 * 4 * 32 * 4 == reader.bytes_read
    assert site.x is x and reads.keys == ["sites.1.x"]  # held by the caller: not read again
    ref = weakref.ref(x)
    del x
    assert ref() is None  # nothing keeps it alive once the caller drops it
    got = probe.inputs(model.sites[2])
    assert reads.keys == ["sites.1.x", "sites.2.x"] and got.dtype == torch.float64


def test_values_are_the_files(case) -> None:
    want = load_file(str(case.activations))
    sites = read_activations(case.activations)
    seen = set()
    for site in sites:
        for key in ("x", "h_res", *OPTIONAL):
            t = getattr(site, key)
            k = f"sites.{site.index}.{key}"
            if k not in want:
                assert t is None and not site.has(key)
                continue
            seen.add(k)
            assert t.dtype == torch.float32 and torch.equal(t, want[k].float()), k
            assert site.shape(key) == tuple(want[k].shape)
    assert seen == set(want)  # every tensor of the file is some site's attribute
    assert {"sites.0.f", "sites.0.y", "sites.0.h_post", "sites.0.branch_in"} <= seen


def _errs(H: np.ndarray) -> tuple[float, float]:
    return float(np.abs(H.sum(-1) - 1).max()), float(np.abs(H.sum(-2) - 1).max())


def _recorded(case) -> dict[str, torch.Tensor]:
    with safe_open(str(case.activations), "pt") as f:
        return {k: f.get_tensor(k).double() for k in f.keys()}


def test_cli_numbers_match_the_library_on_the_recorded_x(case) -> None:
    rec = _recorded(case)
    L = len({k.split(".")[1] for k in rec})
    mats = [case.oracle(i, rec[f"sites.{i}.x"]).numpy() for i in range(L)]  # the library module's own H_res

    p = run_cli("stochasticity", case.path, "--probe", "activations", "--activations", case.activations, "--json")
    assert p.returncode == 0 and p.stderr == "", p.stderr
    rows = json.loads(p.stdout)["sites"]
    assert len(rows) == L
    for i, (row, H) in enumerate(zip(rows, mats, strict=True)):
        r, c = _errs(H)
        assert row["tokens"] == 6
        assert abs(row["row_err_max"] - r) <= 1e-6 and abs(row["col_err_max"] - c) <= 1e-6, (row["name"], r, c)
        diff = float(np.abs(H - rec[f"sites.{i}.h_res"].numpy()).max())  # against the model's recorded comb^T
        assert abs(row["recorded_diff"] - diff) <= 1e-6, (row["name"], row["recorded_diff"], diff)

    p = run_cli("gain-sweep", "--from", case.path, "--probe", "activations", "--activations", case.activations,
                "--json")
    assert p.returncode == 0 and p.stderr == "", p.stderr
    (v,) = json.loads(p.stdout)["variants"]
    fwd = np.zeros((L, 6))
    P = np.broadcast_to(np.eye(4), (6, 4, 4))
    for i, H in enumerate(mats):  # per-token forward composite gain G_f(H_i ... H_1), brute force
        P = H @ P
        fwd[i] = np.abs(P.sum(-1)).max(-1)
    np.testing.assert_allclose(v["curves"]["gain_fwd"]["median"], fwd.mean(1), rtol=1e-6, atol=1e-6)

    p = run_cli("verify", case.path, "--activations", case.activations, "--json")
    assert p.returncode == 0, p.stderr
    doc = json.loads(p.stdout)
    assert len(doc["sites"]) == L
    for i, s in enumerate(doc["sites"]):
        x, h, post = rec[f"sites.{i}.x"], rec[f"sites.{i}.h_res"], rec[f"sites.{i}.h_post"]
        F, y = rec[f"sites.{i}.f"], rec[f"sites.{i}.y"]
        pred = h @ x + post.unsqueeze(-1) * F.unsqueeze(-2)  # mHC Eq. 3 with the model's own matrices
        want = float(torch.linalg.norm(pred - y) / torch.linalg.norm(y))
        assert s["conforms"] is True and (s["tokens"], s["n"], s["C"]) == tuple(x.shape)
        assert abs(s["checks"]["update (model)"] - want) <= 1e-12 + 1e-9 * want, (s["name"], want)


def test_verify_reads_each_tensor_once(case, monkeypatch) -> None:
    from hcdiag.verification import verify

    model = _loaded_model(case)
    reads = Reads(monkeypatch)
    report = verify(model, case.activations)
    assert report.verdict and all(s.conforms for s in report.sites)
    assert len(reads.keys) == len(set(reads.keys))  # conforming sites: x, y, F, ... read once each
    assert {k for k in reads.keys if k.endswith(".x")} == {f"sites.{i}.x" for i in range(len(model.sites))}


@pytest.mark.parametrize("command", ["stochasticity", "gain-sweep", "verify"])
def test_capture_too_large_for_memory_is_refused_in_one_line(case, monkeypatch, command: str) -> None:
    import hcdiag.probes as probes
    from hcdiag.verification import VERIFY_ENTRY_BYTES

    model = _loaded_model(case)
    probe = probes.make_probe("activations", activations=case.activations)
    probe.prepare(model.sites)
    entry = VERIFY_ENTRY_BYTES if command == "verify" else probes.ACTIVATIONS_ENTRY_BYTES
    need = probes.activations_probe_bytes(model.sites, probe, entry)
    # 6 tokens of [4, 32] at site 0: inputs of one site plus each site's [T, n, n] results
    assert need == 6 * (entry * 4 * 32 + len(model.sites) * 2 * 8 * 4 * 4)
    monkeypatch.setattr(probes, "physical_memory_bytes", lambda: need // 2)
    reads = Reads(monkeypatch)
    args = {"stochasticity": ["stochasticity", case.path, "--probe", "activations", "--activations"],
            "gain-sweep": ["gain-sweep", "--from", case.path, "--probe", "activations", "--activations"],
            "verify": ["verify", case.path, "--activations"]}[command]
    r = run_cli(*args, case.activations)
    assert r.returncode == 3 and r.stdout == "", r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert str(case.activations) in lines[0] and "site attn_0" in lines[0] and "6 tokens" in lines[0]
    m = re.search(r"max_tokens=(\d+)", lines[0])
    assert m and 1 <= int(m.group(1)) <= 3, lines[0]  # half the memory: about half the tokens
    assert not [k for k in reads.keys if k.startswith("sites.")]  # refused before any recorded tensor was read

    monkeypatch.setattr(probes, "physical_memory_bytes", lambda: need)
    assert run_cli(*args, case.activations).returncode == 0  # exactly enough: runs

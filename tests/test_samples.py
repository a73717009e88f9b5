"""The shipped sample checkpoints (samples/) and the script that makes them (samples/train.py).

Every sample must load strictly through the native layout (every stored HC key used, none missing), carry its
metadata and training record, stay under 1 MB, and agree with the table in samples/README.md. The script is
run for a few steps on a tiny model into a temporary directory.
"""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import pytest
import torch

from hcdiag.io.load import load
from hcdiag.io.source import open_source

SAMPLES = Path(__file__).resolve().parent.parent / "samples"
VARIANTS = ("identity", "hc-static", "hc-dynamic", "mhc", "mhc-lite", "kromhc", "tbp", "ihc")
FILES = [f"{v}.safetensors" for v in VARIANTS] + ["mhc_trainloop.pt"]
MAX_BYTES = 1_000_000
REQUIRED_META = ("format", "format_version", "variant", "n", "C", "blocks", "sites", "form", "training")


def _train_module():
    spec = importlib.util.spec_from_file_location("hcdiag_samples_train", SAMPLES / "train.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _readme_rows() -> dict[str, list[str]]:
    rows = {}
    for line in (SAMPLES / "README.md").read_text().splitlines():
        cells = [c.strip().strip("`") for c in line.strip().strip("|").split("|")]
        if cells and cells[0] in FILES:
            rows[cells[0]] = cells
    return rows


def _check_loads_strictly(path: Path):
    lm = load(path)
    assert lm.layout == "native"
    assert lm.settings_source["variant"] == "metadata"
    src = open_source(path)
    stored = {k for k in src.keys() if re.match(r"^hc\.sites\.\d+\.", k)}
    used = {t.key for s in lm.sites for t in s.tensors}
    assert used == stored  # every stored HC key used (load_state_dict(strict=True) saw none missing)
    for s in lm.sites:
        assert len(s.tensors) == len(s.module.state_dict())
    return lm


@pytest.mark.parametrize("name", FILES)
def test_sample_loads_with_metadata(name):
    path = SAMPLES / name
    assert path.is_file(), f"{name} missing: run python samples/train.py"
    assert path.stat().st_size < MAX_BYTES
    lm = _check_loads_strictly(path)
    meta = lm.metadata
    for key in REQUIRED_META:
        assert key in meta, key
    assert meta["format"] == "hcdiag" and meta["format_version"] == "1"
    variant = name.split(".")[0].replace("_trainloop", "")
    assert meta["variant"] == variant == lm.sites[0].variant
    blocks = int(meta["blocks"])
    assert len(lm.sites) == 2 * blocks == len(json.loads(meta["sites"]))
    assert (lm.n, lm.C) == (int(meta["n"]), int(meta["C"])) == ((4, 32) if "trainloop" in name else (4, 64))
    train = json.loads(meta["training"])
    assert len(train["loss"]) == len(train["grad_norm"]) == train["steps"]
    assert train["final_loss"] == pytest.approx(train["loss"][-1], rel=1e-5)  # curve: 6 significant digits
    # trained, not initial: the loss fell well below log(vocab) (uniform prediction)
    assert train["final_loss"] < 0.75 * torch.log(torch.tensor(float(train["vocab_size"]))).item()
    if variant == "mhc":
        assert meta["sinkhorn_convention"] == "paper" and meta["sinkhorn_iters"] == "20"
        assert lm.settings_source["convention"] == "metadata"
    if variant == "kromhc":
        assert meta["kron_factors"] == "2,2"


def test_samples_h_res_properties():
    """Real numbers from the shipped files at a seeded random probe: exact variants doubly stochastic to
    rounding, paper-convention mHC rows exact, identity / ihc exactly I."""
    x = torch.randn(16, 4, 64, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for v in VARIANTS:
        lm = load(SAMPLES / f"{v}.safetensors")
        for s in lm.sites:
            H = s.module(x).res.detach()
            rows, cols = (H.sum(-1) - 1).abs().max().item(), (H.sum(-2) - 1).abs().max().item()
            if v in ("identity", "ihc"):
                assert torch.equal(H, torch.eye(4, dtype=torch.float64).expand_as(H))
            elif v in ("mhc-lite", "kromhc", "tbp"):
                assert rows < 1e-12 and cols < 1e-12
                assert H.min().item() > -1e-6
            elif v == "mhc":
                assert rows < 1e-12  # paper convention ends with the row pass
                assert H.min().item() >= 0


def test_readme_table_matches_metadata():
    rows = _readme_rows()
    assert set(rows) == set(FILES)
    for name, cells in rows.items():
        lm = load(SAMPLES / name)
        train = json.loads(lm.metadata["training"])
        numbers = [c for c in cells[1:] if re.fullmatch(r"[0-9.]+", c)]
        assert f"{train['final_loss']:.4f}" in cells, (name, cells)
        assert str(train["steps"]) in numbers
        assert str(len(lm.sites)) in numbers


def test_corpus_is_deterministic():
    train = _train_module()
    a = train.make_corpus(5000, seed=7)
    assert a == train.make_corpus(5000, seed=7) and len(a) == 5000
    assert a != train.make_corpus(5000, seed=8)
    # the splitmix64 reference value for seed 0 (Steele, Lea & Flood 2014; Vigna's splitmix64.c)
    assert train.SplitMix64(0).next() == 0xE220A8397B1DCDAF


def test_train_script_tiny_run(tmp_path):
    train = _train_module()
    det, threads = torch.are_deterministic_algorithms_enabled(), torch.get_num_threads()
    try:
        rc = train.main(
            [
                "--variants", "mhc,kromhc",
                "--steps", "3",
                "--blocks", "1",
                "--C", "8",
                "--batch", "2",
                "--seq", "16",
                "--log-every", "1",
                "--out-dir", str(tmp_path),
                "--trainloop-steps", "2",
                "--trainloop-C", "8",
                "--trainloop-blocks", "1",
            ]
        )  # fmt: skip
    finally:
        torch.use_deterministic_algorithms(det)
        torch.set_num_threads(threads)
    assert rc == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "kromhc.safetensors",
        "mhc.safetensors",
        "mhc_trainloop.pt",
        "mhc_trainloop.pt.json",
    ]
    for name, steps in (("mhc.safetensors", 3), ("kromhc.safetensors", 3), ("mhc_trainloop.pt", 2)):
        lm = _check_loads_strictly(tmp_path / name)
        assert (lm.n, lm.C, len(lm.sites)) == (4, 8, 2)
        t = json.loads(lm.metadata["training"])
        assert t["steps"] == steps and len(t["loss"]) == steps
    ckpt = torch.load(tmp_path / "mhc_trainloop.pt", weights_only=True)
    assert ckpt["step"] == 2 and "state" in ckpt["optimizer"]
    assert any(k.startswith("_orig_mod.hc.sites.0.") for k in ckpt["model"])

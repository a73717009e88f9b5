"""`hcdiag track` over a real transformers Trainer run, with hcdiag's TrainerCallback attached (issue 13).

A tiny DeepSeek-V4 (random init, CPU) trains for 24 steps with the real ``transformers.Trainer``, saving a
checkpoint every 8 steps, the callback computing every 8 steps. Then, per checkpoint:

* the step equals trainer_state.json's global_step;
* the per-site fields equal ``hcdiag stochasticity --json`` on that checkpoint alone, and the composite gains,
  sigma_2 and distance to J/n equal ``hcdiag gain-sweep --from`` on it;
* independently of hcdiag, the library's own DeepseekV4HyperConnection (float64, x = 0, H_res = comb^T)
  gives the same worst column error and the same composite H_L ... H_1 (gains, sigma_2, ||F - J/n||);
* the callback's values logged at that step (its history, the Trainer's log_history in trainer_state.json, the
  logs another callback receives, the JSON-lines sink) equal track's.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from cli_runner import run_cli

from hcdiag.track import checkpoint_step

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")  # the Trainer needs it
from test_io_transformers import TINY_DSV4, _randomize_hc  # noqa: E402
from transformers import DeepseekV4Config, DeepseekV4ForCausalLM, Trainer, TrainingArguments  # noqa: E402

from hcdiag.integrations.transformers import HcdiagCallback  # noqa: E402

SAMPLES = Path(__file__).resolve().parent.parent / "samples"
STEPS, EVERY = 24, 8


class _Tokens(torch.utils.data.Dataset):
    """Random token sequences (labels = inputs: the model shifts them itself)."""

    def __len__(self) -> int:
        return 64

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        ids = torch.randint(0, TINY_DSV4["vocab_size"], (16,), generator=torch.Generator().manual_seed(i))
        return {"input_ids": ids, "labels": ids}


def _args(out: Path, steps: int, save: int | None) -> TrainingArguments:
    return TrainingArguments(
        output_dir=str(out), max_steps=steps, save_steps=save or steps, save_strategy="steps" if save else "no",
        logging_steps=4, per_device_train_batch_size=4, learning_rate=2e-2, report_to=[], use_cpu=True,
        save_only_model=True, disable_tqdm=True, dataloader_num_workers=0, seed=0,
    )


def _model() -> DeepseekV4ForCausalLM:
    torch.manual_seed(0)
    model = DeepseekV4ForCausalLM(DeepseekV4Config(**TINY_DSV4, hc_sinkhorn_iters=3))  # errors above eps
    _randomize_hc(model, 3)  # non-trivial H_res (the library initialises them to the uniform J/n)
    return model


class _Reporter(transformers.TrainerCallback):
    """Records the logs each on_log hands to the callbacks after hcdiag's."""

    def __init__(self) -> None:
        self.logs: dict[int, dict] = {}

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.setdefault(state.global_step, {}).update(logs or {})  # the final summary logs at step 24 too


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("trainer")
    reporter = _Reporter()  # stands for a report_to integration: a callback of the Trainer's default list
    trainer = Trainer(model=_model(), args=_args(out / "run", STEPS, EVERY), train_dataset=_Tokens(),
                      callbacks=[reporter])
    cb = HcdiagCallback.attach(trainer, every=EVERY, sinks=[out / "hc.jsonl"])
    assert trainer.callback_handler.callbacks[0] is cb  # ahead of every reporting callback
    trainer.train()
    cb.reported = reporter.logs  # type: ignore[attr-defined]
    trainer.save_model()  # the final model beside checkpoint-<step>/: not one of the run's checkpoints
    ckpts = sorted((out / "run").glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    return out, ckpts, cb


def _cli_json(*args) -> dict:
    p = run_cli(*args, "--json")
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout)


def _library_h_res(ckpt: Path) -> list[np.ndarray]:
    """Paper-convention H_res per site from the library's own modules in float64 at x = 0 (static probe)."""
    model = DeepseekV4ForCausalLM.from_pretrained(str(ckpt)).double()
    mats = []
    with torch.no_grad():
        for layer in model.model.layers:
            for hc in (layer.attn_hc, layer.ffn_hc):
                x = torch.zeros(1, 1, TINY_DSV4["hc_mult"], TINY_DSV4["hidden_size"], dtype=torch.float64)
                _, comb, _ = hc(x)
                mats.append(comb[0, 0].mT.numpy())
    return mats


def _entries_without_timing(doc: dict) -> list[dict]:
    return [{k: v for k, v in e.items() if k != "seconds"} for e in doc["checkpoints"]]


def test_track_equals_single_checkpoint_commands_library_and_callback(run):
    out, ckpts, cb = run
    doc = _cli_json("track", out / "run")
    entries = doc["checkpoints"]
    states = [json.loads((c / "trainer_state.json").read_text()) for c in ckpts]
    assert [e["step"] for e in entries] == [s["global_step"] for s in states] == [8, 16, 24]
    assert {e["step_source"] for e in entries} == {"trainer_state.json (global_step)"}
    logged = {r["step"]: r for r in states[-1]["log_history"]}
    jsonl = {r["step"]: r for r in map(json.loads, (out / "hc.jsonl").read_text().splitlines())}
    for ckpt, e in zip(ckpts, entries, strict=True):
        assert Path(e["path"]) == ckpt.resolve()
        st = _cli_json("stochasticity", ckpt)
        assert e["sites"] == st["sites"]
        assert e["settings"] == st["settings"] and e["probe"] == st["probe"]
        curves = _cli_json("gain-sweep", "--from", ckpt)["variants"][0]["curves"]
        m = e["metrics"]
        assert m["gain_fwd"] == curves["gain_fwd"]["median"][-1]
        assert m["gain_bwd"] == curves["gain_bwd"]["median"][0]
        assert m["sigma2"] == curves["sigma2"]["median"][-1]
        assert m["dist_uniform"] == curves["dist_uniform"]["median"][-1]

        # independent oracle: the library's modules
        mats = _library_h_res(ckpt)
        F = np.eye(mats[0].shape[0])
        for H in mats:
            F = H @ F
        n = F.shape[0]
        np.testing.assert_allclose(m["gain_fwd"], np.abs(F.sum(1)).max(), rtol=1e-10)
        np.testing.assert_allclose(m["gain_bwd"], np.abs(F.sum(0)).max(), rtol=1e-10)
        np.testing.assert_allclose(m["sigma2"], np.linalg.svd(F, compute_uv=False)[1], rtol=1e-8, atol=1e-14)
        np.testing.assert_allclose(m["dist_uniform"], np.linalg.norm(F - 1.0 / n), rtol=1e-9)
        col = [np.abs(H.sum(0) - 1).max() for H in mats]
        np.testing.assert_allclose(m["col_err"], max(col), rtol=1e-8)
        assert e["where"]["col_err"] == st["sites"][int(np.argmax(col))]["name"]
        np.testing.assert_allclose(m["dist_identity"], np.mean([np.linalg.norm(H - np.eye(n)) for H in mats]),
                                   rtol=1e-10)
        assert m["col_err"] > 1e-5  # the test sees real errors, not only the eps floor

        # the callback's values at this step: its history, trainer_state.json's log_history, the JSON-lines sink
        step = e["step"]
        for got in (cb.history[step], logged[step], jsonl[step], cb.reported[step]):
            assert got["hc/composite/gain_fwd"] == m["gain_fwd"]
            assert got["hc/composite/gain_bwd"] == m["gain_bwd"]
            assert got["hc/composite/sigma2"] == m["sigma2"]
            assert got["hc/worst/col_err"] == m["col_err"]
            assert got["hc/mean_dist_identity"] == m["dist_identity"]
            for s in e["sites"]:
                assert got[f"hc/{s['name']}/row_err"] == s["row_err_max"]
                assert got[f"hc/{s['name']}/col_err"] == s["col_err_max"]
    assert sorted(cb.history) == [8, 16, 24]
    assert doc["training"]["loss"] == [[r["step"], r["loss"]] for r in states[-1]["log_history"] if "loss" in r]


def test_cache_analyses_only_new_checkpoints_and_jobs_agree(run, tmp_path):
    out, ckpts, _ = run
    before = {c: sorted(p.name for p in c.iterdir()) for c in ckpts}
    first = _cli_json("track", ckpts[0], "-o", tmp_path / "t")
    assert (first["analysed"], first["cached"]) == (1, 0)
    again = _cli_json("track", out / "run", "-o", tmp_path / "t", "--jobs", "2")  # 2 new ones, in 2 processes
    assert (again["analysed"], again["cached"]) == (2, 1)
    assert (tmp_path / "t" / "track-cache.json").is_file()
    assert {c: sorted(p.name for p in c.iterdir()) for c in ckpts} == before  # nothing written beside them
    plain = _cli_json("track", out / "run")
    assert _entries_without_timing(again) == _entries_without_timing(plain)
    third = _cli_json("track", out / "run", "-o", tmp_path / "t")
    assert (third["analysed"], third["cached"]) == (0, 3)
    # other settings are another analysis: nothing from the cache
    other = _cli_json("track", out / "run", "-o", tmp_path / "t", "--iters", "3")
    assert other["cached"] == 0
    p = run_cli("track", out / "run", "--cache", ckpts[0] / "c.json")
    assert p.returncode == 2 and "inside checkpoint directory" in p.stderr and len(p.stderr.splitlines()) == 1


def test_csv_long_form_and_plot(run, tmp_path):
    out, ckpts, _ = run
    p = run_cli("track", out / "run", "--csv", tmp_path / "t.csv", "-o", tmp_path / "o", "--plot")
    assert p.returncode == 0, p.stderr
    assert "[3/3]" in p.stderr  # progress on stderr
    assert (tmp_path / "o" / "track.png").stat().st_size > 10_000
    doc = json.loads((tmp_path / "o" / "track.json").read_text())
    import csv

    rows = list(csv.DictReader((tmp_path / "t.csv").open()))
    assert set(rows[0]) >= {"step", "path", "site", "scope", "metric", "value"}
    e = doc["checkpoints"][1]
    got = [r for r in rows if r["step"] == str(e["step"]) and r["scope"] == "checkpoint" and r["metric"] == "col_err"]
    assert len(got) == 1 and float(got[0]["value"]) == e["metrics"]["col_err"]
    assert got[0]["site"] == e["where"]["col_err"]
    site = e["sites"][2]
    got = [r for r in rows
           if r["step"] == str(e["step"]) and r["site"] == site["name"] and r["metric"] == "col_err_max"]
    assert len(got) == 1 and float(got[0]["value"]) == site["col_err_max"]


def test_plot_in_the_figure_format_and_size_asked(run, tmp_path):
    out, _, _ = run
    p = run_cli("track", out / "run", "-o", tmp_path / "o", "--plot", "--fig-format", "svg", "--fig-size", "7x4")
    assert p.returncode == 0, p.stderr
    svg = (tmp_path / "o" / "track.svg").read_text()
    assert 'width="504pt" height="288pt"' in svg  # 7 x 4 inches at 72 pt per inch
    assert not (tmp_path / "o" / "track.png").exists()


def test_steps_from_entries_metadata_and_names(tmp_path):
    assert checkpoint_step(SAMPLES / "mhc_trainloop.pt") == (300, "checkpoint (step)")
    assert checkpoint_step(SAMPLES / "mhc.safetensors", {"training": json.dumps({"steps": 300})}) == (
        300, "metadata (training.steps)")
    # a training-loop .pt without a step entry: the step comes from the name (Lightning and ckpt_<step> styles)
    obj = torch.load(SAMPLES / "mhc_trainloop.pt", weights_only=True)
    side = json.loads((SAMPLES / "mhc_trainloop.pt.json").read_text())
    side.pop("training")
    for name in ("epoch=1-step=60.ckpt", "ckpt_120.pt"):
        torch.save({"model": obj["model"]}, tmp_path / name)
        (tmp_path / (name + ".json")).write_text(json.dumps(side))
    shutil.copy(SAMPLES / "mhc_trainloop.pt", tmp_path / "ckpt_999.pt")  # its own step entry (300) wins
    (tmp_path / "ckpt_999.pt.json").write_text(json.dumps(side))
    doc = _cli_json("track", tmp_path)
    assert [(e["step"], e["step_source"], Path(e["path"]).name) for e in doc["checkpoints"]] == [
        (60, "name", "epoch=1-step=60.ckpt"), (120, "name", "ckpt_120.pt"),
        (300, "checkpoint (step)", "ckpt_999.pt")]
    single = _cli_json("stochasticity", tmp_path / "ckpt_120.pt")
    assert doc["checkpoints"][1]["sites"] == single["sites"]
    (tmp_path / "ckpt_130.pt").write_bytes(b"half-written")  # a damaged checkpoint is skipped, and said so
    doc = _cli_json("track", tmp_path)
    assert [e["step"] for e in doc["checkpoints"]] == [60, 120, 300]
    assert [Path(s["path"]).name for s in doc["skipped"]] == ["ckpt_130.pt"]
    assert "not a PyTorch or safetensors checkpoint" in doc["skipped"][0]["reason"]
    p = run_cli("track", tmp_path / "ckpt_130.pt")  # nothing analysable: exit 3, one line
    assert p.returncode == 3 and p.stderr.strip().splitlines()[-1].startswith("hcdiag: error: no checkpoint")
    p = run_cli("track", str(tmp_path / "ckpt_*.pt"))  # a quoted glob
    assert p.returncode == 0, p.stderr
    assert p.stdout.count("ckpt_") >= 2


@pytest.mark.parametrize("args, words", [
    (("/no/such/run",), "no such checkpoint"),
    (("samples", "--probe", "activations"), "--probe activations"),
])
def test_usage_errors_are_one_line(args, words, tmp_path):
    p = run_cli("track", *args)
    assert p.returncode == 2
    assert words in p.stderr and len(p.stderr.strip().splitlines()) == 1


def test_empty_run_directory_is_a_usage_error(tmp_path):
    p = run_cli("track", tmp_path)
    assert p.returncode == 2 and "no checkpoints in this directory" in p.stderr


def test_threshold_stops_the_trainer_once(tmp_path):
    trainer = Trainer(model=_model(), args=_args(tmp_path / "r", 20, None), train_dataset=_Tokens())
    cb = HcdiagCallback.attach(trainer, every=4, max_col_err=0.0, stop_on_threshold=True)
    with pytest.warns(RuntimeWarning, match="exceeds max_col_err=0") as rec:
        trainer.train()
    assert trainer.state.global_step == 4  # stopped at the first monitored step
    assert sum("max_col_err" in str(w.message) for w in rec) == 1
    assert sorted(cb.history) == [4]

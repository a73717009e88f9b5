"""hcdiag.monitor.Monitor in a plain PyTorch loop on a lucidrains mHC model, and the Lightning callback.

A tiny character model whose residual streams are the hyper-connections package's own
ManifoldConstrainedHyperConnections modules (3 Sinkhorn iterations, so the errors are well above rounding)
trains for 30 steps; every 6 steps the monitor logs and the loop saves ``ckpt_<step>.pt``. Then:

* ``hcdiag track`` on the directory gives one row per checkpoint with the steps of the names, values equal to
  ``stochasticity`` / ``gain-sweep --from`` on each checkpoint and to what the monitor returned and wrote;
* independently of hcdiag, the library's own module (zero streams = the static probe, its Sinkhorn output
  captured; the library computes in float32) gives the same worst errors and composite gains;
* the monitor leaves the model bit-for-bit as it was (values, dtype, device, mode, requires_grad, grads).
"""

from __future__ import annotations

import csv
import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from cli_runner import run_cli
from hyper_connections.manifold_constrained_hyper_connections import ManifoldConstrainedHyperConnections as MHC
from test_io_lucidrains import library_h_res
from torch import nn

from hcdiag.errors import UsageError
from hcdiag.monitor import Monitor

N, C, BLOCKS, VOCAB, ITERS = 4, 16, 2, 32, 3
STEPS, EVERY = 30, 6


class Net(nn.Module):
    """Embedding -> n streams -> BLOCKS x (attention-like, MLP) branches wrapped in lucidrains mHC -> head."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, C)
        hcs = []
        for i in range(BLOCKS):
            for j, branch in enumerate((nn.Linear(C, C), nn.Sequential(nn.Linear(C, 2 * C), nn.GELU(),
                                                                         nn.Linear(2 * C, C)))):
                hcs.append(MHC(N, dim=C, branch=branch, layer_index=2 * i + j, sinkhorn_iters=ITERS))
        self.layers = nn.ModuleList(hcs)
        self.head = nn.Linear(C, VOCAB)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids)  # [b, T, C]
        b = x.shape[0]
        r = x.repeat_interleave(N, dim=0)  # [(b s), T, C]: the library's stream layout
        for hc in self.layers:
            r = hc(r)
        return self.head(r.reshape(b, N, *r.shape[1:]).sum(1))


def _batch(step: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, (4, 12), generator=torch.Generator().manual_seed(step))


def _train_step(net: nn.Module, opt: torch.optim.Optimizer, step: int) -> float:
    ids = _batch(step)
    logits = net(ids[:, :-1])
    loss = nn.functional.cross_entropy(logits.reshape(-1, VOCAB), ids[:, 1:].reshape(-1))
    opt.zero_grad()
    loss.backward()
    opt.step()
    return float(loss.detach())


def _net(seed: int = 0) -> Net:
    torch.manual_seed(seed)
    net = Net()
    with torch.no_grad():  # move H_res away from its identity-like init
        for hc in net.layers:
            hc.static_alpha.add_(torch.randn(hc.static_alpha.shape) * 0.7)
    return net


@pytest.fixture(scope="module")
def loop_run(tmp_path_factory):
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("loop")
    net = _net()
    opt = torch.optim.Adam(net.parameters(), lr=2e-2)
    returned = {}
    (out / "ckpts").mkdir()
    with Monitor(net, every=EVERY, iters=ITERS, sinks=[out / "hc.jsonl", out / "hc.csv"]) as mon:
        for step in range(1, STEPS + 1):
            _train_step(net, opt, step)
            metrics = mon.step(step)
            if metrics:
                returned[step] = metrics
                torch.save(net.state_dict(), out / "ckpts" / f"ckpt_{step}.pt")
    return out, returned, mon


def _cli_json(*args) -> dict:
    p = run_cli(*args, "--json")
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout)


def _library_h_res(ckpt: Path) -> list[np.ndarray]:
    """Paper-convention H_res of each mHC module at zero streams, from the library's own Sinkhorn (float64)."""
    net = Net()
    net.load_state_dict(torch.load(ckpt, weights_only=True))
    mats = []
    for hc in net.layers:
        got: list[torch.Tensor] = []
        with torch.no_grad(), library_h_res(hc, got):
            hc.width_connection(torch.zeros(N, 1, C))
        mats.append(got[0][0].double().numpy())
    return mats


def test_loop_monitor_equals_track_commands_and_library(loop_run):
    out, returned, mon = loop_run
    assert sorted(returned) == list(range(EVERY, STEPS + 1, EVERY))
    doc = _cli_json("track", out / "ckpts", "--iters", str(ITERS))
    entries = doc["checkpoints"]
    assert [(e["step"], e["step_source"]) for e in entries] == [(s, "name") for s in sorted(returned)]
    jsonl = {r["step"]: r for r in map(json.loads, (out / "hc.jsonl").read_text().splitlines())}
    rows = list(csv.DictReader((out / "hc.csv").open()))
    for e in entries:
        ckpt = Path(e["path"])
        st = _cli_json("stochasticity", ckpt, "--iters", str(ITERS))
        assert e["sites"] == st["sites"]
        curves = _cli_json("gain-sweep", "--from", ckpt, "--iters", str(ITERS))["variants"][0]["curves"]
        m = e["metrics"]
        assert (m["gain_fwd"], m["gain_bwd"]) == (curves["gain_fwd"]["median"][-1], curves["gain_bwd"]["median"][0])
        assert m["sigma2"] == curves["sigma2"]["median"][-1]

        mats = _library_h_res(ckpt)
        F = np.eye(N)
        for H in mats:
            F = H @ F
        # the library's Sinkhorn runs in float32 whatever the input dtype: float32 rounding is the tolerance
        np.testing.assert_allclose(m["gain_fwd"], np.abs(F.sum(1)).max(), rtol=1e-6)
        np.testing.assert_allclose(m["gain_bwd"], np.abs(F.sum(0)).max(), rtol=1e-6)
        np.testing.assert_allclose(m["sigma2"], np.linalg.svd(F, compute_uv=False)[1], rtol=1e-5)
        np.testing.assert_allclose(m["dist_uniform"], np.linalg.norm(F - 1.0 / N), rtol=1e-5)
        # lucidrains convention: paper columns exact, the error sits in the rows
        np.testing.assert_allclose(m["row_err"], max(np.abs(H.sum(1) - 1).max() for H in mats), rtol=1e-4)
        np.testing.assert_allclose(m["col_err"], max(np.abs(H.sum(0) - 1).max() for H in mats), atol=1e-6)
        assert m["row_err"] > 1e-4  # 3 Sinkhorn iterations: real errors, not rounding

        got = returned[e["step"]]
        assert got == {k: v for k, v in jsonl[e["step"]].items() if k != "step"}
        csv_got = {r["key"]: float(r["value"]) for r in rows if r["step"] == str(e["step"])}
        assert csv_got == got
        assert got["hc/composite/gain_fwd"] == m["gain_fwd"] and got["hc/composite/gain_bwd"] == m["gain_bwd"]
        assert got["hc/composite/sigma2"] == m["sigma2"] and got["hc/worst/col_err"] == m["col_err"]
        assert got["hc/logit_range_max"] == m["logit_range"]
        for s in e["sites"]:
            assert got[f"hc/{s['name']}/col_err"] == s["col_err_max"]
            assert got[f"hc/{s['name']}/row_err"] == s["row_err_max"]
    # only the HC modules' tensors were read, never the branches, embedding or head
    assert mon.gathered_keys and all(".branch." not in k and k.startswith("layers.") for k in mon.gathered_keys)


def test_monitor_leaves_the_model_untouched():
    net = _net(1)
    net.layers[0].static_alpha.grad = torch.ones_like(net.layers[0].static_alpha)
    net.train()
    before = {k: v.detach().clone() for k, v in net.state_dict().items()}
    flags = [(p.dtype, p.device, p.requires_grad, None if p.grad is None else p.grad.clone())
             for p in net.parameters()]
    Monitor(net, iters=ITERS, probe="random", tokens=8).step(0)
    after = net.state_dict()
    assert all(torch.equal(before[k], after[k]) and before[k].dtype == after[k].dtype for k in before)
    for (dt, dev, rg, g), p in zip(flags, net.parameters(), strict=True):
        assert (p.dtype, p.device, p.requires_grad) == (dt, dev, rg)
        assert (g is None and p.grad is None) or torch.equal(g, p.grad)
    assert net.training


def test_every_thresholds_warn_once_and_stop():
    net = _net(2)
    mon = Monitor(net, every=3, iters=ITERS, max_col_err=1e-3, max_gain=1 + 1e-6, stop_on_threshold=True)
    assert mon.step(1) == {} and mon.step(2) == {}
    with pytest.warns(RuntimeWarning, match="exceeds max_gain") as rec:
        first = mon.step(3)
    assert len(rec) == 1  # columns are exact (lucidrains convention): max_col_err is not crossed
    assert first["hc/worst/col_err"] < 1e-3
    assert mon.should_stop and max(first["hc/composite/gain_fwd"], first["hc/composite/gain_bwd"]) > 1 + 1e-6
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a second crossing does not warn again
        mon.step(6)
    with pytest.raises(UsageError):
        Monitor(net, every=0)


def test_lightning_callback(tmp_path):
    pl = pytest.importorskip("pytorch_lightning", reason="pytorch-lightning is a test extra")
    from pytorch_lightning.callbacks import ModelCheckpoint
    from pytorch_lightning.loggers import CSVLogger

    from hcdiag.integrations.lightning import HcdiagLightningCallback

    class Module(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = _net(3)

        def training_step(self, ids, _i):
            logits = self.net(ids[:, :-1])
            return nn.functional.cross_entropy(logits.reshape(-1, VOCAB), ids[:, 1:].reshape(-1))

        def configure_optimizers(self):
            return torch.optim.Adam(self.parameters(), lr=2e-2)

    data = torch.utils.data.DataLoader([_batch(i)[0] for i in range(48)], batch_size=4)
    cb = HcdiagLightningCallback(every=4, iters=ITERS)
    trainer = pl.Trainer(
        max_steps=12, accelerator="cpu", devices=1, logger=CSVLogger(tmp_path / "logs"), log_every_n_steps=1,
        enable_progress_bar=False, enable_model_summary=False,
        callbacks=[cb, ModelCheckpoint(dirpath=tmp_path / "ck", every_n_train_steps=4, save_top_k=-1)],
    )
    trainer.fit(Module(), data)
    assert sorted(cb.history) == [4, 8, 12]
    doc = _cli_json("track", tmp_path / "ck", "--iters", str(ITERS))
    assert [(e["step"], e["step_source"]) for e in doc["checkpoints"]] == [
        (s, "checkpoint (global_step)") for s in (4, 8, 12)]
    for e in doc["checkpoints"]:
        got = cb.history[e["step"]]
        assert got["hc/composite/gain_fwd"] == e["metrics"]["gain_fwd"]
        assert got["hc/worst/row_err"] == e["metrics"]["row_err"]
    logged = list(csv.DictReader(next((tmp_path / "logs").rglob("metrics.csv")).open()))
    assert any(r.get("hc/composite/gain_fwd") for r in logged)  # reached the Trainer's logger


def test_tensorboard_sink_or_a_clear_error(tmp_path):
    from hcdiag.monitor import sink_for

    try:
        import torch.utils.tensorboard  # noqa: F401
    except ImportError:
        with pytest.raises(UsageError, match="pip install tensorboard"):
            sink_for(f"tensorboard:{tmp_path / 'tb'}")
        return
    sink = sink_for(f"tensorboard:{tmp_path / 'tb'}")
    sink.write(3, Monitor(_net(4), iters=ITERS).compute())
    sink.close()
    assert any(p.name.startswith("events.out.tfevents") for p in (tmp_path / "tb").iterdir())


def test_sinks_refuse_unknown_targets(tmp_path):
    from hcdiag.monitor import sink_for

    with pytest.raises(UsageError, match=".jsonl or .csv"):
        sink_for(tmp_path / "metrics.txt")

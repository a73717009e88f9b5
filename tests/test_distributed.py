"""Monitor under torch.distributed: two CPU processes on gloo, the model wrapped in DDP and sharded by FSDP2.

Each rank builds the same lucidrains mHC model (test_monitor.Net, same seed), wraps it, and calls
``Monitor.step``; every rank must return the same dict, equal to a Monitor on the unwrapped model in this
(non-distributed) process, and only the HC tensors are gathered. Rank 0 alone writes the JSON-lines sink.
"""

from __future__ import annotations

import json
import os
import socket
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from hcdiag.monitor import Monitor

sys.path.insert(0, str(Path(__file__).parent))
from test_monitor import ITERS, _net  # noqa: E402

WORLD = 2
WRAPS = ("ddp", "fsdp2")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wrapped(wrap: str) -> torch.nn.Module:
    net = _net(5)
    if wrap == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(net)
    from torch.distributed.fsdp import fully_shard

    mesh = dist.init_device_mesh("cpu", (WORLD,))
    scalars = {p for p in net.parameters() if p.ndim == 0}  # fully_shard refuses 0-d parameters (h_post_scale)
    for hc in net.layers:
        fully_shard(hc, mesh=mesh, ignored_params=scalars)
    model = fully_shard(net, mesh=mesh, ignored_params=scalars)
    kinds = {type(p).__name__ for p in model.parameters() if p.ndim > 0}
    assert kinds == {"DTensor"}, kinds  # sharded: each rank holds a slice
    return model


def _worker(rank: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        for wrap in WRAPS:
            mon = Monitor(_wrapped(wrap), iters=ITERS, sinks=[Path(out) / f"sink-{wrap}.jsonl"])
            metrics = mon.step(0)
            Path(out, f"{wrap}-{rank}.json").write_text(json.dumps({"metrics": metrics, "keys": mon.gathered_keys}))
            mon.close()
        dist.barrier()  # both ranks done with every collective before either tears gloo down
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist")
    try:
        mp.spawn(_worker, args=(_free_port(), str(out)), nprocs=WORLD, join=True)  # one spawn for both wrappers
    except mp.ProcessExitedException as exc:
        # a rank killed by a signal (seen once in a full run: gloo's "terminate called without an active
        # exception", SIGABRT) is the runtime, not Monitor: spawn once more on a fresh port. An exception raised
        # in a rank (ProcessRaisedException) is not caught and fails the test.
        if exc.signal_name is None:
            raise
        mp.spawn(_worker, args=(_free_port(), str(out)), nprocs=WORLD, join=True)
    return out


@pytest.mark.parametrize("wrap", WRAPS)
def test_two_ranks_gather_hc_tensors_and_agree(wrap, ranks):
    tmp_path = ranks
    got = [json.loads((tmp_path / f"{wrap}-{r}.json").read_text()) for r in range(WORLD)]
    assert got[0] == got[1]  # every rank returns the same dict
    reference = Monitor(_net(5), iters=ITERS).step(0)
    assert got[0]["metrics"] == reference
    keys = got[0]["keys"]
    assert keys and all(k.startswith("layers.") and ".branch." not in k for k in keys)  # HC tensors only
    lines = (tmp_path / f"sink-{wrap}.jsonl").read_text().splitlines()
    assert len(lines) == 1  # rank 0 alone writes
    assert {k: v for k, v in json.loads(lines[0]).items() if k != "step"} == reference

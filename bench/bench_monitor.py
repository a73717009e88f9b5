"""Benchmark: what hcdiag costs inside and after a training run, against baselines measured in the same process.

1. ``Monitor.step`` on a tiny DeepSeek-V4 (transformers, random init, CPU; the test's config) against one
   training step of that model (forward, backward, AdamW step): median over ``--repeat`` calls each, printed
   as a ratio. The monitor's cost does not grow with the model's width outside the HC tensors, a training
   step does: on a real model the ratio is far smaller.
2. ``track_run`` over ``--checkpoints`` saved checkpoints (``save_pretrained`` + trainer_state.json), cold
   (every checkpoint analysed), with ``--jobs`` processes, and warm (all from the cache), per checkpoint,
   against one in-process ``stochasticity`` call (load + analyze_stochasticity) on one of them; plus the
   bytes one checkpoint's analysis reads.

3. ``--scale``: one native checkpoint whose HC sites have DeepSeek-V4's size (n = 4, C = 7168, 61 blocks =
   122 mHC sites, float32: 2.75 MB per site) timed through ``track_run``: what one real checkpoint costs
   (bytes read, seconds), from which the README's 1,000-checkpoint estimate is made.

The 1-minute load average is printed: on a shared machine compare ratios, not seconds.

    python bench/bench_monitor.py
    python bench/bench_monitor.py --checkpoints 16 --jobs 2 --repeat 10
    python bench/bench_monitor.py --scale

Not a pytest test.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from hcdiag.io.load import load
from hcdiag.monitor import Monitor
from hcdiag.stochasticity import analyze_stochasticity
from hcdiag.track import track_run

N, HID, LAYERS = 4, 32, 3
TINY_DSV4 = dict(
    vocab_size=64, hidden_size=HID, moe_intermediate_size=16, num_hidden_layers=LAYERS, num_attention_heads=2,
    num_key_value_heads=1, head_dim=16, q_lora_rank=16, num_experts_per_tok=1, n_routed_experts=2,
    n_shared_experts=1, hc_mult=N, o_groups=1, o_lora_rank=16, index_n_heads=2, index_head_dim=8, index_topk=4,
    num_nextn_predict_layers=0, sliding_window=8,
)  # fmt: skip  (tests/test_io_transformers.py's tiny config)


def _median_time(fn, repeat: int) -> float:
    fn()  # warm-up (imports, first allocation)
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--checkpoints", type=int, default=8)
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--batch", type=int, default=8, help="training batch (sequences of 32 tokens)")
    ap.add_argument("--scale", action="store_true", help="also time one DeepSeek-V4-sized checkpoint")
    a = ap.parse_args()
    torch.set_num_threads(1)
    if a.scale:
        _scale()
    from transformers import DeepseekV4Config, DeepseekV4ForCausalLM

    torch.manual_seed(0)
    model = DeepseekV4ForCausalLM(DeepseekV4Config(**TINY_DSV4))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ids = torch.randint(0, TINY_DSV4["vocab_size"], (a.batch, 32))

    def train_step() -> None:
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()

    mon = Monitor(model)
    load0 = os.getloadavg()[0]
    t_train = _median_time(train_step, a.repeat)
    t_mon = _median_time(lambda: mon.step(0), a.repeat)
    print(f"load average {load0:.1f} (1 min), torch threads 1")
    print(f"training step (batch {a.batch} x 32 tokens, {sum(p.numel() for p in model.parameters()):,} params): "
          f"{t_train * 1e3:.1f} ms")
    print(f"Monitor.step ({len(mon.last)} metrics, {len(mon.gathered_keys or [])} HC tensors): "
          f"{t_mon * 1e3:.1f} ms = {t_mon / t_train:.2f} training steps")

    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp) / "run"
        for k in range(1, a.checkpoints + 1):
            with torch.no_grad():
                for name, p in model.named_parameters():
                    if "_hc." in name:
                        p.add_(torch.randn_like(p) * 0.01)  # each checkpoint a little different
            d = run / f"checkpoint-{10 * k}"
            model.save_pretrained(d)
            (d / "trainer_state.json").write_text(json.dumps({"global_step": 10 * k, "log_history": []}))
        one = str(run / "checkpoint-10")

        def single() -> None:
            analyze_stochasticity(load(one))

        t_single = _median_time(single, a.repeat)
        bytes_read = load(one).bytes_read
        cache = Path(tmp) / "out" / "cache.json"
        t0 = time.perf_counter()
        track_run([run])
        t_cold = (time.perf_counter() - t0) / a.checkpoints
        t0 = time.perf_counter()
        track_run([run], jobs=a.jobs, cache=cache)
        t_jobs = (time.perf_counter() - t0) / a.checkpoints
        t0 = time.perf_counter()
        warm = track_run([run], cache=cache)
        t_warm = (time.perf_counter() - t0) / a.checkpoints
        assert warm.cached == a.checkpoints
    print(f"stochasticity on one checkpoint (load + analyze, in process): {t_single * 1e3:.1f} ms, "
          f"{bytes_read:,} tensor bytes read")
    print(f"track_run, {a.checkpoints} checkpoints, per checkpoint: cold {t_cold * 1e3:.1f} ms = "
          f"{t_cold / t_single:.2f} x stochasticity; --jobs {a.jobs} {t_jobs * 1e3:.1f} ms = "
          f"{t_jobs / t_single:.2f} x (includes spawning the workers); cached {t_warm * 1e3:.2f} ms = "
          f"{t_warm / t_single:.3f} x")
    print(f"load average after: {os.getloadavg()[0]:.1f}")


def _scale(n: int = 4, C: int = 7168, blocks: int = 61) -> None:
    """Time track_run on one native checkpoint with DeepSeek-V4-sized mHC sites (random static logits)."""
    from hcdiag import registry
    from hcdiag.io.native import save_native

    spec = registry.get("mhc")
    torch.manual_seed(0)
    modules = [spec.build(n, C, layer_index=i, dtype=torch.float32) for i in range(2 * blocks)]
    with torch.no_grad():
        for m in modules:
            for p in m.parameters():
                p.add_(torch.randn_like(p) * 0.05)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "ckpt_1000.safetensors"
        save_native(path, modules, variant="mhc", n=n, C=C, blocks=blocks, sinkhorn=None, form="code")
        size = path.stat().st_size
        t0 = time.perf_counter()
        r = track_run([path])
        wall = time.perf_counter() - t0
        e = r.entries[0]
    print(f"scale: one checkpoint, {2 * blocks} mHC sites, n = {n}, C = {C}: {size:,} bytes on disk, "
          f"{e['bytes_read']:,} tensor bytes read, {wall:.2f} s through track_run "
          f"({wall / (2 * blocks) * 1e3:.1f} ms per site)")


if __name__ == "__main__":
    main()

"""Benchmark: ``stochasticity --probe random`` on a DeepSeek-V4-Flash-shaped checkpoint against its floor.

Writes a checkpoint in the transformers layout to a temp dir (43 layers -> 86 sites ``model.layers.N.{attn,ffn}_hc.
{fn,base,scale}``, fn [(n+2)n, nC] = [24, 16384] float32, n = 4, C = 4096; transformers' initialisation: fn ~
N(0, 0.02^2), base = 0, scale = 1; config.json with hc_mult, hc_sinkhorn_iters = 20, hc_eps = rms_norm_eps = 1e-6).

For each token count, in a fresh child process (so that its peak RSS is its own; taken before the floor runs, whose
[T, nC] float64 input would otherwise dominate it):
  * floor: reading every HC tensor (safetensors, cast to float64) plus the float64 projection x' @ fn^T of every
    site on one [T, nC] float64 input (issue 14's floor), timed in that child;
  * total: ``hcdiag.io.load`` + ``analyze_stochasticity(probe=random T)``, as ``hcdiag stochasticity DIR --probe
    random --tokens T`` runs them (less the interpreter's start-up and the rendering);
  * draw: the probe's random numbers alone for every site, timed separately (part of total): numpy PCG64 float64
    x [T, n, C] for ``--draw full``; g [T, k], chi^2 [T] and the QR of fn for ``--draw projected`` (``auto``
    picks projected for this shape: nC = 16384 >= 32 k = 768);
  * peak RSS of the child (VmHWM, its own: ru_maxrss would include the parent's RSS at the fork) and the
    probe's memory estimate (hcdiag.probes).
Printed: total / floor, the time per 1,000 tokens (linear in tokens when it stays flat), and the peak RSS growth
per 1,000 tokens between the smallest and the largest count.

Then ``gain-sweep --layers 1024 --seeds 256 --n 16 --logit-scale 0.05`` against 16 x the same at ``--layers 64``,
both in this process through ``hcdiag.cli.main`` (issue 14: at most 1.2).

    python bench/bench_production.py            # 86 sites at 256, 1024, 4096 tokens, both draws + gain-sweep
    python bench/bench_production.py --full     # also 16384 tokens
    python bench/bench_production.py --quick    # 8 sites, 256 / 1024 tokens, no gain-sweep (~1 min)
    python bench/bench_production.py --shape pro --draws auto   # DeepSeek-V4-Pro's shape: 122 sites, C = 7168

Not a pytest test.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import multiprocessing as mp
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file

N, C = 4, 4096
#: --shape: (layers, hidden size C) of DeepSeek-V4-Flash and DeepSeek-V4-Pro (n = 4 in both)
SHAPES = {"flash": (43, 4096), "pro": (61, 7168)}


def write_checkpoint(directory: Path, layers: int, width: int = C) -> None:
    """The Flash-shaped checkpoint described in the module docstring (``layers`` layers, 2 sites each, hidden
    size ``width``: 7168 for the Pro shape)."""
    g = torch.Generator().manual_seed(0)
    rows = (N + 2) * N
    sd: dict[str, torch.Tensor] = {}
    for i in range(layers):
        for kind in ("attn", "ffn"):
            p = f"model.layers.{i}.{kind}_hc."
            sd[p + "fn"] = torch.randn(rows, N * width, generator=g) * 0.02
            sd[p + "base"] = torch.zeros(rows)
            sd[p + "scale"] = torch.ones(3)
    save_file(sd, str(directory / "model.safetensors"))
    cfg = dict(model_type="deepseek_v4", num_hidden_layers=layers, hidden_size=width, hc_mult=N,
               hc_sinkhorn_iters=20, hc_eps=1e-6, rms_norm_eps=1e-6)
    (directory / "config.json").write_text(json.dumps(cfg))


def peak_rss() -> int:
    """This process's own peak RSS in bytes since it started (VmHWM): unlike ``ru_maxrss``, which Linux keeps
    across fork + exec, so a spawned child's ru_maxrss is at least its parent's RSS at the fork."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def _floor(directory: Path, tokens: int) -> tuple[float, float]:
    """(seconds reading every HC tensor as float64, seconds of x' @ fn^T in float64 over every site)."""
    t0 = time.perf_counter()
    with safe_open(str(directory / "model.safetensors"), "pt") as f:
        tensors = {k: f.get_tensor(k).to(torch.float64) for k in f.keys()}  # noqa: SIM118 (safe_open API)
    read = time.perf_counter() - t0
    fns = [t for k, t in tensors.items() if k.endswith(".fn")]
    x = torch.randn(tokens, fns[0].shape[1], dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    t0 = time.perf_counter()
    for fn in fns:
        F.linear(x, fn)
    return read, time.perf_counter() - t0


def _draw_seconds(probe, sites) -> float:
    """Seconds of the probe's own random numbers for every site, drawn as ``probe`` draws them (part of total):
    the full x [T, n, C], or the projected draw's z = RMSNorm(x) fn^T (its g, chi^2 and the QR)."""
    t0 = time.perf_counter()
    for site in sites:
        if probe.site_draw(site) == "projected":
            probe.read_values(site.index, site.module.linear_read())
        else:
            probe.inputs(site)
    return time.perf_counter() - t0


def _child(directory: str, tokens: int, draw: str, out: mp.Queue) -> None:
    from hcdiag.io.load import load
    from hcdiag.probes import make_probe, random_probe_bytes
    from hcdiag.stochasticity import analyze_stochasticity

    d = Path(directory)
    (d / "model.safetensors").read_bytes()  # the page cache warm for both hcdiag and the floor
    t0 = time.perf_counter()
    model = load(directory)
    t_load = time.perf_counter() - t0
    probe = make_probe("random", tokens=tokens, draw=draw)
    report = analyze_stochasticity(model, probe=probe)
    total = time.perf_counter() - t0
    assert len(report.sites) == len(model.sites)
    rss = peak_rss()  # before the floor's own x
    read, proj = _floor(d, tokens)
    out.put(dict(tokens=tokens, sites=len(model.sites), read=read, proj=proj, load=t_load, total=total,
                 draw=_draw_seconds(probe, model.sites), rss=rss,
                 estimate=random_probe_bytes(tokens, model.sites, probe), how=probe.to_dict(model.sites)["draw"]))


def measure(directory: Path, tokens: int, draw: str) -> dict[str, float]:
    ctx = mp.get_context("spawn")  # fork after torch has run threads can hang the child
    q: mp.Queue = ctx.Queue()
    p = ctx.Process(target=_child, args=(str(directory), tokens, draw, q))
    p.start()
    res = q.get()
    p.join()
    return res


def _cli_seconds(*args: str) -> float:
    from hcdiag.cli import main

    t0 = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):
        main(list(args))
    return time.perf_counter() - t0


def gain_sweep_ratio() -> None:
    opts = ["--seeds", "256", "--n", "16", "--logit-scale", "0.05"]
    _cli_seconds("gain-sweep", "--layers", "8", *opts)  # imports and first-call costs out of the way
    small = _cli_seconds("gain-sweep", "--layers", "64", *opts)
    big = _cli_seconds("gain-sweep", "--layers", "1024", *opts)
    print(f"\ngain-sweep {' '.join(opts)}: --layers 1024 {big:.2f} s, --layers 64 {small:.2f} s; "
          f"1024 / (16 x 64) = {big / (16 * small):.2f} (target <= 1.2)")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="4 layers (8 sites), 256 and 1024 tokens, no gain-sweep")
    ap.add_argument("--full", action="store_true", help="also 16384 tokens")
    ap.add_argument("--draws", default="auto,full",
                    help="comma-separated --draw modes to time (default auto,full: projected here, and full)")
    ap.add_argument("--shape", choices=sorted(SHAPES), default="flash",
                    help="flash: 43 layers, hidden 4096 (default); pro: 61 layers, hidden 7168")
    ap.add_argument("--layers", type=int, default=None, help="layers of the checkpoint (default: the shape's; "
                    "--quick 4)")
    args = ap.parse_args(argv)
    shape_layers, width = SHAPES[args.shape]
    layers = args.layers or (4 if args.quick else shape_layers)
    counts = [256, 1024] if args.quick else [256, 1024, 4096] + ([16384] if args.full else [])
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.2f}")
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        write_checkpoint(d, layers, width)
        size = (d / "model.safetensors").stat().st_size
        print(f"checkpoint ({args.shape} shape): {layers} layers, {2 * layers} sites, "
              f"fn [{(N + 2) * N}, {N * width}] float32, {size / 1e6:.0f} MB")
        for draw in args.draws.split(","):
            _table(d, counts, draw)
    if not args.quick:
        gain_sweep_ratio()
    return 0


def _table(d: Path, counts: list[int], draw: str) -> None:
    """One table of the counts, ``--draw draw``, with its floor ratios and per-1,000-token slopes."""
    print(f"\n--draw {draw}")
    print(f"{'tokens':>7} {'read s':>7} {'proj s':>7} {'floor s':>8} {'load s':>7} {'draw s':>7} "
          f"{'total s':>8} {'total/floor':>11} {'s/1K tok':>9} {'peak RSS':>9} {'estimate':>9}  drawn")
    rows = []
    for T in counts:
        r = measure(d, T, draw)
        rows.append(r)
        floor = r["read"] + r["proj"]
        print(f"{T:>7} {r['read']:>7.2f} {r['proj']:>7.2f} {floor:>8.2f} {r['load']:>7.2f} {r['draw']:>7.2f} "
              f"{r['total']:>8.2f} {r['total'] / floor:>11.2f} {1000 * r['total'] / T:>9.2f} "
              f"{r['rss'] / 2**30:>7.2f} G {r['estimate'] / 2**30:>7.2f} G  {r['how']}", flush=True)
    lo, hi = rows[0], rows[-1]
    dT = hi["tokens"] - lo["tokens"]
    per_k = (hi["rss"] - lo["rss"]) / dT * 1000
    slope_t = (hi["total"] - lo["total"]) / dT * 1000
    print(f"time: {slope_t:.2f} s per 1,000 tokens between {lo['tokens']} and {hi['tokens']} "
          f"(x{hi['total'] / lo['total']:.1f} for x{hi['tokens'] / lo['tokens']:.0f} tokens)")
    print(f"peak RSS: {per_k / 2**20:.0f} MiB per 1,000 tokens between {lo['tokens']} and {hi['tokens']} "
          f"(estimate {hcdiag_estimate_per_k(hi) / 2**20:.0f} MiB); at {lo['tokens']} tokens "
          f"{lo['rss'] / 2**30:.2f} GiB")


def hcdiag_estimate_per_k(row: dict[str, float]) -> float:
    return row["estimate"] / row["tokens"] * 1000


if __name__ == "__main__":
    sys.exit(main())

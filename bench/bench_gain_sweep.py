"""Benchmark: ``gain-sweep`` at scale (default ``--layers 1024 --seeds 256 --n 16``: 2048 sites x 256 seeds =
524,288 matrices of 16 x 16 per variant) and two baselines measured in the same process.

Per variant it prints the wall time and this process's CPU time, split into building the H_res stack and the
depth products + metrics (forward composites with an SVD each, backward composites), and the 1-minute load
average around it (the machine may be shared: compare CPU time when the load exceeds the core count).

Then every variant in one call, as ``hcdiag gain-sweep`` runs them (``--serial``: once more on one thread).

Baselines:
  * the same sweep at ``--base-layers`` (default 64): work grows linearly in the number of sites, so the ratio
    of times should be close to the ratio of sites (16 by default); more means a super-linear cost somewhere.
  * a naive per-matrix loop on a small case (``--naive-layers`` x ``--naive-seeds``): one registry module per
    (site, seed), ``perturb_`` + ``forward`` per module, numpy products and one SVD per matrix: what one
    writes without batching. Printed as the speedup of gain_sweep on the same small case.

    python bench/bench_gain_sweep.py
    python bench/bench_gain_sweep.py --variants mhc,kromhc --init paper
    python bench/bench_gain_sweep.py --layers 256 --seeds 64

Not a pytest test.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
import torch

from hcdiag import registry
from hcdiag.errors import UsageError
from hcdiag.gain import gain_sweep


def _run(variant: str, layers: int, seeds: int, n: int, C: int, init: str, scale: float) -> dict[str, float]:
    marks: dict[str, float] = {}

    def progress(label: str, done: int, total: int) -> None:
        if 2 * done >= total:  # sites built; the depth products start
            marks.setdefault("products", time.perf_counter())

    kw = {"init": "perturb", "logit_scale": scale} if init == "perturb" else {}
    load0 = os.getloadavg()[0]
    t0, c0 = time.perf_counter(), time.process_time()
    r = gain_sweep(layers=layers, seeds=seeds, n=n, C=C, variants=[variant], progress=progress, **kw)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    v = r.variants[0]
    build = marks.get("products", t0 + wall) - t0
    return {
        "ok": v.ok,
        "wall": wall,
        "cpu": cpu,
        "build": build,
        "products": wall - build,
        "load": max(load0, os.getloadavg()[0]),
        "gf_last": float(v.curves["gain_fwd"]["median"][-1]) if v.ok else float("nan"),
        "gb_max": float(v.curves["gain_bwd"]["max"].max()) if v.ok else float("nan"),
        "reason": v.reason,
    }


def _naive(variant: str, layers: int, seeds: int, n: int, C: int, scale: float) -> float:
    """Per-matrix Python loops: module per (site, seed), numpy product and SVD per composite."""
    spec = registry.get(variant)
    t0 = time.perf_counter()
    L = 2 * layers
    g = torch.Generator().manual_seed(0)
    x0 = torch.zeros(n, C, dtype=torch.float64)
    H = np.empty((L, seeds, n, n))
    with torch.no_grad():
        for layer in range(L):
            for s in range(seeds):
                m = spec.build(n, C, layer_index=layer, dtype=torch.float64)
                if scale:
                    m.perturb_(scale, g)
                H[layer, s] = m.forward(x0).res.numpy()
    out = np.empty((L, seeds, 4))  # G_f, sigma_1, sigma_2, ||F - J/n|| per composite
    for s in range(seeds):
        P = np.eye(n)
        for layer in range(L):
            P = H[layer, s] @ P
            sv = np.linalg.svd(P, compute_uv=False)
            out[layer, s] = (np.abs(P.sum(1)).max(), sv[0], sv[1], np.linalg.norm(P - 1 / n))
        Q = np.eye(n)
        for layer in range(L - 1, -1, -1):
            Q = Q @ H[layer, s]
            _ = np.abs(Q.sum(0)).max()
    _ = np.median(out, axis=1)
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=1024)
    ap.add_argument("--seeds", type=int, default=256)
    ap.add_argument("--n", type=int, default=16)
    ap.add_argument("--C", type=int, default=64)
    ap.add_argument("--init", choices=("paper", "perturb"), default="perturb")
    ap.add_argument("--logit-scale", type=float, default=0.05)
    ap.add_argument("--variants", default=",".join(registry.names()))
    ap.add_argument("--base-layers", type=int, default=64)
    ap.add_argument("--naive-layers", type=int, default=16)
    ap.add_argument("--naive-seeds", type=int, default=16)
    ap.add_argument("--naive-variant", default="mhc")
    ap.add_argument("--serial", action="store_true", help="also time the all-variant call on 1 thread")
    a = ap.parse_args(argv)
    scale = a.logit_scale if a.init == "perturb" else 0.0
    print(
        f"gain_sweep --layers {a.layers} --seeds {a.seeds} --n {a.n} --C {a.C} --init {a.init}"
        + (f" --logit-scale {scale:g}" if scale else "")
        + f"  ({2 * a.layers} sites x {a.seeds} seeds = {2 * a.layers * a.seeds:,} matrices per variant); "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs"
    )
    head = (f"{'variant':<11} {'wall s':>7} {'cpu s':>7} {'build':>6} {'prod':>6} {'load':>5} "
            f"{'base s':>7} {'ratio':>6}  {'G_f last (med)':>14} {'G_b max':>10}")
    print(head)
    print("-" * len(head))
    total = 0.0
    for variant in a.variants.split(","):
        try:
            big = _run(variant, a.layers, a.seeds, a.n, a.C, a.init, scale)
        except UsageError as exc:  # every requested variant impractical (mhc-lite at n = 16)
            print(f"{variant:<11} skipped: {exc}")
            continue
        base = _run(variant, a.base_layers, a.seeds, a.n, a.C, a.init, scale)
        total += big["wall"]
        print(
            f"{variant:<11} {big['wall']:7.2f} {big['cpu']:7.2f} {big['build']:6.2f} {big['products']:6.2f} "
            f"{big['load']:5.1f} {base['wall']:7.2f} {big['wall'] / base['wall']:6.1f}  "
            f"{big['gf_last']:14.6g} {big['gb_max']:10.6g}",
            flush=True,
        )
    print(f"total wall over variants: {total:.1f} s (site ratio big / base = {a.layers / a.base_layers:g})")

    # what `hcdiag gain-sweep` runs: every variant in one call (the H_res stack's pages are reused across variants)
    kw = {"init": "perturb", "logit_scale": scale} if scale else {}
    names = a.variants.split(",")
    runs = [("all variants, one call", None)] + ([("the same on 1 thread", 1)] if a.serial else [])
    walls = []
    for label, threads in runs:
        load0 = os.getloadavg()[0]
        t0, c0 = time.perf_counter(), time.process_time()
        try:
            gain_sweep(layers=a.layers, seeds=a.seeds, n=a.n, C=a.C, variants=names, threads=threads, **kw)
        except UsageError as exc:
            print(f"{label}: {exc}")
            break
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        walls.append(wall)
        vs_serial = f"; default threads / 1 thread = {walls[0] / wall:.2f}" if threads == 1 else ""
        print(f"{label}: {wall:.1f} s wall, {cpu:.1f} s cpu, load {max(load0, os.getloadavg()[0]):.1f}; "
              f"{wall / total:.2f} x the separate runs' total{vs_serial}", flush=True)

    nv, nl, ns = a.naive_variant, a.naive_layers, a.naive_seeds
    t_naive = _naive(nv, nl, ns, a.n, a.C, scale)
    t0 = time.perf_counter()
    gain_sweep(layers=nl, seeds=ns, n=a.n, C=a.C, variants=[nv], **kw)
    t_fast = time.perf_counter() - t0
    per = t_naive / (2 * nl * ns)
    print(
        f"naive per-matrix loop, {nv} --layers {nl} --seeds {ns} --n {a.n}: {t_naive:.2f} s; gain_sweep: "
        f"{t_fast:.3f} s; speedup {t_naive / t_fast:.0f}x; naive {per * 1e3:.2f} ms per matrix, i.e. "
        f"~{per * 2 * a.layers * a.seeds / 60:.0f} min for the {2 * a.layers * a.seeds:,} matrices above"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Benchmark: ``stochasticity --probe activations`` on a DeepSeek-V4-Flash-shaped checkpoint against its floor.

The checkpoint is bench/bench_production.py's (transformers layout, n = 4, C = 4096, fn [24, 16384] float32;
its ``write_checkpoint``), with ``--sites`` sites (default 16, i.e. 8 layers). Beside it, an activations file in
the :mod:`hcdiag.capture` format: per site x [T, 4, 4096] float32 (torch's generator, N(0, 1)) and the H_res the
checkpoint's site gives on it (hcdiag's site module, float32), in safetensors' format, written site by site.

For each token count, in a fresh child process (so that its peak RSS is its own; taken before the floor runs):
  * total: ``hcdiag.cli.main(["stochasticity", DIR, "--probe", "activations", "--activations", FILE, "--json"])``
    (the command as a user runs it, less the interpreter's start-up);
  * floor: reading every HC tensor of the checkpoint and every site's x from the file (safetensors, cast to
    float64), plus x' @ fn^T in float64 per site (x' = RMSNorm(vec(x))), timed in the same child after total;
  * peak RSS of the child (resource.getrusage, ru_maxrss; and VmHWM, its own high-water mark: Linux keeps
    ru_maxrss across fork + exec, so a spawned child's is at least the parent's RSS; the file is written in
    another child so that the parent stays small), against the size of one site's x and of all of them.
The page cache is warmed for the file before both. Printed: total / floor, seconds per 1,000 tokens, peak RSS.
No timed assertions.

    python bench/bench_activations.py                      # 16 sites at 1024 and 4096 tokens
    python bench/bench_activations.py --sites 4 --tokens 512

Not a pytest test.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import multiprocessing as mp
import os
import resource
import struct
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import safe_open

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_production import C, N, peak_rss, write_checkpoint  # noqa: E402  (bench/ is not a package)

EPS = 1e-6


def write_activations(ckpt: Path, path: Path, tokens: int) -> int:
    """The capture file described in the module docstring, for every site of ``ckpt``; returns its size.

    Written one site at a time (header first, then each site's x and H_res as they are drawn), so that a file
    larger than memory can be made (86 Flash sites at 4096 tokens: 23 GB): safetensors' ``save_file`` needs
    every tensor in memory, and a byte copy of each. The layout is safetensors' own (8-byte little-endian
    header length, JSON header padded with spaces to 8 bytes, tensors in offset order); ``safe_open`` reads it
    back and checks the offsets before anything is measured."""
    from hcdiag.capture import FORMAT, VERSION
    from hcdiag.io.load import load

    model = load(str(ckpt))
    entries, header, at = [], {}, 0
    for site in model.sites:
        for key, shape in (("x", [tokens, N, C]), ("h_res", [tokens, N, N])):
            size = 4 * shape[0] * shape[1] * shape[2]
            header[f"sites.{site.index}.{key}"] = {"dtype": "F32", "shape": shape, "data_offsets": [at, at + size]}
            at += size
        entries.append({"index": site.index, "name": site.name, "module_class": "bench", "h_res_from": "output",
                        "tokens": tokens, "n": N, "C": C})
    header["__metadata__"] = {"format": FORMAT, "version": VERSION, "sites": json.dumps(entries)}
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    g = torch.Generator().manual_seed(1)
    with path.open("wb") as fh:
        fh.write(struct.pack("<Q", len(raw)) + raw)
        for site in model.sites:
            x = torch.randn(tokens, N, C, generator=g)
            with torch.no_grad():
                h = site.module.in_dtype(torch.float32)(x).res
            fh.write(x.numpy().tobytes())
            fh.write(h.expand(tokens, N, N).contiguous().float().numpy().tobytes())
            del x, h
    with safe_open(str(path), "pt") as f:
        assert len(list(f.keys())) == 2 * len(model.sites)
    return path.stat().st_size


def _warm(path: Path) -> None:
    with path.open("rb") as fh:
        while fh.read(1 << 26):
            pass


def _floor(ckpt: Path, acts: Path) -> tuple[float, float]:
    """(seconds reading the checkpoint's HC tensors and every site's x as float64, seconds of x' @ fn^T)."""
    read = proj = 0.0
    t0 = time.perf_counter()
    with safe_open(str(ckpt / "model.safetensors"), "pt") as f:
        fns = [f.get_tensor(k).to(torch.float64) for k in f.keys()]  # noqa: SIM118 (safe_open API)
    fns = [t for t in fns if t.ndim == 2]
    read += time.perf_counter() - t0
    with safe_open(str(acts), "pt") as f:
        for i, fn in enumerate(fns):
            t0 = time.perf_counter()
            x = f.get_tensor(f"sites.{i}.x").to(torch.float64).reshape(-1, N * C)
            t1 = time.perf_counter()
            xn = x * torch.rsqrt(x.square().mean(-1, keepdim=True) + EPS)
            F.linear(xn, fn)
            proj += time.perf_counter() - t1
            read += t1 - t0
            del x, xn
    return read, proj


def _writer(ckpt: str, acts: str, tokens: int, out: mp.Queue) -> None:
    out.put(write_activations(Path(ckpt), Path(acts), tokens))


def _child(ckpt: str, acts: str, out: mp.Queue) -> None:
    from hcdiag.cli import main

    _warm(Path(acts))
    buf = io.StringIO()
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(buf):
        try:
            main(["stochasticity", ckpt, "--probe", "activations", "--activations", acts, "--json"])
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
    total = time.perf_counter() - t0
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB; before the floor
    hwm = peak_rss()
    sites = len(json.loads(buf.getvalue())["sites"]) if code == 0 else 0
    read, proj = _floor(Path(ckpt), Path(acts))
    out.put(dict(code=code, sites=sites, total=total, rss=rss, hwm=hwm, read=read, proj=proj))


def _in_child(target: Callable[..., None], *args: Any) -> Any:
    ctx = mp.get_context("spawn")  # fork after torch has run threads can hang the child
    q: mp.Queue = ctx.Queue()
    p = ctx.Process(target=target, args=(*args, q))
    p.start()
    res = q.get()
    p.join()
    return res


def measure(ckpt: Path, acts: Path) -> dict[str, float]:
    return _in_child(_child, str(ckpt), str(acts))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sites", type=int, default=16, help="sites (2 per layer; default 16)")
    ap.add_argument("--tokens", type=int, default=4096, help="recorded tokens per site (default 4096)")
    ap.add_argument("--small", type=int, default=1024, help="the smaller token count, for the growth (1024)")
    args = ap.parse_args(argv)
    layers = max(1, args.sites // 2)
    counts = sorted({args.small, args.tokens})
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.2f}")
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        ckpt = d / "ckpt"
        ckpt.mkdir()
        write_checkpoint(ckpt, layers)
        print(f"checkpoint: {layers} layers, {2 * layers} sites, fn [{(N + 2) * N}, {N * C}] float32")
        print(f"{'tokens':>7} {'file':>8} {'1 x':>8} {'read s':>7} {'proj s':>7} {'floor s':>8} {'total s':>8} "
              f"{'total/floor':>11} {'s/1K tok':>9} {'peak RSS':>9} {'VmHWM':>8}")
        rows = []
        for T in counts:
            acts = d / f"acts-{T}.safetensors"
            try:
                size = _in_child(_writer, str(ckpt), str(acts), T)  # this process stays small
                r = measure(ckpt, acts)
            finally:
                acts.unlink(missing_ok=True)
            if r["code"] != 0 or r["sites"] != 2 * layers:
                print(f"{T:>7}: stochasticity exited {r['code']} ({r['sites']} sites)")
                return 1
            floor = r["read"] + r["proj"]
            one = T * N * C * 4
            rows.append(dict(r, tokens=T))
            print(f"{T:>7} {size / 2**30:>6.2f} G {one / 2**20:>6.0f} M {r['read']:>7.2f} {r['proj']:>7.2f} "
                  f"{floor:>8.2f} {r['total']:>8.2f} {r['total'] / floor:>11.2f} {1000 * r['total'] / T:>9.2f} "
                  f"{r['rss'] / 2**30:>7.2f} G {r['hwm'] / 2**30:>6.2f} G", flush=True)
    if len(rows) > 1:
        lo, hi = rows[0], rows[-1]
        dT = hi["tokens"] - lo["tokens"]
        print(f"time: x{hi['total'] / lo['total']:.1f} for x{hi['tokens'] / lo['tokens']:.0f} tokens; "
              f"peak RSS: {(hi['rss'] - lo['rss']) / dT * 1000 / 2**20:.0f} MiB per 1,000 tokens (VmHWM "
              f"{(hi['hwm'] - lo['hwm']) / dT * 1000 / 2**20:.0f} MiB) between "
              f"{lo['tokens']} and {hi['tokens']} (one site's x: {N * C * 4 * 1000 / 2**20:.0f} MiB per 1,000 "
              f"tokens, all {2 * layers} sites' x: {2 * layers * N * C * 4 * 1000 / 2**20:.0f} MiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

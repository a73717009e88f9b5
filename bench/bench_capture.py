"""Benchmark: the peak memory of ``hcdiag.capture`` against the size of what it records.

A stack of hcdiag ``mhc`` site modules (``--sites``, n = 4, ``--C``) is called on ``--tokens`` tokens in calls of
``--batch`` tokens inside ``capture(...)``; each site's x [T, n, C] and H_res [T, n, n] (float32, plus H_pre /
H_post) are recorded and written at the end of the block. In a fresh child process (its own peak RSS), the
peak RSS growth from just before the block to after the file is written (VmHWM) is printed against the
recording's size (the file's tensor bytes): 1.0x is the least a recorder that holds what it records can reach
(it keeps every token until the header, which needs each tensor's length, is written). No timed assertions.

    python bench/bench_capture.py                     # 16 sites, C = 1024, 8192 tokens (2.1 GB recorded)
    python bench/bench_capture.py --sites 4 --tokens 2048

Not a pytest test.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_production import peak_rss  # noqa: E402  (bench/ is not a package)

N = 4


def _rss() -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def _child(sites: int, C: int, tokens: int, batch: int, path: str, out: mp.Queue) -> None:
    from hcdiag import registry
    from hcdiag.capture import capture

    torch.set_num_threads(1)
    spec = registry.get("mhc")
    mods = torch.nn.ModuleList([spec.build(N, C, layer_index=i, dtype=torch.float32) for i in range(sites)])
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(batch, N, C, generator=g) for _ in range(2)]  # reused inputs: the recorder copies them
    before = _rss()
    t0 = time.perf_counter()
    with torch.no_grad(), capture(mods, path, max_tokens=tokens):
        for k in range(0, tokens, batch):
            for m in mods:
                m(xs[(k // batch) % 2])
    seconds = time.perf_counter() - t0
    out.put(dict(before=before, hwm=peak_rss(), seconds=seconds, size=Path(path).stat().st_size))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sites", type=int, default=16)
    ap.add_argument("--C", type=int, default=1024)
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--batch", type=int, default=1024, help="tokens per forward call (default 1024)")
    args = ap.parse_args(argv)
    print(f"torch {torch.__version__}, load average {os.getloadavg()[0]:.2f}")
    with tempfile.TemporaryDirectory() as tmp:
        path = str(Path(tmp) / "acts.safetensors")
        ctx = mp.get_context("spawn")
        q: mp.Queue = ctx.Queue()
        p = ctx.Process(target=_child, args=(args.sites, args.C, args.tokens, args.batch, path, q))
        p.start()
        r = q.get()
        p.join()
    grew = r["hwm"] - r["before"]
    print(f"{args.sites} sites, n = {N}, C = {args.C}, {args.tokens} tokens in calls of {args.batch}: recording "
          f"{r['size'] / 2**30:.2f} GiB (file), capture + write {r['seconds']:.1f} s; peak RSS growth "
          f"{grew / 2**30:.2f} GiB = {grew / r['size']:.2f}x the recording")
    return 0


if __name__ == "__main__":
    sys.exit(main())

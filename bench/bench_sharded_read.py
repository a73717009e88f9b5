"""Benchmark: reading the HC sites of a large sharded safetensors checkpoint touches only the HC bytes.

Generates (in a temporary directory) a DeepSeek-V4-style sharded checkpoint: per block a big non-HC tensor
``model.layers.N.mlp.weight`` and the real HC tensors ``model.layers.N.{attn,ffn}_hc.{fn,base,scale}``
(under 1% of the bytes), a ``config.json`` and ``model.safetensors.index.json``. Then, in a fresh
interpreter (so that peak RSS is not the generator's), it runs ``hcdiag.io.load`` plus every site's static
H_res (x = 0), and compares with reading every tensor of the checkpoint in the same process.

Page cache: the shard files are fsync'ed and then evicted with posix_fadvise(DONTNEED) before each timed
phase, so both phases read from disk (as far as the kernel honours the advice).

    python bench/bench_sharded_read.py                 # ~540 MB, 8 shards
    python bench/bench_sharded_read.py --blocks 16     # ~1.1 GB

Exit status 1 if the bytes read exceed 2% of the checkpoint. Not a pytest test.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

N, C = 4, 512  # streams, stream width: fn [24, 2048]
BIG = (4096, 4096)  # float32: 64 MiB per block


def _rss_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) so that the next phase's peak is its own (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def _peak_rss_bytes() -> int:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB, lifetime peak


def _evict(paths: list[Path]) -> None:
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def generate(root: Path, blocks: int) -> dict:
    import torch
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    wmap: dict[str, str] = {}
    hc_bytes = total = 0
    for b in range(blocks):
        shard = f"model-{b + 1:05d}-of-{blocks:05d}.safetensors"
        tensors = {f"model.layers.{b}.mlp.weight": torch.randn(*BIG, generator=g)}
        for kind in ("attn", "ffn"):
            p = f"model.layers.{b}.{kind}_hc."
            tensors[p + "fn"] = torch.randn((N + 2) * N, N * C, generator=g) * 0.1
            tensors[p + "base"] = torch.randn((N + 2) * N, generator=g)
            tensors[p + "scale"] = torch.ones(3)
            hc_bytes += sum(tensors[p + s].numel() * 4 for s in ("fn", "base", "scale"))
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        save_file(tensors, str(root / shard))
        wmap.update({k: shard for k in tensors})
        del tensors
    for f in root.glob("*.safetensors"):
        fd = os.open(f, os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)
    (root / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": wmap})
    )
    config = dict(
        model_type="deepseek_v4",
        hc_mult=N,
        hidden_size=C,
        hc_sinkhorn_iters=20,
        hc_eps=1e-6,
        rms_norm_eps=1e-6,
        num_hidden_layers=blocks,
    )
    (root / "config.json").write_text(json.dumps(config))
    return {"hc_bytes": hc_bytes, "total": total}


def measure(root: Path) -> dict:
    import torch
    from safetensors import safe_open

    import hcdiag.io
    import hcdiag.sinkhorn  # noqa: F401  (imported lazily by the sites; import cost is not part of the read)
    from hcdiag.io.load import import_layouts

    import_layouts()
    shards = sorted(root.glob("*.safetensors"))
    torch.set_num_threads(1)
    torch.softmax(torch.zeros(2, 2, dtype=torch.float64), -1)  # one-time kernel initialisation

    def one_load() -> tuple[object, list, float, int]:
        _evict(shards)
        _reset_peak_rss()
        rss0 = _rss_bytes()
        t0 = time.perf_counter()
        model = hcdiag.io.load(root)
        with torch.no_grad():
            res = [s.module(torch.zeros(1, model.n, model.C, dtype=torch.float64)).res for s in model.sites]
        return model, res, time.perf_counter() - t0, _peak_rss_bytes() - rss0

    # the first load also pays one-time costs (lazy imports, allocator arenas); the second shows what a load
    # itself needs. Both are printed.
    model, res, t_load, peak_delta = one_load()
    del model, res
    model, res, t_load2, peak_delta2 = one_load()
    row_err = max(float((r.sum(-1) - 1).abs().max()) for r in res)

    _evict(shards)
    t0 = time.perf_counter()
    read = 0
    for f in shards:
        with safe_open(str(f), framework="pt") as fh:
            for k in fh.keys():
                t = fh.get_tensor(k).clone()  # get_tensor is mmap-backed: clone reads every byte
                read += t.numel() * t.element_size()
                del t
    t_all = time.perf_counter() - t0
    return {
        "sites": len(model.sites),
        "n": model.n,
        "C": model.C,
        "bytes_total": model.bytes_total,
        "bytes_read": model.bytes_read,
        "header_bytes": model.metadata.get("header_bytes", 0),
        "t_load": t_load,
        "peak_rss_delta": peak_delta,
        "peak_rss_delta_second": peak_delta2,
        "t_load_second": t_load2,
        "t_read_all": t_all,
        "bytes_read_all": read,
        "max_row_err": row_err,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--blocks", type=int, default=8, help="blocks (one 64 MiB shard each); default 8")
    ap.add_argument("--dir", type=Path, default=None, help="generate here instead of a temporary directory")
    ap.add_argument("--measure", type=Path, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.measure is not None:
        print(json.dumps(measure(args.measure)))
        return 0

    with tempfile.TemporaryDirectory(prefix="hcdiag-bench-", dir=args.dir) as tmp:
        root = Path(tmp)
        t0 = time.perf_counter()
        gen = generate(root, args.blocks)
        t_gen = time.perf_counter() - t0
        out = subprocess.run(
            [sys.executable, __file__, "--measure", str(root)], capture_output=True, text=True, check=False
        )
        if out.returncode != 0:
            print(out.stdout, out.stderr, file=sys.stderr)
            return 2
        r = json.loads(out.stdout.strip().splitlines()[-1])

    frac = r["bytes_read"] / r["bytes_total"]
    print(f"checkpoint: {args.blocks} shards, {r['bytes_total']:,} bytes of tensors (generated in {t_gen:.1f} s)")
    print(
        f"HC tensors: {gen['hc_bytes']:,} bytes ({gen['hc_bytes'] / gen['total']:.3%} of the checkpoint), "
        f"{r['sites']} sites, n = {r['n']}, C = {r['C']}"
    )
    print(
        f"bytes read by load: {r['bytes_read']:,} ({frac:.3%} of total; limit 2%); header bytes {r['header_bytes']:,}"
    )
    print(f"load + static H_res of all sites: {r['t_load']:.3f} s (max |row sum - 1| = {r['max_row_err']:.1e})")
    print(
        f"peak RSS delta: first load {r['peak_rss_delta'] / 1e6:.1f} MB (includes one-time imports and allocator "
        f"set-up), second load {r['peak_rss_delta_second'] / 1e6:.1f} MB ({r['t_load_second']:.3f} s); "
        f"HC tensor bytes {gen['hc_bytes'] / 1e6:.1f} MB, float64 copies {2 * gen['hc_bytes'] / 1e6:.1f} MB"
    )
    print(
        f"baseline, read every tensor: {r['t_read_all']:.3f} s for {r['bytes_read_all']:,} bytes; "
        f"load is {r['t_read_all'] / r['t_load']:.1f}x faster"
    )
    ok = frac < 0.02 and r["bytes_read"] == gen["hc_bytes"]
    print("OK" if ok else "FAIL: read more than the HC tensors")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())

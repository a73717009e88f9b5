"""Benchmark: start-up of every ``hcdiag`` command, as a ratio against ``python -c pass`` measured in the same run.

Each case runs ``python -m hcdiag ...`` in a fresh interpreter ``--repeat`` times (median wall time), next to the
baseline ``python -c pass`` (the interpreter's own start-up) measured the same way, interleaved so that a load
change on a shared machine hits both. Then ``python -X importtime`` of the same command names the heaviest imports
(cumulative microseconds of the top-level packages), and whether torch / numpy were imported at all.

Cases: ``CMD --help`` for every command (pure start-up), and the full runs whose work is negligible
(``params --n 8 --C 4096``, ``variants``, ``inspect samples/mhc.safetensors``: headers only).

    python bench/bench_startup.py
    python bench/bench_startup.py --repeat 9

Not a pytest test (tests/test_cli_conventions.py checks that params and variants import neither torch nor numpy).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
COMMANDS = ("params", "stochasticity", "gain-sweep", "inspect", "verify", "track", "variants")
RUNS = (
    ("params --n 8 --C 4096", ["params", "--n", "8", "--C", "4096"]),
    ("variants", ["variants"]),
    ("inspect samples/mhc.safetensors", ["inspect", "samples/mhc.safetensors"]),
)


def _wall(argv: list[str]) -> float:
    t0 = time.perf_counter()
    subprocess.run(argv, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
    return time.perf_counter() - t0


def _importtime(args: list[str]) -> tuple[list[tuple[str, int]], bool, bool]:
    """Top-level packages by cumulative import time (us), and whether torch / numpy were imported."""
    p = subprocess.run([sys.executable, "-X", "importtime", "-m", "hcdiag", *args], cwd=ROOT, capture_output=True,
                       text=True, check=False)
    cum: dict[str, int] = {}
    for line in p.stderr.splitlines():
        if not line.startswith("import time:") or "|" not in line:
            continue
        _, cumulative, name = (x.strip() for x in line[len("import time:"):].split("|"))
        if not cumulative.isdigit() or name.startswith(" "):
            continue
        top = name.split(".")[0]
        if name == top:  # the package's own line carries its cumulative time
            cum[top] = max(cum.get(top, 0), int(cumulative))
    top = sorted(cum.items(), key=lambda kv: -kv[1])[:4]
    return top, "torch" in cum, "numpy" in cum


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=5, help="runs per case (median reported)")
    args = ap.parse_args()

    cases = [(f"{c} --help", [c, "--help"]) for c in COMMANDS] + list(RUNS)
    base_cmd = [sys.executable, "-c", "pass"]
    base: list[float] = []
    times: dict[str, list[float]] = {label: [] for label, _ in cases}
    for _ in range(args.repeat):
        for label, argv in cases:
            base.append(_wall(base_cmd))
            times[label].append(_wall([sys.executable, "-m", "hcdiag", *argv]))
    b = statistics.median(base)
    print(f"baseline python -c pass: {b * 1e3:.0f} ms (median of {len(base)})")
    print(f"{'case':40s} {'median':>9s} {'x baseline':>11s}  torch numpy  heaviest imports (cumulative)")
    for label, argv in cases:
        t = statistics.median(times[label])
        top, torch_in, numpy_in = _importtime(argv)
        heavy = ", ".join(f"{name} {us / 1e3:.0f} ms" for name, us in top)
        print(f"{label:40s} {t * 1e3:7.0f} ms {t / b:10.1f}x  {'yes' if torch_in else 'no':5s} "
              f"{'yes' if numpy_in else 'no':5s}  {heavy}")


if __name__ == "__main__":
    main()

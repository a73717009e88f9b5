#!/usr/bin/env bash
# Rebuild the PNGs of docs/gallery.md: run the commands shown there, then re-encode each PNG with a
# 256-colour palette (Pillow, which matplotlib installs) so the docs stay a few hundred KB.
# Run from the repository root: bash docs/gallery/make.sh
set -euo pipefail
HCDIAG=${HCDIAG:-$( [ -x .venv/bin/hcdiag ] && echo .venv/bin/hcdiag || echo hcdiag )}
PY=${PY:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python )}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

$HCDIAG stochasticity samples/mhc.safetensors --probe random --tokens 64 --plot -o "$tmp/st" > /dev/null
$HCDIAG gain-sweep --layers 16 --seeds 8 --init perturb --logit-scale 1.0 --plot -o "$tmp/gs" > /dev/null
$HCDIAG gain-sweep --from samples/hc-dynamic.safetensors --probe random --tokens 64 --plot -o "$tmp/from" > /dev/null

"$PY" - "$tmp" docs/gallery <<'PYEOF'
import sys
from pathlib import Path

from PIL import Image

src, dst = Path(sys.argv[1]), Path(sys.argv[2])
picks = {
    "st/stochasticity_error_per_site.png": "stochasticity_error_per_site.png",
    "st/stochasticity_convergence.png": "stochasticity_convergence.png",
    "st/stochasticity_heatmaps.png": "stochasticity_heatmaps.png",
    "gs/gain-sites.png": "gain-sites.png",
    "gs/gain-composite.png": "gain-composite.png",
    "gs/gain-collapse.png": "gain-collapse.png",
    "gs/gain-heatmap-mhc.png": "gain-heatmap-mhc.png",
    "gs/gain-heatmap-hc-static.png": "gain-heatmap-hc-static.png",
    "from/gain-composite.png": "from-gain-composite.png",
    "from/gain-heatmap-hc-dynamic.png": "from-gain-heatmap-hc-dynamic.png",
}
for a, b in picks.items():
    im = Image.open(src / a).convert("RGB")
    im.quantize(colors=256, method=Image.Quantize.FASTOCTREE, dither=Image.Dither.NONE).save(dst / b, optimize=True)
    print(dst / b, (dst / b).stat().st_size, "bytes")
PYEOF

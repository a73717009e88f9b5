"""hcdiag: diagnostics for hyper-connection residual streams.

The computing core imports neither typer nor rich; the CLI lives in :mod:`hcdiag.cli`. The public functions
below are imported lazily, so ``import hcdiag`` stays cheap (torch is loaded on first use)::

    import hcdiag
    model = hcdiag.load("samples/mhc.safetensors")
    report = hcdiag.analyze_stochasticity(model, probe="random", tokens=256)
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# public name -> module that defines it
# (no name here may equal a submodule's: importing hcdiag.capture would replace the attribute)
_EXPORTS = {
    "load": "hcdiag.io.load",
    "analyze_stochasticity": "hcdiag.stochasticity",
    "analyze_matrices": "hcdiag.stochasticity",
    "gain_sweep": "hcdiag.gain",
    "gain_from_model": "hcdiag.gain",
    "compute_params": "hcdiag.params",
    "inspect_checkpoint": "hcdiag.inspect",
    "read_activations": "hcdiag.capture",
    "verify": "hcdiag.verification",
    "save_native": "hcdiag.io.native",
    "track_run": "hcdiag.track",
    "Monitor": "hcdiag.monitor",
    "HcdiagError": "hcdiag.errors",
    "InputError": "hcdiag.errors",
    "UsageError": "hcdiag.errors",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    try:
        module = _EXPORTS[name]
    except KeyError:
        raise AttributeError(f"module 'hcdiag' has no attribute {name!r}") from None
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)

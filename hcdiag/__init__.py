"""hcdiag: diagnostics for hyper-connection residual streams.

The computing core imports neither typer nor rich; the CLI lives in :mod:`hcdiag.cli`.
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__"]

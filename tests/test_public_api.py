"""The package's public surface: __all__ lists exactly what is exported, and importing it stays light."""

from __future__ import annotations

import subprocess
import sys

import hcdiag


def test_all_names_resolve_and_are_exactly_the_exports():
    for name in hcdiag.__all__:
        assert getattr(hcdiag, name) is not None
    public = {n for n in dir(hcdiag) if not n.startswith("_")} | {"__version__"}
    assert public == set(hcdiag.__all__)


def test_import_loads_no_cli_machinery():
    code = (
        "import sys, hcdiag; hcdiag.load; "
        "print(sorted(m for m in ('typer', 'rich', 'matplotlib') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_verify_is_the_function_even_after_its_module_is_imported():
    """hcdiag.verify lives in hcdiag.verification: a submodule named verify would replace the function."""
    import hcdiag.verification

    assert "verify" in hcdiag.__all__
    assert hcdiag.verify is hcdiag.verification.verify and callable(hcdiag.verify)


def test_training_exports_and_light_imports():
    from hcdiag.monitor import Monitor
    from hcdiag.track import track_run

    assert hcdiag.Monitor is Monitor and hcdiag.track_run is track_run
    code = (
        "import sys, hcdiag.monitor, hcdiag.track; "
        "print(sorted(m for m in ('typer', 'rich', 'matplotlib', 'transformers', 'pytorch_lightning', 'lightning') "
        "if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"

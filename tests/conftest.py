from __future__ import annotations

import sys
from pathlib import Path

# tests/ on the path, for the shared helpers in tests/cli_runner.py
sys.path.insert(0, str(Path(__file__).parent))

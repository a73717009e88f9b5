"""Atomic output files: nothing half-written is ever left under the user's name.

Every file hcdiag writes goes to a temporary name in the destination directory first and is renamed into
place (``os.replace`` is atomic on POSIX and Windows), so an interrupted run leaves either the old file or
none at all.
"""

from __future__ import annotations

import csv
import io
import json
import os
import tempfile
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from hcdiag.errors import UsageError


def ensure_dir(path: str | os.PathLike[str], option: str = "--output-dir") -> Path:
    """Create ``path`` (and parents) or raise a one-line UsageError naming the option."""
    p = Path(path)
    try:
        p.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"cannot create directory {p}: {exc.strerror}; choose a writable path", option) from None
    return p


def atomic_write(path: str | os.PathLike[str], write: Callable[[Path], None], option: str = "--output") -> Path:
    """Call ``write(tmp_path)`` then rename ``tmp_path`` to ``path``. The temp file is removed on failure."""
    dest = Path(path)
    parent = dest.parent if str(dest.parent) else Path(".")
    if not parent.is_dir():
        raise UsageError(f"directory {parent} does not exist; create it or choose another path", option)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=parent)
    os.close(fd)
    try:
        write(Path(tmp))
        os.chmod(tmp, _default_mode())  # mkstemp makes 0600; a normal output file follows the umask
        os.replace(tmp, dest)
    except OSError as exc:
        _unlink_quietly(tmp)
        raise UsageError(f"cannot write {dest}: {exc.strerror}; choose a writable path", option) from None
    except BaseException:
        _unlink_quietly(tmp)
        raise
    return dest


def atomic_write_text(path: str | os.PathLike[str], text: str, option: str = "--output") -> Path:
    def write(tmp: Path) -> None:
        tmp.write_text(text, encoding="utf-8")

    return atomic_write(path, write, option)


def to_json(doc: Mapping[str, Any]) -> str:
    """JSON text for a result document. NaN/Inf become null (strict JSON has no NaN)."""
    return json.dumps(_finite(doc), indent=2, allow_nan=False) + "\n"


def csv_text(rows: Iterable[Mapping[str, Any]]) -> str:
    rows = list(rows)
    if not rows:
        return ""
    fields: list[str] = []
    for row in rows:
        fields.extend(k for k in row if k not in fields)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: _cell(v) for k, v in row.items()})
    return buf.getvalue()


def _cell(v: Any) -> Any:
    if isinstance(v, list | tuple | dict):
        return json.dumps(_finite(v))
    return v


def _finite(obj: Any) -> Any:
    if isinstance(obj, float):
        return obj if obj == obj and obj not in (float("inf"), float("-inf")) else None
    if isinstance(obj, Mapping):
        return {str(k): _finite(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_finite(v) for v in obj]
    return obj


def _default_mode() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass

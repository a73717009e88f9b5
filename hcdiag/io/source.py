"""Lazy, read-only tensor sources: safetensors files, PyTorch checkpoints, model directories.

:func:`open_source` sniffs what a path holds and returns a :class:`hcdiag.io.base.TensorSource`:

* ``*.safetensors`` (or any file whose bytes are a safetensors header): the header is parsed by hand (shapes,
  dtypes, offsets, ``__metadata__``) and validated against the file size, so listing costs the header only;
  tensors are read one at a time through ``safetensors.safe_open``.
* ``*.pt`` / ``*.pth`` / ``*.bin`` / ``*.ckpt`` (PyTorch zip or legacy format): ``torch.load(weights_only=True,
  mmap=True)``, so nothing is unpickled that is not a tensor or a plain container, and tensor data is paged in
  only when touched. Training dicts are unwrapped (``model``, ``state_dict``, ``module``, ``ema``, ...).
  ``trust_pickle=True`` switches to ``weights_only=False``: that runs arbitrary code from the file.
* a directory: ``config.json`` (into ``.config``) plus ``model.safetensors``, a sharded
  ``model.safetensors.index.json``, ``pytorch_model.bin`` (optionally sharded), or a single checkpoint file.
* ``*.index.json`` given directly: the sharded checkpoint it describes.

Sidecar metadata: next to a file ``F``, ``F.json`` (``model.safetensors.json``) or ``<stem>.hcdiag.json``
(``model.hcdiag.json``); in a directory, ``hcdiag.json``. A sidecar is one JSON object; it is merged over the
safetensors ``__metadata__`` (the sidecar wins), non-string values JSON-encoded.

Keys are reported with wrapper prefixes stripped (``module.``, ``_orig_mod.``, repeatedly; a ``._orig_mod.``
inside a key from a compiled submodule is removed too). ``bytes_read`` counts the tensor bytes actually handed
out by :meth:`get` (each key once); header bytes are counted apart in ``header_bytes``.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import re
import struct
import warnings
import zipfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from hcdiag.errors import InputError, is_out_of_memory
from hcdiag.model import TensorInfo

__all__ = [
    "SafetensorsSource",
    "TorchSource",
    "UnionSource",
    "looks_hc",
    "open_source",
    "strip_key",
]

NOT_A_CHECKPOINT = "not a PyTorch or safetensors checkpoint"

# ------------------------------------------------------------------------------------------------------------
# key helpers

_WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def strip_key(key: str) -> str:
    """Remove DDP / torch.compile wrapper prefixes: ``module._orig_mod.layers.0`` -> ``layers.0``."""
    changed = True
    while changed:
        changed = False
        for prefix in _WRAPPER_PREFIXES:
            if key.startswith(prefix) and len(key) > len(prefix):
                key = key[len(prefix) :]
                changed = True
    while "._orig_mod." in key:  # torch.compile applied to a submodule
        key = key.replace("._orig_mod.", ".")
    return key


# Names that hyper-connection code uses; a key matching these but no layout rule is reported as unmatched.
_HC_TOKEN_RE = re.compile(r"(?i)(?:^|[._/-])(?:m?hc\d*|hcs|comb|hyper\w*)(?=$|[._/-])")
_HC_SUBSTR_RE = re.compile(
    r"(?i)hyper_?conn|static_alpha|static_beta|dynamic_alpha|dynamic_beta|sinkhorn|h_res|h_pre|h_post"
    r"|phi_res|phi_pre|phi_post|mhc|kromhc|birkhoff"
)


def looks_hc(key: str) -> bool:
    """Whether a tensor name looks like hyper-connection state (hc, mhc, hyper*, static_alpha, sinkhorn, ...)."""
    return bool(_HC_TOKEN_RE.search(key) or _HC_SUBSTR_RE.search(key))


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def torch_dtype_of(name: str) -> torch.dtype | None:
    """The torch dtype a :class:`TensorInfo` dtype name stands for (inverse of the names sources report);
    None for names torch does not know (packed or exotic formats)."""
    dt = getattr(torch, name, None)
    return dt if isinstance(dt, torch.dtype) else None


# safetensors dtype codes -> (torch-style name, bytes per element or None when packed / unknown)
_ST_DTYPES: dict[str, tuple[str, float | None]] = {
    "F64": ("float64", 8),
    "F32": ("float32", 4),
    "F16": ("float16", 2),
    "BF16": ("bfloat16", 2),
    "I64": ("int64", 8),
    "I32": ("int32", 4),
    "I16": ("int16", 2),
    "I8": ("int8", 1),
    "U64": ("uint64", 8),
    "U32": ("uint32", 4),
    "U16": ("uint16", 2),
    "U8": ("uint8", 1),
    "BOOL": ("bool", 1),
    "F8_E4M3": ("float8_e4m3fn", 1),
    "F8_E5M2": ("float8_e5m2", 1),
    "F8_E8M0": ("float8_e8m0fnu", 1),
    "C64": ("complex64", 8),
    "F4": ("float4_e2m1fn_x2", 0.5),
    "F6_E2M3": ("float6_e2m3", 0.75),
    "F6_E3M2": ("float6_e3m2", 0.75),
}

_MAX_HEADER = 100_000_000  # the safetensors format's own limit


#: stored dtypes whose values are the numbers themselves; float8 / float4 / float6, integer and quantized tensors
#: need a scale stored elsewhere (DeepSeek-V4's ``scale_inv``), bool and complex are no HC parameter
READABLE_AS_FLOAT = ("float64", "float32", "float16", "bfloat16")


def check_float_dtype(path: str, key: str, stored: str) -> None:
    """InputError unless a tensor stored as ``stored`` (a :class:`TensorInfo` dtype name) can be read as real
    floating-point numbers without a scale hcdiag does not know."""
    if stored not in READABLE_AS_FLOAT:
        raise InputError(
            f"{path}: tensor {key!r} is stored as {stored}; hcdiag reads HC tensors stored as "
            f"{' / '.join(READABLE_AS_FLOAT)}: dequantise the checkpoint first",
            path=path,
        )


def _convert(t: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    t = t.detach()
    if dtype is None:
        return t.clone()
    return t.to(dtype=dtype, copy=True)


# ------------------------------------------------------------------------------------------------------------
# safetensors


class _StHeader:
    """One parsed, validated safetensors header."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            size = path.stat().st_size
            with path.open("rb") as fh:
                head = fh.read(8)
                if len(head) < 8:
                    raise InputError(_bad(path, "file too short for a safetensors header"), path=str(path))
                (n,) = struct.unpack("<Q", head)
                if n < 2 or n > _MAX_HEADER or 8 + n > size:
                    raise InputError(
                        _bad(
                            path,
                            f"safetensors header length {n} does not fit a {size}-byte file (truncated?)",
                        ),
                        path=str(path),
                    )
                raw = fh.read(n)
        except OSError as exc:
            raise InputError(
                f"{path}: cannot read ({exc.strerror or exc}); check the path and permissions", path=str(path)
            ) from None
        try:
            header = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise InputError(_bad(path, f"safetensors header is not valid JSON: {exc}"), path=str(path)) from None
        if not isinstance(header, dict):
            raise InputError(_bad(path, "safetensors header is not a JSON object"), path=str(path))
        self.header_bytes = 8 + n
        data_size = size - 8 - n
        meta = header.pop("__metadata__", None) or {}
        if not isinstance(meta, dict):
            raise InputError(_bad(path, "safetensors __metadata__ is not an object"), path=str(path))
        odd = next((k for k, v in meta.items() if not isinstance(v, str)), None)
        if odd is not None:  # safetensors itself refuses such a file when a tensor is read
            raise InputError(
                _bad(path, f"safetensors __metadata__ value of {odd!r} is not a string; the format stores strings"),
                path=str(path),
            )
        self.metadata = {str(k): v for k, v in meta.items()}
        self.infos: dict[str, TensorInfo] = {}
        self.nbytes: dict[str, int] = {}
        for key, entry in header.items():
            try:
                code = entry["dtype"]
                shape = tuple(int(s) for s in entry["shape"])
                begin, end = (int(o) for o in entry["data_offsets"])
            except (TypeError, KeyError, ValueError) as exc:
                raise InputError(_bad(path, f"malformed header entry for {key!r} ({exc!r})"), path=str(path)) from None
            if any(s < 0 for s in shape) or not 0 <= begin <= end:
                raise InputError(_bad(path, f"invalid shape/offsets for {key!r}"), path=str(path))
            if end > data_size:
                raise InputError(
                    _bad(
                        path,
                        f"tensor {key!r} ends at byte {end} past the data ({data_size} bytes): truncated file",
                    ),
                    path=str(path),
                )
            name, itemsize = _ST_DTYPES.get(str(code), (str(code).lower(), None))
            if itemsize is not None and end - begin != math.ceil(math.prod(shape) * itemsize):
                raise InputError(
                    _bad(path, f"tensor {key!r}: {end - begin} bytes stored for shape {list(shape)} {code}"),
                    path=str(path),
                )
            self.infos[key] = TensorInfo(key=key, shape=shape, dtype=name)
            self.nbytes[key] = end - begin
        self.data_bytes = sum(self.nbytes.values())


def _bad(path: Path | str, why: str) -> str:
    return f"{path}: {NOT_A_CHECKPOINT} ({why})"


class _IndexedSource:
    """keys() / info() of a source that lists its tensors in ``_infos`` (stripped key -> TensorInfo)."""

    path: str
    _infos: dict[str, TensorInfo]

    def keys(self) -> list[str]:
        return list(self._infos)

    def info(self, key: str) -> TensorInfo:
        try:
            return self._infos[key]
        except KeyError:
            raise InputError(f"{self.path}: no tensor named {key!r}", path=self.path) from None


class SafetensorsSource(_IndexedSource):
    """One or more safetensors files seen as one checkpoint; tensors read one at a time."""

    kind = "safetensors"

    def __init__(
        self,
        path: str | Path,
        files: list[Path],
        *,
        weight_map: dict[str, str] | None = None,
        config: dict[str, Any] | None = None,
        metadata: dict[str, str] | None = None,
        notes: list[str] | None = None,
    ) -> None:
        self.path = str(path)
        self.config = config
        self.notes: list[str] = list(notes or [])
        self.metadata: dict[str, str] = {}
        self.bytes_read = 0
        self.header_bytes = 0
        self._read: set[str] = set()
        self._handles: dict[Path, Any] = {}
        self._infos: dict[str, TensorInfo] = {}
        self._where: dict[str, tuple[Path, str, int]] = {}  # stripped key -> (file, stored key, nbytes)
        self.files = files
        total = 0
        for f in files:
            head = _StHeader(f)
            self.header_bytes += head.header_bytes
            total += head.data_bytes
            for k, v in head.metadata.items():
                self.metadata.setdefault(k, v)
            wanted = None
            if weight_map is not None:
                wanted = {k for k, shard in weight_map.items() if shard == f.name}
            for stored, info in head.infos.items():
                if wanted is not None and stored not in wanted:
                    continue  # the index says this key lives elsewhere; the index is authoritative
                key = strip_key(stored)
                if key in self._where:
                    self.notes.append(f"duplicate tensor {key!r} in {f.name}: kept the first one")
                    continue
                self._infos[key] = TensorInfo(key=key, shape=info.shape, dtype=info.dtype)
                self._where[key] = (f, stored, head.nbytes[stored])
        if weight_map is not None:
            missing = sorted({strip_key(k) for k in weight_map} - set(self._infos))
            if missing:
                self.notes.append(
                    f"{len(missing)} tensors listed in the index are not in their shard (e.g. {missing[0]!r})"
                )
        self.bytes_total = total
        self.metadata.update(metadata or {})

    def get(self, key: str, dtype: torch.dtype | None = torch.float64) -> torch.Tensor:
        info = self.info(key)
        if dtype is not None and dtype.is_floating_point:
            check_float_dtype(self.path, key, info.dtype)
        f, stored, nbytes = self._where[key]
        try:
            handle = self._handles.get(f)
            if handle is None:
                from safetensors import safe_open

                handle = safe_open(str(f), framework="pt", device="cpu")
                self._handles[f] = handle
            t = handle.get_tensor(stored)
            out = _convert(t, dtype)
        except InputError:
            raise
        except Exception as exc:  # SafetensorError, OSError, unsupported dtype conversions
            if is_out_of_memory(exc):  # not a damaged file
                raise
            raise InputError(
                f"{f}: cannot read tensor {key!r} ({type(exc).__name__}: {exc}); the file may be damaged",
                path=str(f),
            ) from None
        if key not in self._read:
            self._read.add(key)
            self.bytes_read += nbytes
        return out

    def close(self) -> None:
        self._handles.clear()


# ------------------------------------------------------------------------------------------------------------
# PyTorch pickles

_PREFERRED_CONTAINERS = (
    "model",
    "state_dict",
    "model_state_dict",
    "module",
    "model_state",
    "net",
    "network",
    "params",
    "weights",
)
_EMA_CONTAINERS = (
    "ema",
    "ema_model",
    "model_ema",
    "ema_state_dict",
    "ema_state",
    "averaged_model",
    "swa_model",
    "shadow",
)

# the pickled magic number torch.save writes first in its legacy (non-zip) format
_LEGACY_MAGIC = b"\x8a\nl\xfc\x9cF\xf9 j\xa8P\x19"


def _unsafe_globals(path: Path, message: str) -> list[str]:
    names: list[str] = []
    try:
        names = list(torch.serialization.get_unsafe_globals_in_checkpoint(str(path)))
    except Exception:  # legacy format, damaged archive, older torch: fall back to the message
        names = []
    if not names:
        names = re.findall(r"GLOBAL ([\w.]+)", message)
    return sorted(dict.fromkeys(names))


def _path_str(path: tuple[str, ...]) -> str:
    return "".join(f"[{p!r}]" for p in path) or "(top level)"


class TorchSource(_IndexedSource):
    """A ``torch.save`` checkpoint; the state dict holding the HC tensors is picked out of training dicts."""

    kind = "torch"

    def __init__(
        self,
        path: str | Path,
        *,
        trust_pickle: bool = False,
        state_key: str | None = None,
        config: dict[str, Any] | None = None,
        metadata: dict[str, str] | None = None,
    ) -> None:
        p = Path(path)
        self.path = str(p)
        self.config = config
        self.metadata: dict[str, str] = dict(metadata or {})
        self.notes: list[str] = []
        self.header_bytes = 0
        self.bytes_read = 0
        self._read: set[str] = set()
        self.container = ""
        obj = self._load(p, trust_pickle)
        self._tensors: dict[str, torch.Tensor] = self._pick(obj, state_key)
        if self.config is None:
            self.config = _training_config(obj)
        self.bytes_total = self._storage_bytes(obj)
        if self._legacy:
            # without mmap the whole file was read into memory
            self.bytes_read = self.bytes_total
            self.notes.append("legacy (non-zip) torch.save format: the whole file was read")
        self._infos = {
            k: TensorInfo(key=k, shape=tuple(t.shape), dtype=_dtype_name(t.dtype)) for k, t in self._tensors.items()
        }

    def _load(self, p: Path, trust_pickle: bool) -> Any:
        self._legacy = not zipfile.is_zipfile(p)
        try:
            with warnings.catch_warnings():
                # torch's own deprecation notices while rebuilding storages (TypedStorage for quantized
                # tensors) are not the user's concern; what hcdiag cannot read it says itself
                warnings.simplefilter("ignore", UserWarning)
                if trust_pickle:
                    # Dangerous by design: the user vouched for the file (--trust-pickle).
                    return torch.load(p, map_location="cpu", weights_only=False, mmap=not self._legacy)
                return torch.load(p, map_location="cpu", weights_only=True, mmap=not self._legacy)
        except pickle.UnpicklingError as exc:
            msg = str(exc)
            if not trust_pickle and ("Unsupported global" in msg or "GLOBAL" in msg):
                names = _unsafe_globals(p, msg)
                if names:
                    raise InputError(
                        f"{p}: refusing to unpickle non-tensor globals {', '.join(names)} (weights_only load); "
                        "if you trust this file, pass --trust-pickle (runs code from the file)",
                        path=str(p),
                    ) from None
            inner = re.search(r"WeightsUnpickler error: ([^\n]*)", msg)
            why = inner.group(1) if inner else msg.splitlines()[0] if msg else type(exc).__name__
            raise InputError(_bad(p, f"unpickling failed: {why[:200]}"), path=str(p)) from None
        except Exception as exc:  # RuntimeError / OSError from the zip reader, EOFError, ... on damaged files
            first = (str(exc).splitlines() or [""])[0][:200]
            raise InputError(_bad(p, f"torch.load failed: {type(exc).__name__}: {first}"), path=str(p)) from None

    def _pick(self, obj: Any, state_key: str | None) -> dict[str, torch.Tensor]:
        """Find the dict of tensors that holds the HC keys; strip wrapper prefixes."""
        candidates: list[tuple[tuple[str, ...], dict[str, torch.Tensor]]] = []

        def walk(o: Any, path: tuple[str, ...], depth: int) -> None:
            if isinstance(o, torch.nn.Module):
                o = o.state_dict()
            if not isinstance(o, dict) or depth > 5:
                return
            tensors = {k: v for k, v in o.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
            if tensors:
                candidates.append((path, tensors))
            for k, v in o.items():
                if isinstance(k, str | int) and isinstance(v, dict | torch.nn.Module):
                    walk(v, (*path, str(k)), depth + 1)

        walk(obj, (), 0)
        if not candidates:
            raise InputError(_bad(self.path, "the pickle holds no dict of tensors"), path=self.path)

        if state_key is not None:
            chosen = [c for c in candidates if ".".join(c[0]) == state_key]
            if not chosen:
                known = ", ".join(".".join(c[0]) or "(top level)" for c in candidates)
                raise InputError(f"{self.path}: no state dict at {state_key!r}; found: {known}", path=self.path)
            path, tensors = chosen[0]
        else:
            hc = [(c, sum(looks_hc(strip_key(k)) for k in c[1])) for c in candidates]
            with_hc = [(c, m) for c, m in hc if m > 0]
            pool = with_hc or [(c, len(c[1])) for c in candidates]

            def rank(item: tuple[tuple[tuple[str, ...], dict], int]) -> tuple:
                (cpath, _), count = item
                last = cpath[-1] if cpath else ""
                if last in _PREFERRED_CONTAINERS:
                    pref = 0
                elif last in _EMA_CONTAINERS or "ema" in last.lower().split("_"):
                    pref = 2
                else:
                    pref = 1
                return (pref, -count, len(cpath))

            pool.sort(key=rank)
            (path, tensors), _ = pool[0]
            others = [_path_str(c[0]) for c, _ in pool[1:]]
            if with_hc and others:
                self.notes.append(
                    f"HC tensors also found under {', '.join(others)}; read {_path_str(path)} "
                    "(choose another with the state_key load option)"
                )
        self.container = ".".join(path)
        out: dict[str, torch.Tensor] = {}
        for k, v in tensors.items():
            key = strip_key(k)
            if key in out:
                self.notes.append(f"duplicate tensor {key!r} after stripping wrapper prefixes: kept the first")
                continue
            out[key] = v
        return out

    @staticmethod
    def _storage_bytes(obj: Any) -> int:
        seen: set[int] = set()
        total = 0

        def walk(o: Any, depth: int) -> None:
            nonlocal total
            if depth > 8:
                return
            if isinstance(o, torch.Tensor):
                try:
                    st = o.untyped_storage()
                    ident = st.data_ptr() or id(st)
                    if ident not in seen:
                        seen.add(ident)
                        total += st.nbytes()
                except Exception:  # tensor subclasses without a plain storage
                    total += o.nbytes
            elif isinstance(o, torch.nn.Module):
                walk(o.state_dict(), depth + 1)
            elif isinstance(o, dict):
                for v in o.values():
                    walk(v, depth + 1)
            elif isinstance(o, list | tuple):
                for v in o:
                    walk(v, depth + 1)

        walk(obj, 0)
        return total

    def get(self, key: str, dtype: torch.dtype | None = torch.float64) -> torch.Tensor:
        info = self.info(key)
        if dtype is not None and dtype.is_floating_point:
            check_float_dtype(self.path, key, info.dtype)
        t = self._tensors[key]
        try:
            out = _convert(t, dtype)
        except Exception as exc:
            if is_out_of_memory(exc):  # not a damaged file
                raise
            raise InputError(
                f"{self.path}: cannot read tensor {key!r} ({type(exc).__name__}: {exc})", path=self.path
            ) from None
        if key not in self._read and not self._legacy:
            self._read.add(key)
            self.bytes_read += t.nbytes
        return out

    def close(self) -> None:
        self._tensors.clear()


# ------------------------------------------------------------------------------------------------------------
# several sources as one (sharded pytorch_model-*.bin)


class UnionSource:
    """Several sources seen as one checkpoint (first occurrence of a key wins)."""

    def __init__(self, path: str | Path, parts: list[Any], *, config=None, metadata=None, notes=None) -> None:
        self.path = str(path)
        self.config = config
        self.metadata: dict[str, str] = {}
        self.notes: list[str] = list(notes or [])
        self.kind = parts[0].kind if parts else "union"
        self._parts = parts
        self._owner: dict[str, Any] = {}
        for part in parts:
            self.notes.extend(getattr(part, "notes", []))
            for k, v in part.metadata.items():
                self.metadata.setdefault(k, v)
            for key in part.keys():
                if key in self._owner:
                    self.notes.append(f"duplicate tensor {key!r} in {part.path}: kept the first one")
                    continue
                self._owner[key] = part
        self.metadata.update(metadata or {})

    @property
    def bytes_read(self) -> int:
        return sum(p.bytes_read for p in self._parts)

    @property
    def bytes_total(self) -> int:
        return sum(p.bytes_total for p in self._parts)

    @property
    def header_bytes(self) -> int:
        return sum(getattr(p, "header_bytes", 0) for p in self._parts)

    def keys(self) -> list[str]:
        return list(self._owner)

    def info(self, key: str) -> TensorInfo:
        try:
            return self._owner[key].info(key)
        except KeyError:
            raise InputError(f"{self.path}: no tensor named {key!r}", path=self.path) from None

    def get(self, key: str, dtype: torch.dtype | None = torch.float64) -> torch.Tensor:
        self.info(key)
        return self._owner[key].get(key, dtype)

    def close(self) -> None:
        for p in self._parts:
            p.close()


# ------------------------------------------------------------------------------------------------------------
# opening


def _read_json(path: Path, what: str) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise InputError(f"{path}: cannot read {what} ({exc.strerror or exc})", path=str(path)) from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"{path}: {what} is not valid JSON ({exc}); fix or remove it", path=str(path)) from None


def _sidecar(candidates: Iterable[Path]) -> tuple[dict[str, str], Path | None]:
    for c in candidates:
        if c.is_file():
            data = _read_json(c, "sidecar metadata")
            if not isinstance(data, dict):
                raise InputError(f"{c}: sidecar metadata must be one JSON object", path=str(c))
            return {str(k): v if isinstance(v, str) else json.dumps(v) for k, v in data.items()}, c
    return {}, None


def _file_sidecar(p: Path) -> tuple[dict[str, str], Path | None]:
    return _sidecar([p.with_name(p.name + ".json"), p.with_name(p.stem + ".hcdiag.json")])


def _sniff(p: Path) -> str:
    """'safetensors', 'torch', or raise InputError saying what the file is instead."""
    try:
        size = p.stat().st_size
        with p.open("rb") as fh:
            head = fh.read(512)
    except OSError as exc:
        raise InputError(
            f"{p}: cannot read ({exc.strerror or exc}); check the path and permissions", path=str(p)
        ) from None
    if size == 0:
        raise InputError(_bad(p, "empty file"), path=str(p))
    if head.startswith(b"PK\x03\x04") or head.startswith(b"PK\x05\x06"):
        return "torch"
    if head[:1] == b"\x80" and head[2:14] == _LEGACY_MAGIC:
        return "torch"
    if len(head) >= 512 and head[257:262] == b"ustar":
        return "torch"  # the oldest torch.save (tar) format
    if len(head) >= 9:
        (n,) = struct.unpack("<Q", head[:8])
        if 2 <= n <= _MAX_HEADER and head[8:9] == b"{":
            if 8 + n > size:
                raise InputError(_bad(p, "safetensors header runs past the end of the file: truncated"), path=str(p))
            return "safetensors"
    suffix = p.suffix.lower()
    stripped = head.lstrip()
    if stripped[:1] in (b"{", b"["):
        why = "JSON text"
    elif head[:1] == b"\x80":
        why = "a plain pickle, not written by torch.save"
    elif suffix == ".safetensors":
        why = "invalid safetensors header (damaged or truncated?)"
    elif suffix in (".pt", ".pth", ".bin", ".ckpt"):
        why = "neither a torch.save zip archive nor its legacy format (damaged or truncated?)"
    else:
        why = f"unrecognised content starting {head[:8]!r}"
    raise InputError(_bad(p, why), path=str(p))


def _open_index(
    index: Path, *, trust_pickle: bool, state_key: str | None, config: dict | None, metadata: dict[str, str]
) -> Any:
    data = _read_json(index, "checkpoint index")
    wmap = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(wmap, dict) or not all(isinstance(v, str) for v in wmap.values()):
        raise InputError(f"{index}: checkpoint index has no weight_map of key -> shard file", path=str(index))
    root = index.parent
    shards = list(dict.fromkeys(wmap.values()))
    for s in shards:
        if Path(s).is_absolute() or ".." in Path(s).parts or not s:
            raise InputError(
                f"{index}: weight_map names shard {s!r} outside the checkpoint directory; refusing to read it",
                path=str(index),
            )
    present = [root / s for s in shards if (root / s).is_file()]
    absent = [s for s in shards if not (root / s).is_file()]
    notes = []
    if absent:
        notes.append(
            f"{len(absent)} of {len(shards)} shards listed in {index.name} are missing "
            f"(e.g. {absent[0]}): their tensors are skipped"
        )
    if not present:
        raise InputError(_bad(index, f"none of the {len(shards)} shards it lists exists"), path=str(index))
    if all(s.suffix == ".safetensors" for s in present):
        for s in present:
            _sniff(s)
        return SafetensorsSource(index.parent, present, weight_map=wmap, config=config, metadata=metadata, notes=notes)
    parts = [_open_file(s, trust_pickle=trust_pickle, state_key=state_key, sidecar=False) for s in present]
    return UnionSource(index.parent, parts, config=config, metadata=metadata, notes=notes)


def _sibling_config(p: Path) -> dict | None:
    """config.json next to an HF-named weights file (model.safetensors, pytorch_model.bin, model-0001-...)."""
    cfg = p.parent / "config.json"
    if not (p.name.startswith("model") or p.name.startswith("pytorch_model")) or not cfg.is_file():
        return None
    config = _read_json(cfg, "config.json")
    return config if isinstance(config, dict) else None


def _open_file(
    p: Path, *, trust_pickle: bool, state_key: str | None, config: dict | None = None, sidecar: bool = True
) -> Any:
    meta, _ = _file_sidecar(p) if sidecar else ({}, None)
    kind = _sniff(p)
    if config is None and sidecar:
        config = _sibling_config(p)
    if kind == "safetensors":
        return SafetensorsSource(p, [p], config=config, metadata=meta)
    return TorchSource(p, trust_pickle=trust_pickle, state_key=state_key, config=config, metadata=meta)


def _training_config(obj: Any) -> dict[str, Any] | None:
    """Plain settings a training loop saved beside the weights (nanoGPT's ``model_args``, ``config``, ``args``),
    for layouts that need them (e.g. ``hyper_conn_type``); None when there are none. Non-plain values are
    dropped: they are never needed and may be arbitrary objects."""
    if not isinstance(obj, dict):
        return None
    out: dict[str, Any] = {}
    for key in ("model_args", "config", "args"):
        v = obj.get(key)
        if isinstance(v, dict):
            plain = {k: x for k, x in v.items() if isinstance(k, str) and isinstance(x, str | int | float | bool)}
            if plain:
                out[key] = plain
    return out or None


_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")
_SHARD_NAME = re.compile(r"-\d+-of-\d+\.safetensors$", re.IGNORECASE)
# transformers' shard names: model-00002-of-00004.safetensors, pytorch_model-00001-of-00002.bin
_SHARD_FILE = re.compile(r"^(?P<stem>.+)-(?P<i>\d+)-of-(?P<k>\d+)\.(?P<ext>safetensors|bin)$", re.IGNORECASE)


def _shard_error(p: Path) -> InputError | None:
    """The error for a file that is one shard of a sharded checkpoint (``model-00002-of-00004.safetensors``), or
    None for any other file: analysing one shard as if it were the model would miss most of its sites."""
    m = _SHARD_FILE.match(p.name)
    if m is None or int(m["k"]) <= 1:
        return None
    what = f"{p}: shard {int(m['i'])} of {int(m['k'])} of a sharded checkpoint"
    index = p.parent / f"{m['stem']}.{m['ext'].lower()}.index.json"
    if index.is_file():
        return InputError(
            f"{what}, whose index is {index}; pass the directory {p.parent} to read the whole model", path=str(p)
        )
    return InputError(
        f"{what}, with no {index.name} beside it; pass the directory that holds all {int(m['k'])} shards",
        path=str(p),
    )


def _open_dir(d: Path, *, trust_pickle: bool, state_key: str | None) -> Any:
    config = None
    cfg = d / "config.json"
    if cfg.is_file():
        config = _read_json(cfg, "config.json")
        if not isinstance(config, dict):
            raise InputError(f"{cfg}: config.json is not a JSON object", path=str(cfg))
    meta, _ = _sidecar([d / "hcdiag.json"])
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if (d / index_name).is_file():
            return _open_index(
                d / index_name, trust_pickle=trust_pickle, state_key=state_key, config=config, metadata=meta
            )
    for single in ("model.safetensors", "pytorch_model.bin"):
        if (d / single).is_file():
            src = _open_file(d / single, trust_pickle=trust_pickle, state_key=state_key, config=config)
            src.metadata.update(meta)
            return src
    indexes = sorted(d.glob("*.index.json"))
    if len(indexes) == 1:
        return _open_index(indexes[0], trust_pickle=trust_pickle, state_key=state_key, config=config, metadata=meta)
    weights = sorted(
        f for f in d.iterdir() if f.is_file() and f.suffix.lower() in _WEIGHT_SUFFIXES and not f.name.startswith(".")
    )
    if not weights:
        raise InputError(
            _bad(d, "directory holds no model.safetensors, *.safetensors, pytorch_model.bin or *.pt file"),
            path=str(d),
        )
    st = [f for f in weights if f.suffix.lower() == ".safetensors"]
    chosen = st or weights
    if len(chosen) == 1:
        if _shard_error(chosen[0]) is not None:
            m = _SHARD_FILE.match(chosen[0].name)
            assert m is not None
            raise InputError(
                f"{d}: holds only {chosen[0].name}, shard {int(m['i'])} of {int(m['k'])}, and no index; copy all "
                f"{int(m['k'])} shards (and {m['stem']}.{m['ext'].lower()}.index.json) into it",
                path=str(d),
            )
        src = _open_file(chosen[0], trust_pickle=trust_pickle, state_key=state_key, config=config)
        src.metadata.update(meta)
        return src
    # several files and no index: shards only when they are named like shards (model-00001-of-00003...);
    # otherwise they are separate checkpoints (a folder of runs, samples/), and merging them would mix models
    if st and all(_SHARD_NAME.search(f.name) for f in st):
        for s in st:
            _sniff(s)
        return SafetensorsSource(d, st, config=config, metadata=meta)
    names = ", ".join(f.name for f in weights[:4])
    raise InputError(f"{d}: several checkpoint files ({names}, ...) and no index; pass one file", path=str(d))


def open_source(path: str | os.PathLike[str], *, trust_pickle: bool = False, state_key: str | None = None) -> Any:
    """Open a checkpoint file or model directory as a lazy :class:`~hcdiag.io.base.TensorSource`.

    trust_pickle: load PyTorch pickles with ``weights_only=False`` (runs code from the file; only for files you
    trust). state_key: dotted path of the state dict inside a training checkpoint (``"ema"``), else the dict
    holding HC-looking keys is chosen, preferring ``model`` / ``state_dict`` over EMA copies.
    Raises :class:`InputError` for anything that is not a readable checkpoint.
    """
    p = Path(path)
    if not p.exists():
        raise InputError(f"{p}: no such file or directory", path=str(p))
    if p.is_dir():
        return _open_dir(p, trust_pickle=trust_pickle, state_key=state_key)
    if p.name.endswith(".index.json"):
        parent_cfg = p.parent / "config.json"
        config = _read_json(parent_cfg, "config.json") if parent_cfg.is_file() else None
        if config is not None and not isinstance(config, dict):
            config = None
        return _open_index(p, trust_pickle=trust_pickle, state_key=state_key, config=config, metadata={})
    shard = _shard_error(p)
    if shard is not None:
        raise shard
    return _open_file(p, trust_pickle=trust_pickle, state_key=state_key)

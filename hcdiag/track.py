"""HC diagnostics across a training run's checkpoints (``hcdiag track``), and the per-model summary that
:mod:`hcdiag.monitor` logs during training.

Dimension letters: L sites, T probe tokens, n streams. Matrices are in paper convention (mHC Eq. 3).

Per checkpoint, nothing is recomputed here: :func:`summarize_model` calls
:func:`hcdiag.stochasticity.analyze_stochasticity` (the ``stochasticity`` command) and
:func:`hcdiag.gain.gain_from_model` (``gain-sweep --from``) with the same probe and Sinkhorn settings, and picks
out what a researcher plots against the step (mHC Fig. 2):

* worst row / column error over the constrained sites (max over tokens), and the sites where they are;
* composite gains of the whole stack: G_f(H_L ... H_1) forward, G_b(H_L ... H_1) backward (gain-sweep's
  ``gain_fwd`` at site L and ``gain_bwd`` at site 1);
* sigma_2 of that composite and ||H_L ... H_1 - J/n||_F (both -> 0: stream collapse to the uniform mixer);
* the largest logit range over Sinkhorn sites (float32 absorbs small entries past 16.6);
* the mean over sites (and tokens) of ||H_l - I||_F, how far the streams mix at all.

Steps come from the checkpoint itself where it says (``trainer_state.json``'s ``global_step``, a ``step`` /
``global_step`` entry of a torch checkpoint, ``step`` / ``training.steps`` metadata of an hcdiag sample), else
from its name (``checkpoint-120``, ``epoch=2-step=120.ckpt``, ``ckpt_120.pt``); each entry says which.

A cache (one JSON file beside the outputs) keys every analysed checkpoint by its identity (resolved path, and
the size and modification time of each of its files) and the analysis settings, so a second run over a run
directory that gained checkpoints analyses only the new ones.
"""

from __future__ import annotations

import glob
import json
import math
import multiprocessing
import os
import re
import time
import zipfile
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hcdiag.enums import DType, Probe
from hcdiag.errors import InputError, UsageError
from hcdiag.plot_common import FigOptions

__all__ = [
    "CACHE_NAME",
    "CHECKPOINT_METRICS",
    "SCHEMA_VERSION",
    "CheckpointRef",
    "ModelSummary",
    "TrackReport",
    "checkpoint_step",
    "find_checkpoints",
    "plot_track",
    "summarize_model",
    "track_run",
]

SCHEMA_VERSION = 1
CACHE_NAME = "track-cache.json"

#: per-checkpoint metric -> what it is (the table's columns, the plot's panels, the CSV's checkpoint rows)
CHECKPOINT_METRICS: dict[str, str] = {
    "row_err": "worst row error max_i |sum_j H_ij - 1| over constrained sites and tokens",
    "col_err": "worst column error max_j |sum_i H_ij - 1| over constrained sites and tokens",
    "gain_fwd": "G_f(H_L ... H_1): forward gain of the whole stack (max |row sum|)",
    "gain_bwd": "G_b(H_L ... H_1): backward gain of the whole stack (max |column sum|)",
    "sigma2": "sigma_2(H_L ... H_1); -> 0 together with dist_uniform is stream collapse",
    "dist_uniform": "||H_L ... H_1 - J/n||_F",
    "logit_range": "largest pre-Sinkhorn logit range (max - min) over sites and tokens",
    "dist_identity": "mean over sites and tokens of ||H_l - I||_F",
}
#: metrics whose plot uses a log y axis (errors, ranges and distances; gains stay linear around 1)
_LOG_METRICS = ("row_err", "col_err", "sigma2", "dist_uniform", "logit_range", "dist_identity")

Progress = Callable[[str, int, int], None]


# ------------------------------------------------------------------------------------------------------------
# The summary of one model (shared with hcdiag.monitor)


@dataclass(frozen=True)
class ModelSummary:
    """What :func:`summarize_model` returns. ``metrics``: :data:`CHECKPOINT_METRICS` (None where it does not
    apply, e.g. no Sinkhorn site has logits); ``where``: the site of the worst row / column error and of the
    largest logit range; ``sites``: per site, the fields of ``stochasticity --json``; ``probe`` /
    ``settings``: the probe and the effective Sinkhorn settings, as ``stochasticity`` reports them."""

    layout: str
    n: int
    metrics: dict[str, float | None]
    where: dict[str, str | None]
    sites: tuple[dict[str, Any], ...]
    probe: dict[str, Any]
    probe_description: str
    settings: dict[str, Any]
    dtype: str
    tol: float
    bytes_read: int = 0
    bytes_total: int = 0
    warnings: tuple[str, ...] = ()

    def flat(self, prefix: str = "hc") -> dict[str, float]:
        """Flat ``{key: float}`` for a logger: ``hc/<site>/row_err``, ``hc/<site>/col_err``,
        ``hc/<site>/logit_range`` per site, ``hc/composite/{gain_fwd, gain_bwd, sigma2, dist_uniform}``,
        ``hc/worst/{row_err, col_err}``, ``hc/logit_range_max``, ``hc/mean_dist_identity``. Values that do not
        apply are left out."""
        out: dict[str, float] = {}
        for s in self.sites:
            for key, field_ in (("row_err", "row_err_max"), ("col_err", "col_err_max"),
                                ("logit_range", "logit_range_max")):
                v = s.get(field_)
                if v is not None:
                    out[f"{prefix}/{s['name']}/{key}"] = float(v)
        m = self.metrics
        named = {
            "composite/gain_fwd": m["gain_fwd"], "composite/gain_bwd": m["gain_bwd"],
            "composite/sigma2": m["sigma2"], "composite/dist_uniform": m["dist_uniform"],
            "worst/row_err": m["row_err"], "worst/col_err": m["col_err"],
            "logit_range_max": m["logit_range"], "mean_dist_identity": m["dist_identity"],
        }
        out.update({f"{prefix}/{k}": float(v) for k, v in named.items() if v is not None})
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "layout": self.layout, "n": self.n, "metrics": dict(self.metrics), "where": dict(self.where),
            "probe": dict(self.probe), "probe_description": self.probe_description,
            "settings": dict(self.settings), "dtype": self.dtype, "tol": self.tol,
            "bytes_read": self.bytes_read, "bytes_total": self.bytes_total, "warnings": list(self.warnings),
            "sites": [dict(s) for s in self.sites],
        }


def _worst(sites: Sequence[Any], attr: str) -> tuple[float | None, str | None]:
    """Largest ``attr`` (a Dist's max, or a float) over ``sites``; NaN counts as the worst."""
    best: tuple[float, str] | None = None
    for s in sites:
        v = getattr(s, attr)
        v = getattr(v, "max", v)
        if v is None:
            continue
        key = math.inf if math.isnan(v) else v
        if best is None or key > (math.inf if math.isnan(best[0]) else best[0]):
            best = (float(v), s.name)
    return (None, None) if best is None else best


def summarize_model(
    model: Any,
    *,
    probe: Any = Probe.STATIC,
    tokens: int = 256,
    seed: int = 0,
    iters: int | None = None,
    convention: Any = None,
    dtype: DType | str = DType.FLOAT64,
    tol: float = 1e-6,
    threads: int | None = 1,
) -> ModelSummary:
    """The per-checkpoint summary of a :class:`hcdiag.model.LoadedModel` (see the module docstring).

    probe: a probe object or kind (``tokens`` / ``seed`` build a ``random`` one); iters / convention: Sinkhorn
    overrides, as in ``stochasticity``; dtype: compute precision of both analyses. Raises what
    :func:`~hcdiag.stochasticity.analyze_stochasticity` and :func:`~hcdiag.gain.gain_from_model` raise.
    """
    from hcdiag.gain import gain_from_model
    from hcdiag.metrics import dist_identity
    from hcdiag.probes import ProbeBase, make_probe
    from hcdiag.stochasticity import analyze_stochasticity

    if not isinstance(probe, ProbeBase):
        probe = make_probe(probe, tokens=tokens, seed=seed)
    st = analyze_stochasticity(model, probe=probe, iters=iters, convention=convention, dtype=dtype, tol=tol)
    gr = gain_from_model(model, probe=probe, iters=iters, convention=convention, dtype=dtype, keep_stacks=True,
                         threads=threads)
    v = gr.variants[0]
    c = v.curves

    def last(metric: str, i: int = -1) -> float:
        return float(c[metric]["median"][i])  # one "seed": the median is the value (mean over probe tokens)

    applicable = [s for s in st.sites if s.applicable]
    row, row_at = _worst(applicable, "row_err")
    col, col_at = _worst(applicable, "col_err")
    ranged = [s for s in st.sites if s.logit_range_max is not None]
    rng, rng_at = _worst(ranged, "logit_range_max")
    stack = v.stack  # [L, 1, T, n, n] float64, the H_res gain-sweep --from multiplied
    assert stack is not None
    metrics = {
        "row_err": row,
        "col_err": col,
        "gain_fwd": last("gain_fwd"),  # G_f(F_L), F_L = H_L ... H_1
        "gain_bwd": last("gain_bwd", 0),  # G_b(B_1), B_1 = H_L ... H_1
        "sigma2": last("sigma2"),
        "dist_uniform": last("dist_uniform"),
        "logit_range": rng,
        "dist_identity": float(dist_identity(stack).mean()),
    }
    return ModelSummary(
        layout=model.layout, n=int(model.n), metrics=metrics,
        where={"row_err": row_at, "col_err": col_at, "logit_range": rng_at},
        sites=tuple(s.to_dict() for s in st.sites), probe=dict(st.probe), probe_description=st.probe_description,
        settings=dict(st.settings), dtype=st.dtype, tol=st.tol,
        bytes_read=int(model.bytes_read), bytes_total=int(model.bytes_total), warnings=tuple(v.warnings),
    )


# ------------------------------------------------------------------------------------------------------------
# Finding checkpoints and their steps

_CKPT_FILE_SUFFIXES = (".safetensors", ".pt", ".pth", ".ckpt", ".bin")
_DIR_MARKERS = ("trainer_state.json", "config.json", "model.safetensors", "model.safetensors.index.json",
                "pytorch_model.bin", "pytorch_model.bin.index.json", "hcdiag.json")
_NAME_STEP = (
    re.compile(r"(?:^|[^a-z])(?:global_)?step[=_-]?(\d+)", re.IGNORECASE),  # epoch=2-step=120.ckpt, step_120
    re.compile(r"checkpoint[-_](\d+)", re.IGNORECASE),  # transformers Trainer
    re.compile(r"ckpt[-_](\d+)", re.IGNORECASE),  # ckpt_120.pt
    re.compile(r"(\d+)(?!.*\d)"),  # the last number in the name
)


@dataclass(frozen=True)
class CheckpointRef:
    """One checkpoint of a run: its path and identity (file sizes and modification times)."""

    path: str
    identity: tuple[tuple[str, int, int], ...]

    def key(self) -> str:
        return json.dumps([self.path, [list(i) for i in self.identity]])


def _is_checkpoint_dir(d: Path) -> bool:
    return any((d / m).is_file() for m in _DIR_MARKERS)


def _identity(p: Path) -> tuple[tuple[str, int, int], ...]:
    files = sorted(f for f in p.iterdir() if f.is_file()) if p.is_dir() else [p]
    out = []
    for f in files:
        st = f.stat()
        out.append((f.name, int(st.st_size), int(st.st_mtime_ns)))
    return tuple(out)


def _ref(p: Path) -> CheckpointRef:
    return CheckpointRef(str(p.resolve()), _identity(p))


def _natural(p: Path) -> list[Any]:
    """Sort key: ``checkpoint-8`` before ``checkpoint-16``."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", p.name)]


#: a model directory's own weight files (the final ``save_model()`` of a Trainer run), not checkpoints of the run
_MODEL_WEIGHTS = re.compile(r"^(model|pytorch_model)(-\d+-of-\d+)?\.(safetensors|bin)$")
#: the transformers Trainer's training-state files: no model weights in them
_TRAINER_STATE_FILES = re.compile(r"^(training_args\.bin|optimizer\.pt|scheduler\.pt|scaler\.pt|rng_state.*\.pth)$")


def _checkpoint_subdirs(d: Path) -> list[Path]:
    return [c for c in sorted(d.iterdir(), key=_natural) if c.is_dir() and _is_checkpoint_dir(c)]


def _run_members(d: Path) -> list[Path]:
    """Checkpoints inside a run directory: subdirectories that hold one, and checkpoint files (sidecar JSONs,
    other files, the Trainer's state files and the directory's own model weights left out)."""
    out = _checkpoint_subdirs(d)
    for child in sorted(d.iterdir(), key=_natural):
        if (child.is_file() and child.suffix in _CKPT_FILE_SUFFIXES and not child.name.startswith(".")
                and not _MODEL_WEIGHTS.match(child.name) and not _TRAINER_STATE_FILES.match(child.name)):
            out.append(child)
    return sorted(out, key=_natural)


def find_checkpoints(inputs: Sequence[str | os.PathLike[str]]) -> list[CheckpointRef]:
    """Expand ``inputs`` (run directories, checkpoint directories or files, shell globs) into checkpoints.

    A directory that holds a checkpoint itself (``config.json``, ``trainer_state.json``, ``model.safetensors``,
    ...) and no checkpoint subdirectories is one checkpoint; any other directory is a run, whose checkpoint
    subdirectories and checkpoint files are taken (not its own ``model.safetensors`` / ``pytorch_model.bin``:
    a Trainer's final ``save_model()`` beside its ``checkpoint-<step>/``). Duplicates are dropped. Raises
    UsageError when an input matches nothing.
    """
    refs: dict[str, CheckpointRef] = {}
    for raw in inputs:
        text = os.fspath(raw)
        paths = [Path(p) for p in sorted(glob.glob(text))] if glob.has_magic(text) else [Path(text)]
        if not paths or not all(p.exists() for p in paths):
            raise UsageError(f"{text}: no such checkpoint, run directory or match; check the path or the glob",
                             "RUN")
        found: list[Path] = []
        for p in paths:
            # a Trainer's output directory holds checkpoint-<step>/ and, after save_model(), the final model too:
            # with checkpoint subdirectories it is a run (its own weights are not one of its checkpoints)
            if p.is_dir() and (not _is_checkpoint_dir(p) or _checkpoint_subdirs(p)):
                members = _run_members(p)
                if not members and not glob.has_magic(text):
                    raise UsageError(
                        f"{p}: no checkpoints in this directory (expected checkpoint-<step>/ directories or "
                        f"{', '.join(_CKPT_FILE_SUFFIXES)} files); pass the checkpoints themselves", "RUN")
                found += members
            else:
                found.append(p)
        for p in found:
            ref = _ref(p)
            refs.setdefault(ref.path, ref)
    return list(refs.values())


def _int_step(v: Any) -> int | None:
    if isinstance(v, bool):
        return None
    if isinstance(v, int):
        return v
    if isinstance(v, float) and v.is_integer():
        return int(v)
    if isinstance(v, str) and v.strip().isdigit():
        return int(v.strip())
    if hasattr(v, "numel") and v.numel() == 1 and not v.is_floating_point():  # a 0-d integer tensor
        return int(v.item())
    return None


def _trainer_state(d: Path) -> dict[str, Any] | None:
    f = d / "trainer_state.json"
    if not f.is_file():
        return None
    try:
        doc = json.loads(f.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"{f}: trainer_state.json is not valid JSON ({exc}); fix or remove it", path=str(f)) from None
    return doc if isinstance(doc, dict) else None


def _torch_entries(p: Path, trust_pickle: bool = False) -> dict[str, Any]:
    """Top-level entries of a torch checkpoint (``weights_only`` unless the user vouched for the file with
    ``--trust-pickle``, as the reader does)."""
    import torch

    try:
        obj = torch.load(p, map_location="cpu", weights_only=not trust_pickle, mmap=zipfile.is_zipfile(p))
    except Exception:  # noqa: BLE001 - the reader reports unreadable files when the checkpoint is analysed
        return {}
    return {k: v for k, v in obj.items() if isinstance(k, str)} if isinstance(obj, dict) else {}


def _training_meta(metadata: dict[str, str]) -> dict[str, Any]:
    raw = metadata.get("training")
    if raw is None:
        return {}
    try:
        doc = json.loads(raw) if isinstance(raw, str) else raw
    except json.JSONDecodeError:
        return {}
    return doc if isinstance(doc, dict) else {}


def checkpoint_step(
    path: str | os.PathLike[str], metadata: dict[str, str] | None = None, *, trust_pickle: bool = False
) -> tuple[int, str]:
    """(step, where it came from) for one checkpoint.

    In order: ``trainer_state.json`` ``global_step`` (directories); a top-level ``global_step`` / ``step``
    entry of a torch checkpoint (Lightning, hand-written loops); ``step`` / ``global_step`` / ``training.steps``
    in the checkpoint's metadata (safetensors ``__metadata__`` or sidecar JSON; pass ``metadata`` when it is
    already read); else a number in the name. Raises InputError when none says.
    """
    p = Path(path)
    if p.is_dir():
        state = _trainer_state(p)
        if state is not None and (s := _int_step(state.get("global_step"))) is not None:
            return s, "trainer_state.json (global_step)"
    elif p.suffix in (".pt", ".pth", ".ckpt", ".bin"):
        entries = _torch_entries(p, trust_pickle)
        for key in ("global_step", "step"):
            if (s := _int_step(entries.get(key))) is not None:
                return s, f"checkpoint ({key})"
    meta = metadata or {}
    for key in ("global_step", "step"):
        if (s := _int_step(meta.get(key))) is not None:
            return s, f"metadata ({key})"
    if (s := _int_step(_training_meta(meta).get("steps"))) is not None:
        return s, "metadata (training.steps)"
    name = p.name if p.is_dir() else p.stem
    for pattern in _NAME_STEP:
        m = pattern.search(name)
        if m:
            return int(m.group(1)), "name"
    raise InputError(
        f"{p}: cannot tell this checkpoint's step (no trainer_state.json, no step / global_step entry or "
        "metadata, no number in its name); rename it with its step, e.g. ckpt_1000.pt", path=str(p))


def _training_curves(path: Path, metadata: dict[str, str]) -> dict[str, list[list[float]]]:
    """[step, value] pairs of loss and grad norm: trainer_state.json's log_history, or the per-step lists of
    an hcdiag sample's ``training`` metadata (step k = index k - 1)."""
    out: dict[str, list[list[float]]] = {}
    state = _trainer_state(path) if path.is_dir() else None
    if state is not None:
        for rec in state.get("log_history") or []:
            if not isinstance(rec, dict) or _int_step(rec.get("step")) is None:
                continue
            for key in ("loss", "grad_norm"):
                v = rec.get(key)
                if isinstance(v, int | float) and not isinstance(v, bool):
                    out.setdefault(key, []).append([int(rec["step"]), float(v)])
        return out
    training = _training_meta(metadata)
    for key in ("loss", "grad_norm"):
        vals = training.get(key)
        if isinstance(vals, list) and all(isinstance(v, int | float) for v in vals):
            out[key] = [[i + 1, float(v)] for i, v in enumerate(vals)]
    return out


# ------------------------------------------------------------------------------------------------------------
# One checkpoint (runs in a worker process with --jobs)


@dataclass(frozen=True)
class _Settings:
    """What a checkpoint's analysis depends on besides its bytes (part of the cache key)."""

    probe: str = Probe.STATIC.value
    tokens: int = 256
    seed: int = 0
    iters: int | None = None
    convention: str | None = None
    dtype: str = DType.FLOAT64.value
    tol: float = 1e-6
    layout: str | None = None
    layout_file: str | None = None
    state_key: str | None = None
    trust_pickle: bool = False

    def key(self) -> str:
        from hcdiag import __version__

        d = dict(self.__dict__)
        if self.probe != Probe.RANDOM.value:
            d.pop("tokens"), d.pop("seed")
        return json.dumps({"hcdiag": __version__, **d}, sort_keys=True)


def _analyse(path: str, settings: _Settings, threads: int | None) -> dict[str, Any]:
    """The JSON entry of one checkpoint: step, summary, per-site stochasticity fields, training curves."""
    from hcdiag.fileio import to_json
    from hcdiag.io.base import LoadOptions
    from hcdiag.io.load import load

    t0 = time.perf_counter()
    options = LoadOptions(iters=settings.iters, convention=settings.convention, layout_file=settings.layout_file,
                          extra={"state_key": settings.state_key} if settings.state_key else {})
    model = load(path, layout=settings.layout, options=options, trust_pickle=settings.trust_pickle)
    summary = summarize_model(model, probe=settings.probe, tokens=settings.tokens, seed=settings.seed,
                              iters=settings.iters, convention=settings.convention, dtype=settings.dtype,
                              tol=settings.tol, threads=threads)
    step, source = checkpoint_step(path, model.metadata, trust_pickle=settings.trust_pickle)
    entry = {"step": step, "step_source": source, "path": path, **summary.to_dict(),
             "training": _training_curves(Path(path), model.metadata),
             "seconds": round(time.perf_counter() - t0, 4)}
    return json.loads(to_json(entry))  # NaN/Inf -> null, as written: a cached entry reads back the same


def _worker(path: str, settings: _Settings) -> dict[str, Any]:
    import torch

    torch.set_num_threads(1)  # one process per core: torch's own threads would oversubscribe
    return _analyse(path, settings, 1)


# ------------------------------------------------------------------------------------------------------------
# The run


@dataclass(frozen=True)
class TrackReport:
    """What :func:`track_run` returns: one entry per checkpoint, in step order (``to_dict()['checkpoints']``),
    the loss / grad-norm curves found beside them, how many entries came from the cache, and the checkpoints
    skipped as unreadable (path, reason)."""

    entries: tuple[dict[str, Any], ...]
    settings: dict[str, Any]
    training: dict[str, list[list[float]]] = field(default_factory=dict)
    analysed: int = 0
    cached: int = 0
    cache_path: str | None = None
    elapsed_s: float = 0.0
    notes: tuple[str, ...] = ()
    skipped: tuple[dict[str, str], ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema_version": SCHEMA_VERSION,
            "command": "track",
            "settings": dict(self.settings),
            "metrics": dict(CHECKPOINT_METRICS),
            "analysed": self.analysed,
            "cached": self.cached,
            "cache": self.cache_path,
            "skipped": [dict(s) for s in self.skipped],
            "elapsed_s": round(self.elapsed_s, 4),
            "notes": list(self.notes),
            "training": self.training,
            "checkpoints": list(self.entries),
        }

    def csv_rows(self) -> list[dict[str, Any]]:
        """Long form: one row per (checkpoint, metric) and per (checkpoint, site, numeric site field)."""
        rows: list[dict[str, Any]] = []
        for e in self.entries:
            base = {"step": e["step"], "path": e["path"]}
            for m, v in e["metrics"].items():
                rows.append({**base, "site": e["where"].get(m) or "", "scope": "checkpoint", "metric": m,
                             "value": v})
            for s in e["sites"]:
                for k, v in s.items():
                    if isinstance(v, int | float) and not isinstance(v, bool) and k != "index":
                        rows.append({**base, "site": s["name"], "scope": "site", "metric": k, "value": v})
        return rows


def _read_cache(path: Path | None) -> dict[str, Any]:
    if path is None or not path.is_file():
        return {}
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return {}  # a damaged cache is rebuilt, never trusted
    if not isinstance(doc, dict) or doc.get("schema_version") != SCHEMA_VERSION:
        return {}
    entries = doc.get("entries")
    return entries if isinstance(entries, dict) else {}


def _write_cache(path: Path, entries: dict[str, Any]) -> None:
    from hcdiag.fileio import atomic_write_text, ensure_dir, to_json

    ensure_dir(path.parent, "--cache")
    atomic_write_text(path, to_json({"schema_version": SCHEMA_VERSION, "entries": entries}), "--cache")


def _merged_training(entries: Iterable[dict[str, Any]]) -> dict[str, list[list[float]]]:
    """Loss / grad norm per step over the run: the latest checkpoint's history wins where they overlap."""
    merged: dict[str, dict[int, float]] = {}
    for e in entries:  # in step order: later checkpoints overwrite
        for key, pairs in (e.get("training") or {}).items():
            for s, v in pairs:
                if v is not None:
                    merged.setdefault(key, {})[int(s)] = float(v)
    return {k: [[s, d[s]] for s in sorted(d)] for k, d in merged.items()}


def _check_cache_place(cache: Path, refs: Sequence[CheckpointRef], allow_inside: bool) -> None:
    if allow_inside:
        return
    c = cache.resolve()
    for r in refs:
        p = Path(r.path)
        if p.is_dir() and (c == p or p in c.parents):
            raise UsageError(
                f"cache {cache} would be written inside checkpoint directory {p}; choose another --cache or "
                "--output-dir, or pass --cache-in-checkpoint to allow it", "--cache")


def track_run(
    inputs: Sequence[str | os.PathLike[str]],
    *,
    probe: Probe | str = Probe.STATIC,
    tokens: int = 256,
    seed: int = 0,
    iters: int | None = None,
    convention: Any = None,
    dtype: DType | str = DType.FLOAT64,
    tol: float = 1e-6,
    layout: str | None = None,
    layout_file: str | None = None,
    state_key: str | None = None,
    trust_pickle: bool = False,
    cache: str | os.PathLike[str] | None = None,
    cache_in_checkpoint: bool = False,
    jobs: int = 1,
    progress: Progress | None = None,
) -> TrackReport:
    """Analyse every checkpoint of ``inputs`` (see :func:`find_checkpoints`), in step order.

    probe: ``static`` or ``random`` (``tokens`` / ``seed``); the activations probe belongs to one checkpoint,
    not a run. cache: JSON file of analysed checkpoints (None: no cache); refused inside a checkpoint
    directory unless ``cache_in_checkpoint``. jobs: worker processes (spawned; 1 analyses in this process).
    progress(label, done, total) is called after each checkpoint.
    """
    from hcdiag.probes import make_probe
    from hcdiag.sinkhorn import parse_convention

    t0 = time.perf_counter()
    if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
        raise UsageError(f"--jobs must be an integer >= 1, got {jobs!r}", "--jobs")
    kind = make_probe(probe, tokens=tokens, seed=seed).kind  # validates probe / tokens / seed
    if kind is Probe.ACTIVATIONS:
        raise UsageError("--probe activations records one checkpoint's forward pass; track a run with static or "
                         "random", "--probe")
    conv = None if convention is None else parse_convention(convention).value
    settings = _Settings(kind.value, tokens, seed, iters, conv, DType(str(dtype)).value, float(tol), layout,
                         layout_file, state_key, trust_pickle)
    refs = find_checkpoints(inputs)
    cache_path = Path(cache) if cache is not None else None
    if cache_path is not None:
        _check_cache_place(cache_path, refs, cache_in_checkpoint)
    stored = _read_cache(cache_path)
    skey = settings.key()
    results: dict[str, dict[str, Any]] = {}
    todo: list[CheckpointRef] = []
    for r in refs:
        hit = stored.get(r.key())
        if isinstance(hit, dict) and hit.get("settings_key") == skey and isinstance(hit.get("entry"), dict):
            results[r.path] = hit["entry"]
        else:
            todo.append(r)
    cached = len(results)
    total = len(refs)

    skipped: list[dict[str, str]] = []

    def done(ref: CheckpointRef, entry: dict[str, Any]) -> None:
        results[ref.path] = entry
        stored[ref.key()] = {"settings_key": skey, "entry": entry}
        if progress is not None:
            progress(f"analysed {Path(ref.path).name}", len(results) + len(skipped), total)

    def failed(ref: CheckpointRef, exc: InputError) -> None:
        # a checkpoint hcdiag recognises as bad (a half-written last one, say) is skipped, not cached: a later
        # run tries it again; anything else is a bug and stops the run
        skipped.append({"path": ref.path, "reason": str(exc)})
        if progress is not None:
            progress(f"skipped {Path(ref.path).name}: {exc}", len(results) + len(skipped), total)

    if progress is not None and cached:
        progress(f"{cached} checkpoint(s) from the cache", cached, total)
    try:
        if jobs == 1 or len(todo) <= 1:
            for r in todo:
                try:
                    done(r, _analyse(r.path, settings, None))
                except InputError as exc:
                    failed(r, exc)
        else:
            ctx = multiprocessing.get_context("spawn")  # fork after torch's threads started is unsafe
            with ProcessPoolExecutor(max_workers=min(jobs, len(todo)), mp_context=ctx) as pool:
                futures = {pool.submit(_worker, r.path, settings): r for r in todo}
                for fut in as_completed(futures):  # results keyed by path, sorted by step below
                    try:
                        done(futures[fut], fut.result())
                    except InputError as exc:
                        failed(futures[fut], exc)
    finally:
        if cache_path is not None and todo:
            _write_cache(cache_path, stored)  # what was analysed before a failure is kept
    if not results and skipped:
        raise InputError(f"no checkpoint could be analysed; the first: {skipped[0]['reason']}",
                         path=skipped[0]["path"])
    entries = sorted(results.values(), key=lambda e: (e["step"], e["path"]))
    notes = [f"skipped {Path(s['path']).name}: {s['reason']}" for s in skipped]
    steps = [e["step"] for e in entries]
    dup = sorted({s for s in steps if steps.count(s) > 1})
    if dup:
        notes.append(f"several checkpoints share step(s) {', '.join(map(str, dup[:5]))}: check the inputs")
    sources = sorted({e["step_source"] for e in entries})
    notes.append("steps from " + ", ".join(sources))
    return TrackReport(
        entries=tuple(entries), settings={k: v for k, v in settings.__dict__.items()},
        training=_merged_training(entries), analysed=len(todo) - len(skipped), cached=cached,
        skipped=tuple(skipped),
        cache_path=str(cache_path) if cache_path is not None else None, elapsed_s=time.perf_counter() - t0,
        notes=tuple(notes),
    )


# ------------------------------------------------------------------------------------------------------------
# Figure


def plot_track(report: TrackReport, out_dir: Path, opts: FigOptions | None = None) -> list[Path]:
    """``track.<fmt>``: each metric of :data:`CHECKPOINT_METRICS` against step (log y where the metric is an
    error, range or distance whose positive values span a decade), loss and grad norm beside them when the run
    recorded them. Written atomically in ``opts``' format and size (:mod:`hcdiag.plot_common`, as every figure);
    matplotlib is imported there."""
    from hcdiag.plot_common import new_figure, save

    opts = opts or FigOptions()
    entries = report.entries
    steps = [e["step"] for e in entries]
    panels = list(CHECKPOINT_METRICS) + [k for k in ("loss", "grad_norm") if report.training.get(k)]
    cols = 3
    rows = math.ceil(len(panels) / cols)
    fig = new_figure((4.0 * cols, 2.6 * rows), opts)
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax, name in zip(axes, panels, strict=False):
        if name in CHECKPOINT_METRICS:
            xs = [s for s, e in zip(steps, entries, strict=True) if e["metrics"].get(name) is not None]
            ys = [e["metrics"][name] for e in entries if e["metrics"].get(name) is not None]
            ax.plot(xs, ys, marker="o", color="C0")
            title = name
        else:
            pairs = report.training[name]
            xs, ys = [p[0] for p in pairs], [p[1] for p in pairs]
            ax.plot(xs, ys, color="C1")
            title = f"{name} (training log)"
        if ys and min(ys) > 0 and max(ys) / min(ys) >= 10 and (name in _LOG_METRICS or name in ("loss", "grad_norm")):
            ax.set_yscale("log")  # only across a decade or more: a narrower log axis repeats its tick labels
        if xs and min(xs) > 0 and max(xs) / min(xs) >= 100:  # steps spanning decades
            ax.set_xscale("log")
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    probe = entries[0]["probe_description"] if entries else ""
    fig.suptitle(f"HC diagnostics over {len(entries)} checkpoints (probe {probe})", fontsize=10)
    out = save(fig, out_dir, "track", opts)
    return [out]

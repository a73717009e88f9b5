"""Hostile files through the CLI: seeded mutants of a sample safetensors file (its bytes, its header, its
metadata), of a transformers model directory's config.json, and of a layout file, run through ``inspect``,
``stochasticity`` and ``gain-sweep --from``.

Every run ends clean or correct within its limits: exit 0, 1, 2 or 3 (never 4, hcdiag's own bug), no
traceback, a failure is one ``hcdiag: error:`` line, no other library's warning on stderr, within
``LIMIT_S`` seconds and ``LIMIT_MB`` of resident memory above what the process held before the run.

Each mutant runs in a forked child of this process (the modules are imported once, here; a fork costs
milliseconds where a new interpreter costs seconds of imports): the child runs ``hcdiag.cli.main`` in-process
under an address-space limit, and the parent kills it at the time limit, so a hang or a huge allocation is a
failing case, not a stuck suite. ``HCDIAG_FUZZ_CASES=N`` runs N mutants per family instead of the default.
"""

from __future__ import annotations

import copy
import json
import math
import os
import random
import resource
import select
import shutil
import signal
import struct
import sys
import time
import tomllib
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "samples"
DOC = ROOT / "docs" / "layout-file.md"
PER_FAMILY = int(os.environ.get("HCDIAG_FUZZ_CASES", "50"))
LIMIT_S = 10.0  # per mutant (three commands); a sane run takes well under a second
LIMIT_MB = 1024  # resident growth per mutant; the tiny models here need a few MB
AS_HEADROOM = 6 << 30  # address space a child may add (a hard stop for huge allocations)
COMMANDS = (("inspect", "--json"), ("stochasticity", "--json"), ("gain-sweep", "--json", "--from"))

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="the fuzz runner forks")

# hostile numbers a file may state
HOSTILE_INTS = [0, -1, 1, 2, 3, 30_000, 10**6, 10**8, 10**9, 2**31, 2**63, 2**64, 10**30]
HOSTILE_VALUES = [*HOSTILE_INTS, 1.5, -0.0, 1e-300, 1e300, math.nan, math.inf, -math.inf, True, None, "", "x",
                  "20", [], {}, [1, 2]]  # fmt: skip
HOSTILE_STRINGS = ["0", "-1", "1.5", "", "abc", "nan", "inf", "null", "[]", "{}", "[1]", '["attn_0"]', "30000",
                   "1000000", "100000000", "1000000000", "9223372036854775807", "18446744073709551616",
                   "1e400", "2,2", "3,3", "0,4", "log", "paper", "transformers", "mhc", "identity", "kromhc",
                   "mhc-lite", "tbp", "hcdiag", "code", "2"]  # fmt: skip


# ------------------------------------------------------------------------------------------------------------
# running one mutant in a forked child


def _proc_status(field: str) -> int:
    """A ``/proc/self/status`` size field in bytes (VmRSS, VmHWM, VmSize)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0


def _child(runs: list[list[str]], wfd: int) -> None:
    from cli_runner import run_cli

    torch.set_num_threads(1)  # no thread pool inherited across the fork
    vm = _proc_status("VmSize")
    resource.setrlimit(resource.RLIMIT_AS, (vm + AS_HEADROOM, vm + AS_HEADROOM))
    rss0 = _proc_status("VmRSS")
    out = []
    for args in runs:
        r = run_cli(*args)
        out.append({"args": args, "rc": r.returncode, "stdout": r.stdout[:500_000], "stderr": r.stderr[:4_000]})
    peak = max(0, _proc_status("VmHWM") - rss0)
    os.write(wfd, json.dumps({"runs": out, "peak": peak}).encode())
    os.close(wfd)


def run_forked(runs: list[list[str]], limit_s: float = LIMIT_S) -> dict:
    """Run the CLI invocations ``runs`` in a forked child; {"runs": [...], "peak": bytes} or {"timeout": s}."""
    rfd, wfd = os.pipe()
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # child: never return into pytest
        code = 0
        try:
            os.close(rfd)
            _child(runs, wfd)
        except BaseException as exc:  # noqa: BLE001 - report anything to the parent, then leave
            try:
                os.write(wfd, json.dumps({"crash": f"{type(exc).__name__}: {exc}"}).encode())
            except OSError:
                pass
            code = 1
        os._exit(code)
    os.close(wfd)
    chunks: list[bytes] = []
    start = time.monotonic()
    timed_out = False
    while True:
        left = limit_s - (time.monotonic() - start)
        if left <= 0:
            timed_out = True
            break
        ready, _, _ = select.select([rfd], [], [], left)
        if not ready:
            continue
        data = os.read(rfd, 1 << 16)
        if not data:
            break
        chunks.append(data)
    if timed_out:
        os.kill(pid, signal.SIGKILL)
    os.close(rfd)
    _, status = os.waitpid(pid, 0)
    if timed_out:
        return {"timeout": limit_s}
    if not chunks:
        return {"crash": f"child died without a report (wait status {status})"}
    return json.loads(b"".join(chunks))


def check_result(result: dict, what: str) -> list[str]:
    """Problems with one mutant's runs (empty: clean)."""
    if "timeout" in result:
        return [f"{what}: ran past {result['timeout']} s"]
    if "crash" in result:
        return [f"{what}: {result['crash']}"]
    problems = []
    if result["peak"] > LIMIT_MB << 20:
        problems.append(f"{what}: resident memory grew by {result['peak'] >> 20} MB")
    for r in result["runs"]:
        cmd = " ".join(r["args"][:1] + r["args"][-1:])
        err = r["stderr"]
        lines = [ln for ln in err.splitlines() if ln.strip()]
        if r["rc"] not in (0, 1, 2, 3):
            problems.append(f"{what}: {cmd} exit {r['rc']}: {err.strip()[:300]}")
        if "Traceback" in err:
            problems.append(f"{what}: {cmd} printed a traceback")
        if any(not ln.startswith("hcdiag") for ln in lines):
            problems.append(f"{what}: {cmd} printed a line not from hcdiag: {err.strip()[:300]}")
        if r["rc"] != 0 and not (lines and lines[-1].startswith("hcdiag: ")):
            problems.append(f"{what}: {cmd} exit {r['rc']} without a one-line reason: {err.strip()[:300]}")
        if r["rc"] in (2, 3) and sum(ln.startswith("hcdiag: error") for ln in lines) != 1:
            problems.append(f"{what}: {cmd} exit {r['rc']} with {len(lines)} error lines: {err.strip()[:300]}")
    return problems


def runs_for(path: Path, extra: list[str] | None = None) -> list[list[str]]:
    return [[*cmd, str(path), *(extra or [])] for cmd in COMMANDS]


# ------------------------------------------------------------------------------------------------------------
# safetensors bytes, header and metadata


def st_split(data: bytes) -> tuple[dict, bytes]:
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + n]), data[8 + n :]


def st_join(header: dict, body: bytes) -> bytes:
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + body


def mutate_bytes(data: bytes, rng: random.Random) -> bytes:
    (n,) = struct.unpack("<Q", data[:8])
    b = bytearray(data)
    op = rng.randrange(6)
    if op == 0:  # flip bytes in the header
        for _ in range(rng.choice([1, 2, 8])):
            b[rng.randrange(8, 8 + n)] = rng.randrange(256)
    elif op == 1:  # truncate
        return bytes(b[: rng.choice([0, 4, 8, 9, 8 + n // 2, 8 + n, 8 + n + 1, len(b) // 2, len(b) - 1])])
    elif op == 2:  # header length
        b[:8] = struct.pack("<Q", rng.choice([0, 1, n - 1, n + 1, len(b), 2**40, 2**64 - 1]))
    elif op == 3:  # garbage in the data: NaN / Inf / huge floats in HC tensors
        for _ in range(rng.choice([1, 16, 256])):
            at = rng.randrange(8 + n, len(b) - 4)
            specials = [b"\x00\x00\xc0\x7f", b"\x00\x00\x80\x7f", b"\xff\xff\x7f\x7f", b"\xff" * 4]
            b[at : at + 4] = rng.choice(specials)
    elif op == 4:  # swap the header for another JSON value
        if rng.random() < 0.5:
            return st_join({"__metadata__": rng.choice([[], "x", {"a": 1}, None])}, bytes(b[8 + n :]))
        return struct.pack("<Q", 4) + b"[1] " + bytes(b[8 + n :])
    else:  # append / prepend junk
        return bytes(b) + os.urandom(rng.choice([1, 100])) if rng.random() < 0.5 else b"\x00" * 8 + bytes(b)
    return bytes(b)


_DTYPE_SIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
               "F8_E4M3": 1, "F8_E5M2": 1, "U32": 4, "C64": 8}  # fmt: skip


_CAST_TO = [torch.float16, torch.bfloat16, torch.float64, torch.float8_e4m3fn, torch.float8_e5m2, torch.int8,
            torch.uint8, torch.int32, torch.bool, torch.complex64]  # fmt: skip


def mutate_header(data: bytes, rng: random.Random) -> bytes:
    if rng.random() < 0.15:  # a well-formed file whose HC tensors were cast (quantised, integer, complex)
        from safetensors.torch import load, save

        meta = st_split(data)[0].get("__metadata__")
        sd = load(data)
        site = rng.choice(sorted({k.split(".")[2] for k in sd if k.startswith("hc.sites.")}))
        dtype = rng.choice(_CAST_TO)
        for k in sd:
            if k.startswith(f"hc.sites.{site}.") and (rng.random() < 0.5 or dtype.is_floating_point):
                sd[k] = sd[k].to(dtype)
        return save(sd, metadata=meta)
    header, body = st_split(data)
    keys = [k for k in header if k != "__metadata__"]
    hc = [k for k in keys if "hc" in k] or keys
    for _ in range(rng.choice([1, 1, 2, 3])):
        k = rng.choice(hc)
        e = header.get(k)
        if e is None:
            continue
        op = rng.randrange(10)
        if op == 0 and e["shape"]:  # one dimension
            i = rng.randrange(len(e["shape"]))
            e["shape"][i] = rng.choice([0, 1, e["shape"][i] + 1, e["shape"][i] * 2, 2**40, 2**63, -1, 1.5, "a"])
        elif op == 1:  # add / drop dimensions, keep the element count (the bytes still match)
            e["shape"] = rng.choice([e["shape"] + [1], [1] + e["shape"], [math.prod(e["shape"])], [1] * 40 +
                                     e["shape"], e["shape"][::-1]])
        elif op == 2:  # another dtype of the same bytes: reinterpret (quantised, integer, complex, unknown)
            old = _DTYPE_SIZE.get(e["dtype"], 4)
            new = rng.choice([*_DTYPE_SIZE, "F4", "XYZ", "f32"])
            nbytes = e["data_offsets"][1] - e["data_offsets"][0]
            size = _DTYPE_SIZE.get(new)
            if size and nbytes % size == 0:
                e["shape"] = [nbytes // size]
            e["dtype"], _ = new, old
        elif op == 3:  # offsets
            b0, b1 = e["data_offsets"]
            e["data_offsets"] = rng.choice([[b1, b0], [b0, b1 + 4], [b0 + 4, b1 + 4], [0, b1 - b0], [b0, b0],
                                            [-4, b1], [b0, 2**64]])
        elif op == 4:  # a site index or block number from the key
            new = k.replace(".0.", rng.choice([".100000000.", ".99999999999999999999.", ".-1.", ".00.", ".1."]), 1)
            header[new] = header.pop(k)
        elif op == 5:  # drop a tensor
            header.pop(k)
        elif op == 6:  # rename it out of its layout
            header[k + rng.choice(["_x", ".weight", ""])] = header.pop(k)
        elif op == 7:  # a wrapper prefix on one key only
            header["module." + k] = header.pop(k)
        elif op == 8:  # malformed entry
            bad_entries = [{}, {"dtype": "F32"}, {"dtype": "F32", "shape": "x", "data_offsets": [0, 4]}, [], 1]
            header[k] = rng.choice(bad_entries)
        else:  # duplicate a tensor under a new site index
            header[k.replace(".1.", ".63.", 1)] = copy.deepcopy(e)
    return st_join(header, body)


def mutate_metadata(data: bytes, rng: random.Random) -> bytes:
    header, body = st_split(data)
    meta = header.setdefault("__metadata__", {})
    fields = ["n", "C", "blocks", "sites", "variant", "form", "sinkhorn_iters", "sinkhorn_eps",
              "sinkhorn_convention", "kron_factors", "format", "format_version"]  # fmt: skip
    for _ in range(rng.choice([1, 1, 2])):
        key = rng.choice(fields)
        op = rng.random()
        if op < 0.1:
            meta.pop(key, None)
        elif key == "sites" and op < 0.5:
            count = rng.choice([0, 1, 3, 15, 17, 40, 10**5])
            meta[key] = json.dumps([f"attn_{i}" for i in range(count)])
        else:
            meta[key] = rng.choice(HOSTILE_STRINGS)
    if rng.random() < 0.1:
        header["__metadata__"] = {k: rng.choice([1, [], {"a": "b"}]) for k in list(meta)[:2]}
    return st_join(header, body)


# ------------------------------------------------------------------------------------------------------------
# a transformers model directory (DeepSeek-V4 naming) and its config.json

TF_N, TF_C, TF_LAYERS = 3, 4, 2
TF_CONFIG = {"model_type": "deepseek_v4", "hc_mult": TF_N, "hidden_size": TF_C, "num_hidden_layers": TF_LAYERS,
             "hc_sinkhorn_iters": 20, "hc_eps": 1e-6, "rms_norm_eps": 1e-6}  # fmt: skip


def write_transformers_dir(d: Path) -> None:
    g = torch.Generator().manual_seed(0)
    n, c = TF_N, TF_C
    sd = {"model.embed_tokens.weight": torch.randn(8, c, generator=g)}
    for b in range(TF_LAYERS):
        for kind in ("attn", "ffn"):
            p = f"model.layers.{b}.{kind}_hc."
            sd[p + "fn"] = torch.randn((n + 2) * n, n * c, generator=g) * 0.3
            sd[p + "base"] = torch.randn((n + 2) * n, generator=g)
            sd[p + "scale"] = torch.randn(3, generator=g)
    d.mkdir(parents=True, exist_ok=True)
    save_file(sd, str(d / "model.safetensors"), metadata={"format": "pt"})  # as save_pretrained writes it
    (d / "config.json").write_text(json.dumps(TF_CONFIG))


def mutate_config(cfg: dict, rng: random.Random) -> dict:
    cfg = copy.deepcopy(cfg)
    for _ in range(rng.choice([1, 1, 2])):
        key = rng.choice([*TF_CONFIG, "hc_magnitude"])
        op = rng.random()
        if op < 0.1:
            cfg.pop(key, None)
        elif op < 0.2:  # a VLM's nested text config
            cfg = {"model_type": "x", "text_config": cfg, "vision_config": {"hc_mult": rng.choice(HOSTILE_INTS)}}
        else:
            target = cfg.get("text_config", cfg)
            target[key] = rng.choice(HOSTILE_VALUES)
    return cfg


# ------------------------------------------------------------------------------------------------------------
# a layout file (the worked example of docs/layout-file.md) and its checkpoint

LAY_N, LAY_C, LAY_BLOCKS = 4, 4, 2


def write_braid(d: Path) -> tuple[Path, dict]:
    import re

    g = torch.Generator().manual_seed(0)
    n, c = LAY_N, LAY_C
    sd = {}
    for b in range(LAY_BLOCKS):
        for kind in ("attn", "mlp"):
            p = f"trunk.blocks.{b}.{kind}_braid."
            sd[p + "norm.weight"] = 1 + 0.3 * torch.randn(n * c, generator=g)
            sd[p + "proj"] = 0.5 * torch.randn(n * c, n * n + 2 * n, generator=g)
            sd[p + "static"] = torch.randn(n * n + 2 * n, generator=g)
            for part in ("res", "pre", "post"):
                sd[p + f"alpha_{part}"] = torch.tensor(float(torch.rand((), generator=g)) + 0.2)
    f = d / "braid.safetensors"
    save_file(sd, str(f))
    toml = re.findall(r"```toml\n(.*?)```", DOC.read_text(), flags=re.S)[0]
    return f, tomllib.loads(toml)


def mutate_layout(spec: dict, rng: random.Random) -> dict | str:
    spec = copy.deepcopy(spec)
    if rng.random() < 0.1:  # not a valid document at all
        text = json.dumps(spec)
        at = rng.randrange(len(text))
        return text[:at] + rng.choice(["", "}", "\x00", "\"", "é"]) + text[at + 1 :]
    tables = ["n", "C", "version", "sites.pattern", "norm.kind", "norm.eps", "norm.over", "norm.gain",
              "projection.weight", "projection.input", "projection.orientation", "projection.split",
              "projection.names", "bias.tensor", "scale.res", "scale.pre", "pre.activation", "pre.eps",
              "post.activation", "res.orientation", "res.constraint", "sinkhorn.convention", "sinkhorn.iters",
              "sinkhorn.eps"]  # fmt: skip
    for _ in range(rng.choice([1, 1, 2, 3])):
        path = rng.choice(tables).split(".")
        parent = spec
        for p in path[:-1]:
            parent = parent.setdefault(p, {}) if isinstance(parent.get(p, {}), dict) else {}
        key = path[-1]
        op = rng.random()
        if op < 0.1:
            parent.pop(key, None)
        elif key == "split":
            parent[key] = rng.choice([["n*n", "n", "n"], ["n", "n", "n*n"], ["9**9**9", "n", "n"], ["n**n**n", 1, 1],
                                      ["2**62", "n", "n"], [-4, 12, 8], ["n*n", "n"], ["(", "n", "n"], [0, 0, 0]])
        elif key == "constraint":
            parent[key] = rng.choice(["sinkhorn", "identity", "none", "x"])
        elif key in ("n", "C", "iters"):
            parent[key] = rng.choice(HOSTILE_INTS + [4, 4, 16])
        else:
            parent[key] = rng.choice(HOSTILE_VALUES + ["flat", "per_stream", "in_out", "out_in", "code", "paper",
                                                       "sigmoid", "rms", "none", "/trunk.blocks.0.attn_braid.proj"])
    return spec


# ------------------------------------------------------------------------------------------------------------
# the families


def _family_cases(tmp: Path, family: str, count: int, seed: int) -> list[tuple[str, list[list[str]]]]:
    """(label, CLI invocations) for ``count`` mutants of one family, written under ``tmp``."""
    rng = random.Random(f"{family}-{seed}")
    out = []
    if family in ("bytes", "header", "metadata"):
        bases = {"bytes": ["mhc"], "header": ["mhc", "kromhc", "tbp", "hc-dynamic"],
                 "metadata": ["mhc", "identity", "kromhc", "mhc-lite", "ihc"]}[family]  # fmt: skip
        mutate: Callable[[bytes, random.Random], bytes] = {"bytes": mutate_bytes, "header": mutate_header,
                                                           "metadata": mutate_metadata}[family]  # fmt: skip
        datas = {b: (SAMPLES / f"{b}.safetensors").read_bytes() for b in bases}
        for i in range(count):
            base = rng.choice(bases)
            f = tmp / f"{family}-{i}-{base}.safetensors"
            f.write_bytes(mutate(datas[base], rng))
            out.append((f"{family} #{i} ({base})", runs_for(f)))
    elif family == "config":
        proto = tmp / "tf-proto"
        write_transformers_dir(proto)
        for i in range(count):
            d = tmp / f"config-{i}"
            d.mkdir()
            os.link(proto / "model.safetensors", d / "model.safetensors")
            cfg = mutate_config(TF_CONFIG, rng)
            (d / "config.json").write_text(json.dumps(cfg) if rng.random() < 0.95 else "{" + json.dumps(cfg))
            out.append((f"config #{i}: {json.dumps(cfg)[:200]}", runs_for(d)))
    elif family == "layout":
        ckpt, spec = write_braid(tmp)
        for i in range(count):
            mutant = mutate_layout(spec, rng)
            lay = tmp / f"layout-{i}.json"
            lay.write_text(mutant if isinstance(mutant, str) else json.dumps(mutant))
            out.append((f"layout #{i}: {lay.read_text()[:300]}", runs_for(ckpt, ["--layout-file", str(lay)])))
    return out


FAMILIES = ("bytes", "header", "metadata", "config", "layout")


@pytest.fixture(scope="module")
def _warm():
    """Import and exercise every command once in this process, so that children only run, never import."""
    from cli_runner import run_cli

    for args in runs_for(SAMPLES / "mhc.safetensors"):
        r = run_cli(*args)
        assert r.returncode == 0, (args, r.stderr)
    yield


@pytest.mark.parametrize("family", FAMILIES)
def test_mutants_end_clean(family, tmp_path, _warm):
    cases = _family_cases(tmp_path, family, PER_FAMILY, seed=0)
    problems: list[str] = []
    codes: dict[int, int] = {}
    start = time.monotonic()
    for label, runs in cases:
        result = run_forked(runs)
        problems += check_result(result, label)
        for r in result.get("runs", []):
            codes[r["rc"]] = codes.get(r["rc"], 0) + 1
    elapsed = time.monotonic() - start
    print(f"{family}: {len(cases)} mutants x {len(COMMANDS)} commands in {elapsed:.1f} s, exit codes {codes}")
    assert not problems, "\n".join(problems[:20])
    assert len(codes) > 1 or family == "bytes"  # the mutants reach more than one outcome


def test_runner_catches_a_hang_and_a_huge_allocation(tmp_path, monkeypatch):
    """The watchdog itself: a run that never ends is reported as a timeout, one that allocates past the
    address-space limit as a failure, so a clean fuzz result means something."""
    import importlib

    load_mod = importlib.import_module("hcdiag.io.load")  # the module, not the function hcdiag.io exports

    def hang(*args, **kwargs):
        while True:
            time.sleep(0.01)

    monkeypatch.setattr(load_mod, "detect_layout", hang)
    assert "timeout" in run_forked(runs_for(SAMPLES / "mhc.safetensors")[:1], limit_s=2.0)

    def huge(*args, **kwargs):
        return torch.ones(AS_HEADROOM // 2, dtype=torch.float32)  # twice the headroom

    monkeypatch.setattr(load_mod, "detect_layout", huge)
    result = run_forked(runs_for(SAMPLES / "mhc.safetensors")[:1])
    assert "runs" in result, result
    assert result["runs"][0]["rc"] == 4 and check_result(result, "huge")
    shutil.rmtree(tmp_path, ignore_errors=True)


# ------------------------------------------------------------------------------------------------------------
# the hostile numbers issue 10 names, one by one: refused with the limit (and the option that overrides it)


def _native_with(tmp: Path, base: str, meta: dict | None = None, rename: tuple[str, str] | None = None) -> Path:
    header, body = st_split((SAMPLES / f"{base}.safetensors").read_bytes())
    header["__metadata__"].update(meta or {})
    if rename is not None:
        header = {k.replace(*rename) if k.startswith(rename[0]) else k: v for k, v in header.items()}
    f = tmp / f"{base}-{len(list(tmp.iterdir()))}.safetensors"
    f.write_bytes(st_join(header, body))
    return f


def _layout_with(tmp: Path, **edits) -> list[str]:
    ckpt, spec = write_braid(tmp)
    for path, value in edits.items():
        table, _, key = path.rpartition("__")
        (spec.setdefault(table, {}) if table else spec)[key] = value
    lay = tmp / f"lay-{len(list(tmp.iterdir()))}.json"
    lay.write_text(json.dumps(spec))
    return [str(ckpt), "--layout-file", str(lay)]


def _config_with(tmp: Path, **edits) -> Path:
    d = tmp / f"tf-{len(list(tmp.iterdir()))}"
    write_transformers_dir(d)
    (d / "config.json").write_text(json.dumps({**TF_CONFIG, **edits}))
    return d


HOSTILE = {
    "config hc_sinkhorn_iters 10^9": (lambda t: [str(_config_with(t, hc_sinkhorn_iters=10**9))],
                                      "config.json hc_sinkhorn_iters = 1,000,000,000 exceeds hcdiag's limit of 1,000; "
                                      "pass --iters"),
    "metadata sinkhorn_iters 2^63": (
        lambda t: [str(_native_with(t, "mhc", {"sinkhorn_iters": str(2**63)}))],
        "metadata sinkhorn_iters = about 10^18 exceeds hcdiag's limit of 1,000; pass --iters",
    ),
    "layout file iters 10^9": (
        lambda t: _layout_with(t, sinkhorn__iters=10**9),
        "layout file [sinkhorn] iters = 1,000,000,000 exceeds hcdiag's limit of 1,000; pass --iters",
    ),
    "metadata blocks 10^9": (lambda t: [str(_native_with(t, "identity", {"blocks": str(10**9)}))],
                             "metadata blocks = 1,000,000,000 exceeds hcdiag's limit of 8,192"),
    "site index 10^8": (
        lambda t: [str(_native_with(t, "mhc", {"blocks": "8"}, ("hc.sites.3.", "hc.sites.100000000.")))],
        "the site index of key hc.sites.100000000.",
    ),
    "metadata n 30000": (lambda t: [str(_native_with(t, "identity", {"n": "30000"}))],
                         "metadata n (streams) = 30,000 exceeds hcdiag's limit of 256"),
    "layout file n 30000": (lambda t: _layout_with(t, n=30_000), "layout file n (streams) = 30,000 exceeds hcdiag's "
                            "limit of 256"),
    "layout file split 9**9**9": (lambda t: _layout_with(t, projection__split=["9**9**9", "n", "n"]),
                                  "split size '9**9**9' is not between 0 and"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(HOSTILE))
def test_a_hostile_number_is_refused_by_every_command(case, tmp_path, _warm):
    make, expected = HOSTILE[case]
    args = make(tmp_path)
    result = run_forked([[*cmd, *args] for cmd in COMMANDS], limit_s=LIMIT_S)
    assert not check_result(result, case)
    for r in result["runs"]:
        assert r["rc"] == 3 and len(r["stderr"].splitlines()) == 1 and expected in r["stderr"], (r["args"], r["stderr"])


@pytest.mark.parametrize("case", [c for c, (_, msg) in HOSTILE.items() if "--iters" in msg])
def test_iters_overrides_a_hostile_iteration_count(case, tmp_path, _warm):
    args = HOSTILE[case][0](tmp_path)
    result = run_forked([["stochasticity", "--json", *args, "--iters", "5"]], limit_s=LIMIT_S)
    assert not check_result(result, case)
    r = result["runs"][0]
    assert r["rc"] == 0 and json.loads(r["stdout"])["sites"][0]["iters"] == 5


def test_a_far_block_number_costs_nothing(tmp_path, _warm):
    """A transformers key naming block 10^8: read as it is (the sites exist), the gap listed, never enumerated."""
    d = tmp_path / "tf"
    write_transformers_dir(d)
    header, body = st_split((d / "model.safetensors").read_bytes())
    header = {k.replace("layers.1.", "layers.100000000."): v for k, v in header.items()}
    (d / "model.safetensors").write_bytes(st_join(header, body))
    cfg = {k: v for k, v in TF_CONFIG.items() if k != "num_hidden_layers"}
    (d / "config.json").write_text(json.dumps(cfg))
    result = run_forked(runs_for(d), limit_s=LIMIT_S)
    assert not check_result(result, "far block")
    notes = json.loads(result["runs"][0]["stdout"])["notes"]
    assert any("[1, 2, 3, 4, 5, 6, 7, 8] and 99,999,991 more" in note for note in notes), notes

"""The ``hcdiag`` command line. The only module (with :mod:`hcdiag.render`) that imports typer and rich.

Each command parses its options, calls one pure function of the core, renders the returned result object,
and exits. Exit codes: 0 ok, 1 a ``--fail-above`` check failed, 2 usage error, 3 unreadable/unsupported input.
"""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path
from typing import Annotated

import typer

from hcdiag import __version__
from hcdiag.enums import Convention, Draw, DType, FigFormat, Form, Probe
from hcdiag.errors import HcdiagError, UsageError, is_out_of_memory

#: ``hcdiag gain-sweep`` without --init / --logit-scale: N(0, 0.2^2) on every site's static H_res logits / weights
#: (gain_sweep's init "perturb", part "res"). At --layers 64 (128 sites, n = 4, seed 0) unconstrained HC's composite
#: gain grows past 1e3 (hc-static G_f 1.2e3, hc-dynamic 2.3e2) while the doubly stochastic variants stay within
#: 1% of 1, the contrast of mHC Figs. 3 and 7. ``--init paper`` is the exact initialisation (every gain 1).
GAIN_DEFAULT_SCALE = 0.2

EPILOG_EXIT = (
    "Exit status: 0 ok, 1 check failed (--fail-above), 2 usage error, 3 unreadable or unsupported input, "
    "4 internal error, 130 interrupted."
)

app = typer.Typer(
    name="hcdiag",
    help=(
        "Diagnostics for hyper-connection residual streams (HC, mHC, mHC-lite, KromHC, TBP-mHC): "
        "doubly-stochastic error of H_res, gain of its products across depth, parameter cost per variant.\n\n"
        "All matrices are reported in the mHC paper's convention: row i of H_res builds output stream i."
    ),
    epilog=EPILOG_EXIT,
    no_args_is_help=True,
    add_completion=True,
    context_settings={"help_option_names": ["-h", "--help"]},
    pretty_exceptions_enable=False,
    rich_markup_mode="markdown",
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"hcdiag {__version__}")
        raise typer.Exit(0)


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """hcdiag: hyper-connection residual-stream diagnostics."""
    _quiet(False)  # each run starts talkative (main() may run several times in one process)


# --------------------------------------------------------------------------------------------- shared options

JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON document on stdout and nothing else.")]
CsvOpt = Annotated[
    Path | None,
    typer.Option("--csv", metavar="FILE|-", help="Also write the data as CSV to FILE (with the column meanings in "
                 "FILE-metadata.json), or to stdout with `-` (instead of the table)."),
]
QuietOpt = Annotated[
    bool, typer.Option("--quiet", "-q", help="Print no table, notes, progress or warnings; errors, failed checks "
                       "and what --json / --csv - ask for still appear.")
]
OutDirOpt = Annotated[
    Path | None, typer.Option("--output-dir", "-o", help="Write JSON and CSV into this directory."),
]
PlotOutDirOpt = Annotated[
    Path | None,
    typer.Option("--output-dir", "-o", help="Write JSON, CSV (and plots with --plot) into this directory."),
]
PlotOpt = Annotated[
    bool, typer.Option("--plot", help="Write figures into --output-dir (default ./hcdiag-out).")
]
FigFormatOpt = Annotated[
    FigFormat, typer.Option("--fig-format", help="With --plot: figure file format: png, or svg / pdf (vector).",
                            case_sensitive=False)
]


def _check_fig_size(value: str | None) -> str | None:
    """Refuse a bad --fig-size while parsing, before any computation."""
    from hcdiag.plot_common import parse_fig_size

    parse_fig_size(value)
    return value


FigSizeOpt = Annotated[
    str | None,
    typer.Option("--fig-size", metavar="WxH", callback=_check_fig_size,
                 help="With --plot: every figure's size in inches, e.g. 8x5 (default: each figure its own)."),
]
#: the most --iters a command takes: far past convergence of any matrix hcdiag reports (iterations to
#: tolerance stop at 1,000) and minutes at most on a production checkpoint, never an unbounded run (a file's
#: own count is bounded by hcdiag.io.limits.MAX_ITERS; this module does not import hcdiag.io, which needs torch)
MAX_CLI_ITERS = 100_000
IterOpt = Annotated[
    int | None,
    typer.Option("--iters", help="Sinkhorn iterations (default: the checkpoint's metadata, else 20).", min=1,
                 max=MAX_CLI_ITERS),
]
ConvOpt = Annotated[
    Convention | None,
    typer.Option("--convention", help="Sinkhorn convention (default: the checkpoint's, else `paper`).",
                 case_sensitive=False),
]
DrawOpt = Annotated[Draw, typer.Option(
    "--draw", help="How --probe random draws a site's tokens: projected draws RMSNorm(x) W^T directly for sites "
    "that read x only through it (transformers-family; same distribution, far less work), full draws x [T, n, C]; "
    "auto: projected where nC >= 32 k.")]
LayoutOpt = Annotated[str | None, typer.Option("--layout", help="Force a checkpoint layout (see `hcdiag inspect`).")]
LayoutFileOpt = Annotated[
    Path | None, typer.Option("--layout-file", help="TOML/JSON file describing an unknown checkpoint layout.")
]
StateKeyOpt = Annotated[
    str | None,
    typer.Option("--state-key", help="Which state dict of a training checkpoint to read (e.g. ema; default: model)."),
]
TemperatureOpt = Annotated[
    float | None,
    typer.Option("--temperature", help="Sinkhorn temperature tau: logits / tau (tokenbender's mHC; default: the "
                 "checkpoint's metadata, else the library's 0.05).", min=0.0),
]
HcTanhOpt = Annotated[
    bool | None,
    typer.Option("--hc-tanh/--no-hc-tanh", help="hyper-connections HC sites: tanh on the dynamic alpha / beta "
                 "(HyperConnections(tanh=...); not stored in a state dict; default: on, the library's)."),
]
VariantsOpt = Annotated[
    str | None, typer.Option("--variants", help="Comma-separated variant names (default: all).")
]
NOpt = Annotated[int, typer.Option("--n", help="Number of residual streams.")]
TrustOpt = Annotated[
    bool,
    typer.Option(
        "--trust-pickle",
        help="DANGEROUS: unpickle .pt files with arbitrary code (weights_only=False). A malicious checkpoint "
        "can run any command on your machine. Use only for files you made yourself.",
    ),
]


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _extra(state_key: str | None, temperature: float | None = None, hc_tanh: bool | None = None) -> dict:
    """LoadOptions.extra from the loader options that only some layouts read."""
    given = {"state_key": state_key, "temperature": temperature, "tanh": hc_tanh}
    return {k: v for k, v in given.items() if v is not None}


def _load(ckpt: Path, layout: str | None, layout_file: Path | None, iters: int | None,
          convention: Convention | None, trust_pickle: bool, state_key: str | None = None,
          temperature: float | None = None, hc_tanh: bool | None = None):
    from hcdiag.io.base import LoadOptions
    from hcdiag.io.load import load

    options = LoadOptions(
        iters=iters,
        convention=str(convention) if convention else None,
        layout_file=str(layout_file) if layout_file else None,
        extra=_extra(state_key, temperature, hc_tanh),
    )
    model = load(str(ckpt), layout=layout, options=options, trust_pickle=trust_pickle)
    # options only some layouts read: silently ignoring one would report numbers the user did not ask for
    if temperature is not None and "temperature" not in model.settings_source:
        raise UsageError(f"--temperature does not apply to {ckpt} ({model.layout} layout: no Sinkhorn temperature); "
                         "tokenbender checkpoints and layout files take it", "--temperature")
    if hc_tanh is not None and "tanh" not in model.settings_source:
        raise UsageError(f"--hc-tanh / --no-hc-tanh apply to hyper-connections HC sites; {ckpt} ({model.layout} "
                         "layout) has none", "--hc-tanh")
    return model


def _record_reading(doc: dict, model) -> str:
    """Put what was read into the JSON document; return the line the table output ends with."""
    doc["bytes_read"] = model.bytes_read
    doc["bytes_total"] = model.bytes_total
    frac = f" ({model.bytes_read / model.bytes_total:.3%})" if model.bytes_total else ""
    return (f"read {model.bytes_read:,} of {model.bytes_total:,} tensor bytes{frac}: the hyper-connection tensors "
            f"only ({model.layout} layout)")


def _probe(ctx: typer.Context, probe: Probe, activations: Path | None, tokens: int, seed: int,
           draw: Draw = Draw.AUTO):
    """The probe object for --probe/--activations/--tokens/--seed (UsageError naming the option, also for an
    option the chosen probe does not use)."""
    from hcdiag.probes import make_probe

    if probe != Probe.RANDOM:
        _refuse_given(ctx, ("tokens", "seed", "draw"),
                      f"to --probe {probe.value} (they set the random probe's tokens)")
    if probe != Probe.ACTIVATIONS:
        _refuse_given(ctx, ("activations",), f"to --probe {probe.value}",
                      "drop --activations, or add --probe activations to use it")

    if probe == Probe.ACTIVATIONS and activations is None:
        raise UsageError("--probe activations needs --activations FILE (written by hcdiag.capture)", "--activations")
    return make_probe(probe, tokens=tokens, seed=seed, activations=str(activations) if activations else None,
                      draw=draw.value)


def _plots(plot, report, output_dir: Path | None, doc: dict, fig_format: FigFormat, fig_size: str | None) -> None:
    """Write ``plot(report, dir, opts)``'s figures into --output-dir (default ./hcdiag-out), in --fig-format at
    --fig-size; list them in doc and on stderr."""
    from hcdiag.fileio import ensure_dir
    from hcdiag.plot_common import FigOptions, parse_fig_size

    opts = FigOptions(fmt=fig_format, size=parse_fig_size(fig_size))
    files = plot(report, ensure_dir(output_dir or Path("hcdiag-out")), opts)
    doc["plots"] = [str(f) for f in files]
    from hcdiag import render

    render.note("plots: " + ", ".join(str(f) for f in files))


def _stdout_check(as_json: bool, csv_path: Path | None) -> None:
    """--json and --csv - both want stdout: refuse before computing anything."""
    if as_json and csv_path is not None and str(csv_path) == "-":
        raise UsageError("--json and --csv - both write to stdout; give --csv a file name, or drop one", "--csv")


def _write_csv(path: Path, rows: list[dict], name: str, option: str = "--csv") -> None:
    """CSV at ``path`` and its CSVW sidecar ``path-metadata.json`` saying what each column means."""
    from hcdiag import columns
    from hcdiag.fileio import atomic_write_text, csv_text, to_json

    text = csv_text(rows)
    atomic_write_text(path, text, option)
    header = next(iter(text.splitlines()), "")
    meaning = columns.describe(name, header.split(",") if header else [])
    doc = columns.sidecar(path.name, f"hcdiag {name}", meaning)
    atomic_write_text(path.with_name(path.name + "-metadata.json"), to_json(doc), option)


def _outputs(doc: dict, rows: list[dict], *, name: str, as_json: bool, csv_path: Path | None,
             output_dir: Path | None) -> bool:
    """Write the JSON / CSV side outputs every command offers. True when stdout carried a document (--json,
    --csv -): then no table follows."""
    from hcdiag.fileio import csv_text, ensure_dir, to_json

    to_stdout = csv_path is not None and str(csv_path) == "-"
    if csv_path is not None and not to_stdout:
        _write_csv(csv_path, rows, name)
    if output_dir is not None:
        from hcdiag.fileio import atomic_write_text

        d = ensure_dir(output_dir)
        atomic_write_text(d / f"{name}.json", to_json(doc))
        _write_csv(d / f"{name}.csv", rows, name, "--output-dir")
    if as_json:
        sys.stdout.write(to_json(doc))
    elif to_stdout:
        sys.stdout.write(csv_text(rows))
    return as_json or to_stdout


def _quiet(quiet: bool) -> None:
    """--quiet for this run; without it, undo a quiet earlier run in the same process (never imports rich)."""
    render = sys.modules.get("hcdiag.render")
    if quiet and render is None:
        from hcdiag import render
    if render is not None:
        render.set_quiet(quiet)


# --------------------------------------------------------------------------------------------------- params


@app.command(
    "params",
    epilog="Examples:\n\n"
    "    hcdiag params --n 8 --C 4096\n\n"
    "    hcdiag params --n 4 --C 2560 --layers 30 --form paper --variants mhc,kromhc\n\n"
    "    hcdiag params --n 8 --C 4096 --kron-factors 2,4 --json\n\n" + EPILOG_EXIT,
)
def params_cmd(
    n: NOpt = 4,
    C: Annotated[int, typer.Option("--C", "-C", help="Width of one stream (the model's hidden size).")] = 4096,
    layers: Annotated[int, typer.Option("--layers", help="Transformer blocks (2 HC sites each).")] = 1,
    variants: VariantsOpt = None,
    form: Annotated[
        Form, typer.Option("--form", help="paper: mHC Eqs. 7-9 (no norm gain); code: reference modules.")
    ] = Form.CODE,
    kron_factors: Annotated[
        str | None, typer.Option("--kron-factors", help="KromHC factor sizes, product = n (default 2,2,...).")
    ] = None,
    as_json: JsonOpt = False,
    csv_path: CsvOpt = None,
    output_dir: OutDirOpt = None,
    quiet: QuietOpt = False,
) -> None:
    """Parameter cost of every variant per HC site and per model, against a plain pre-norm block."""
    from hcdiag import render
    from hcdiag.params import compute_params

    _stdout_check(as_json, csv_path)
    _quiet(quiet)
    report = compute_params(
        n, C, layers=layers, variants=_split_names(variants, "--variants"), form=form,
        kron_factors=_parse_factors(kron_factors),
    )
    doc = report.to_dict()
    if not _outputs(doc, doc["rows"], name="params", as_json=as_json, csv_path=csv_path, output_dir=output_dir):
        render.params(report)


def _refuse_given(ctx: typer.Context, names: tuple[str, ...], why: str, fix: str | None = None) -> None:
    """A usage error for the first of ``names`` (parameter names) that the user gave: it does not apply."""
    for param in ctx.command.params:
        src = ctx.get_parameter_source(param.name) if param.name in names else None
        if src is not None and src.name not in ("DEFAULT", "DEFAULT_MAP"):
            opt = max(param.opts, key=len)
            raise UsageError(f"{opt} does not apply {why}; {fix or 'drop ' + opt}", opt)


def _refuse_fig_without_plot(ctx: typer.Context, plot: bool) -> None:
    """--fig-format / --fig-size say how figures are written: without --plot there are none."""
    if not plot:
        _refuse_given(ctx, ("fig_format", "fig_size"), "without --plot (no figures are written)",
                      "add --plot, or drop the figure option")


#: gain-sweep options of the synthetic stack, and those of a checkpoint (--from)
_SYNTHETIC_ONLY = ("layers", "variants", "n", "C", "init", "logit_scale", "seeds", "kron_factors")
_FROM_ONLY = ("probe", "draw", "activations", "layout", "layout_file", "state_key", "trust_pickle", "temperature",
              "hc_tanh")


def _gain_init(init: str | None, logit_scale: float | None) -> tuple[str, float]:
    """(init, logit scale) for gain_sweep: --init perturb at GAIN_DEFAULT_SCALE unless told otherwise;
    --logit-scale alone implies perturb (0: paper); --init paper --logit-scale S is refused by gain_sweep."""
    if init is not None and init not in ("paper", "perturb"):
        raise UsageError(f"--init {init!r} is not one of: perturb, paper", "--init")
    if logit_scale is None:
        return (init or "perturb"), (GAIN_DEFAULT_SCALE if init != "paper" else 0.0)
    return (init or ("perturb" if logit_scale else "paper")), logit_scale


def _split_names(value: str | None, option: str) -> list[str] | None:
    if value is None:
        return None
    names = [v.strip() for v in value.split(",") if v.strip()]
    if not names:
        raise UsageError(f"{option} is empty; give comma-separated names, e.g. mhc,kromhc", option)
    return names


def _parse_factors(value: str | None) -> tuple[int, ...] | None:
    from hcdiag.registry import parse_kron_factors

    return None if value is None else parse_kron_factors(value)


# ---------------------------------------------------------------------------------------------- stochasticity


@app.command(
    "stochasticity",
    epilog="Examples:\n\n"
    "    hcdiag stochasticity samples/mhc.safetensors\n\n"
    "    hcdiag stochasticity model_dir/ --probe random --tokens 512 --iters 20 --convention paper --plot\n\n"
    "    hcdiag stochasticity ckpt.pt --fail-above 1e-3 --json > report.json\n\n" + EPILOG_EXIT,
)
def stochasticity_cmd(
    ctx: typer.Context,
    ckpt: Annotated[Path, typer.Argument(help="Checkpoint: .safetensors, .pt/.pth/.bin, or a model directory.")],
    probe: Annotated[Probe, typer.Option("--probe", help="Stream inputs: static (x = 0), random, activations.")]
    = Probe.STATIC,
    activations: Annotated[
        Path | None, typer.Option("--activations", help="Activation file for --probe activations (hcdiag.capture).")
    ] = None,
    tokens: Annotated[int, typer.Option("--tokens", help="Synthetic tokens for --probe random.", min=1)] = 256,
    seed: Annotated[int, typer.Option("--seed", help="Seed for --probe random.")] = 0,
    draw: DrawOpt = Draw.AUTO,
    iters: IterOpt = None,
    convention: ConvOpt = None,
    dtype: Annotated[DType, typer.Option("--dtype", help="Precision of the computation.")] = DType.FLOAT64,
    tol: Annotated[float, typer.Option(
        "--tol", help="Tolerance for the verdict and iterations-needed, above the convention's eps floor: with eps "
        "in the Sinkhorn denominators (transformers: hc_eps, 1e-6) converged sums sit eps below 1, so a site is ok "
        "within tol + eps ('ok (at the eps floor)').")] = 1e-6,
    fail_above: Annotated[
        float | None, typer.Option("--fail-above", help="Exit 1 if any site's error exceeds this.")
    ] = None,
    as_json: JsonOpt = False,
    csv_path: CsvOpt = None,
    output_dir: PlotOutDirOpt = None,
    plot: PlotOpt = False,
    fig_format: FigFormatOpt = FigFormat.PNG,
    fig_size: FigSizeOpt = None,
    layout: LayoutOpt = None,
    layout_file: LayoutFileOpt = None,
    state_key: StateKeyOpt = None,
    temperature: TemperatureOpt = None,
    hc_tanh: HcTanhOpt = None,
    trust_pickle: TrustOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """How far each site's H_res is from doubly stochastic, why, and what to change."""
    from hcdiag import render
    from hcdiag.stochasticity import analyze_stochasticity

    _stdout_check(as_json, csv_path)
    _quiet(quiet)
    _refuse_fig_without_plot(ctx, plot)
    if tol <= 0:
        raise UsageError(f"--tol {tol} must be positive, e.g. 1e-6", "--tol")
    probe_obj = _probe(ctx, probe, activations, tokens, seed, draw)
    model = _load(ckpt, layout, layout_file, iters, convention, trust_pickle, state_key, temperature, hc_tanh)
    report = analyze_stochasticity(model, probe=probe_obj, iters=iters, convention=convention, dtype=dtype, tol=tol)
    for w in report.warnings:
        render.warn(w)
    doc = report.to_dict()
    read_line = _record_reading(doc, model)
    if plot:
        from hcdiag.plot_stochasticity import plot_stochasticity

        _plots(plot_stochasticity, report, output_dir, doc, fig_format, fig_size)
    if not _outputs(doc, doc["sites"], name="stochasticity", as_json=as_json, csv_path=csv_path,
                    output_dir=output_dir):
        render.stochasticity(report)
        render.dim(read_line)
    if fail_above is not None:
        bad = report.exceeds(fail_above)
        if bad:
            _stderr(f"hcdiag: check failed: {len(bad)} site(s) exceed --fail-above {fail_above:g}: "
                    + ", ".join(bad[:8]) + (" ..." if len(bad) > 8 else ""))
            raise typer.Exit(1)


# -------------------------------------------------------------------------------------------------- gain-sweep


@app.command(
    "gain-sweep",
    epilog="Examples:\n\n"
    "    hcdiag gain-sweep --layers 64\n\n"
    "    hcdiag gain-sweep --layers 64 --init perturb --logit-scale 1.0 --seeds 32 --plot\n\n"
    "    hcdiag gain-sweep --layers 1024 --seeds 256 --n 16 --logit-scale 0.05 --threads 2\n\n"
    "    hcdiag gain-sweep --from samples/hc-dynamic.safetensors --probe random --tokens 64\n\n" + EPILOG_EXIT,
)
def gain_sweep_cmd(
    ctx: typer.Context,
    layers: Annotated[int, typer.Option("--layers", help="Blocks in the synthetic stack (2 HC sites each).")] = 64,
    variants: VariantsOpt = None,
    n: NOpt = 4,
    C: Annotated[int, typer.Option("--C", "-C", help="Stream width (matters for dynamic variants).")] = 64,
    init: Annotated[str | None, typer.Option(
        "--init", metavar="perturb|paper",
        help="perturb (default): every site's static H_res logits / weights at the published init + N(0, s^2) "
        f"noise, s = --logit-scale (default {GAIN_DEFAULT_SCALE:g}): unconstrained HC grows by orders of "
        "magnitude, the doubly stochastic variants stay bounded (mHC Figs. 3, 7). paper: the exact published "
        "init, no noise (every variant's gain is 1).")] = None,
    logit_scale: Annotated[
        float | None, typer.Option("--logit-scale", "--perturb",
                                   help=f"Std s of the noise around init (implies --init perturb; default "
                                   f"{GAIN_DEFAULT_SCALE:g}; 0 means --init paper).")
    ] = None,
    seeds: Annotated[int, typer.Option("--seeds", help="Independent stacks; median and worst are reported.")] = 1,
    tokens: Annotated[int, typer.Option("--tokens", help="Tokens per stack (dynamic variants).")] = 1,
    iters: IterOpt = None,
    convention: ConvOpt = None,
    dtype: Annotated[DType, typer.Option("--dtype", help="Precision the product is accumulated in.")]
    = DType.FLOAT64,
    kron_factors: Annotated[str | None, typer.Option("--kron-factors", help="KromHC factor sizes.")] = None,
    seed: Annotated[int, typer.Option("--seed", help="Base seed.")] = 0,
    threads: Annotated[
        int | None,
        typer.Option("--threads", min=1, help="Worker threads (default: torch's, the cores); results do not change."),
    ] = None,
    from_ckpt: Annotated[
        Path | None, typer.Option("--from", help="Use a real checkpoint's sites instead of a synthetic stack.")
    ] = None,
    probe: Annotated[Probe, typer.Option("--probe", help="With --from: stream inputs.")] = Probe.STATIC,
    draw: DrawOpt = Draw.AUTO,
    activations: Annotated[Path | None, typer.Option("--activations", help="Activation file for --probe activations.")]
    = None,
    every: Annotated[int | None, typer.Option("--every", help="Table rows every k sites (default: ~12 rows).")]
    = None,
    as_json: JsonOpt = False,
    csv_path: CsvOpt = None,
    output_dir: PlotOutDirOpt = None,
    plot: PlotOpt = False,
    fig_format: FigFormatOpt = FigFormat.PNG,
    fig_size: FigSizeOpt = None,
    layout: LayoutOpt = None,
    layout_file: LayoutFileOpt = None,
    state_key: StateKeyOpt = None,
    temperature: TemperatureOpt = None,
    hc_tanh: HcTanhOpt = None,
    trust_pickle: TrustOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Gain of residual-matrix products across depth (mHC Figs. 3, 7, 8), synthetic or from a checkpoint."""
    from hcdiag import render
    from hcdiag.gain import gain_from_model, gain_sweep

    _stdout_check(as_json, csv_path)
    _quiet(quiet)
    _refuse_fig_without_plot(ctx, plot)
    read_line: str | None = None
    if from_ckpt is not None:
        _refuse_given(ctx, _SYNTHETIC_ONLY, "with --from (the checkpoint fixes its sites, n, C and weights)")
    else:
        _refuse_given(ctx, _FROM_ONLY, "without --from CKPT (a synthetic stack has no checkpoint to read)")
    if from_ckpt is not None:
        probe_obj = _probe(ctx, probe, activations, tokens, seed, draw)
        model = _load(from_ckpt, layout, layout_file, iters, convention, trust_pickle, state_key, temperature,
                      hc_tanh)
        report = gain_from_model(
            model, probe=probe_obj, iters=iters, convention=convention, dtype=dtype, threads=threads
        )
    else:
        defaulted = init is None and logit_scale is None
        init, scale = _gain_init(init, logit_scale)
        with render.progress_reporter(enabled=not as_json) as progress:
            report = gain_sweep(
                layers=layers, variants=_split_names(variants, "--variants"), n=n, C=C,
                init=init, logit_scale=scale, seeds=seeds,
                tokens=tokens, iters=iters, convention=convention, dtype=dtype, seed=seed,
                kron_factors=_parse_factors(kron_factors), progress=progress, threads=threads,
            )
    doc = report.to_dict()
    if from_ckpt is not None:
        read_line = _record_reading(doc, model)
    rows = report.table_rows(every)
    if plot:
        from hcdiag.plot_gain import plot_gain

        _plots(plot_gain, report, output_dir, doc, fig_format, fig_size)
    to_stdout = _outputs(doc, report.curve_rows(), name="gain-sweep", as_json=as_json, csv_path=csv_path,
                         output_dir=output_dir)
    for v in report.variants:
        for w in v.warnings:
            render.warn(w)
    if not to_stdout:
        render.gain(report, rows)
        if read_line:
            render.dim(read_line)
        if from_ckpt is None and defaulted:
            render.dim(f"default perturbation: N(0, {GAIN_DEFAULT_SCALE:g}^2) on every site's static H_res logits / "
                       "weights (--logit-scale S to change it, --init paper for the exact published init)")


# ----------------------------------------------------------------------------------------------------- inspect


@app.command(
    "inspect",
    epilog="Examples:\n\n    hcdiag inspect samples/mhc.safetensors\n\n"
    "    hcdiag inspect deepseek_dir/ --json\n\n" + EPILOG_EXIT,
)
def inspect_cmd(
    ckpt: Annotated[Path, typer.Argument(help="Checkpoint file or model directory.")],
    as_json: JsonOpt = False,
    csv_path: CsvOpt = None,
    output_dir: OutDirOpt = None,
    layout: LayoutOpt = None,
    layout_file: LayoutFileOpt = None,
    state_key: StateKeyOpt = None,
    temperature: TemperatureOpt = None,
    hc_tanh: HcTanhOpt = None,
    trust_pickle: TrustOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Detected layout, HC sites and their tensors, settings and where they came from (reads headers only)."""
    from hcdiag import render
    from hcdiag.inspect import inspect_checkpoint
    from hcdiag.io.base import LoadOptions

    _stdout_check(as_json, csv_path)
    _quiet(quiet)
    report = inspect_checkpoint(
        str(ckpt), layout=layout,
        options=LoadOptions(layout_file=str(layout_file) if layout_file else None,
                            extra=_extra(state_key, temperature, hc_tanh)),
        trust_pickle=trust_pickle,
    )
    doc = report.to_dict()
    if not _outputs(doc, doc["sites"], name="inspect", as_json=as_json, csv_path=csv_path, output_dir=output_dir):
        render.inspect(report)


# ------------------------------------------------------------------------------------------------------ verify


def _verify_table(report) -> None:
    """The verify table, the skipped checks and the verdict (rich, on stdout)."""
    from rich.markup import escape
    from rich.text import Text

    from hcdiag import render

    def sci(v) -> str:
        return "n/a" if v is None else f"{v:.1e}"

    t = render.Grid(f"Update equation per site: {escape(report.path)} ({escape(report.layout)} layout), "
                    f"activations {escape(report.activations)}, tolerance {report.tolerance:.1e}",
                    [("site", "left"), ("update (model)", "right"), ("update (recomputed)", "right"),
                     ("branch input", "right"), ("fingerprint (residual)", "left"), ("conforms", "left"),
                     ("diagnosis", "left")], wrap=["diagnosis"])
    for s in report.sites:
        fp = s.fingerprint
        c = s.checks
        update_model = c.get("update (model)", c.get("H_res"))
        t.add_row(escape(s.name), sci(update_model), sci(c.get("update (recomputed)", c.get("H_post"))),
                  sci(c.get("branch input", c.get("H_pre"))),
                  escape(f"{fp.headline.label} ({fp.headline.residual:.1e})") if fp else "-",
                  Text("yes" if s.conforms else "NO", style="green" if s.conforms else "red"),
                  escape(s.diagnosis or ("" if s.conforms else "unexplained")))
    t.show()
    render.dim("residuals: ||x_(l+1) - (H_res x_l + H_post^T F_l)|| / ||x_(l+1)|| with the model's matrices "
               "and with those recomputed from the checkpoint; branch input: ||H_pre x - branch input|| / ||.|| "
               "(Qwen4-Exp: its channel-gated mean of the normalised streams, recomputed). "
               "Sites without a recorded update show H_res / H_post / H_pre differences in those columns.")
    skipped: dict[tuple[str, str], list[str]] = {}
    for s in report.sites:
        for check, why in s.skipped.items():
            skipped.setdefault((check, why), []).append(s.name)
    for (check, why), names in skipped.items():
        render.dim(f"skipped {check} at {len(names)} site(s) ({', '.join(names[:4])}"
                   f"{' ...' if len(names) > 4 else ''}): {why}")
    for note in report.notes:
        render.dim(note)
    render.out.print(Text(report.verdict, style="green" if report.conforms else "red"))


@app.command(
    "verify",
    epilog="Examples:\n\n    hcdiag verify model_dir/ --activations acts.safetensors\n\n"
    "    hcdiag verify ckpt.safetensors --activations acts.safetensors --json > verify.json\n\n"
    "Record the activations with hcdiag.capture.capture(model, 'acts.safetensors') around a forward pass.\n\n"
    "Exit status: 0 every site conforms, 1 a site does not conform, 2 usage error, 3 unreadable or unsupported "
    "input, 4 internal error, 130 interrupted.",
)
def verify_cmd(
    ckpt: Annotated[Path, typer.Argument(help="Checkpoint: .safetensors, .pt/.pth/.bin, or a model directory.")],
    activations: Annotated[
        Path, typer.Option("--activations", help="Activations of a forward pass (hcdiag.capture).")
    ],
    tol: Annotated[
        float | None, typer.Option("--tol", help="Conformance threshold (default 64 x float32 eps = 7.6e-6).")
    ] = None,
    fingerprint: Annotated[
        bool, typer.Option("--fingerprint/--no-fingerprint", help="Sinkhorn fingerprint at every site (always "
                           "computed where a site does not conform).")
    ] = True,
    as_json: JsonOpt = False,
    csv_path: CsvOpt = None,
    output_dir: OutDirOpt = None,
    layout: LayoutOpt = None,
    layout_file: LayoutFileOpt = None,
    state_key: StateKeyOpt = None,
    trust_pickle: TrustOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Does the model compute the hyper-connection it claims? Update equation per site, diagnoses, fingerprint."""
    from hcdiag.verification import verify

    _stdout_check(as_json, csv_path)
    _quiet(quiet)
    if tol is not None and tol <= 0:
        raise UsageError(f"--tol {tol} must be positive, e.g. 1e-5", "--tol")
    if not activations.is_file():
        raise UsageError(f"activations file {activations} does not exist; record one with hcdiag.capture",
                         "--activations")
    model = _load(ckpt, layout, layout_file, None, None, trust_pickle, state_key)
    report = verify(model, activations, tol=tol, fingerprint=fingerprint)
    doc = report.to_dict()
    read_line = _record_reading(doc, model)
    if not _outputs(doc, report.rows(), name="verify", as_json=as_json, csv_path=csv_path,
                    output_dir=output_dir) and not as_json:
        from hcdiag import render

        _verify_table(report)
        render.dim(read_line)
    bad = report.failing()
    if bad:
        _stderr(f"hcdiag: check failed: {len(bad)} site(s) do not conform: " + ", ".join(bad[:8])
                + (" ..." if len(bad) > 8 else ""))
        raise typer.Exit(1)


# ------------------------------------------------------------------------------------------------------- track


def _track_table(report) -> None:
    """One row per checkpoint (rich, on stdout), then what the columns mean and where steps came from."""
    from rich.markup import escape

    from hcdiag import render

    def sci(v) -> str:
        return "-" if v is None else f"{v:.2e}"

    def g(v) -> str:
        return "-" if v is None else f"{v:.6g}"

    t = render.Grid(f"HC diagnostics across {len(report.entries)} checkpoint(s), "
                    f"probe {escape(report.entries[0]['probe_description']) if report.entries else '-'}",
                    [(col, "left" if col in ("step from", "checkpoint") else "right")
                     for col in ("step", "step from", "row err (site)", "col err (site)", "G_f stack", "G_b stack",
                                 "sigma_2", "||F-J/n||", "logit range", "mean ||H-I||", "checkpoint")])
    for e in report.entries:
        m, w = e["metrics"], e["where"]
        t.add_row(str(e["step"]), escape(e["step_source"]),
                  f"{sci(m['row_err'])} {escape(w.get('row_err') or '')}",
                  f"{sci(m['col_err'])} {escape(w.get('col_err') or '')}",
                  g(m["gain_fwd"]), g(m["gain_bwd"]), g(m["sigma2"]), g(m["dist_uniform"]), g(m["logit_range"]),
                  g(m["dist_identity"]), escape(Path(e["path"]).name))
    t.show()
    render.dim("row / col err: worst max |sum - 1| over constrained sites and probe tokens; G_f / G_b stack: gains "
               "of the whole stack H_L...H_1 (gain-sweep --from's last / first site); sigma_2 and ||F-J/n||: of "
               "that composite (both -> 0: stream collapse); mean ||H-I||: over sites and tokens")
    if report.entries:
        s = report.entries[0]["settings"]
        for key in ("convention", "iters", "eps"):
            if key in s:
                render.dim(f"{key}: {s[key]['value']} (from {s[key]['source']})")
    for note in report.notes:
        render.dim(note)
    render.dim(f"{report.analysed} analysed, {report.cached} from the cache"
               + (f" ({report.cache_path})" if report.cache_path else "") + f"; {report.elapsed_s:.2f} s")


@app.command(
    "track",
    epilog="Examples:\n\n"
    "    hcdiag track runs/my_run/ -o track-out\n\n"
    "    hcdiag track 'ckpts/ckpt_*.pt' --jobs 4 --plot\n\n"
    "    hcdiag track runs/lightning/checkpoints/ --probe random --tokens 64 --json > track.json\n\n" + EPILOG_EXIT,
)
def track_cmd(
    ctx: typer.Context,
    runs: Annotated[list[str], typer.Argument(
        metavar="RUN...", help="Run directories (checkpoint-STEP/ subdirectories, *.ckpt / *.pt / *.safetensors "
        "files), checkpoints, or quoted globs.")],
    probe: Annotated[Probe, typer.Option("--probe", help="Stream inputs: static (x = 0) or random.")]
    = Probe.STATIC,
    tokens: Annotated[int, typer.Option("--tokens", help="Synthetic tokens for --probe random.", min=1)] = 256,
    seed: Annotated[int, typer.Option("--seed", help="Seed for --probe random.")] = 0,
    iters: IterOpt = None,
    convention: ConvOpt = None,
    dtype: Annotated[DType, typer.Option("--dtype", help="Precision of the computation.")] = DType.FLOAT64,
    tol: Annotated[float, typer.Option("--tol", help="Tolerance for the per-site verdicts (as in stochasticity).")]
    = 1e-6,
    jobs: Annotated[int, typer.Option("--jobs", "-j", min=1, help="Checkpoints analysed in parallel processes.")]
    = 1,
    cache: Annotated[Path | None, typer.Option(
        "--cache", help="Cache file of analysed checkpoints (default: track-cache.json in --output-dir, or in the "
        "--plot directory; none without either).")] = None,
    cache_in_checkpoint: Annotated[bool, typer.Option(
        "--cache-in-checkpoint", help="Allow --cache inside a checkpoint directory.")] = False,
    as_json: JsonOpt = False,
    csv_path: CsvOpt = None,
    output_dir: PlotOutDirOpt = None,
    plot: PlotOpt = False,
    fig_format: FigFormatOpt = FigFormat.PNG,
    fig_size: FigSizeOpt = None,
    layout: LayoutOpt = None,
    layout_file: LayoutFileOpt = None,
    state_key: StateKeyOpt = None,
    trust_pickle: TrustOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """HC diagnostics of every checkpoint of a training run, one row per checkpoint, in step order."""
    _stdout_check(as_json, csv_path)
    _quiet(quiet)
    _refuse_fig_without_plot(ctx, plot)
    from hcdiag.track import CACHE_NAME, plot_track, track_run

    if probe == Probe.ACTIVATIONS:
        raise UsageError("--probe activations belongs to one checkpoint; track a run with --probe static or random",
                         "--probe")
    if cache is None and (output_dir is not None or plot):
        cache = (output_dir or Path("hcdiag-out")) / CACHE_NAME

    def progress(label: str, done: int, total: int) -> None:
        if not quiet:
            _stderr(f"hcdiag: track [{done}/{total}] {label}")

    report = track_run(runs, probe=probe, tokens=tokens, seed=seed, iters=iters, convention=convention,
                       dtype=dtype, tol=tol, layout=layout, layout_file=str(layout_file) if layout_file else None,
                       state_key=state_key, trust_pickle=trust_pickle, cache=cache,
                       cache_in_checkpoint=cache_in_checkpoint, jobs=jobs, progress=progress)
    doc = report.to_dict()
    if plot:
        _plots(plot_track, report, output_dir, doc, fig_format, fig_size)
    if not _outputs(doc, report.csv_rows(), name="track", as_json=as_json, csv_path=csv_path,
                    output_dir=output_dir):
        _track_table(report)


# ---------------------------------------------------------------------------------------------------- variants


@app.command("variants", epilog="Example:\n\n    hcdiag variants\n\n" + EPILOG_EXIT)
def variants_cmd(
    as_json: JsonOpt = False,
    csv_path: CsvOpt = None,
    output_dir: OutDirOpt = None,
    quiet: QuietOpt = False,
) -> None:
    """List the variants hcdiag knows, whether their H_res is exact, and how they grow."""
    from hcdiag import registry, render

    _stdout_check(as_json, csv_path)
    _quiet(quiet)
    specs = registry.specs()
    rows = [{"name": s.name, "exactness": str(s.exactness), "growth": s.growth, "summary": s.summary} for s in specs]
    doc = {"schema_version": 1, "command": "variants", "variants": rows}
    if not _outputs(doc, rows, name="variants", as_json=as_json, csv_path=csv_path, output_dir=output_dir):
        render.variants(specs)


# -------------------------------------------------------------------------------------------------------- main


def _click_exceptions() -> list:
    """Typer >= 0.29 vendors click as ``typer._click``; older Typer uses click itself. Catch both."""
    mods = []
    try:
        import typer._click.exceptions as vendored

        mods.append(vendored)
    except ImportError:
        pass
    try:
        import click.exceptions as upstream

        mods.append(upstream)
    except ImportError:
        pass
    return mods


def main(argv: list[str] | None = None) -> None:
    """Entry point: run the app, turn every expected failure into one stderr line and an exit status."""
    command = typer.main.get_command(app)
    _flags_without_metavar(command)
    mods = _click_exceptions()
    no_args = tuple(m.NoArgsIsHelpError for m in mods if hasattr(m, "NoArgsIsHelpError"))
    # an exception tuple may be empty; then the clause never matches
    usage = tuple(m.UsageError for m in mods)
    click_exc = tuple(m.ClickException for m in mods)
    abort = tuple(m.Abort for m in mods if hasattr(m, "Abort"))
    try:
        with warnings.catch_warnings():
            warnings.showwarning = _foreign_warning  # restored on leaving the block
            rc = command.main(args=argv, prog_name="hcdiag", standalone_mode=False)
    except HcdiagError as exc:
        _debug_traceback(exc)
        _stderr(f"hcdiag: error: {exc}")
        sys.exit(exc.exit_code)
    except no_args:
        sys.exit(2)  # the help text has been printed already
    except usage as exc:
        _debug_traceback(exc)
        hint = ""
        if exc.ctx is not None:
            hint = f"; see `{exc.ctx.command_path} --help`"
        _stderr(f"hcdiag: error: {_one_line(exc.format_message())}{hint}")
        sys.exit(2)
    except click_exc as exc:
        _debug_traceback(exc)
        _stderr(f"hcdiag: error: {_one_line(exc.format_message())}")
        sys.exit(exc.exit_code)
    except (*abort, KeyboardInterrupt) as exc:
        _debug_traceback(exc)
        _stderr("hcdiag: interrupted")
        sys.exit(130)
    except BrokenPipeError:
        sys.exit(0)
    except Exception as exc:  # noqa: BLE001 - not an input hcdiag recognised as bad: hcdiag's own bug
        _debug_traceback(exc)
        if is_out_of_memory(exc):  # neither a bad input nor a wrong result: say what ran out
            _stderr(f"hcdiag: error: out of memory ({type(exc).__name__}); fewer --tokens / --seeds / --layers "
                    "need less, or run on a machine with more; rerun with HCDIAG_DEBUG=1 for the traceback")
            sys.exit(4)
        # readers raise InputError (exit 3) for every bad file they recognise; anything else is exit 4
        msg = _one_line(str(exc))[:300]
        what = f"{type(exc).__name__}: {msg}" if msg else type(exc).__name__
        _stderr(f"hcdiag: internal error: {what}; rerun with HCDIAG_DEBUG=1 for the traceback")
        sys.exit(4)
    if rc == 130:  # typer turns KeyboardInterrupt into Exit(130), which click returns without a word
        _stderr("hcdiag: interrupted")
    sys.exit(rc if isinstance(rc, int) else 0)


def _foreign_warning(message, category, filename, lineno, file=None, line=None) -> None:  # noqa: ANN001
    """Another library's warning (torch, safetensors, matplotlib) as one hcdiag line, not a source excerpt."""
    text = _one_line(str(message)).split(" (Triggered internally")[0]
    _stderr(f"hcdiag: warning: {category.__name__}: {text[:300]}")


def _flags_without_metavar(command) -> None:
    """Typer >= 0.29 writes a ``<bool>`` type after every flag in --help; a flag takes no value, so show none.
    Covers each command's own flags and the --help / completion options Typer adds."""
    names = command.context_settings.get("help_option_names")  # the help option is built (and cached) once
    for cmd in (command, *getattr(command, "commands", {}).values()):
        help_opt = cmd.get_help_option(typer.Context(cmd, info_name=cmd.name, help_option_names=names))
        for param in (*cmd.params, *([help_opt] if help_opt is not None else [])):
            if getattr(param, "is_flag", False) and not getattr(param, "count", False):
                param.metavar = ""


def _debug_traceback(exc: BaseException) -> None:
    """With HCDIAG_DEBUG set, print ``exc``'s traceback on stderr, including the exception a reader caught and
    turned into an InputError (``raise ... from None`` hides it otherwise)."""
    if not os.environ.get("HCDIAG_DEBUG"):
        return
    import traceback

    exc.__suppress_context__ = False
    traceback.print_exception(exc, file=sys.stderr)


def _one_line(text: str) -> str:
    return " ".join(text.split())

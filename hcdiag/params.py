"""Parameter cost of each HC variant per site and per model, against a plain transformer (SPEC section 5).

Dimension letters: n streams, C width of one stream, B blocks (``layers``), sites = 2B (attention + FFN).
Counts are exact Python ints from each variant's closed form (:meth:`VariantSpec.param_count`); nothing is
allocated, so mHC-lite at n = 12 (12! permutations) is counted, not built.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from hcdiag import registry
from hcdiag.enums import Exactness, Form
from hcdiag.errors import UsageError
from hcdiag.registry import ParamCount, check_form, check_int

__all__ = ["BASELINE", "Counts", "ParamsInputs", "ParamsReport", "ParamsRow", "compute_params"]

#: What ``overhead`` is measured against.
BASELINE = (
    "plain pre-norm transformer block: 12 C^2 weights (attention Q, K, V, O: 4 C^2; FFN with 4C hidden: "
    "8 C^2; no biases, norms or embeddings); overhead = per_model / (12 C^2 x layers)"
)


#: The count fields that :class:`Counts` and :class:`ParamsRow` share, in their JSON order.
COUNT_FIELDS = ("pre", "post", "res", "norm", "per_site", "per_model", "overhead")


@dataclass(frozen=True)
class Counts:
    """One set of counts: per site by part, per site total, per model (x 2 x layers) and the overhead."""

    pre: int
    post: int
    res: int
    norm: int
    per_site: int
    per_model: int
    overhead: float  # per_model / (12 C^2 layers)

    @classmethod
    def of(cls, pc: ParamCount, sites: int, baseline: int) -> Counts:
        per_model = pc.total * sites
        return cls(pc.pre, pc.post, pc.res, pc.norm, pc.total, per_model, per_model / baseline)

    def to_dict(self) -> dict[str, Any]:
        return {f: getattr(self, f) for f in COUNT_FIELDS}


@dataclass(frozen=True)
class ParamsRow:
    """One variant. The count fields are the allocated parameters; ``effective`` (TBP-mHC only) counts the
    entries its forward pass uses. ``kron_factors``: the factorisation counted (KromHC only)."""

    variant: str
    exactness: Exactness
    growth: str
    pre: int
    post: int
    res: int
    norm: int
    per_site: int
    per_model: int
    overhead: float
    practical: bool
    notes: tuple[str, ...] = ()
    effective: Counts | None = None
    kron_factors: tuple[int, ...] | None = None

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "variant": self.variant,
            "exactness": self.exactness.value,
            "growth": self.growth,
            **{f: getattr(self, f) for f in COUNT_FIELDS},
            "practical": self.practical,
            "notes": list(self.notes),
            "effective": None if self.effective is None else self.effective.to_dict(),
            "kron_factors": None if self.kron_factors is None else list(self.kron_factors),
        }
        return d


@dataclass(frozen=True)
class ParamsInputs:
    n: int
    C: int
    layers: int
    form: Form
    sites: int  # 2 x layers: attention and FFN site of every block (SPEC section 1)
    baseline_params: int  # 12 C^2 x layers

    def to_dict(self) -> dict[str, Any]:
        return {
            "n": self.n,
            "C": self.C,
            "layers": self.layers,
            "form": self.form.value,
            "sites": self.sites,
            "baseline_params": self.baseline_params,
        }


@dataclass(frozen=True)
class ParamsReport:
    """Result of :func:`compute_params`: inputs, one row per variant, and what overhead is relative to."""

    inputs: ParamsInputs
    rows: tuple[ParamsRow, ...]
    baseline: str = BASELINE

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: ints stay ints (exact even past 2^53), enums become their string values."""
        return {
            "schema_version": 1,
            "command": "params",
            "inputs": self.inputs.to_dict(),
            "baseline": self.baseline,
            "rows": [r.to_dict() for r in self.rows],
        }


def compute_params(
    n: int,
    C: int,
    *,
    layers: int = 1,
    variants: list[str] | None = None,
    form: Form = Form.CODE,
    kron_factors: tuple[int, ...] | None = None,
) -> ParamsReport:
    """Per-site and per-model parameter counts of each variant (SPEC section 5).

    n streams, C stream width, layers = transformer blocks (2 sites each). variants: registry names (default:
    all, in display order). form: CODE counts the RMSNorm gain (nC per site), PAPER does not (mHC Eqs. 7-9).
    kron_factors: KromHC factor sizes (product n); when None KromHC uses the prime factorisation of n.
    Raises UsageError naming the option (``--n``, ``--C``, ``--layers``, ``--variants``, ``--kron-factors``,
    ``--form``).
    """
    n = check_int(n, "--n", "stream count n", 1)
    C = check_int(C, "--C", "stream width C", 1)
    layers = check_int(layers, "--layers", "transformer blocks", 1)
    form = check_form(form)
    if variants is None:
        specs = list(registry.specs())
    else:
        if not variants:
            raise UsageError("--variants is empty; name at least one, e.g. mhc", option="--variants")
        specs = []
        for name in dict.fromkeys(variants):  # de-duplicate, keep order
            specs.append(registry.get(name, option="--variants"))
    if kron_factors is not None and not any(s.accepts_kron_factors for s in specs):
        raise UsageError(
            "--kron-factors applies only to kromhc; add kromhc to --variants or drop --kron-factors",
            option="--kron-factors",
        )

    sites = 2 * layers
    baseline = 12 * C * C * layers
    rows = []
    for spec in specs:
        kf = kron_factors if spec.accepts_kron_factors else None
        factors = spec.validate(n, C, kf)
        pc = spec.param_count(n, C, form, kron_factors=factors)
        c = Counts.of(pc, sites, baseline)
        rows.append(
            ParamsRow(
                variant=spec.name,
                exactness=spec.exactness,
                growth=spec.growth,
                pre=c.pre,
                post=c.post,
                res=c.res,
                norm=c.norm,
                per_site=c.per_site,
                per_model=c.per_model,
                overhead=c.overhead,
                practical=spec.practical(n, factors),
                notes=pc.notes,
                effective=None if pc.effective is None else Counts.of(pc.effective, sites, baseline),
                kron_factors=factors,
            )
        )
    inputs = ParamsInputs(n=n, C=C, layers=layers, form=form, sites=sites, baseline_params=baseline)
    return ParamsReport(inputs=inputs, rows=tuple(rows))

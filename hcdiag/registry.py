"""The registry of hyper-connection variants, keyed by stable names (``mhc``, ``mhc-lite``, ...).

Every variant is declared here once (:data:`_DECLARED`): name, one-line summary, exactness, growth, its closed-form
parameter count (:mod:`hcdiag.counts`) and the module that builds it. Describing and counting variants
(``hcdiag params``, ``hcdiag variants``) therefore imports neither torch nor numpy; only :meth:`VariantSpec.build`
and :attr:`VariantSpec.cls` import the variant's torch module, which binds its class with :func:`register`.
The CLI builds its choices and help text from :func:`specs`. Nothing dispatches on variant names.

Dimension letters: n streams, C width of one stream, S = sum_k i_k! (KromHC permutation logits).
Parameter counts (SPEC section 5) are exact Python ints computed from closed forms, never by allocating.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from hcdiag import counts
from hcdiag.counts import ParamCount
from hcdiag.enums import Exactness, Form
from hcdiag.errors import UsageError

if TYPE_CHECKING:
    import torch

    from hcdiag.variants._common import VariantModule

__all__ = [
    "BUILD_LIMIT_BYTES",
    "ParamCount",
    "check_form",
    "check_int",
    "VariantSpec",
    "get",
    "names",
    "parse_kron_factors",
    "register",
    "specs",
]

# Building refuses modules whose parameters alone would take more than this (mHC-lite at n = 8, C = 4096 needs
# 5.3 GB in float32); counting never allocates, and device="meta" builds without memory.
BUILD_LIMIT_BYTES = 2 * 1024**3

Factors = tuple[int, ...] | None
CountFn = Callable[[int, int, Form, Factors], ParamCount]


def check_int(value: object, option: str, what: str, minimum: int) -> int:
    """``value`` if it is an int >= minimum, else UsageError naming ``option`` (bool is refused)."""
    # bool is an int subclass; --n True is a caller bug, not n = 1
    if isinstance(value, bool) or not isinstance(value, int):
        raise UsageError(f"{option} must be an integer {what} >= {minimum}, got {value!r}", option=option)
    if value < minimum:
        raise UsageError(
            f"{option} {value} is out of range: {what} must be >= {minimum}; pass {option} {minimum} or more",
            option=option,
        )
    return value


def check_form(form: Form | str) -> Form:
    """``form`` as a :class:`Form`; UsageError naming ``--form`` otherwise."""
    try:
        return Form(form)
    except ValueError:
        known = ", ".join(f.value for f in Form)
        msg = f"--form {form!r} is not a parameter form; choose one of: {known}"
        raise UsageError(msg, option="--form") from None


def parse_kron_factors(text: str) -> tuple[int, ...]:
    """``"2,3"`` -> ``(2, 3)``. Range checks (each >= 2, product n) happen in :meth:`VariantSpec.validate`."""
    parts = [p.strip() for p in text.replace("x", ",").split(",") if p.strip()]
    try:
        factors = tuple(int(p) for p in parts)
    except ValueError:
        raise UsageError(
            f"--kron-factors {text!r} is not a list of integers; write them comma-separated, e.g. 2,2,2",
            option="--kron-factors",
        ) from None
    if not factors:
        raise UsageError("--kron-factors is empty; give factor sizes, e.g. 2,2,2", option="--kron-factors")
    return factors


def _always_practical(n: int, factors: Factors) -> bool:
    return True


@dataclass(frozen=True)
class VariantSpec:
    """One declared variant.

    name: stable key (CLI choice, JSON value). summary: one line for ``--help``. exactness: how exactly H_res
    lies on the Birkhoff polytope. growth: parameter growth of one site, e.g. ``"O(n^3 C)"``. count: the
    closed-form parameter count ``(n, C, form, factors) -> ParamCount``. module: ``"package.module:Class"``
    of the :class:`~hcdiag.variants._common.VariantModule` subclass that builds it (imported on first use).
    """

    name: str
    summary: str
    exactness: Exactness
    growth: str
    count: CountFn
    module: str
    accepts_kron_factors: bool = False
    practical_fn: Callable[[int, Factors], bool] = _always_practical
    order: int = 1000

    @property
    def cls(self) -> type[VariantModule]:
        """The module class (imports torch and the variant's module)."""
        importlib.import_module(self.module.partition(":")[0])  # its @register binds the class
        return _CLASSES[self.name]

    def resolve_factors(self, n: int, kron_factors: Factors) -> Factors:
        """KromHC: kron_factors checked, or the prime factorisation of n; others: None (refusing factors)."""
        if self.accepts_kron_factors:
            return counts.kromhc_factors(n, kron_factors)
        if kron_factors is not None:
            raise UsageError(f"--kron-factors applies only to kromhc, not {self.name}; drop --kron-factors",
                             option="--kron-factors")
        return None

    def validate(self, n: int, C: int, kron_factors: tuple[int, ...] | None = None) -> tuple[int, ...] | None:
        """Raise :class:`UsageError` naming the option and the fix; return the factorisation used (KromHC)."""
        check_int(n, "--n", "stream count n", 1)
        check_int(C, "--C", "stream width C", 1)
        return self.resolve_factors(n, kron_factors)

    def param_count(
        self, n: int, C: int, form: Form | str = Form.CODE, *, kron_factors: tuple[int, ...] | None = None
    ) -> ParamCount:
        """Exact parameter count of one site (Python ints; nothing is allocated)."""
        factors = self.validate(n, C, kron_factors)
        return self.count(n, C, check_form(form), factors)

    def practical(self, n: int, kron_factors: tuple[int, ...] | None = None) -> bool:
        """False where the variant is computable but not usable in practice (mHC-lite beyond n = 6)."""
        return self.practical_fn(n, self.resolve_factors(n, kron_factors))

    def build(
        self,
        n: int,
        C: int,
        *,
        layer_index: int = 0,
        form: Form | str = Form.CODE,
        kron_factors: tuple[int, ...] | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        max_bytes: int = BUILD_LIMIT_BYTES,
        **kw: Any,
    ) -> VariantModule:
        """A fresh site module at the variant's initialisation for site ``layer_index`` (0-based).

        ``device="meta"`` builds shapes only (for counting huge sizes); otherwise building refuses modules
        whose parameters exceed ``max_bytes``. Extra keywords go to the module (e.g. ``sinkhorn=`` for mhc).
        """
        import torch

        factors = self.validate(n, C, kron_factors)
        check_int(layer_index, "--layer-index", "site index", 0)
        form = check_form(form)
        if torch.device(device or "cpu").type != "meta":
            dt = dtype or torch.get_default_dtype()
            need = self.count(n, C, form, factors).total * torch.empty((), dtype=dt).element_size()
            if need > max_bytes:
                raise UsageError(
                    f"{self.name} at n = {n}, C = {C} needs {need / 1e9:.3g} GB of parameters "
                    f"(limit {max_bytes / 1e9:.3g} GB); use a smaller --n or --C, or build on device='meta'",
                    option="--n",
                )
        return self.cls(
            n, C, layer_index=layer_index, form=form, factors=factors, device=device, dtype=dtype, **kw
        )


#: Every variant, in display order. Adding a variant: one module under hcdiag/variants (its class decorated
#: with ``@register(name)``), its closed-form count in hcdiag/counts.py, and one entry here.
_DECLARED: tuple[VariantSpec, ...] = (
    VariantSpec("identity", "plain pre-norm residual: H_res = I, no parameters", Exactness.IDENTITY, "0",
                counts.identity, "hcdiag.variants.identity:IdentitySite", order=0),
    VariantSpec("hc-static", "static hyper-connections (HC Eq. 1): unconstrained learned H_res",
                Exactness.UNCONSTRAINED, "O(n^2)", counts.hc_static, "hcdiag.variants.hc_static:HCStatic",
                order=10),
    VariantSpec("hc-dynamic", "dynamic hyper-connections (HC Eqs. 10-13): token-dependent, unconstrained H_res",
                Exactness.UNCONSTRAINED, "O(nC)", counts.hc_dynamic, "hcdiag.variants.hc_dynamic:HCDynamic",
                order=20),
    VariantSpec("mhc", "mHC (mHC Eqs. 7-9): Sinkhorn-projected dynamic H_res, approximately doubly stochastic",
                Exactness.SINKHORN, "O(n^3 C)", counts.mhc, "hcdiag.variants.mhc:MHC", order=30),
    VariantSpec("mhc-lite", "mHC-lite: softmax-weighted sum of all n! permutations, exactly doubly stochastic",
                Exactness.EXACT, "O(n! nC)", counts.mhc_lite, "hcdiag.variants.mhc_lite:MHCLite",
                practical_fn=counts.mhc_lite_practical, order=40),
    VariantSpec("kromhc", "KromHC: Kronecker product of small mHC-lite factors, exactly doubly stochastic",
                Exactness.EXACT, "O(nC sum_k i_k!)", counts.kromhc, "hcdiag.variants.kromhc:KromHC",
                accepts_kron_factors=True, practical_fn=counts.kromhc_practical, order=50),
    VariantSpec("tbp", "TBP-mHC: transportation-polytope chart, exactly doubly stochastic from (n-1)^2 logits",
                Exactness.EXACT, "O(n^3 C)", counts.tbp, "hcdiag.variants.tbp:TBP", order=60),
    VariantSpec("ihc", "identity-residual HC: mHC's learned H_pre / H_post, H_res = I", Exactness.IDENTITY,
                "O(n^2 C)", counts.ihc, "hcdiag.variants.ihc:IHC", order=70),
)
_REGISTRY: dict[str, VariantSpec] = {s.name: s for s in _DECLARED}
_CLASSES: dict[str, type[VariantModule]] = {}


def register(name: str) -> Callable[[type[VariantModule]], type[VariantModule]]:
    """Class decorator: ``@register("mhc")`` binds a VariantModule subclass to its declared spec. Refuses
    names not declared in :data:`_DECLARED` and classes whose exactness or Kronecker factors disagree with it."""

    def deco(cls: type[VariantModule]) -> type[VariantModule]:
        spec = _REGISTRY.get(name)
        if spec is None:
            raise ValueError(f"variant {name!r} is not declared in hcdiag.registry._DECLARED; declare it there")
        if spec.module.partition(":")[2] != cls.__qualname__:
            raise ValueError(f"variant {name!r} is declared as {spec.module}, not {cls.__qualname__}")
        if cls.exactness != spec.exactness or cls.accepts_kron_factors != spec.accepts_kron_factors:
            raise ValueError(f"variant {name!r}: class {cls.__qualname__} disagrees with its declaration")
        cls.variant_name = name
        _CLASSES[name] = cls
        return cls

    return deco


def names() -> tuple[str, ...]:
    """Registered names in display order: identity, hc-static, hc-dynamic, mhc, mhc-lite, kromhc, tbp, ihc."""
    return tuple(s.name for s in specs())


def specs() -> tuple[VariantSpec, ...]:
    return tuple(sorted(_REGISTRY.values(), key=lambda s: (s.order, s.name)))


def get(name: str, *, option: str = "--variant") -> VariantSpec:
    """The spec declared as ``name``; UsageError listing the known names otherwise."""
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        known = ", ".join(names())
        msg = f"unknown variant {name!r} for {option}; choose one of: {known}"
        raise UsageError(msg, option=option) from None

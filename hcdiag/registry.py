"""The registry of hyper-connection variants, keyed by stable names (``mhc``, ``mhc-lite``, ...).

Each variant module in :mod:`hcdiag.variants` registers its :class:`~hcdiag.site.SiteModule` subclass with
:func:`register`; the CLI builds its choices and help text from :func:`specs`. Nothing dispatches on variant
names: a :class:`VariantSpec` delegates to class methods of the registered module.

Dimension letters: n streams, C width of one stream, S = sum_k i_k! (KromHC permutation logits).
Parameter counts (SPEC section 5) are exact Python ints computed from closed forms, never by allocating.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from hcdiag.enums import Exactness, Form
from hcdiag.errors import UsageError

if TYPE_CHECKING:
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


@dataclass(frozen=True)
class ParamCount:
    """Parameters of one HC site, split by what they produce (SPEC section 5).

    pre / post / res: projection + bias + scale(s) of H_pre, H_post, H_res; norm: RMSNorm gain (nC in code
    form, 0 in paper form). ``effective`` (TBP-mHC only): the entries the forward pass actually uses, where
    the module allocates more. ``notes``: one-line remarks (shared parameters, factorisation used, ...).
    """

    pre: int
    post: int
    res: int
    norm: int
    effective: ParamCount | None = None
    notes: tuple[str, ...] = ()

    @property
    def total(self) -> int:
        return self.pre + self.post + self.res + self.norm

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "pre": self.pre,
            "post": self.post,
            "res": self.res,
            "norm": self.norm,
            "total": self.total,
        }
        if self.effective is not None:
            d["effective"] = self.effective.to_dict()
        if self.notes:
            d["notes"] = list(self.notes)
        return d


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


@dataclass(frozen=True)
class VariantSpec:
    """One registered variant.

    name: stable key (CLI choice, JSON value). summary: one line for ``--help``. exactness: how exactly H_res
    lies on the Birkhoff polytope. growth: parameter growth of one site, e.g. ``"O(n^3 C)"``.
    cls: the :class:`~hcdiag.variants._common.VariantModule` subclass that builds and counts it.
    """

    name: str
    summary: str
    exactness: Exactness
    growth: str
    cls: type[VariantModule]

    @property
    def accepts_kron_factors(self) -> bool:
        return self.cls.accepts_kron_factors

    def validate(self, n: int, C: int, kron_factors: tuple[int, ...] | None = None) -> tuple[int, ...] | None:
        """Raise :class:`UsageError` naming the option and the fix; return the factorisation used (KromHC)."""
        check_int(n, "--n", "stream count n", 1)
        check_int(C, "--C", "stream width C", 1)
        return self.cls.resolve_factors(n, kron_factors)

    def param_count(
        self, n: int, C: int, form: Form | str = Form.CODE, *, kron_factors: tuple[int, ...] | None = None
    ) -> ParamCount:
        """Exact parameter count of one site (Python ints; nothing is allocated)."""
        factors = self.validate(n, C, kron_factors)
        return self.cls.count(n, C, check_form(form), factors)

    def practical(self, n: int, kron_factors: tuple[int, ...] | None = None) -> bool:
        """False where the variant is computable but not usable in practice (mHC-lite beyond n = 6)."""
        factors = self.cls.resolve_factors(n, kron_factors)
        return self.cls.practical(n, factors)

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
        factors = self.validate(n, C, kron_factors)
        check_int(layer_index, "--layer-index", "site index", 0)
        form = check_form(form)
        if torch.device(device or "cpu").type != "meta":
            dt = dtype or torch.get_default_dtype()
            need = self.cls.count(n, C, form, factors).total * torch.empty((), dtype=dt).element_size()
            if need > max_bytes:
                raise UsageError(
                    f"{self.name} at n = {n}, C = {C} needs {need / 1e9:.3g} GB of parameters "
                    f"(limit {max_bytes / 1e9:.3g} GB); use a smaller --n or --C, or build on device='meta'",
                    option="--n",
                )
        return self.cls(
            n, C, layer_index=layer_index, form=form, factors=factors, device=device, dtype=dtype, **kw
        )


_REGISTRY: dict[str, VariantSpec] = {}
_ORDER: dict[str, int] = {}


def register(
    name: str, *, summary: str, growth: str, order: int = 1000
) -> Callable[[type[VariantModule]], type[VariantModule]]:
    """Class decorator: ``@register("mhc", summary=..., growth="O(n^3 C)", order=30)`` on a VariantModule
    subclass. ``order`` sets the display order of :func:`names` / :func:`specs` (ties: by name)."""

    def deco(cls: type[VariantModule]) -> type[VariantModule]:
        old = _REGISTRY.get(name)
        if old is not None and old.cls.__qualname__ != cls.__qualname__:
            raise ValueError(f"variant {name!r} registered twice: {old.cls.__qualname__}, {cls.__qualname__}")
        cls.variant_name = name
        _REGISTRY[name] = VariantSpec(name, summary, cls.exactness, growth, cls)
        _ORDER[name] = order
        return cls

    return deco


def _load_all() -> None:
    # importing the package registers every variant module (hcdiag/variants/__init__.py)
    import hcdiag.variants  # noqa: F401


def names() -> tuple[str, ...]:
    """Registered names in display order: identity, hc-static, hc-dynamic, mhc, mhc-lite, kromhc, tbp, ihc."""
    return tuple(s.name for s in specs())


def specs() -> tuple[VariantSpec, ...]:
    _load_all()
    return tuple(sorted(_REGISTRY.values(), key=lambda s: (_ORDER[s.name], s.name)))


def get(name: str, *, option: str = "--variant") -> VariantSpec:
    """The spec registered as ``name``; UsageError listing the known names otherwise."""
    _load_all()
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        known = ", ".join(names())
        msg = f"unknown variant {name!r} for {option}; choose one of: {known}"
        raise UsageError(msg, option=option) from None

"""Identifying a native site without metadata: the registry variant, form, n and C whose freshly built module
(on the meta device: no memory) has exactly the site's key set and shapes (docs/native-layout.md).

Dimension letters: n streams, C width of one stream.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from hcdiag.enums import Form
from hcdiag.errors import InputError
from hcdiag.io.native_format import PREFIX
from hcdiag.model import TensorInfo

__all__ = ["SiteMatch", "fitting_form", "identify_all", "identify_site", "meta_shapes"]

# Identification without metadata: largest n tried, and a cap on candidate builds per site signature.
_MAX_N = 16
_MAX_LITE_N = 8  # variants impractical at n (mHC-lite: n! permutations) are tried only up to this n


@dataclass(frozen=True)
class SiteMatch:
    """A registry variant whose state_dict has exactly a site's keys and shapes."""

    variant: str
    form: Form
    n: int
    C: int
    kron_factors: tuple[int, ...] | None = None


def meta_shapes(
    variant: str, n: int, C: int, form: Form, factors: tuple[int, ...] | None, cache: dict
) -> dict[str, tuple[int, ...]] | None:
    """state_dict shapes of ``variant`` built on the meta device (no memory), or None if it cannot be "
    "built."""
    key = (variant, n, C, form, factors)
    if key not in cache:
        from hcdiag import registry

        try:
            m = registry.get(variant).build(n, C, form=form, kron_factors=factors, device="meta")
            cache[key] = {k: tuple(v.shape) for k, v in m.state_dict().items()}
        except ValueError:  # UsageError: a variant that cannot take these sizes simply does not match
            cache[key] = None
    return cache[key]


def _candidate_sizes(shapes: Mapping[str, tuple[int, ...]]) -> list[tuple[int, int]]:
    """(n, C) pairs worth trying: n among the stored dims (<= 16), C among dims / 1, n, n^2."""
    dims = sorted({d for s in shapes.values() for d in s if d > 0})
    ns = [d for d in dims if 2 <= d <= _MAX_N] or [1]
    pairs: list[tuple[int, int]] = []
    for n in ns:
        cs = set()
        for d in dims:
            for div in (1, n, n * n):
                if d % div == 0:
                    cs.add(d // div)
        pairs.extend((n, c) for c in sorted(cs) if c >= 1)
    return pairs


def _practical(spec: Any, n: int) -> bool:
    try:
        return bool(spec.practical(n))
    except ValueError:  # UsageError: a size the variant rejects is simply not a candidate
        return False


def identify_site(
    shapes: Mapping[str, tuple[int, ...]],
    *,
    variants: Sequence[str] | None = None,
    n: int | None = None,
    C: int | None = None,
    cache: dict | None = None,
) -> list[SiteMatch]:
    """Every (variant, form, n, C) whose freshly built module has exactly ``shapes`` as its state_dict.

    shapes: param name (without ``hc.sites.{i}.``) -> shape. Rule (docs/native-layout.md): candidate n are
    the stored dims in 2..16, candidate C the stored dims divided by 1, n or n^2; each registry variant is
    built on the meta device in both forms (KromHC with its default prime factorisation) and matches when its
    key set and every shape agree. ``n`` / ``C`` restrict the search when known.
    """
    from hcdiag import registry

    cache = {} if cache is None else cache
    names = list(variants) if variants is not None else list(registry.names())
    pairs = _candidate_sizes(shapes)
    if n is not None:
        pairs = [(nn_, c) for nn_, c in pairs if nn_ == n] or [(n, C or 1)]
    if C is not None:
        pairs = [(nn_, c) for nn_, c in pairs if c == C] or [(n or 1, C)]
    want = dict(shapes)
    found: list[SiteMatch] = []
    for name in names:
        spec = registry.get(name)
        for nn_, c in pairs:
            if nn_ > _MAX_LITE_N and not _practical(spec, nn_):
                continue  # mHC-lite past n = 8: building would enumerate n! permutations
            for form in (Form.CODE, Form.PAPER):
                got = meta_shapes(name, nn_, c, form, None, cache)
                if got is not None and got == want:
                    factors = None
                    if spec.accepts_kron_factors:
                        factors = spec.validate(nn_, c, None)
                    found.append(SiteMatch(name, form, nn_, c, factors))
    return found


def identify_all(
    sites: Mapping[int, Mapping[str, TensorInfo]],
    variant: str | None,
    n: int | None,
    C: int | None,
    form: Form | None,
    path: str,
    prefix: str,
) -> dict[int, SiteMatch]:
    """One SiteMatch per stored site, all with the same n and C (files without complete metadata)."""
    cache: dict = {}
    cands: dict[int, list[SiteMatch]] = {}
    by_sig: dict[tuple, list[SiteMatch]] = {}
    for i, infos in sorted(sites.items()):
        shapes = {p: tuple(t.shape) for p, t in infos.items()}
        sig = tuple(sorted(shapes.items()))
        if sig not in by_sig:
            found = identify_site(shapes, variants=[variant] if variant else None, n=n, C=C, cache=cache)
            found = [m for m in found if form is None or m.form is form]
            # same key set in both forms (hc-static, hc-dynamic): the form is moot, keep code
            both = {(m.variant, m.n, m.C) for m in found if m.form is Form.PAPER} & {
                (m.variant, m.n, m.C) for m in found if m.form is Form.CODE
            }
            by_sig[sig] = [m for m in found if not ((m.variant, m.n, m.C) in both and m.form is Form.PAPER)]
        cands[i] = by_sig[sig]
        if not cands[i]:
            keys = ", ".join(f"{p}{list(s)}" for p, s in sorted(shapes.items()))
            raise InputError(
                f"site {prefix}{PREFIX}{i}.* in {path} ({keys}) matches no registry variant at any n <= "
                f"{_MAX_N}; "
                "add hcdiag metadata (variant, n, C) to the file or a .json sidecar",
                path=path,
            )
    # n and C are one per model: keep the sizes every site admits
    common = set.intersection(*[{(m.n, m.C) for m in found} for found in cands.values()])
    if not common:
        raise InputError(
            f"the sites in {path} fit no single n and C; add hcdiag metadata (variant, n, C) to the file",
            path=path,
        )
    out: dict[int, SiteMatch] = {}
    for i, found in cands.items():
        found = [m for m in found if (m.n, m.C) in common]
        if len(found) != 1:
            shown = "; ".join(f"{m.variant} form={m.form.value} n={m.n} C={m.C}" for m in found[:6])
            raise InputError(
                f"site {prefix}{PREFIX}{i}.* in {path} fits several variants/sizes ({shown}); add hcdiag "
                "metadata (variant, n, C, form) to the file or a .json sidecar",
                path=path,
            )
        out[i] = found[0]
    return out


def fitting_form(
    variant: str, n: int, C: int, factors: tuple[int, ...] | None, infos: Mapping[int, Mapping[str, TensorInfo]]
) -> tuple[Form, str]:
    """No form in the metadata: the one whose keys fit (paper form has no norm_weight); code if both."""
    stored = next((site for site in infos.values() if site), None)
    if stored is not None:
        have = {p: tuple(t.shape) for p, t in stored.items()}
        for f in (Form.CODE, Form.PAPER):
            got = meta_shapes(variant, n, C, f, factors, {})
            if got is not None and got == have:
                return f, "inferred"
    return Form.CODE, "default"

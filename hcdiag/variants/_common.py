"""Pieces shared by the variant modules: the base class, mHC-style H_pre / H_post, permutations, Kronecker.

Dimension letters: n streams, C width of one stream, ... any leading (token / batch) dims, k permutations.
All outputs are in paper convention (SPEC section 1): row i of H_res says how output stream i is made.
"""

from __future__ import annotations

import functools
import itertools
import math
from typing import ClassVar

import torch
from torch import nn

from hcdiag.enums import Form
from hcdiag.errors import UsageError
from hcdiag.site import HCOutput, SiteModule, rms_norm

__all__ = [
    "MHCPrePost",
    "MHCResSite",
    "VariantModule",
    "batched_kron",
    "bvn_matrices",
]

PERTURB_PARTS = ("res", "pre", "post", "dynamic")


@functools.lru_cache(maxsize=32)
def bvn_matrices(
    n: int, dtype: torch.dtype = torch.float64, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """The n! permutation matrices [n!, n, n], paper orientation, itertools.permutations order (0 = identity).

    The reference code (mhc-lite, KromHC ``get_all_permutations``) builds P_k = eye[perm_k], i.e.
    P_k[i, perm_k[i]] = 1, and uses it as alpha[input, output]; in paper orientation that is
    Q_k = P_k^T: Q_k[perm_k[i], i] = 1 (permutation k sends input stream i to output stream perm_k[i]).
    Cached; treat the result as read-only.
    """
    perms = torch.tensor(list(itertools.permutations(range(n))), dtype=torch.long).reshape(-1, n)
    P = torch.eye(n, dtype=dtype)[perms]  # [n!, n, n], P[k, i, perm_k[i]] = 1
    return P.transpose(-1, -2).contiguous().to(device)


def batched_kron(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """Kronecker product over the last two dims: [..., a, b] (x) [..., c, d] -> [..., ac, bd] (leading dims
    broadcast). Matches torch.kron per matrix."""
    a, b = A.shape[-2:]
    c, d = B.shape[-2:]
    out = A[..., :, None, :, None] * B[..., None, :, None, :]
    return out.reshape(*out.shape[:-4], a * c, b * d)


class VariantModule(SiteModule):
    """Base of every registered variant. Subclasses implement the forward pass; their parameter counts are the
    closed forms in :mod:`hcdiag.counts`, declared with the variant in :mod:`hcdiag.registry`.

    Constructor keywords (all variants): layer_index (site index k, 0-based: picks the stream that H_pre
    starts on), form (:class:`Form`: CODE adds an RMSNorm gain of nC entries), factors (KromHC only),
    device / dtype of the parameters, norm_eps.
    """

    variant_name: ClassVar[str] = ""
    accepts_kron_factors: ClassVar[bool] = False

    def __init__(
        self,
        n: int,
        C: int,
        *,
        layer_index: int = 0,
        form: Form = Form.CODE,
        factors: tuple[int, ...] | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        norm_eps: float = 1e-6,
    ) -> None:
        super().__init__()
        self.n = n
        self.C = C
        self.layer_index = layer_index
        self.form = Form(form)
        self.norm_eps = norm_eps
        self._device = device
        self._dtype = dtype if dtype is not None else torch.get_default_dtype()

    # ---- helpers -------------------------------------------------------------------------------------------

    def _param(self, init: torch.Tensor) -> nn.Parameter:
        """A parameter holding ``init`` (built on CPU in float64) on this module's device / dtype."""
        return nn.Parameter(init.to(device=self._device, dtype=self._dtype))

    def _zeros(self, *shape: int) -> nn.Parameter:
        return nn.Parameter(torch.zeros(shape, device=self._device, dtype=self._dtype))

    def _scalar(self, value: float) -> nn.Parameter:
        return nn.Parameter(torch.full((), value, device=self._device, dtype=self._dtype))

    def _input(self, x: torch.Tensor) -> torch.Tensor:
        """Check x is [..., n, C] and cast it to the parameters' dtype."""
        if x.ndim < 2 or tuple(x.shape[-2:]) != (self.n, self.C):
            raise UsageError(
                f"{self.variant_name} site expects x of shape [..., n={self.n}, C={self.C}], got "
                f"{tuple(x.shape)}; pass the stream tensor with streams in dim -2 and width in dim -1"
            )
        # the parameters' current dtype, not the one built with: .double() / .to() / in_dtype() must keep
        # forward working; a module without parameters (identity) computes in the input's own dtype
        p = next(self.parameters(), None)
        if p is not None:
            return x.to(p.dtype)
        return x if x.is_floating_point() else x.to(self._dtype)

    def _eye(self, lead: torch.Size, like: torch.Tensor) -> torch.Tensor:
        return torch.eye(self.n, dtype=like.dtype, device=like.device).expand(*lead, self.n, self.n)

    def _one_hot_logits(self) -> torch.Tensor:
        """-1 everywhere, +1 at stream k mod n: static H_pre / H_post logits of the reference code
        (KromHC repo ``hyper_conn/mhc.py``, ``mhc_lite.py``, tbp-mHC ``tbp_mhc.py``: ``init_alpha0``,
        ``beta_init``). H_pre starts at sigma(+-1) = 0.731 / 0.269, H_post at 1.462 / 0.538."""
        b = -torch.ones(self.n, dtype=torch.float64)
        b[self.layer_index % self.n] = 1.0
        return b

    # ---- perturbation --------------------------------------------------------------------------------------

    def _perturb_targets(self) -> dict[str, list[tuple[nn.Parameter, float]]]:
        """part -> [(parameter, std multiplier)]: 1 for static parts, 1/sqrt(fan_in) for projections."""
        return {}

    @torch.no_grad()
    def perturb_(
        self,
        scale: float,
        generator: torch.Generator | None = None,
        *,
        parts: tuple[str, ...] | list[str] = ("res",),
    ) -> VariantModule:
        """Add seeded Gaussian noise around the current (initial) parameters, in place; returns self.

        parts: ``"res"`` adds N(0, scale^2) to the static H_res logits / weights (mhc: b_res [n, n];
        mhc-lite / kromhc: the permutation-logit biases; tbp: the chart-logit bias; hc-static / hc-dynamic:
        A_r, i.e. H_res^T itself; identity / ihc: nothing, H_res = I is fixed). ``"pre"`` / ``"post"``: the
        static H_pre / H_post logits (A_m / B for HC). ``"dynamic"``: N(0, (scale / sqrt(fan_in))^2) on the
        token projections, so for a unit-RMS normalised input each dynamic logit moves by about a * scale
        (a = the variant's scale parameter, 0.01 at init; hc-dynamic: s_a, s_b).
        Noise is drawn on the CPU from ``generator`` (float64) so results do not depend on the device.
        """
        bad = [p for p in parts if p not in PERTURB_PARTS]
        if bad:
            known = ", ".join(PERTURB_PARTS)
            raise UsageError(f"perturb part {bad[0]!r} is unknown; choose from: {known}", option="--perturb")
        targets = self._perturb_targets()
        for part in parts:
            for p, mult in targets.get(part, []):
                if p.device.type == "meta":
                    continue
                noise = torch.randn(p.shape, generator=generator, dtype=torch.float64)
                p.add_((noise * (scale * mult)).to(device=p.device, dtype=p.dtype))
        return self


class MHCPrePost(VariantModule):
    """mHC-style H_pre / H_post on the flattened, RMS-normalised streams (mHC Eqs. 7-8).

    x' = RMSNorm(vec(x)) [..., nC] (gain ``norm_weight`` [nC] in code form; the reference code's
    ``norm.gamma`` is stored there as gamma + 1), H_pre = sigma(a_pre x' phi_pre + b_pre),
    H_post = 2 sigma(a_post x' phi_post + b_post); phi_* [nC, n] init 0, a_* init 0.01, b_* = -1 / +1 at k.
    """

    def _init_pre_post(self) -> None:
        nC = self.n * self.C
        self.phi_pre = self._zeros(nC, self.n)
        self.phi_post = self._zeros(nC, self.n)
        self.b_pre = self._param(self._one_hot_logits())
        self.b_post = self._param(self._one_hot_logits())
        self.a_pre = self._scalar(0.01)
        self.a_post = self._scalar(0.01)
        self.norm_weight: nn.Parameter | None = None
        if self.form is Form.CODE:
            self.norm_weight = self._param(torch.ones(nC, dtype=torch.float64))

    def _normed(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., n, C] -> x' [..., nC] (mHC Eq. 7)."""
        x = self._input(x)
        return rms_norm(x.flatten(-2), self.norm_weight, self.norm_eps)

    def _pre_post(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x' [..., nC] -> H_pre [..., n], H_post [..., n] (mHC Eq. 8)."""
        pre = torch.sigmoid(self.a_pre * (h @ self.phi_pre) + self.b_pre)
        post = 2.0 * torch.sigmoid(self.a_post * (h @ self.phi_post) + self.b_post)
        return pre, post

    def _pre_post_targets(self) -> dict[str, list[tuple[nn.Parameter, float]]]:
        fan = 1.0 / math.sqrt(self.n * self.C)
        return {
            "pre": [(self.b_pre, 1.0)],
            "post": [(self.b_post, 1.0)],
            "dynamic": [(self.phi_pre, fan), (self.phi_post, fan)],
        }


class MHCResSite(MHCPrePost):
    """An mHC-style site with dynamic H_res logits (mhc, mhc-lite, kromhc, tbp; mHC Eq. 8's form):

        logits = a_res * mat(x' W) + b_res         W [nC, b_res.numel()], mat() reshapes to b_res's shape

    on the x' of :meth:`_normed`. ``res_projection`` names W (``phi_res`` for mhc, ``W_res`` for the others);
    :meth:`_init_res` allocates W, b_res, a_res. Subclasses implement :meth:`res_from_logits` (the map from the
    logits to H_res) and may narrow :meth:`_res_logits_h` (tbp keeps only the chart block).
    """

    res_projection: ClassVar[str] = "W_res"

    @property
    def res_params(self) -> tuple[str, ...]:  # type: ignore[override]
        return (self.res_projection, "a_res", "b_res")

    def _init_res(self, b_res: torch.Tensor) -> None:
        """W = 0 [nC, b_res.numel()] under the name ``res_projection``, b_res = ``b_res``, a_res = 0.01."""
        setattr(self, self.res_projection, self._zeros(self.n * self.C, b_res.numel()))
        self.b_res = self._param(b_res)
        self.a_res = self._scalar(0.01)

    def _res_weight(self) -> nn.Parameter:
        return getattr(self, self.res_projection)

    def _res_logits_h(self, h: torch.Tensor) -> torch.Tensor:
        """x' [..., nC] -> a_res * mat(x' W) + b_res [..., *b_res.shape]."""
        return self.a_res * (h @ self._res_weight()).unflatten(-1, self.b_res.shape) + self.b_res

    def res_logits(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., n, C] -> the H_res logits :meth:`res_from_logits` takes (shape: see the variant)."""
        return self._res_logits_h(self._normed(x))

    def forward(self, x: torch.Tensor) -> HCOutput:
        """x [..., n, C] -> H_pre [..., n], H_post [..., n], H_res [..., n, n] (paper convention)."""
        h = self._normed(x)
        pre, post = self._pre_post(h)
        return HCOutput(pre, post, self.res_from_logits(self._res_logits_h(h)))

    def _perturb_targets(self) -> dict[str, list[tuple[nn.Parameter, float]]]:
        t = self._pre_post_targets()
        t["res"] = [(self.b_res, 1.0)]
        t["dynamic"].append((self._res_weight(), 1.0 / math.sqrt(self.n * self.C)))
        return t

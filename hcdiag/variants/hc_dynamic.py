"""Dynamic hyper-connections, DHC (HC Eqs. 10-13; SPEC section 2).

Dimension letters: n streams, C width of one stream, ... leading (token / batch) dims.

Per stream, H_bar = norm(H) (width C, unweighted RMSNorm here: the count excludes norm parameters, HC Eq. 25):
    B(H)   = s_b * tanh(H_bar W_b)^T + B        W_b, W_m [C, 1], W_r [C, n], init 0
    A_m(H) = s_a * tanh(H_bar W_m)   + A_m      s_a, s_b scalars, init 0.01
    A_r(H) = s_a * tanh(H_bar W_r)   + A_r      static B, A_m, A_r as SHC
H_post = B(H), H_pre = A_m(H)^T, H_res = A_r(H)^T (row s of A_r(H) comes from input stream s's own state).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from hcdiag.registry import register
from hcdiag.site import HCOutput, rms_norm
from hcdiag.variants.hc_static import HCBase


@register("hc-dynamic")
class HCDynamic(HCBase):
    """DHC site: W_b, W_m [C, 1], W_r [C, n], s_a, s_b scalars, static B [n], A_m [n], A_r [n, n].

    s_a scales both A_m and A_r (HC Eqs. 11-12); the count lists it under res.
    """

    def __init__(self, n: int, C: int, **kw: Any) -> None:
        super().__init__(n, C, **kw)
        self.W_b = self._zeros(C, 1)
        self.W_m = self._zeros(C, 1)
        self.W_r = self._zeros(C, n)
        self.s_a = self._scalar(0.01)
        self.s_b = self._scalar(0.01)

    def _alpha_r(self, hbar: torch.Tensor) -> torch.Tensor:
        """A_r(H) [..., n, n] (code orientation [input, output]) from H_bar [..., n, C] (HC Eq. 12)."""
        return self.s_a * torch.tanh(hbar @ self.W_r) + self.A_r

    def forward(self, x: torch.Tensor) -> HCOutput:
        """x [..., n, C] -> H_pre [..., n], H_post [..., n], H_res [..., n, n] = A_r(H)^T."""
        x = self._input(x)
        hbar = rms_norm(x, None, self.norm_eps)
        pre = (self.s_a * torch.tanh(hbar @ self.W_m)).squeeze(-1) + self.A_m
        post = (self.s_b * torch.tanh(hbar @ self.W_b)).squeeze(-1) + self.B
        return HCOutput(pre, post, self._alpha_r(hbar).transpose(-1, -2))

    def _perturb_targets(self) -> dict[str, list[tuple[nn.Parameter, float]]]:
        fan = 1.0 / math.sqrt(self.C)
        t = super()._perturb_targets()
        t["dynamic"] = [(self.W_r, fan), (self.W_m, fan), (self.W_b, fan)]
        return t

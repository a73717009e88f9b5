"""iHC: learned H_pre / H_post as in mHC, fixed H_res = I (SPEC section 2; HY-V4 ships this layout).

Dimension letters: n streams, C width of one stream, ... leading (token / batch) dims.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from hcdiag.enums import Exactness
from hcdiag.registry import register
from hcdiag.site import HCOutput, SinkhornSpec
from hcdiag.variants._common import MHCPrePost


@register("ihc")
class IHC(MHCPrePost):
    """iHC site: phi_pre, phi_post [nC, n], b_pre, b_post [n], a_pre, a_post, norm_weight [nC] (code form).

    H_pre = sigma(a_pre x' phi_pre + b_pre), H_post = 2 sigma(a_post x' phi_post + b_post) (mHC Eq. 8),
    H_res = I. Per site: 2(n nC + n + 1) (= HY-V4's fn [2n, nC], base [2n], scale [2]) + nC in code form.
    """

    exactness = Exactness.IDENTITY

    def __init__(self, n: int, C: int, **kw: Any) -> None:
        super().__init__(n, C, **kw)
        self._init_pre_post()

    def forward(self, x: torch.Tensor) -> HCOutput:
        """x [..., n, C] -> H_pre [..., n], H_post [..., n], H_res [..., n, n] = I."""
        h = self._normed(x)
        pre, post = self._pre_post(h)
        return HCOutput(pre, post, self._eye(h.shape[:-1], h))

    def res_from_logits(self, logits: torch.Tensor, spec: SinkhornSpec | None = None) -> torch.Tensor:
        """H_res = I broadcast over ``logits``' leading dims (iHC has no H_res logits; see res_logits)."""
        return self._eye(logits.shape[:-2], logits)

    def _perturb_targets(self) -> dict[str, list[tuple[nn.Parameter, float]]]:
        return self._pre_post_targets()

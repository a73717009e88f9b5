"""Identity residual (plain pre-norm): H_res = I, no parameters (SPEC section 2).

Dimension letters: n streams, C width of one stream, ... leading (token / batch) dims.
"""

from __future__ import annotations

import torch

from hcdiag.enums import Exactness
from hcdiag.registry import register
from hcdiag.site import HCOutput, SinkhornSpec
from hcdiag.variants._common import VariantModule


@register("identity")
class IdentitySite(VariantModule):
    """Plain pre-norm residual written as an n-stream site.

    H_res = I [n, n]; H_pre = 1/n each (the branch reads the mean of the streams); H_post = 1 each (every
    stream receives the branch output). With the streams expanded as n copies of the embedding they stay
    equal, the branch sees exactly the single-stream input, and x_{l+1} = x_l + F(x_l) per stream: plain
    pre-norm.
    """

    exactness = Exactness.IDENTITY

    def forward(self, x: torch.Tensor) -> HCOutput:
        """x [..., n, C] -> H_pre [..., n] = 1/n, H_post [..., n] = 1, H_res [..., n, n] = I."""
        x = self._input(x)
        lead = x.shape[:-2]
        pre = torch.full((*lead, self.n), 1.0 / self.n, dtype=x.dtype, device=x.device)
        post = torch.ones((*lead, self.n), dtype=x.dtype, device=x.device)
        return HCOutput(pre, post, self._eye(lead, x))

    def res_from_logits(self, logits: torch.Tensor, spec: SinkhornSpec | None = None) -> torch.Tensor:
        """H_res = I broadcast over ``logits``' leading dims (identity sites have no logits: res_logits)."""
        return self._eye(logits.shape[:-2], logits)

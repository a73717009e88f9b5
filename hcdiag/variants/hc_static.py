"""Static hyper-connections, SHC (HC Eq. 1; SPEC section 2).

Dimension letters: n streams, C width of one stream, ... leading (token / batch) dims.

HC writes the site as the (n+1) x (n+1) matrix [[0, B], [A_m, A_r]]: B [1, n] = H_post, A_m [n, 1] = H_pre^T,
A_r [n, n] = H_res^T (HC applies A_r^T to the streams H, i.e. code orientation [input, output]).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from hcdiag.enums import Exactness
from hcdiag.registry import register
from hcdiag.site import HCOutput, SinkhornSpec
from hcdiag.variants._common import VariantModule


def hc_static_init(n: int, layer_index: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """HC's initialisation for site k (HC Sec. 2.3 / App. J): B = 1, A_m = e_{k mod n}, A_r = I (float64).

    With it HC equals pre-norm: the branch reads stream k mod n and every gain is exactly 1.
    """
    B = torch.ones(n, dtype=torch.float64)
    A_m = torch.zeros(n, dtype=torch.float64)
    A_m[layer_index % n] = 1.0
    return B, A_m, torch.eye(n, dtype=torch.float64)


class HCBase(VariantModule):
    """What SHC and DHC share: the static B [n] (= H_post), A_m [n] (= H_pre^T), A_r [n, n] (= H_res^T, code
    orientation), initialised by :func:`hc_static_init`, and no constraint on H_res."""

    exactness = Exactness.UNCONSTRAINED

    def __init__(self, n: int, C: int, **kw: Any) -> None:
        super().__init__(n, C, **kw)
        B, A_m, A_r = hc_static_init(n, self.layer_index)
        self.B = self._param(B)
        self.A_m = self._param(A_m)
        self.A_r = self._param(A_r)

    def res_from_logits(self, logits: torch.Tensor, spec: SinkhornSpec | None = None) -> torch.Tensor:
        """HC has no projection onto a constraint set: the "logits" are H_res itself (paper orientation);
        returned unchanged."""
        return logits

    def _perturb_targets(self) -> dict[str, list[tuple[nn.Parameter, float]]]:
        return {"res": [(self.A_r, 1.0)], "pre": [(self.A_m, 1.0)], "post": [(self.B, 1.0)]}


@register("hc-static")
class HCStatic(HCBase):
    """SHC: parameters B [n] (= H_post), A_m [n] (= H_pre^T), A_r [n, n] (= H_res^T, code orientation).

    Forward: H_pre = A_m, H_post = B, H_res = A_r^T, the same for every token. No norm, no projections.
    """

    def forward(self, x: torch.Tensor) -> HCOutput:
        """x [..., n, C] -> H_pre [..., n] = A_m, H_post [..., n] = B, H_res [..., n, n] = A_r^T."""
        x = self._input(x)
        lead = x.shape[:-2]
        n = self.n
        return HCOutput(
            self.A_m.expand(*lead, n), self.B.expand(*lead, n), self.A_r.transpose(0, 1).expand(*lead, n, n)
        )

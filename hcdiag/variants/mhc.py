"""mHC: manifold-constrained hyper-connections (mHC Eqs. 7-9; SPEC section 2), paper form.

Dimension letters: n streams, C width of one stream, ... leading (token / batch) dims.

    x'      = RMSNorm(vec(x))                        [..., nC]   (Eq. 7; gain ``norm_weight`` in code form)
    H~_pre  = a_pre  * (x' phi_pre)    + b_pre       phi_pre, phi_post [nC, n]
    H~_post = a_post * (x' phi_post)   + b_post      phi_res [nC, n^2], b_res [n, n]
    H~_res  = a_res  * mat(x' phi_res) + b_res       a_* scalars, init 0.01                     (Eq. 8)
    H_pre = sigma(H~_pre), H_post = 2 sigma(H~_post), H_res = SinkhornKnopp(H~_res)             (Eq. 9)

mat() reshapes row-major, so row i of mat(.) and of b_res belongs to output stream i (paper orientation).
"""

from __future__ import annotations

from typing import Any

import torch

from hcdiag.enums import Convention, Exactness
from hcdiag.registry import register
from hcdiag.site import SinkhornSpec
from hcdiag.variants._common import MHCResSite


def mhc_res_bias_init(n: int) -> torch.Tensor:
    """Static H_res logits [n, n]: 0 on the diagonal, -8 off it (float64).

    Source: the mHC baseline in the KromHC repo (wz1119/KromHC ``hyper_conn/mhc.py``: ``init_alpha1`` = -8,
    ``fill_diagonal_(0)``), shared by the mhc-lite and tbp-mHC repos' baselines. Sinkhorn then starts near the
    identity: diagonal 1 / (1 + (n-1) e^-8) = 0.999 at n = 4. (lucidrains' hyper-connections uses logits = I
    instead, which starts at Sinkhorn(exp(I)), far from I: 0.475 on the diagonal at n = 4; the mHC paper does
    not state its initialisation; transformers' DeepSeek-V4 ``_init_weights`` zeroes ``base``.)
    """
    b = torch.full((n, n), -8.0, dtype=torch.float64)
    b.fill_diagonal_(0.0)
    return b


@register("mhc")
class MHC(MHCResSite):
    """mHC site. Parameters: phi_pre, phi_post [nC, n], phi_res [nC, n^2], b_pre, b_post [n], b_res [n, n]
    (paper orientation), a_pre, a_post, a_res (0-dim), and in code form norm_weight [nC].

    Init (site k): phi = 0 (the site starts static), a = 0.01, b_pre = b_post = -1 with +1 at k mod n,
    b_res = :func:`mhc_res_bias_init`. ``sinkhorn``: how H_res is projected (default: paper convention, 20
    iterations, mHC Eq. 9 with t_max = 20). res_logits: H~_res [..., n, n] (mHC Eq. 8), paper orientation,
    before Sinkhorn.
    """

    exactness = Exactness.SINKHORN
    res_projection = "phi_res"

    def __init__(self, n: int, C: int, *, sinkhorn: SinkhornSpec | None = None, **kw: Any) -> None:
        super().__init__(n, C, **kw)
        self.sinkhorn: SinkhornSpec = sinkhorn if sinkhorn is not None else SinkhornSpec(Convention.PAPER, 20)
        self._init_pre_post()
        self._init_res(mhc_res_bias_init(n))

    def res_from_logits(self, logits: torch.Tensor, spec: SinkhornSpec | None = None) -> torch.Tensor:
        """H_res [..., n, n] = Sinkhorn(logits) under ``spec`` (default ``self.sinkhorn``) (mHC Eq. 9)."""
        from hcdiag.sinkhorn import project  # lazy: keeps importing the registry light

        return project(logits, spec if spec is not None else self.sinkhorn)

"""Brute-force composite gains of a stack of H_res matrices (mHC Sec. 3.1), in plain numpy: the oracle that
``gain-sweep --from`` is compared with. Independent of hcdiag."""

from __future__ import annotations

import numpy as np


def stack_gains(Hs: list[np.ndarray]) -> tuple[list[float], list[float]]:
    """For H_1 .. H_L [n, n] (depth order): forward G_f(H_l ... H_1) = max_i |sum_j M_ij| and backward
    G_b(H_L ... H_l) = max_j |sum_i M_ij|, each for l = 1 .. L."""
    F, fwd = np.eye(Hs[0].shape[0]), []
    for H in Hs:
        F = H @ F
        fwd.append(float(np.abs(F.sum(-1)).max()))
    B, bwd = np.eye(Hs[0].shape[0]), [0.0] * len(Hs)
    for i in range(len(Hs) - 1, -1, -1):
        B = B @ Hs[i]
        bwd[i] = float(np.abs(B.sum(-2)).max())
    return fwd, bwd

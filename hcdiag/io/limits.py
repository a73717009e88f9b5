"""Bounds on the numbers a file states, checked before hcdiag computes or allocates anything sized by them.

Dimension letters: L sites, n streams, C width of one stream.

A checkpoint's metadata, its ``config.json`` or a layout file may state an iteration count, n, C, a block count
or a site index that no trained model has and that would take hours or allocate past memory (``hc_sinkhorn_iters
= 10**9``, a layout file with ``n = 30000``: an n x n H_res of 7 GB). Readers pass such numbers through
:func:`bounded` where they read them, so the user gets one line (what, where, the limit, the option that
overrides it) instead of a hang. The limits are far above any published HC model (n = 4..16, 20 Sinkhorn
iterations, 61 blocks) and keep one site's work small.
"""

from __future__ import annotations

from hcdiag.errors import InputError

__all__ = ["MAX_ITERS", "MAX_SITES", "MAX_STREAMS", "MAX_STREAM_WIDTH", "bounded"]

#: Sinkhorn iterations taken from a file (models use 20); ``--iters`` overrides the file's value, unbounded
MAX_ITERS = 1_000
#: streams n (an n x n H_res per token; mHC-style models use 4 to 16)
MAX_STREAMS = 256
#: n * C, the entries of one token's residual streams (DeepSeek-V4: 4 x 7,168 = 28,672)
MAX_STREAM_WIDTH = 1 << 20
#: HC sites (2 per block), hence also the largest site index and block count a file may state
MAX_SITES = 16_384


def bounded(value: int, limit: int, what: str, path: str, *, override: str | None = None) -> int:
    """``value`` if it is at most ``limit``, else InputError: "<path>: <what> = <value> exceeds hcdiag's limit
    of <limit>; <how>", where how names ``override`` (an option that replaces the file's value) if any."""
    if value <= limit:
        return value
    shown = f"{value:,}" if value < 10**15 else f"about 10^{len(str(value)) - 1}"
    how = f"pass {override} to use another value" if override else "no trained model needs more"
    raise InputError(f"{path}: {what} = {shown} exceeds hcdiag's limit of {limit:,}; {how}", path=path)

"""Closed option sets. Typer turns these into validated choices; JSON keys use the same values."""

from __future__ import annotations

from enum import StrEnum


class Exactness(StrEnum):
    """How exactly a variant's H_res lies on the Birkhoff polytope."""

    IDENTITY = "identity"  # H_res = I, trivially doubly stochastic
    EXACT = "exact"  # doubly stochastic by construction (to rounding)
    SINKHORN = "sinkhorn"  # approximately, after a fixed number of Sinkhorn-Knopp iterations
    UNCONSTRAINED = "unconstrained"  # no constraint (HC); doubly-stochastic error is not applicable


class Convention(StrEnum):
    """Sinkhorn-Knopp conventions (SPEC section 3)."""

    PAPER = "paper"  # exp start, columns then rows; exact paper rows (mHC Eq. 9)
    LOG = "log"  # log domain, lse over input axis then output axis; exact paper columns
    TRANSFORMERS = "transformers"  # softmax + eps start on comb = H_res^T; exact paper rows
    TRANSFORMERS_SIGMOID = "transformers-sigmoid"  # earlier transformers DeepSeek-V4: sigmoid + eps start on comb
    LUCIDRAINS = "lucidrains"  # exp(l - max) on alpha = H_res^T, inputs then outputs; exact paper columns


class Form(StrEnum):
    """Parameter-count form (SPEC section 5)."""

    PAPER = "paper"  # mHC Eqs. 7-9: unweighted RMSNorm, no norm parameters
    CODE = "code"  # reference-code modules: RMSNorm gain norm.gamma with nC entries


class Probe(StrEnum):
    """How stream inputs x are chosen when H_res depends on the token."""

    STATIC = "static"  # x = 0: the bias logits alone
    RANDOM = "random"  # T seeded synthetic tokens
    ACTIVATIONS = "activations"  # recorded stream inputs, one [T, n, C] tensor per site


class Draw(StrEnum):
    """How the random probe draws a site's tokens (``--draw``; :mod:`hcdiag.probes`)."""

    AUTO = "auto"  # projected where the site reads x through RMSNorm(vec x) W^T and nC >= 32 k, else full
    PROJECTED = "projected"  # z = RMSNorm(vec x) W^T drawn directly (same distribution, k + 1 numbers per token)
    FULL = "full"  # x [T, n, C] drawn and the site's forward run on it


class DType(StrEnum):
    FLOAT64 = "float64"
    FLOAT32 = "float32"
    BFLOAT16 = "bfloat16"


class FigFormat(StrEnum):
    """File format of the figures written by ``--plot`` (``--fig-format``)."""

    PNG = "png"
    SVG = "svg"
    PDF = "pdf"

"""What each CSV column means, per command, and the sidecar file that says so (torch- and numpy-free).

Every CSV file hcdiag writes (``--csv FILE``, ``-o DIR``) gets a sidecar ``FILE-metadata.json`` in the W3C
"CSV on the Web" metadata vocabulary (https://www.w3.org/TR/tabular-metadata/; ``{+url}-metadata.json`` is the
name CSVW readers look for): one entry per column with its name and ``dc:description``. The CSV itself stays
plain (header row first, no comment lines), so ``csv.DictReader`` / ``pandas.read_csv`` read it unchanged.
``--csv -`` writes the CSV to stdout and no sidecar.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

__all__ = ["COLUMNS", "GAIN_CURVE_COLUMNS", "describe", "sidecar"]

_COUNT = "parameters of one site that produce "

#: gain-sweep --csv: the long form, one row per (variant, curves, site, metric, statistic) of the JSON curves
GAIN_CURVE_COLUMNS: dict[str, str] = {
    "variant": "variant name (synthetic stack) or the checkpoint's layout/variant label (--from); JSON "
    "variants[].name",
    "site": "site name in depth order (attn_0, ffn_0, attn_1, ...); JSON site_names[site_index - 1]",
    "site_index": "1-based depth index l of the site (l = 1..L)",
    "curves": "which JSON curve set: 'curves' (per-token composites, token mean, then over seeds) or "
    "'token_mean_curves' (composites of the token-mean matrices; only with --tokens > 1)",
    "metric": "metric name; its meaning is the JSON document's metrics[metric] (e.g. gain_fwd = G_f(H_l...H_1), "
    "gain_bwd = G_b(H_L...H_l), mHC Sec. 3.1)",
    "statistic": "statistic over seeds: median, min, max; token_min / token_max: extremes over seeds x tokens",
    "value": "the value (float64, full precision; inf / nan where a composite overflowed)",
}

COLUMNS: dict[str, dict[str, str]] = {
    "params": {
        "variant": "variant name (hcdiag variants)",
        "exactness": "how exactly H_res is doubly stochastic: identity, exact, sinkhorn, unconstrained",
        "growth": "parameter growth of one site in n (streams) and C (stream width)",
        "pre": _COUNT + "H_pre (projection, bias, scale)",
        "post": _COUNT + "H_post (projection, bias, scale)",
        "res": _COUNT + "H_res (projection, bias, scale)",
        "norm": "RMSNorm gain parameters of one site (nC in code form, 0 in paper form)",
        "per_site": "pre + post + res + norm",
        "per_model": "per_site x 2 sites per block x layers",
        "overhead": "per_model / (12 C^2 x layers), the plain pre-norm block's weights (a fraction, 0.01 = 1%)",
        "practical": "false where the variant is counted but impractical to build (mHC-lite beyond n = 6)",
        "notes": "JSON list of one-line remarks",
        "effective": "TBP-mHC: JSON object of the counts its forward pass uses (same keys); empty otherwise",
        "kron_factors": "KromHC: JSON list of the factor sizes counted; empty otherwise",
    },
    "variants": {
        "name": "variant name (the value of --variants)",
        "exactness": "how exactly H_res is doubly stochastic: identity, exact, sinkhorn, unconstrained",
        "growth": "parameter growth of one site in n (streams) and C (stream width)",
        "summary": "one-line description with the paper equations",
    },
    "inspect": {
        "index": "0-based site index in depth order",
        "name": "site name (attn_0, ffn_0, ...)",
        "block": "transformer block of the site",
        "kind": "attn or ffn",
        "variant": "variant as read from the checkpoint",
        "exactness": "how exactly H_res is doubly stochastic: identity, exact, sinkhorn, unconstrained",
        "tensors": "JSON list of the site's stored tensors (key, shape, dtype)",
        "params": "parameters stored for this site",
        "registry_variant": "registry variant whose closed form the count is checked against",
        "registry_params": "JSON object: form -> that variant's closed-form count at this n, C",
        "param_check": "one line: does the stored count match the closed form",
        "param_match": "true / false / empty (no formula)",
    },
    "stochasticity": {
        "index": "0-based site index in depth order",
        "name": "site name (attn_0, ffn_0, ...)",
        "variant": "variant of the site",
        "exactness": "how exactly H_res is doubly stochastic: identity, exact, sinkhorn, unconstrained",
        "n": "streams at this site",
        "tokens": "probe tokens (stream inputs) evaluated",
        "verdict": "ok / over tolerance / n/a (unconstrained)",
        "convention": "Sinkhorn convention used (SPEC section 3)",
        "convention_source": "where the convention came from (option, metadata, config, default)",
        "iters": "Sinkhorn iterations",
        "iters_source": "where iters came from",
        "eps": "eps in the Sinkhorn denominators",
        "eps_source": "where eps came from",
        "row_err_p50": "median over tokens of max_i |sum_j H_ij - 1| (paper convention: rows build output streams)",
        "row_err_p99": "99th percentile over tokens of the row error",
        "row_err_max": "max over tokens of the row error",
        "col_err_p50": "median over tokens of max_j |sum_i H_ij - 1|",
        "col_err_p99": "99th percentile over tokens of the column error",
        "col_err_max": "max over tokens of the column error",
        "row_err_mean": "mean over tokens of the mean over rows of |row sum - 1|",
        "col_err_mean": "mean over tokens of the mean over columns of |column sum - 1|",
        "min_entry": "smallest entry of H_res over tokens (negative: outside the Birkhoff polytope)",
        "logit_range_p50": "median over tokens of max - min of the pre-Sinkhorn logits (Sinkhorn sites only)",
        "logit_range_max": "max over tokens of max - min of the pre-Sinkhorn logits",
        "logit_max": "largest pre-Sinkhorn logit (the paper convention exponentiates it unshifted)",
        "over_absorption_f32": "matrices whose logit range exceeds 16.64 (float32 absorbs the small entries)",
        "over_underflow_f32": "matrices whose logit range exceeds 87.34 (e^-R below float32's smallest normal)",
        "iters_to_tol_p50": "median over tokens of the Sinkhorn iterations needed to reach --tol on both axes; "
        "empty where most tokens do not within 1000",
        "iters_to_tol_max": "max over tokens of the iterations needed to reach --tol; "
        "empty where some token does not within 1000",
        "iters_to_tol_unreached": "tokens that do not reach --tol within 1000 iterations",
        "iters_to_tol_never": "of the unreached tokens, those that provably never reach --tol (their state repeats "
        "with the error above the target)",
        "iters_to_tol_estimate": "median over the other unreached tokens of the iteration count extrapolated from "
        "each one's measured contraction rate; empty where there is none",
        "iters_to_tol_rate": "median contraction rate per iteration of those tokens; empty where there is none",
        "gain_f_mean": "mean over tokens of G_f = max_i |sum_j H_ij| (Amax gain, mHC Sec. 3.1)",
        "gain_f_max": "max over tokens of G_f",
        "gain_f_of_mean": "G_f of the token-mean H_res",
        "gain_b_mean": "mean over tokens of G_b = max_j |sum_i H_ij|",
        "gain_b_max": "max over tokens of G_b",
        "gain_b_of_mean": "G_b of the token-mean H_res",
        "spectral_norm_max": "max over tokens of sigma_1(H_res)",
        "sigma2_max": "max over tokens of sigma_2(H_res) (near 1: slow Sinkhorn convergence)",
        "spectral_norm_of_mean": "sigma_1 of the token-mean H_res",
        "row_sums_of_mean": "JSON list: row sums of the token-mean H_res",
        "col_sums_of_mean": "JSON list: column sums of the token-mean H_res",
        "recorded_diff": "with --probe activations: max |H recomputed - H recorded by the model|; empty otherwise",
        "recorded_tol": "with --probe activations: the float32 rounding bound recorded_diff is compared with",
        "h_pre_mean": "JSON list: token mean of H_pre [n] (what the branch reads from each stream; a site with "
        "several branch inputs, views or fractions: also the mean over them)",
        "h_post_mean": "JSON list: token mean of H_post [n] (what the branch writes to each stream; several branch "
        "outputs or fractions: also the mean over them)",
        "temperature": "the Sinkhorn temperature tau the logits were divided by; empty where the codebase has none",
        "perm_distance": "max over tokens of max |H - P|, P the permutation matrix of each row's largest entry; "
        "empty where those entries do not form a permutation (near 0: a near-permutation)",
        "eps_floor": "how far below 1 converged sums settle where the convention adds eps to its denominators; "
        "the verdict allows tol + eps_floor",
        "res_tensors": "JSON list of the checkpoint tensors that make H_res",
        "worst_error": "max of row_err_max and col_err_max; empty for unconstrained sites",
    },
    "verify": {
        "index": "0-based site index in depth order",
        "name": "site name (attn_0, ffn_0, ...)",
        "conforms": "true when every check the site has is within the tolerance (JSON tolerance; default 64 x "
        "float32 eps = 7.6e-6)",
        "update_model": "rel(H_res x + H_post^T F, x_{l+1}) = ||a - b||_F / ||b||_F with the matrices the model "
        "produced (mHC Eq. 3); empty where the update was not recorded",
        "update_recomputed": "the same residual with the H_res, H_post the checkpoint's parameters give under the "
        "layout's convention; empty where the update was not recorded",
        "branch_input": "rel(H_pre x, branch input) with the recomputed H_pre (Qwen4-Exp: the recomputed channel-gated "
        "mean of the normalised streams, which no H_pre [n] gives); empty where the module did not "
        "return its branch input",
        "h_res": "rel(recomputed H_res, the model's H_res); empty where the module did not expose it",
        "h_post": "rel(recomputed H_post, the model's H_post); empty where the module did not expose it",
        "diagnosis": "for a site that does not conform: the first diagnosis whose residual reaches the tolerance "
        "(transposed mix, H_res = I, split order, iteration count, ...); empty otherwise",
        "fingerprint": "the Sinkhorn candidate (family, iterations) that best reproduces the model's H_res; empty "
        "without a fingerprint",
        "fingerprint_residual": "rel(H_candidate, H_model) of that candidate",
        "runner_up": "the best candidate of another class or iteration count",
        "runner_up_residual": "rel(H_candidate, H_model) of the runner-up",
    },
    "gain-sweep": GAIN_CURVE_COLUMNS,
    "track": {
        "step": "training step of the checkpoint",
        "path": "the checkpoint read",
        "site": "site the value belongs to (scope site), or where a checkpoint-wide worst value was found",
        "scope": "'checkpoint' (one value per checkpoint) or 'site' (one value per site)",
        "metric": "metric name: a checkpoint metric of the JSON entries[].metrics, or a numeric field of "
        "stochasticity's per-site record (see hcdiag stochasticity --csv FILE's sidecar)",
        "value": "the value",
    },
}


def describe(command: str, columns: Iterable[str]) -> dict[str, str]:
    """column -> meaning, for the columns a CSV of ``command`` actually has (in their order)."""
    known = COLUMNS.get(command, {})
    fallback = "see the field of the same name in the JSON document (--json)"
    return {c: known.get(c, fallback) for c in columns}


def sidecar(csv_name: str, title: str, columns: Mapping[str, str]) -> dict[str, Any]:
    """CSVW metadata document for ``csv_name`` (a file name next to the sidecar)."""
    return {
        "@context": "http://www.w3.org/ns/csvw",
        "url": csv_name,
        "dc:title": title,
        "tableSchema": {
            "columns": [{"name": c, "titles": c, "dc:description": d} for c, d in columns.items()],
        },
    }

"""nanogpt layout: mHC (log Sinkhorn), mHC-lite, KromHC, TBP-mHC sites against a port of the reference forward.

The reference repos are not installed, so :class:`RefPort` re-implements their ``width_connection`` /
``depth_connection`` for num_fracs = 1 with the repos' own einops patterns (wz1119/KromHC hyper_conn/mhc.py,
mhc_lite.py, Kromhc.py; alyubinin/tbp-mHC hyper_conn/tbp_mhc.py, base.py). It shares no code with hcdiag: the
oracle is its output streams (H_res acting on x), branch input (H_pre) and depth contribution (H_post).
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from einops import einsum, rearrange, repeat
from safetensors.torch import save_file
from torch import nn

from hcdiag.enums import Exactness
from hcdiag.errors import InputError
from hcdiag.io.base import LoadOptions
from hcdiag.io.lucidrains_layout import LUCIDRAINS
from hcdiag.io.nanogpt_layout import NANOGPT, build_ref_site, plan_ref_site
from hcdiag.io.source import open_source
from hcdiag.variants import tbp_chart

TOL = 1e-5


# ---------------------------------------------------------------------------------------------------------------
# Port of the reference modules (num_fracs = 1), kept close to the repo source


def ref_perms(n: int) -> torch.Tensor:
    index = torch.tensor(list(itertools.permutations(range(n))), dtype=torch.long)
    return torch.eye(n)[index]


def ref_log_sinkhorn(log_alpha: torch.Tensor, iters: int = 20) -> torch.Tensor:
    for _ in range(iters):
        log_alpha = log_alpha - torch.logsumexp(log_alpha, dim=-2, keepdim=True)
        log_alpha = log_alpha - torch.logsumexp(log_alpha, dim=-1, keepdim=True)
    return log_alpha.exp()


def ref_transportation_birkhoff(t: torch.Tensor, delta_logit: torch.Tensor | None, eps: float = 1e-7):
    n = t.shape[-1] + 1
    B = t.shape[0]
    rows = []
    r = torch.ones(B, n, dtype=t.dtype)
    c = torch.ones(B, n, dtype=t.dtype)
    for i in range(n - 1):
        entries, ri = [], r[:, i]
        for j in range(n - 1):
            cj = c[:, j]
            c_tail = c[:, j + 1:].sum(dim=-1)
            r_tail = r[:, i + 1:].sum(dim=-1)
            L = torch.clamp(torch.maximum(ri - c_tail, cj - r_tail), min=0)
            U = torch.minimum(ri, cj)
            x = L + (U - L).clamp_min(eps) * torch.sigmoid(t[:, i, j])
            entries.append(x)
            ri = ri - x
            c = c.clone()
            c[:, j] = c[:, j] - x
        entries.append(ri)
        c = c.clone()
        c[:, n - 1] = c[:, n - 1] - ri
        r = r.clone()
        r[:, i] = torch.zeros(B, dtype=t.dtype)
        rows.append(torch.stack(entries, dim=-1))
    rows.append(c)
    X = torch.stack(rows, dim=-2)
    if delta_logit is not None:
        delta = torch.sigmoid(delta_logit)
        X = (1 - delta) * X + delta * (1.0 / n)
    return X


class RefRMSNorm(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.scale = dim**0.5
        self.gamma = nn.Parameter(torch.zeros(dim))

    def forward(self, x):
        return F.normalize(x, dim=-1) * self.scale * (self.gamma + 1)


class RefPort(nn.Module):
    """variant: mhc | mhc_lite | kromhc | tbp_mhc (f = 1). Parameter names and inits as in the repos."""

    def __init__(self, variant: str, n: int, dim: int, *, layer_index: int = 0, views: int = 1,
                 make_dse: bool = True) -> None:
        super().__init__()
        self.variant, self.n, self.v = variant, n, views
        s, v = n, views
        self.norm = RefRMSNorm(dim * s)
        init_pre = torch.ones(s, v) * -1
        init_pre[layer_index % s, :] = 1.0
        if variant in ("mhc", "tbp_mhc"):
            res = torch.zeros(s, s) if variant == "tbp_mhc" else torch.ones(s, s) * -8
            if variant == "mhc":
                res.fill_diagonal_(0.0)
            self.static_alpha = nn.Parameter(torch.cat((init_pre, res), dim=1))
            self.dynamic_alpha_fn = nn.Parameter(torch.zeros(dim * s, s * s + s * v))
            self.delta_logit = nn.Parameter(torch.tensor(-8.0)) if variant == "tbp_mhc" and make_dse else None
        else:
            if variant == "mhc_lite":
                R = math.factorial(s)
                init_res = torch.ones(R) * -8
                init_res[0] = 0.0
            else:  # kromhc, n = 2^K
                self.K = int(math.log2(s))
                R = 2 * self.K
                init_res = torch.ones(R) * -8
                init_res[::2] = 0.0
            self.static_alpha = nn.Parameter(torch.cat([init_pre.view(-1), init_res]))
            self.dynamic_alpha_fn = nn.Parameter(torch.zeros(dim * s, R + s * v))
        self.pre_branch_scale = nn.Parameter(torch.ones(1) * 1e-2)
        self.residual_scale = nn.Parameter(torch.ones(1) * 1e-2)
        beta_init = torch.ones(s) * -1.0
        beta_init[layer_index % s] = 1.0
        self.static_beta = nn.Parameter(beta_init)
        self.dynamic_beta_fn = nn.Parameter(torch.zeros(dim * s, s))
        self.h_post_scale = nn.Parameter(torch.ones(()) * 1e-2)
        self.branch = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim))  # duplicated in the state dict

    def alpha_beta(self, normed):
        s, v = self.n, self.v
        wc = normed @ self.dynamic_alpha_fn
        if self.variant in ("mhc", "tbp_mhc"):
            wc = rearrange(wc, "... (s t) -> ... s t", s=s)
            scale = torch.cat(
                (repeat(self.pre_branch_scale, "1 -> v", v=v), repeat(self.residual_scale, "1 -> s", s=s))
            )
            alpha = wc * scale + rearrange(self.static_alpha, "(f s) t -> f s t", s=s)
            alpha = rearrange(alpha, "... (f d) -> ... f d", f=1)  # split_fracs
            alpha_pre, alpha_res = alpha[..., :v].sigmoid(), alpha[..., v:]
            alpha_res = rearrange(alpha_res, "... f s g t -> ... f g s t")
            if self.variant == "mhc":
                alpha_res = ref_log_sinkhorn(alpha_res)
            else:
                shape = alpha_res.shape[:-2]
                flat = alpha_res[..., : s - 1, : s - 1].reshape(-1, s - 1, s - 1)
                alpha_res = ref_transportation_birkhoff(flat, self.delta_logit).reshape(*shape, s, s)
            alpha_res = rearrange(alpha_res, "... f g s t -> ... f s g t")
        else:
            psize = v * s
            dyn_pre, dyn_res = wc[..., :psize], wc[..., psize:]
            st_pre, st_res = self.static_alpha[:psize], self.static_alpha[psize:]
            coeff = self.residual_scale * dyn_res + st_res
            if self.variant == "mhc_lite":
                alpha_res = einsum(torch.softmax(coeff, dim=-1), ref_perms(s), "... r, r i j -> ... i j")
            else:
                w = F.softmax(coeff.view(*coeff.shape[:-1], self.K, 2), dim=-1)
                p = w[..., 0]
                q = 1.0 - p
                mats = torch.stack([torch.stack([p, q], -1), torch.stack([q, p], -1)], -2)
                alpha_res = mats[..., 0, :, :]
                for k in range(1, self.K):
                    kron = alpha_res.unsqueeze(-1).unsqueeze(-3) * mats[..., k, :, :].unsqueeze(-4).unsqueeze(-2)
                    alpha_res = kron.reshape(*coeff.shape[:-1], alpha_res.shape[-2] * 2, alpha_res.shape[-1] * 2)
            alpha_res = rearrange(alpha_res, "... i (f j) -> ... i f j", f=1)
            alpha_pre = self.pre_branch_scale * dyn_pre + st_pre
            alpha_pre = rearrange(alpha_pre, "... (f s v) -> ... s f v", v=v, f=1).sigmoid()
        alpha = torch.cat((alpha_pre, alpha_res), dim=-1)  # (..., f, s, f, v + s)
        dc = rearrange(normed @ self.dynamic_beta_fn, "... (s f) -> ... s f", s=s)
        beta = (dc * self.h_post_scale + rearrange(self.static_beta, "(s f) -> s f", s=s)).sigmoid() * 2
        return alpha, beta

    def width_connection(self, residuals):  # residuals [(b s), T, d]
        s = self.n
        residuals = rearrange(residuals, "b ... (f d) -> b ... f d", f=1)
        residuals = rearrange(residuals, "(b s) ... d -> b ... s d", s=s)
        normed = self.norm(rearrange(residuals, "b ... s d -> b ... (s d)", s=s))
        alpha, beta = self.alpha_beta(normed)
        mix_h = einsum(alpha, residuals, "... f1 s f2 t, ... f1 s d -> ... f2 t d")
        if self.v == 1:
            branch_input, residuals = mix_h[..., 0, :], mix_h[..., 1:, :]
        else:
            branch_input = rearrange(mix_h[..., : self.v, :], "b ... v d -> v b ... d")
            residuals = mix_h[..., self.v:, :]
        branch_input = rearrange(branch_input, "b ... f d -> b ... (f d)")
        residuals = rearrange(rearrange(residuals, "b ... s d -> (b s) ... d"), "b ... f d -> b ... (f d)")
        return branch_input, residuals, dict(beta=beta)

    def depth_connection(self, branch_output, residuals, *, beta):
        branch_output = rearrange(branch_output, "b ... (f d) -> b ... f d", f=1)
        output = einsum(branch_output, beta, "b ... f1 d, b ... f1 s f2 -> b ... f2 s d")
        output = rearrange(rearrange(output, "b ... s d -> (b s) ... d"), "b ... f d -> b ... (f d)")
        return output + residuals


def perturb(m: nn.Module, seed: int, scale: float = 0.5) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)
    return m


def hc_state(m: RefPort) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in m.state_dict().items()}


def compare(ref: RefPort, site, seed: int = 0) -> dict[str, float]:
    """Max abs errors of hcdiag's site against the reference port on random streams [(b s), T, C]."""
    s, C = ref.n, ref.norm.gamma.numel() // ref.n
    b, T = 2, 5
    g = torch.Generator().manual_seed(seed)
    R = torch.randn(b * s, T, C, generator=g)
    with torch.no_grad():
        branch_in, streams_out, kw = ref.width_connection(R)
        x = R.reshape(b, s, T, C).transpose(1, 2).reshape(b * T, s, C)
        out = site(x.double())
        y = streams_out.reshape(b, s, T, C).transpose(1, 2).reshape(b * T, s, C)
        err = {"res_action": (torch.einsum("tij,tjd->tid", out.res, x.double()) - y).abs().max().item()}
        pre = out.pre if out.pre.ndim == 3 else out.pre.unsqueeze(-2)
        bi = (branch_in if ref.v == 1 else branch_in.movedim(0, -2)).reshape(b * T, ref.v, C)
        err["pre_action"] = (torch.einsum("tvn,tnd->tvd", pre, x.double()) - bi).abs().max().item()
        bo = torch.randn(b, T, C, generator=g)
        added = (ref.depth_connection(bo, streams_out, **kw) - streams_out).reshape(b, s, T, C).transpose(1, 2)
        pred = out.post[..., :, None] * bo.reshape(b * T, 1, C).double()
        err["post_action"] = (pred - added.reshape(b * T, s, C)).abs().max().item()
    return err


CASES = {
    "mhc": dict(variant="mhc", n=4),
    "mhc-views": dict(variant="mhc", n=3, views=2),
    "mhc_lite": dict(variant="mhc_lite", n=4),
    "mhc_lite-n3": dict(variant="mhc_lite", n=3),
    "kromhc": dict(variant="kromhc", n=4),
    "kromhc-n8": dict(variant="kromhc", n=8),
    "tbp_mhc": dict(variant="tbp_mhc", n=4),
    "tbp_mhc-n5": dict(variant="tbp_mhc", n=5),
    "tbp_mhc-nodse": dict(variant="tbp_mhc", n=4, make_dse=False),
}
HCDIAG_VARIANT = {"mhc": "mhc", "mhc_lite": "mhc-lite", "kromhc": "kromhc", "tbp_mhc": "tbp"}


@pytest.mark.parametrize("case", sorted(CASES))
def test_site_matches_reference(case: str) -> None:
    cfg = dict(CASES[case])
    ref = perturb(RefPort(cfg.pop("variant"), cfg.pop("n"), 8, layer_index=1, **cfg), seed=len(case)).eval()
    sd = hc_state(ref)
    hc_type = ref.variant if case == "tbp_mhc-nodse" else None  # indistinguishable from mHC by shapes
    plan = plan_ref_site({k: tuple(v.shape) for k, v in sd.items()}, hc_type=hc_type)
    assert plan.variant == HCDIAG_VARIANT[ref.variant]
    assert (plan.n, plan.views, plan.C) == (ref.n, ref.v, 8)
    site = build_ref_site(plan, {k: v.double() for k, v in sd.items()})
    err = compare(ref, site)
    assert max(err.values()) < TOL, err
    x = torch.randn(7, ref.n, 8, dtype=torch.float64)
    with torch.no_grad():  # res_logits -> res_from_logits reproduces forward
        torch.testing.assert_close(site.res_from_logits(site.res_logits(x)), site(x).res, rtol=0, atol=1e-12)
        H = site(x).res
    if plan.variant != "mhc":
        assert site.exactness is Exactness.EXACT
        torch.testing.assert_close(H.sum(-1), torch.ones(7, ref.n, dtype=torch.float64), rtol=0, atol=1e-12)
        torch.testing.assert_close(H.sum(-2), torch.ones(7, ref.n, dtype=torch.float64), rtol=0, atol=1e-12)
        assert H.min() >= -1e-6
    if plan.variant == "kromhc":  # closed form: symmetric Kronecker product
        torch.testing.assert_close(H, H.mT, rtol=0, atol=1e-15)


def test_mhc_lite_paper_orientation_uses_transposed_permutations() -> None:
    """Weight on one non-involutive permutation k: paper H_res = P_k^T with P_k = eye[perm_k]."""
    n, C = 3, 4
    ref = RefPort("mhc_lite", n, C)
    k = 3  # itertools order: (1, 2, 0)
    with torch.no_grad():
        ref.static_alpha[n:] = -60.0
        ref.static_alpha[n + k] = 60.0
    sd = {key: v.double() for key, v in hc_state(ref).items()}
    site = build_ref_site(plan_ref_site({key: tuple(v.shape) for key, v in sd.items()}), sd)
    with torch.no_grad():
        H = site(torch.zeros(1, n, C, dtype=torch.float64)).res[0]
    P = torch.eye(n, dtype=torch.float64)[list(list(itertools.permutations(range(n)))[k])]
    torch.testing.assert_close(H, P.T, rtol=0, atol=1e-12)
    assert not torch.equal(P, P.T)


def test_tbp_chart_spec_fixture() -> None:
    """SPEC section 2: the chart at t = 0, n = 4."""
    X = tbp_chart(torch.zeros(3, 3, dtype=torch.float64))
    expected = torch.tensor([[0.5, 0.25, 0.125, 0.125], [0.25, 0.375, 0.1875, 0.1875],
                             [0.125, 0.1875, 0.34375, 0.34375], [0.125, 0.1875, 0.34375, 0.34375]],
                            dtype=torch.float64)
    torch.testing.assert_close(X, expected, rtol=0, atol=1e-15)
    t = torch.randn(50, 4, 4, dtype=torch.float64) * 3
    torch.testing.assert_close(tbp_chart(t), ref_transportation_birkhoff(t, None), rtol=0, atol=1e-14)


# ---------------------------------------------------------------------------------------------------------------
# A nanoGPT checkpoint through the loader


def gpt_state(variant: str, n: int, C: int, blocks: int, seed: int) -> tuple[dict[str, torch.Tensor], list]:
    """State dict shaped like tbp-mHC model.py: transformer.h.N.{branch_attn, branch_mlp, hc_attn, hc_mlp}."""
    sd: dict[str, torch.Tensor] = {"transformer.wte.weight": torch.randn(11, C), "lm_head.weight": torch.randn(11, C)}
    refs = []
    for i in range(blocks):
        for kind in ("attn", "mlp"):
            ref = perturb(RefPort(variant, n, C, layer_index=i), seed=seed + 2 * i + (kind == "mlp")).eval()
            refs.append(ref)
            for k, v in hc_state(ref).items():
                sd[f"transformer.h.{i}.hc_{kind}.{k}"] = v
                if k.startswith("branch."):  # the same branch also lives under the block itself
                    sd[f"transformer.h.{i}.branch_{kind}.{k[len('branch.'):]}"] = v.clone()
    return sd, refs


def _load(path: str, options: LoadOptions = LoadOptions()):
    from hcdiag.io.load import load

    return load(path, options=options)


@pytest.mark.parametrize("fmt", ["pt", "safetensors"])
@pytest.mark.parametrize("variant", ["mhc", "mhc_lite", "kromhc", "tbp_mhc"])
def test_gpt_checkpoint_round_trip(tmp_path, variant: str, fmt: str) -> None:
    blocks = 11 if (variant, fmt) == ("mhc", "safetensors") else 3  # 11: natural order, 2 < 10
    sd, refs = gpt_state(variant, 4, 8, blocks=blocks, seed=3)
    if fmt == "pt":
        path = tmp_path / "ckpt.pt"
        torch.save({"model": sd, "model_args": {"hyper_conn_type": variant, "hyper_conn_n": 4}, "iter_num": 1}, path)
    else:
        path = tmp_path / "model.safetensors"
        save_file(sd, str(path))
    assert NANOGPT.detect(open_source(path)) is not None
    assert LUCIDRAINS.detect(open_source(path)) is None
    model = _load(str(path))
    assert model.layout == "nanogpt"
    assert (model.n, model.C) == (4, 8)
    assert [s.name for s in model.sites] == [f"{k}_{b}" for b in range(blocks) for k in ("attn", "ffn")]
    assert {s.variant for s in model.sites} == {HCDIAG_VARIANT[variant]}
    for site, ref in zip(model.sites, refs, strict=True):
        assert all(".branch." not in t.key for t in site.tensors)
        assert sum(t.numel() for t in site.module.parameters()) == sum(
            p.numel() for name, p in ref.named_parameters() if not name.startswith("branch."))
        err = compare(ref, site.module, seed=site.index)
        assert max(err.values()) < TOL, (site.name, err)
    assert not model.unmatched_keys
    if variant == "mhc":
        assert model.settings_source["convention"] == "default"
        assert model.sites[0].module.sinkhorn.convention == "log"


# ---------------------------------------------------------------------------------------------------------------
# Identification edge cases


def _shapes(variant: str, n: int, **kw) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in hc_state(RefPort(variant, n, 8, **kw)).items()}


@pytest.mark.parametrize(
    "variant, n, hc_type, expect",
    [
        ("mhc", 4, None, "mhc"),
        ("mhc", 4, "tbp_mhc", "tbp"),  # make_dse=False TBP stores exactly mHC's keys
        ("tbp_mhc", 4, None, "tbp"),
        ("mhc_lite", 2, None, "mhc-lite"),
        ("mhc_lite", 2, "kromhc", "kromhc"),  # n = 2: one 2x2 factor = mHC-lite, same math
        ("kromhc", 2, "kromhc", "kromhc"),
        ("kromhc", 8, None, "kromhc"),
        ("mhc_lite", 4, "analysis", None),  # 1-D static_alpha but the run says mHC: refuse
        ("tbp_mhc", 4, "mhc", None),  # delta_logit but the run says mHC
        ("tbp_mhc", 4, "stbp_mhc", None),  # same keys, different chart: refused, not guessed
    ],
)
def test_identification(variant: str, n: int, hc_type: str | None, expect: str | None) -> None:
    shapes = _shapes(variant, n)
    if expect is None:
        with pytest.raises(InputError):
            plan_ref_site(shapes, hc_type=hc_type)
    else:
        assert plan_ref_site(shapes, hc_type=hc_type).variant == expect


def test_hyper_conn_type_from_options_and_unknown_tensors(tmp_path) -> None:
    sd, refs = gpt_state("mhc", 3, 8, blocks=1, seed=0)
    path = tmp_path / "m.safetensors"
    save_file(sd, str(path))
    model = _load(str(path), LoadOptions(extra={"hyper_conn_type": "mhc"}))
    assert model.settings_source["hyper_conn_type"] == "cli"
    sd["transformer.h.0.hc_attn.lambda_logit"] = torch.zeros(())  # a variant hcdiag does not know
    save_file(sd, str(path))
    with pytest.raises(InputError, match="lambda_logit"):
        NANOGPT.load(open_source(path), LoadOptions())
    assert NANOGPT.detect(open_source(path)) is None


@pytest.mark.parametrize("variant", ["mhc", "mhc_lite", "kromhc", "tbp_mhc"])
@pytest.mark.parametrize("n", [2, 4])
def test_parameter_counts_match_spec_code_form(variant: str, n: int) -> None:
    """SPEC section 5, reference-code form: the loaded site holds exactly the formula's parameters."""
    C = 8
    sd = {k: v for k, v in hc_state(RefPort(variant, n, C)).items() if not k.startswith("branch.")}
    site = build_ref_site(plan_ref_site({k: tuple(v.shape) for k, v in sd.items()}, hc_type=variant), sd)
    pre = post = n * n * C + n + 1
    res = {"mhc": n**3 * C + n**2 + 1, "mhc_lite": math.factorial(n) * n * C + math.factorial(n) + 1,
           "kromhc": 2 * int(math.log2(n)) * (n * C + 1) + 1, "tbp_mhc": n**3 * C + n**2 + 2}[variant]
    assert sum(p.numel() for p in site.parameters()) == pre + post + res + n * C

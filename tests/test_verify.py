"""hcdiag verify on forward passes of the real libraries' modules: conforming runs, injected bugs, fingerprints.

Oracles: the models themselves. A run of the unmodified transformers / hyper-connections code must conform and be
fingerprinted as the convention hcdiag's layout uses; each bug is injected into the real module or decoder layer
(the code the bug reports describe), so what verify must find is known by construction, not from hcdiag.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from cli_runner import run_cli
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from hcdiag.capture import capture, read_activations
from hcdiag.verification import TOLERANCE, TRANSPOSED, UNMIXED, verify

transformers = pytest.importorskip("transformers")
from test_io_transformers import TINY_DSV4, TINY_GLM5, TINY_HY, _randomize_hc  # noqa: E402
from transformers import (  # noqa: E402
    DeepseekV4Config,
    DeepseekV4ForCausalLM,
    Glm5NextTextConfig,
    Glm5NextTextModel,
    HYV4Config,
    HYV4Model,
)
from transformers.models.deepseek_v4 import modeling_deepseek_v4 as ds  # noqa: E402
from transformers.models.glm5_next import modeling_glm5_next as glm  # noqa: E402


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def _ids(vocab: int = 64, B: int = 2, S: int = 6) -> torch.Tensor:
    return torch.randint(1, vocab, (B, S), generator=torch.Generator().manual_seed(0))


def _capture(model: nn.Module, path, *inputs, **kwargs) -> str:
    with torch.no_grad(), capture(model, path):
        model(*inputs, **kwargs)
    return str(path)


def _verify_cli(ckpt, acts) -> tuple[int, dict]:
    r = run_cli("verify", ckpt, "--activations", acts, "--json")
    assert r.stderr == "" or r.stderr.startswith("hcdiag: check failed"), r.stderr
    return r.returncode, json.loads(r.stdout)


# ---------------------------------------------------------------------------------------------------------------
# transformers DeepSeek-V4: the decoder layer and the HC module, re-written with one thing changed


def _layer_forward(mix):
    """DeepseekV4DecoderLayer.forward (transformers 5.24) with the residual mix ``mix(comb, streams)``."""

    def forward(self, hidden_states, input_ids=None, **kwargs):
        dtype = hidden_states.dtype
        post, comb, collapsed = self.attn_hc(hidden_states)
        attn_output, _ = self.self_attn(self.input_layernorm(collapsed), **kwargs)
        hidden_states = post.to(dtype).unsqueeze(-1) * attn_output.unsqueeze(-2) + mix(comb.to(dtype), hidden_states)
        post, comb, collapsed = self.ffn_hc(hidden_states)
        mlp_output = self.mlp(self.post_attention_layernorm(collapsed), input_ids=input_ids)
        return post.to(dtype).unsqueeze(-1) * mlp_output.unsqueeze(-2) + mix(comb.to(dtype), hidden_states)

    return forward


def _hc_forward(split=("pre", "post", "comb"), start: str = "softmax"):
    """DeepseekV4HyperConnection.forward (transformers 5.24) with the packed projection split in ``split`` order
    and, for start="sigmoid", the earlier Sinkhorn: sigmoid(logits) + eps, then iters x (rows, columns)."""

    def forward(self, hidden_streams):
        b, s = hidden_streams.shape[:2]
        hc, eps = self.hc_mult, self.hc_eps
        mixes = F.linear(self.input_norm(hidden_streams.view(b, s, -1).float()), self.fn.float())
        sizes = [hc * hc if p == "comb" else hc for p in split]
        w = dict(zip(split, mixes.split(sizes, dim=-1), strict=True))
        bias = dict(zip(split, self.base.split(sizes), strict=True))
        pre_scale, post_scale, comb_scale = self.scale.unbind(0)
        pre = torch.sigmoid(w["pre"] * pre_scale + bias["pre"]) + eps
        post = 2 * torch.sigmoid(w["post"] * post_scale + bias["post"])
        logits = w["comb"].view(b, s, hc, hc) * comb_scale + bias["comb"].view(hc, hc)
        if start == "softmax":
            comb = torch.softmax(logits, dim=-1) + eps
            comb = comb / (comb.sum(dim=-2, keepdim=True) + eps)
            for _ in range(self.hc_sinkhorn_iters - 1):
                comb = comb / (comb.sum(dim=-1, keepdim=True) + eps)
                comb = comb / (comb.sum(dim=-2, keepdim=True) + eps)
        else:
            comb = torch.sigmoid(logits) + eps
            for _ in range(self.hc_sinkhorn_iters):
                comb = comb / (comb.sum(dim=-1, keepdim=True) + eps)
                comb = comb / (comb.sum(dim=-2, keepdim=True) + eps)
        collapsed = (pre.unsqueeze(-1) * hidden_streams).sum(dim=2).to(hidden_streams.dtype)
        return post, comb, collapsed

    return forward


@pytest.fixture(scope="module")
def dsv4(tmp_path_factory):
    torch.manual_seed(0)
    model = DeepseekV4ForCausalLM(DeepseekV4Config(**dict(TINY_DSV4, num_hidden_layers=2))).eval()
    _randomize_hc(model, 1)
    with torch.no_grad():  # comb logits with enough contrast that 10 and 20 Sinkhorn iterations differ everywhere
        for layer in model.model.layers:
            for hc in (layer.attn_hc, layer.ffn_hc):
                hc.base[2 * hc.hc_mult:] *= 3
    root = tmp_path_factory.mktemp("dsv4")
    model.save_pretrained(root / "ckpt")
    return model, str(root / "ckpt")


def test_rewritten_forwards_equal_the_library(dsv4) -> None:
    """The re-written forwards used to inject bugs are the library's own, bit for bit, when nothing is changed."""
    model, _ = dsv4
    hc = model.model.layers[0].attn_hc
    x = torch.randn(2, 3, 4, TINY_DSV4["hidden_size"], generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        for a, b in zip(hc(x), _hc_forward()(hc, x), strict=True):
            assert torch.equal(a, b)


@pytest.fixture(scope="module")
def dsv4_acts(dsv4, tmp_path_factory) -> str:
    return _capture(dsv4[0], tmp_path_factory.mktemp("acts") / "acts.safetensors", _ids())


def test_deepseek_v4_conforms_and_is_fingerprinted_as_transformers(dsv4, dsv4_acts) -> None:
    _, ckpt = dsv4
    acts = dsv4_acts
    code, doc = _verify_cli(ckpt, acts)
    assert code == 0, doc["verdict"]
    assert [s["name"] for s in doc["sites"]] == ["attn_0", "ffn_0", "attn_1", "ffn_1"]
    for s in doc["sites"]:
        assert s["conforms"] is True
        assert s["checks"]["update (model)"] < 1e-6 and s["checks"]["update (recomputed)"] < 1e-6
        assert s["checks"]["branch input"] < 1e-6  # H_pre x = the collapsed input the module returned
        best = s["fingerprint"]["best"]
        # hcdiag's transformers layout: convention transformers, hc_sinkhorn_iters 20, hc_eps 1e-6
        assert (best["convention"], best["transposed"], best["iters"], best["eps"]) == ("transformers", False, 20,
                                                                                       1e-6)
        assert best["residual"] < 1e-6 < s["fingerprint"]["other_class"]["residual"]
        assert "h_pre" in s["skipped"]  # the module consumes pre itself: said, not silently dropped


def test_cli_table_csv_and_usage_errors(dsv4, dsv4_acts, tmp_path) -> None:
    import csv

    _, ckpt = dsv4
    r = run_cli("verify", ckpt, "--activations", dsv4_acts, "--csv", tmp_path / "v.csv", "--no-fingerprint")
    assert r.returncode == 0, r.stderr
    assert "All 4 sites conform" in r.stdout and "skipped h_pre at 4 site(s)" in r.stdout
    rows = list(csv.DictReader((tmp_path / "v.csv").open()))
    assert [(row["name"], row["conforms"]) for row in rows] == [(n, "True") for n in ("attn_0", "ffn_0", "attn_1",
                                                                                      "ffn_1")]
    assert all(float(row["update_recomputed"]) < 1e-6 and row["fingerprint"] == "" for row in rows)
    meta = json.loads((tmp_path / "v.csv-metadata.json").read_text())
    described = {c["name"]: c["dc:description"] for c in meta["tableSchema"]["columns"]}
    assert list(described) == list(rows[0])
    assert not [c for c, d in described.items() if "see the field of the same name" in d], described
    for args in (["--activations", tmp_path / "missing.safetensors"], ["--activations", dsv4_acts, "--tol", "0"]):
        r = run_cli("verify", ckpt, *args)
        assert r.returncode == 2 and r.stdout == "" and len(r.stderr.strip().splitlines()) == 1, r.stderr
    (tmp_path / "junk.safetensors").write_bytes(b"not safetensors")
    r = run_cli("verify", ckpt, "--activations", tmp_path / "junk.safetensors")
    assert r.returncode == 3 and "cannot read as safetensors" in r.stderr


@pytest.mark.parametrize(
    "bug, diagnosis",
    [
        ("untransposed", TRANSPOSED),
        ("skip-mix", UNMIXED),
        ("split", "split order [pre, comb, post]"),
        ("iters-10", "iterations 10 (layout: 20)"),
    ],
)
def test_deepseek_v4_injected_bugs(dsv4, tmp_path, monkeypatch, bug: str, diagnosis: str) -> None:
    model, ckpt = dsv4
    if bug == "untransposed":
        monkeypatch.setattr(ds.DeepseekV4DecoderLayer, "forward", _layer_forward(torch.matmul))
    elif bug == "skip-mix":
        monkeypatch.setattr(ds.DeepseekV4DecoderLayer, "forward", _layer_forward(lambda comb, h: h))
    elif bug == "split":
        monkeypatch.setattr(ds.DeepseekV4HyperConnection, "forward", _hc_forward(split=("pre", "comb", "post")))
    else:
        for layer in model.model.layers:
            monkeypatch.setattr(layer.attn_hc, "hc_sinkhorn_iters", 10)
            monkeypatch.setattr(layer.ffn_hc, "hc_sinkhorn_iters", 10)
    acts = _capture(model, tmp_path / f"{bug}.safetensors", _ids())
    code, doc = _verify_cli(ckpt, acts)
    assert code == 1
    affected = ["attn_0", "ffn_0", "attn_1", "ffn_1"]
    if bug == "skip-mix":
        # the first site's n streams are n copies of the embedding, and a matrix with unit row sums maps them to
        # themselves: skipping the mix there changes nothing (and verify must not claim it does)
        x0 = read_activations(acts)[0].x
        assert torch.equal(x0, x0[:, :1].expand_as(x0))
        affected = affected[1:]
        assert doc["sites"][0]["conforms"] is True
    assert doc["conforms"] is False and doc["failing"] == affected
    for s in (s for s in doc["sites"] if s["name"] in affected):
        assert s["conforms"] is False and s["diagnosis"] == diagnosis, (s["name"], s["diagnoses"])
        hit = next(d for d in s["diagnoses"] if d["name"] == diagnosis)
        assert hit["residual"] < TOLERANCE < min(s["checks"][c] for c in s["failing"])
        # the layer applying its module's matrices wrongly breaks the model-matrix check; a module computing
        # other matrices keeps it and breaks only the recomputed one
        layer_bug = bug in ("untransposed", "skip-mix")
        assert ("update (model)" in s["failing"]) is layer_bug
        # at attn_0 (n equal streams) only the matrices show a Sinkhorn change, not the update
        assert {"update (recomputed)", "H_res"} & set(s["failing"])
    assert diagnosis in doc["verdict"]
    if bug == "iters-10":
        assert {s["fingerprint"]["best"]["iters"] for s in doc["sites"]} == {10}
        assert {s["fingerprint"]["best"]["convention"] for s in doc["sites"]} == {"transformers"}


def test_deepseek_v4_earlier_sigmoid_sinkhorn_is_fingerprinted(dsv4, tmp_path, monkeypatch) -> None:
    model, ckpt = dsv4
    monkeypatch.setattr(ds.DeepseekV4HyperConnection, "forward", _hc_forward(start="sigmoid"))
    acts = _capture(model, tmp_path / "sigmoid.safetensors", _ids())
    report = verify(ckpt, acts)
    assert report.failing() == ["attn_0", "ffn_0", "attn_1", "ffn_1"]
    for s in report.sites:
        fp = s.fingerprint
        # the earlier code's Sinkhorn inside the 5.24 module, whose layer applies comb^T: the sigmoid convention
        # (defined on comb = H, as the earlier layer applied comb itself) on the transpose, i.e. columns then rows
        assert (fp.best.convention, fp.best.transposed) == ("transformers-sigmoid", True), fp.best
        assert fp.best.order == "columns, rows"
        assert fp.best.residual < 1e-6 and fp.matches
        lo, hi = fp.iters_matching  # near convergence neighbouring counts match to rounding too
        assert lo <= 20 <= hi
        # not the 5.24 code: no softmax-start candidate (either orientation, any of 1..100 iterations) comes close
        assert min(r for f, (_, r) in fp.by_family.items() if f.startswith("transformers")) > 1e-3
        assert fp.layout.label == "transformers x20, eps 1e-06" and fp.layout.residual > 1e-3
        assert s.diagnosis == f"Sinkhorn {fp.best.label}" and fp.best.label.startswith("sigmoid (earlier")
    assert "sigmoid (earlier transformers) (transposed) x" in report.verdict


def test_old_activation_files_still_verify(dsv4, dsv4_acts, tmp_path) -> None:
    """A file with only x and h_res (written before F / y existed): the matrix checks run, the update is skipped."""
    _, ckpt = dsv4
    with safe_open(dsv4_acts, "pt") as f:
        meta = f.metadata()
        old = {k: f.get_tensor(k) for k in f.keys() if k.endswith((".x", ".h_res"))}
    entries = [{k: e[k] for k in ("index", "name", "module_class", "h_res_from", "tokens", "n", "C")}
               for e in json.loads(meta["sites"])]
    save_file(old, str(tmp_path / "old.safetensors"), metadata={**meta, "sites": json.dumps(entries)})
    report = verify(ckpt, tmp_path / "old.safetensors")
    for s in report.sites:
        assert s.conforms and set(s.checks) == {"H_res"} and s.checks["H_res"] < 1e-6
        assert "update (model)" in s.skipped and "update (recomputed)" in s.skipped


# ---------------------------------------------------------------------------------------------------------------
# GLM-5-Next and HY-V4


def _glm_config() -> Glm5NextTextConfig:
    return Glm5NextTextConfig(**TINY_GLM5)


def test_glm5_next_conforms_then_flags_a_transposed_comb(tmp_path, monkeypatch) -> None:
    torch.manual_seed(0)
    model = Glm5NextTextModel(_glm_config()).eval()
    _randomize_hc(model, 2)
    model.save_pretrained(tmp_path / "ckpt")
    acts = _capture(model, tmp_path / "acts.safetensors", _ids(), use_cache=False)
    report = verify(tmp_path / "ckpt", acts)
    assert report.conforms, report.verdict
    for s in report.sites:
        assert s.checks["update (recomputed)"] < 1e-6
        best = s.fingerprint.best
        assert (best.convention, best.iters, best.eps) == ("transformers", 5, 2e-6)  # read from config.json
    # a module that returns comb already transposed: the layer's comb^T then mixes with comb
    real = glm.Glm5NextTextHyperConnection.forward

    def transposed(self, hidden_states):
        post, comb, collapsed = real(self, hidden_states)
        return post, comb.transpose(-1, -2), collapsed

    monkeypatch.setattr(glm.Glm5NextTextHyperConnection, "forward", transposed)
    acts = _capture(model, tmp_path / "bug.safetensors", _ids(), use_cache=False)
    code, doc = _verify_cli(tmp_path / "ckpt", acts)
    assert code == 1
    assert [s["diagnosis"] for s in doc["sites"]] == [TRANSPOSED] * 4


def test_hy_v4_identity_residual_checks_pre_and_post(tmp_path) -> None:
    torch.manual_seed(0)
    cfg = HYV4Config(**TINY_HY)
    model = HYV4Model(cfg).eval()
    _randomize_hc(model, 3)
    model.save_pretrained(tmp_path / "ckpt")
    report = verify(tmp_path / "ckpt", _capture(model, tmp_path / "acts.safetensors", _ids()))
    assert report.conforms, report.verdict
    for s in report.sites:
        assert s.checks["update (recomputed)"] < 1e-6 and s.checks["branch input"] < 1e-6
        assert s.fingerprint is None and "H_res = I" in s.fingerprint_skipped


# ---------------------------------------------------------------------------------------------------------------
# lucidrains hyper-connections


def _lucid_net(iters: int = 20) -> nn.Module:
    from hyper_connections import mc_get_init_and_expand_reduce_stream_functions
    from hyper_connections.hyper_connections import HyperConnections

    class Net(nn.Module):
        def __init__(self, n: int = 4, C: int = 16) -> None:
            super().__init__()
            init, self.expand, self.reduce = mc_get_init_and_expand_reduce_stream_functions(n, dim=C)
            self.layers = nn.ModuleList([
                init(branch=nn.Linear(C, C), layer_index=0, sinkhorn_iters=iters),
                init(branch=nn.Sequential(nn.Linear(C, C), nn.GELU()), layer_index=1, sinkhorn_iters=iters,
                     log_domain_sinkhorn=True),
                HyperConnections(n, dim=C, branch=nn.Linear(C, C), layer_index=2),
                init(branch=nn.Linear(C, C), layer_index=3, sinkhorn_iters=iters),
            ])

        def forward(self, tokens):
            x = self.expand(tokens)
            for blk in self.layers:
                x = blk(x)
            return self.reduce(x)

    torch.manual_seed(0)
    net = Net().eval()
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in net.named_parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.5)
            if name.endswith("static_alpha"):  # H_res logits with contrast: 20 Sinkhorn iterations do not converge
                p[:, 1:] += torch.randn(p[:, 1:].shape, generator=g) * 3
    return net


def _save_state(net: nn.Module, path) -> str:
    save_file({k: v.detach().clone().contiguous() for k, v in net.state_dict().items()}, str(path))
    return str(path)


def _tokens() -> torch.Tensor:
    return torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(2))


def test_lucidrains_mhc_conforms_and_is_fingerprinted(tmp_path) -> None:
    net = _lucid_net()
    ckpt = _save_state(net, tmp_path / "net.safetensors")
    report = verify(ckpt, _capture(net, tmp_path / "acts.safetensors", _tokens()))
    assert report.conforms, report.verdict
    mhc = [report.sites[i] for i in (0, 1, 3)]
    for s in report.sites:
        assert s.checks["update (model)"] < 1e-6 and s.checks["update (recomputed)"] < 1e-6
        assert s.checks["branch input"] < 1e-6
    for s in mhc:
        fp = s.fingerprint
        # the layout's convention (lucidrains, 20) or one equal to it in exact arithmetic (log domain)
        assert "lucidrains" in (fp.best.family, *fp.equivalent) and fp.best.iters == 20, fp.best
        assert fp.best.residual < 1e-6 < fp.other_class.residual and fp.layout.residual < 1e-6
    hc = report.sites[2]
    assert hc.fingerprint is None and "model H_res" in hc.skipped  # HC does not expose its alpha


def test_lucidrains_mhc_bugs(tmp_path, monkeypatch) -> None:
    from hyper_connections.manifold_constrained_hyper_connections import ManifoldConstrainedHyperConnections as MHC

    # 1. a module whose width connection returns the unmixed residuals
    net = _lucid_net()
    ckpt = _save_state(net, tmp_path / "net.safetensors")
    real = MHC.width_connection

    def unmixed(self, residuals):
        branch_input, _, kwargs = real(self, residuals)
        return branch_input, residuals, kwargs

    with monkeypatch.context() as mp:
        mp.setattr(MHC, "width_connection", unmixed)
        acts = _capture(net, tmp_path / "unmixed.safetensors", _tokens())
    code, doc = _verify_cli(ckpt, acts)
    # the HC site (another class) is unaffected. The first site's streams are n copies of the embedding: mixing
    # them changes them only as far as the library's own H_res has rows that do not sum to 1
    first = read_activations(acts)[0]
    assert torch.equal(first.x, first.x[:, :1].expand_as(first.x))
    H = first.h_res_module.double()  # the library's own Sinkhorn output
    x0 = first.x.double()
    first_affected = float((H @ x0 - x0).norm() / first.y.double().norm()) > TOLERANCE
    affected = [0, 1, 3] if first_affected else [1, 3]
    assert code == 1 and doc["failing"] == [doc["sites"][i]["name"] for i in affected]
    assert [doc["sites"][i]["diagnosis"] for i in (1, 3)] == [UNMIXED] * 2
    if first_affected:  # n equal streams: H^T x = x too (exact columns), so both explain it and both are named
        s0 = doc["sites"][0]
        assert UNMIXED in [s0["diagnosis"], *s0["also_explained_by"]]
    # 2. a model run with 10 Sinkhorn iterations, read under the layout's default 20
    net10 = _lucid_net(iters=10)
    ckpt10 = _save_state(net10, tmp_path / "net10.safetensors")
    report = verify(ckpt10, _capture(net10, tmp_path / "iters.safetensors", _tokens()))
    assert report.failing() == [report.sites[i].name for i in (0, 1, 3)]
    for i in (0, 1, 3):
        s = report.sites[i]
        assert s.diagnosis == "iterations 10 (layout: 20)" and s.fingerprint.best.iters == 10


# ---------------------------------------------------------------------------------------------------------------
# hcdiag's own site modules (a native checkpoint): matrices only, no update to see


def test_hcdiag_site_modules_matrix_checks_and_iterations(tmp_path) -> None:
    import copy
    from dataclasses import replace

    from hcdiag.io import load

    full = load("samples/mhc.safetensors")
    model = replace(full, sites=full.sites[:4])  # attn_0 .. ffn_1 keep the suite fast
    x = torch.randn(32, model.n, model.C, generator=torch.Generator().manual_seed(4))

    def record(modules: dict[str, nn.Module], name: str) -> str:
        holder = nn.ModuleDict(modules)
        with torch.no_grad(), capture(holder, tmp_path / name):
            for m in holder.values():
                m(x)
        return str(tmp_path / name)

    report = verify(model, record({s.name: s.module for s in model.sites}, "own.safetensors"))
    assert report.conforms, report.verdict
    for s in report.sites:
        # the same modules: only capture's float32 storage separates them from the float64 recomputation
        assert set(s.checks) == {"H_res", "H_post", "H_pre"} and max(s.checks.values()) < 1e-7
        assert "caller applies the update" in s.skipped["update (model)"]
        fp = s.fingerprint  # the trained sample: paper convention, 20 iterations (its metadata)
        assert fp.layout.label == "paper x20" and fp.layout.residual < 1e-7
    # the same modules run with 10 iterations: the checkpoint says 20
    tens = {}
    for s in model.sites:
        m = copy.deepcopy(s.module)
        m.sinkhorn = replace(m.sinkhorn, iters=10)
        tens[s.name] = m
    report = verify(model, record(tens, "ten.safetensors"))
    flagged = [s for s in report.sites if not s.conforms]
    assert flagged, "no site of the sample differs between 10 and 20 iterations"
    for s in flagged:
        assert s.failing == ("H_res",) and s.diagnosis == "iterations 10 (layout: 20)"
        assert s.fingerprint.best.iters == 10 or s.fingerprint.matching > 1


def test_lucidrains_mhc_v2_conforms(tmp_path) -> None:
    from hyper_connections.mHCv2 import ManifoldConstrainedHyperConnections as MHCv2
    from hyper_connections.mHCv2 import get_expand_reduce_stream_functions

    expand, reduce = get_expand_reduce_stream_functions(4)
    blocks = nn.ModuleList([MHCv2(4, dim=16, branch=nn.Linear(16, 16), layer_index=i) for i in range(2)])
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in blocks.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.5)
    ckpt = _save_state(blocks, tmp_path / "v2.safetensors")
    with torch.no_grad(), capture(blocks, tmp_path / "acts.safetensors"):
        x = expand(_tokens())
        for b in blocks:
            x = b(x)
    report = verify(ckpt, tmp_path / "acts.safetensors")
    assert report.conforms, report.verdict
    for s in report.sites:
        assert s.checks["update (model)"] < 1e-6 and s.checks["H_res"] < 1e-6  # H_res: the library's own output
        assert s.fingerprint.layout.residual < 1e-6 and s.fingerprint.describe().startswith("lucidrains x20 (the")

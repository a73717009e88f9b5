"""The transformers mHC reader against the real transformers modules (DeepSeek-V4, GLM-5-Next, HY-V4).

Oracle: the library's own DeepseekV4HyperConnection / Glm5NextTextHyperConnection / HYV4HyperConnection, run in
float32 on the same weights. They return (post, comb, collapsed) with comb [input, output]; the decoder layer
applies comb^T, so paper H_res = comb^T, and collapsed = sum_s pre_s x_s gives H_pre.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from hcdiag.enums import Convention, Exactness
from hcdiag.errors import InputError
from hcdiag.inspect import inspect_checkpoint
from hcdiag.io import load
from hcdiag.io.base import LoadOptions

transformers = pytest.importorskip("transformers")
from transformers import (  # noqa: E402
    DeepseekV4Config,
    DeepseekV4ForCausalLM,
    Glm5NextTextConfig,
    Glm5NextTextModel,
    HYV4Config,
    HYV4Model,
)
from transformers.models.deepseek_v4.modeling_deepseek_v4 import DeepseekV4HyperConnection  # noqa: E402

N, HID, LAYERS = 4, 32, 3
TINY_DSV4 = dict(
    vocab_size=64, hidden_size=HID, moe_intermediate_size=16, num_hidden_layers=LAYERS, num_attention_heads=2,
    num_key_value_heads=1, head_dim=16, q_lora_rank=16, num_experts_per_tok=1, n_routed_experts=2,
    n_shared_experts=1, hc_mult=N, o_groups=1, o_lora_rank=16, index_n_heads=2, index_head_dim=8, index_topk=4,
    num_nextn_predict_layers=0, sliding_window=8,
)  # fmt: skip
# non-default settings, so that reading them from config.json is visible in the numbers
# GLM-5-Next at n = 3 with non-default Sinkhorn settings; HY-V4 (no comb: H_res = I)
TINY_GLM5 = dict(
    vocab_size=64, hidden_size=32, intermediate_size=32, moe_intermediate_size=16, num_hidden_layers=2,
    num_attention_heads=2, num_key_value_heads=2, n_routed_experts=2, num_experts_per_tok=1, kv_lora_rank=8,
    q_lora_rank=8, qk_rope_head_dim=0, v_head_dim=8, qk_nope_head_dim=8, index_n_heads=2, index_head_dim=8,
    index_topk=16, index_kpool=4, linear_head_dim=8, linear_num_heads=2, hc_mult=3, hc_sinkhorn_iters=5,
    hc_eps=2e-6, rms_norm_eps=1e-5, pad_token_id=0,
)  # fmt: skip
TINY_HY = dict(
    vocab_size=64, hidden_size=32, intermediate_size=32, moe_intermediate_size=16, num_hidden_layers=2,
    num_attention_heads=2, num_key_value_heads=2, head_dim=16, n_routed_experts=2, num_experts_per_tok=1,
    kv_lora_rank=8, q_lora_rank=8, qk_rope_head_dim=8, v_head_dim=8, qk_nope_head_dim=8, index_n_heads=2,
    index_head_dim=8, index_topk=4, hc_mult=4, hc_magnitude=1.5, pad_token_id=0, bos_token_id=1,
    eos_token_id=2,
)  # fmt: skip
SETTINGS = dict(hc_sinkhorn_iters=7, hc_eps=1e-5, rms_norm_eps=1e-5)
DEFAULTS = dict(hc_sinkhorn_iters=20, hc_eps=1e-6, rms_norm_eps=1e-6)  # what hcdiag assumes without config


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors: torch's intra-op thread pool only adds wake-up latency (~20 ms per op on a busy 2-core box)."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def _randomize_hc(model: torch.nn.Module, seed: int) -> None:
    """Non-trivial HC weights (the library initialises base = 0, scale = 1)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "_hc." in name or "hc_head" in name:
                scale = {"fn": 0.3, "base": 1.0, "scale": 1.5}.get(name.rsplit(".", 1)[-1].removeprefix("hc_"), 1.0)
                p.copy_(torch.randn(p.shape, generator=g) * scale)


def _hc_modules(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """(site name, library HC module) in depth order attn_0, ffn_0, attn_1, ..."""
    base = model.model if hasattr(model, "model") else model
    out = []
    for i, layer in enumerate(base.layers):
        out += [(f"attn_{i}", layer.attn_hc), (f"ffn_{i}", layer.ffn_hc)]
    return out


def _streams(seed: int, T: int, n: int, C: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, T, n, C, generator=g) * 2.0  # [batch, T, n, C] float32


def _check_against_library(loaded, lib_modules, *, tol: float = 1e-5, identity: bool = False) -> None:
    assert [s.name for s in loaded.sites] == [name for name, _ in lib_modules]
    for (_, lib), site in zip(lib_modules, loaded.sites, strict=True):
        x = _streams(site.index + 11, 6, loaded.n, loaded.C)
        with torch.no_grad():
            if identity:
                post_lib, collapsed = lib(x)
            else:
                post_lib, comb, collapsed = lib(x)
            pre, post, res = site.module(x[0].double())
        assert pre.shape == (6, loaded.n) and post.shape == (6, loaded.n) and res.shape == (6, loaded.n, loaded.n)
        torch.testing.assert_close(post.float(), post_lib[0], atol=tol, rtol=0)
        collapsed_ours = (pre.unsqueeze(-1) * x[0].double()).sum(-2)
        torch.testing.assert_close(collapsed_ours.float(), collapsed[0], atol=tol * 10, rtol=tol)
        if identity:
            torch.testing.assert_close(res, torch.eye(loaded.n, dtype=res.dtype).expand_as(res))
        else:
            torch.testing.assert_close(res.float(), comb[0].transpose(-1, -2), atol=tol, rtol=0)
            # paper rows exact after the final column pass on comb; columns carry the error
            assert (res.sum(-1) - 1).abs().max() < 1e-4
            # res_logits + res_from_logits is the same path
            lg = site.module.res_logits(x[0].double())
            torch.testing.assert_close(site.module.res_from_logits(lg), res)


@pytest.fixture(scope="module")
def dsv4(tmp_path_factory):
    torch.manual_seed(0)
    model = DeepseekV4ForCausalLM(DeepseekV4Config(**TINY_DSV4, **SETTINGS)).eval()
    _randomize_hc(model, 1)
    root = tmp_path_factory.mktemp("dsv4")
    model.save_pretrained(root / "sharded", max_shard_size="20KB")
    return model, root


def _oracle(model, settings: dict) -> list[tuple[str, torch.nn.Module]]:
    """Library HC modules holding ``model``'s weights, under ``settings`` (iters / eps / rms eps)."""
    cfg = DeepseekV4Config(**TINY_DSV4, **settings)
    out = []
    for name, lib in _hc_modules(model):
        m = DeepseekV4HyperConnection(cfg)
        m.load_state_dict(lib.state_dict())
        out.append((name, m.eval()))
    return out


def test_sharded_dir_matches_library(dsv4):
    model, root = dsv4
    d = root / "sharded"
    index = json.loads((d / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 3  # really sharded
    loaded = load(d)
    assert loaded.layout == "transformers" and (loaded.n, loaded.C) == (N, HID)
    assert len(loaded.sites) == 2 * LAYERS
    assert all(s.variant == "mhc" and s.module.exactness == Exactness.SINKHORN for s in loaded.sites)
    spec = loaded.sites[0].module.sinkhorn
    assert (spec.convention, spec.iters, spec.eps) == (Convention.TRANSFORMERS, 7, 1e-5)
    assert loaded.settings_source["iters"].startswith("config.json")
    assert loaded.settings_source["n"] == "config.json (hc_mult)"
    _check_against_library(loaded, _hc_modules(model))
    # only the HC tensors were read: 6 sites x (fn + base + scale) in float32
    hc_bytes = 2 * LAYERS * 4 * ((N + 2) * N * N * HID + (N + 2) * N + 3)
    assert loaded.bytes_read == hc_bytes
    assert loaded.bytes_total == sum(p.numel() * p.element_size() for p in model.state_dict().values())
    assert "hc_head" in loaded.metadata and loaded.unmatched_keys == []


def test_one_shard_is_refused_naming_the_index(dsv4, tmp_path):
    """One file of a real save_pretrained(max_shard_size=...) checkpoint, through the CLI: one line naming the
    index beside it and the directory to pass; a shard copied away from its index: pass the directory that holds
    all shards. Reading one shard as the model would analyse a fraction of its sites."""
    import shutil

    from cli_runner import run_cli

    _, root = dsv4
    d = root / "sharded"
    index = d / "model.safetensors.index.json"
    shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    k = len(shards)
    shard = d / shards[1]
    assert shard.name == f"model-00002-of-{k:05d}.safetensors"  # transformers' own naming
    for cmd in (["inspect"], ["stochasticity"], ["gain-sweep", "--from"]):
        r = run_cli(*cmd, shard)
        lines = r.stderr.splitlines()
        assert r.returncode == 3 and len(lines) == 1, r.stderr
        assert f"shard 2 of {k} of a sharded checkpoint" in lines[0]
        assert f"whose index is {index}; pass the directory {d} " in lines[0]
    alone = tmp_path / "alone"
    alone.mkdir()
    shutil.copy(shard, alone / shard.name)
    r = run_cli("inspect", alone / shard.name)
    assert r.returncode == 3 and len(r.stderr.splitlines()) == 1
    assert f"no model.safetensors.index.json beside it; pass the directory that holds all {k} shards" in r.stderr
    r = run_cli("stochasticity", alone)
    assert r.returncode == 3 and f"shard 2 of {k}, and no index" in r.stderr
    assert run_cli("inspect", d).returncode == 0  # the directory itself is read whole


def test_iters_override_matches_library(dsv4):
    model, root = dsv4
    loaded = load(root / "sharded", options=LoadOptions(iters=2))
    assert loaded.settings_source["iters"] == "cli (--iters)"
    _check_against_library(loaded, _oracle(model, dict(SETTINGS, hc_sinkhorn_iters=2)))


def _converted_sd(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}


def _original_names(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """DeepSeek-V4 release naming (before transformers' conversion): layers.N.hc_attn_fn, hc_head_fn."""
    out = {}
    for k, v in sd.items():
        k = k.removeprefix("model.")
        for kind in ("attn", "ffn"):
            for part in ("fn", "base", "scale"):
                k = k.replace(f".{kind}_hc.{part}", f".hc_{kind}_{part}")
        k = k.replace("hc_head.hc_", "hc_head_")
        out[k] = v
    return out


@pytest.mark.parametrize("style", ["converted", "original", "vlm_nested_config"])
@pytest.mark.parametrize("container", ["safetensors", "pt_training_dict"])
def test_single_files_match_library(dsv4, tmp_path, style, container):
    model, _ = dsv4
    sd = _converted_sd(model)
    config_settings = DEFAULTS
    if style == "original":
        sd = _original_names(sd)
    elif style == "vlm_nested_config":
        sd = {k.replace("model.", "model.language_model.", 1): v for k, v in sd.items()}
    if container == "safetensors":
        f = tmp_path / ("model.safetensors" if style == "vlm_nested_config" else "weights.safetensors")
        save_file(sd, str(f))
    else:
        f = tmp_path / ("pytorch_model.bin" if style == "vlm_nested_config" else "ckpt.pt")
        wrapped = {f"_orig_mod.{k}": v for k, v in sd.items()}
        ema = {f"module.{k}": torch.zeros_like(v) for k, v in sd.items()}
        opt = {"state": {0: {"exp_avg": torch.ones(3)}}, "param_groups": [{"lr": 1e-3}]}
        torch.save({"model": wrapped, "ema": ema, "optimizer": opt, "step": 3}, f)
    if style == "vlm_nested_config":
        cfg = {"model_type": "some_vlm", "text_config": dict(hc_mult=N, hidden_size=HID, **SETTINGS)}
        (tmp_path / "config.json").write_text(json.dumps(cfg))
        config_settings = SETTINGS
    loaded = load(f)
    assert loaded.layout == "transformers" and (loaded.n, loaded.C) == (N, HID)
    if style == "vlm_nested_config":
        assert loaded.settings_source["n"] == "config.json:text_config (hc_mult)"
    else:  # no config: n and C from fn's shape, defaults for the rest, said so
        assert loaded.settings_source["n"].startswith("inferred from")
        assert loaded.settings_source["iters"].startswith("default")
    if container == "pt_training_dict":
        assert loaded.metadata["state_dict"] == "model"
        assert any("ema" in note for note in loaded.notes)
        assert loaded.bytes_read == 2 * LAYERS * 4 * ((N + 2) * N * N * HID + (N + 2) * N + 3)
    _check_against_library(loaded, _oracle(model, config_settings))


def test_pt_state_key_reads_ema(dsv4, tmp_path):
    model, _ = dsv4
    sd = _converted_sd(model)
    ema = {k: v * 0.5 for k, v in sd.items()}
    f = tmp_path / "ckpt.pt"
    torch.save({"model": sd, "ema": ema}, f)
    a = load(f)
    b = load(f, options=LoadOptions(extra={"state_key": "ema"}))
    assert b.metadata["state_dict"] == "ema"
    torch.testing.assert_close(b.sites[0].module.fn, a.sites[0].module.fn * 0.5)


def test_mtp_layers_beyond_num_hidden_layers_are_ignored(dsv4, tmp_path):
    model, _ = dsv4
    sd = _original_names(_converted_sd(model))
    for part, v in [("fn", torch.zeros(24, N * HID)), ("base", torch.zeros(24)), ("scale", torch.ones(3))]:
        sd[f"layers.{LAYERS}.hc_attn_{part}"] = v
    save_file(sd, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps(dict(num_hidden_layers=LAYERS, hc_mult=N, hidden_size=HID)))
    loaded = load(tmp_path)
    assert len(loaded.sites) == 2 * LAYERS
    assert any("beyond num_hidden_layers" in note for note in loaded.notes)


def test_config_mismatch_is_an_input_error(dsv4, tmp_path):
    model, _ = dsv4
    save_file(_converted_sd(model), str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps(dict(hc_mult=3, hidden_size=HID)))
    with pytest.raises(InputError, match=r"model\.layers\.0\.attn_hc\.fn has 24 rows"):
        load(tmp_path)


def test_incomplete_site_names_the_key(dsv4, tmp_path):
    model, _ = dsv4
    sd = _converted_sd(model)
    del sd["model.layers.1.ffn_hc.base"]
    save_file(sd, str(tmp_path / "w.safetensors"))
    with pytest.raises(InputError, match=r"ffn_1 is incomplete.*model\.layers\.1\.ffn_hc\.fn.*no base"):
        load(tmp_path / "w.safetensors")


def test_inspect_counts_match_registry_and_module(dsv4):
    model, root = dsv4
    rep = inspect_checkpoint(root / "sharded")
    assert rep.layout == "transformers" and rep.convention == "transformers" and rep.iters == 7
    per_site = (N * N + 2 * N) * (N * HID + 1) + 3  # SPEC section 5, paper form
    lib_count = sum(p.numel() for p in model.model.layers[0].attn_hc.parameters())
    assert lib_count == per_site
    assert [s.params for s in rep.sites] == [per_site] * (2 * LAYERS)
    assert all(s.param_match and s.registry_params.get("paper") == per_site for s in rep.sites)
    assert rep.total_params == 2 * LAYERS * per_site
    d = rep.to_dict()
    json.dumps(d)
    assert d["sites"][0]["tensors"][0]["shape"] == [(N + 2) * N, N * HID]
    assert d["bytes_read"] == 0  # inspect reads headers only
    assert d["hc_bytes"] == 2 * LAYERS * 4 * per_site  # float32 fn/base/scale of every site, from the headers
    assert 0 < d["hc_bytes"] < d["bytes_total"]


# ---------------------------------------------------------------------------------------------------------------
# GLM-5-Next (n = 3, no model prefix) and HY-V4 (no comb: H_res = I)


def test_glm5_next_matches_library(tmp_path):
    torch.manual_seed(0)
    cfg = Glm5NextTextConfig(**TINY_GLM5)
    model = Glm5NextTextModel(cfg).eval()
    _randomize_hc(model, 2)
    model.save_pretrained(tmp_path)
    loaded = load(tmp_path)
    assert (loaded.n, loaded.C, len(loaded.sites)) == (3, 32, 4)
    assert loaded.sites[0].module.sinkhorn.iters == 5
    _check_against_library(loaded, _hc_modules(model))


def test_hy_v4_is_identity_residual(tmp_path):
    torch.manual_seed(0)
    cfg = HYV4Config(**TINY_HY)
    model = HYV4Model(cfg).eval()
    _randomize_hc(model, 3)
    model.save_pretrained(tmp_path)
    loaded = load(tmp_path)
    assert (loaded.n, loaded.C, len(loaded.sites)) == (4, 32, 4)
    assert all(s.variant == "ihc" and s.module.exactness == Exactness.IDENTITY for s in loaded.sites)
    assert all(s.module.res_logits(torch.zeros(4, 32)) is None for s in loaded.sites)
    _check_against_library(loaded, _hc_modules(model), identity=True)
    rep = inspect_checkpoint(tmp_path)
    per_site = 2 * (4 * 4 * 32 + 4 + 1)  # fn [2n, nC] + base [2n] + scale [2]
    assert all(s.params == per_site and s.param_match for s in rep.sites)
    assert rep.convention is None


def test_inferred_n_without_config(tmp_path):
    """(n + 2) n rows solve for n; C = columns / n."""
    g = torch.Generator().manual_seed(5)
    n, C = 6, 5
    sd = {}
    for b in range(2):
        for kind in ("attn", "ffn"):
            sd[f"layers.{b}.{kind}_hc.fn"] = torch.randn((n + 2) * n, n * C, generator=g)
            sd[f"layers.{b}.{kind}_hc.base"] = torch.randn((n + 2) * n, generator=g)
            sd[f"layers.{b}.{kind}_hc.scale"] = torch.randn(3, generator=g)
    f = tmp_path / "x.safetensors"
    save_file(sd, str(f))
    loaded = load(f)
    assert (loaded.n, loaded.C) == (n, C)
    assert [s.name for s in loaded.sites] == ["attn_0", "ffn_0", "attn_1", "ffn_1"]
    lib = DeepseekV4HyperConnection(DeepseekV4Config(**dict(TINY_DSV4, hidden_size=C, hc_mult=n), **DEFAULTS))
    lib.load_state_dict({p: sd[f"layers.1.ffn_hc.{p}"] for p in ("fn", "base", "scale")})
    x = _streams(0, 3, n, C)
    with torch.no_grad():
        _, comb, _ = lib(x)
    res = loaded.sites[3].module(x[0].double()).res
    torch.testing.assert_close(res.float(), comb[0].transpose(-1, -2), atol=1e-5, rtol=0)
    assert math.isclose(float(res.sum(-1).mean()), 1.0, abs_tol=1e-5)


def test_hy_release_names(tmp_path):
    """HY-V4 before conversion: layers.N.hc_pre.hc_attn_layer.hc_fn / hc_mlp_layer."""
    n, C = 2, 4
    sd = {}
    for b in range(2):
        for kind in ("attn", "mlp"):
            sd[f"model.layers.{b}.hc_pre.hc_{kind}_layer.hc_fn"] = torch.randn(2 * n, n * C)
            sd[f"model.layers.{b}.hc_pre.hc_{kind}_layer.hc_base"] = torch.randn(2 * n)
            sd[f"model.layers.{b}.hc_pre.hc_{kind}_layer.hc_scale"] = torch.randn(2)
    save_file(sd, str(tmp_path / "m.safetensors"))
    loaded = load(tmp_path / "m.safetensors")
    assert [s.name for s in loaded.sites] == ["attn_0", "ffn_0", "attn_1", "ffn_1"]
    assert all(s.variant == "ihc" for s in loaded.sites)


def test_forced_layout_and_unknown_layout(dsv4, tmp_path):
    from hcdiag.errors import UsageError

    _, root = dsv4
    loaded = load(root / "sharded", layout="transformers")
    assert loaded.layout_reason.startswith("forced with --layout transformers")
    with pytest.raises(UsageError, match="unknown layout"):
        load(root / "sharded", layout="nope")


def test_paths_are_strings(dsv4):
    _, root = dsv4
    assert load(str(root / "sharded")).path == str(Path(root / "sharded"))


# ------------------------------------------------------------------ convention by transformers version


def _sigmoid_start_forward(self, hidden_streams):
    """DeepseekV4HyperConnection.forward as the earlier transformers code computed it (sigmoid start), in
    float64: comb = sigmoid(logits) + eps, then hc_sinkhorn_iters x (rows, columns), + eps in each denominator."""
    b, s = hidden_streams.shape[:2]
    hc, eps = self.hc_mult, self.hc_eps
    flat = hidden_streams.reshape(b, s, -1).double()
    flat = flat * torch.rsqrt(flat.square().mean(-1, keepdim=True) + self.input_norm.eps)
    pre_w, post_w, comb_w = torch.nn.functional.linear(flat, self.fn.double()).split([hc, hc, hc * hc], dim=-1)
    pre_b, post_b, comb_b = self.base.double().split([hc, hc, hc * hc])
    pre_s, post_s, comb_s = self.scale.double().unbind(0)
    pre = torch.sigmoid(pre_w * pre_s + pre_b) + eps
    post = torch.sigmoid(post_w * post_s + post_b) + eps
    comb = torch.sigmoid(comb_w.view(b, s, hc, hc) * comb_s + comb_b.view(hc, hc)) + eps
    for _ in range(self.hc_sinkhorn_iters):
        comb = comb / (comb.sum(dim=-1, keepdim=True) + eps)
        comb = comb / (comb.sum(dim=-2, keepdim=True) + eps)
    return post, comb, (pre.unsqueeze(-1) * hidden_streams.double()).sum(dim=2)


def _with_version(root: Path, dst: Path, version: str | None) -> Path:
    """A copy of the sharded checkpoint whose config.json says ``transformers_version`` (None: key removed)."""
    import shutil

    shutil.copytree(root / "sharded", dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg.pop("transformers_version", None)
    if version is not None:
        cfg["transformers_version"] = version
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def test_pre_release_config_gets_the_sigmoid_start(dsv4, tmp_path, monkeypatch):
    """transformers_version 5.8.0.dev0 (before the first release with DeepSeek-V4, whose code has the softmax
    start): H_res equals the earlier code's comb itself (its layer applies torch.matmul(comb, residual); this
    test asserted comb^T before, the 5.8.0+ orientation, which the earlier code never used) and H_post its
    sigmoid + eps, float64 within 1e-6, and the output says why."""
    model, root = dsv4
    loaded = load(_with_version(root, tmp_path / "old", "5.8.0.dev0"))
    assert {s.module.sinkhorn.convention for s in loaded.sites} == {Convention.TRANSFORMERS_SIGMOID}
    why = "config.json transformers_version 5.8.0.dev0 < 5.8.0, the first release with the softmax start"
    assert loaded.settings_source["convention"].startswith(why)
    assert any(note.startswith("the earlier transformers DeepSeek-V4 code (before 5.8.0)") for note in loaded.notes)
    monkeypatch.setattr(DeepseekV4HyperConnection, "forward", _sigmoid_start_forward)
    worst = 0.0
    for (_, lib), site in zip(_oracle(model, SETTINGS), loaded.sites, strict=True):
        x = _streams(site.index + 5, 6, loaded.n, loaded.C)
        with torch.no_grad():
            post, comb, _ = lib(x)
            _, got_post, res = site.module(x[0].double())
        worst = max(worst, float((res - comb[0]).abs().max()), float((got_post - post[0]).abs().max()))
    assert worst < 1e-6
    # and the 5.24 (softmax) matrices are visibly different: the test can fail
    today = load(_with_version(root, tmp_path / "new", "5.24.0"))
    x = _streams(5, 6, loaded.n, loaded.C)[0].double()
    assert float((today.sites[0].module(x)[2] - loaded.sites[0].module(x)[2]).abs().max()) > 1e-3


@pytest.mark.parametrize(
    ("version", "why"),
    [
        ("5.24.0", "layout (transformers; config.json transformers_version 5.24.0 >= 5.8.0: softmax start)"),
        ("4.57.1", "layout (transformers; config.json transformers_version 4.57.1 predates"),
        (None, "layout (transformers; installed transformers 5.24.0 >= 5.8.0"),
    ],
)
def test_released_or_older_config_keeps_the_softmax_start(dsv4, tmp_path, version, why):
    model, root = dsv4
    loaded = load(_with_version(root, tmp_path / "ckpt", version))
    assert {s.module.sinkhorn.convention for s in loaded.sites} == {Convention.TRANSFORMERS}
    assert loaded.settings_source["convention"].startswith(why)
    _check_against_library(loaded, _oracle(model, SETTINGS))  # the real 5.24 module


def test_cli_convention_overrides_the_version(dsv4, tmp_path):
    _, root = dsv4
    old = _with_version(root, tmp_path / "old", "5.8.0.dev0")
    loaded = load(old, options=LoadOptions(convention="transformers"))
    assert {s.module.sinkhorn.convention for s in loaded.sites} == {Convention.TRANSFORMERS}
    assert loaded.settings_source["convention"] == "cli (--convention)"
    # the other transformers convention keeps the config's hc_eps; one without an eps gets 0, said so
    assert loaded.settings_source["eps"] == "config.json (hc_eps)"
    log = load(old, options=LoadOptions(convention="log"))
    assert {(s.module.sinkhorn.convention, s.module.sinkhorn.eps) for s in log.sites} == {(Convention.LOG, 0.0)}
    assert log.settings_source["eps"] == "default"

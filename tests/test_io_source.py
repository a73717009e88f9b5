"""Tensor sources and load(): every readable format, and hostile files that must end in one-line InputErrors."""

from __future__ import annotations

import json
import pickle
import struct
import zipfile

import pytest
import torch
from safetensors.torch import save_file

from hcdiag.errors import InputError
from hcdiag.io import load, open_source
from hcdiag.io.source import looks_hc, strip_key

N, C = 2, 4


def _hc_sd(blocks: int = 2, seed: int = 0, prefix: str = "model.") -> dict[str, torch.Tensor]:
    """A transformers-named mHC state dict (n = 2, C = 4) plus one big non-HC tensor."""
    g = torch.Generator().manual_seed(seed)
    sd = {f"{prefix}embed_tokens.weight": torch.randn(64, C, generator=g)}
    for b in range(blocks):
        for kind in ("attn", "ffn"):
            sd[f"{prefix}layers.{b}.{kind}_hc.fn"] = torch.randn((N + 2) * N, N * C, generator=g)
            sd[f"{prefix}layers.{b}.{kind}_hc.base"] = torch.randn((N + 2) * N, generator=g)
            sd[f"{prefix}layers.{b}.{kind}_hc.scale"] = torch.randn(3, generator=g)
    return sd


HC_BYTES_2_BLOCKS = 4 * 4 * ((N + 2) * N * N * C + (N + 2) * N + 3)  # 4 sites, float32


class _Unsafe:  # pickled by reference: weights_only loading must refuse it
    def __init__(self) -> None:
        self.lr = 0.1


def _expect_input_error(path, match: str, **kw) -> InputError:
    with pytest.raises(InputError) as info:
        load(path, **kw)
    msg = str(info.value)
    assert str(path) in msg, msg
    assert "\n" not in msg, msg
    assert info.value.path is not None
    import re

    assert re.search(match, msg), msg
    return info.value


# ---------------------------------------------------------------------------------------------------------------
# readable formats


def test_safetensors_header_only_listing_and_bytes(tmp_path):
    sd = _hc_sd()
    sd["model.layers.0.attn_hc.base"] = sd["model.layers.0.attn_hc.base"].to(torch.bfloat16)
    f = tmp_path / "w.safetensors"
    save_file(sd, str(f), metadata={"trained_on": "tiny"})
    src = open_source(f)
    assert sorted(src.keys()) == sorted(sd)
    assert src.bytes_read == 0
    assert src.bytes_total == sum(t.numel() * t.element_size() for t in sd.values())
    assert src.header_bytes == f.stat().st_size - src.bytes_total
    assert src.metadata == {"trained_on": "tiny"}
    info = src.info("model.layers.0.attn_hc.base")
    assert (info.shape, info.dtype) == (((N + 2) * N,), "bfloat16")
    t64 = src.get("model.layers.0.attn_hc.base")
    assert t64.dtype == torch.float64
    torch.testing.assert_close(t64, sd["model.layers.0.attn_hc.base"].double(), atol=0, rtol=0)
    assert src.get("model.layers.0.attn_hc.base", dtype=None).dtype == torch.bfloat16
    assert src.bytes_read == (N + 2) * N * 2  # each key counted once
    model = load(f)
    assert model.bytes_read == HC_BYTES_2_BLOCKS - (N + 2) * N * 2  # the bf16 base is half the size
    assert model.bytes_total == src.bytes_total
    assert model.source_dtype == "float32"


@pytest.mark.parametrize("name", ["w.safetensors.json", "w.hcdiag.json"])
def test_sidecar_metadata_is_merged(tmp_path, name):
    f = tmp_path / "w.safetensors"
    save_file(_hc_sd(), str(f), metadata={"a": "header", "b": "header"})
    (tmp_path / name).write_text(json.dumps({"b": "sidecar", "n": 2, "sites": ["attn_0"]}))
    src = open_source(f)
    assert src.metadata == {"a": "header", "b": "sidecar", "n": "2", "sites": '["attn_0"]'}


def test_bad_sidecar_is_an_input_error(tmp_path):
    f = tmp_path / "w.safetensors"
    save_file(_hc_sd(), str(f))
    (tmp_path / "w.hcdiag.json").write_text("{not json")
    with pytest.raises(InputError, match="w.hcdiag.json"):
        open_source(f)


def test_pt_training_dict_prefixes_and_bytes(tmp_path):
    sd = _hc_sd()
    f = tmp_path / "ckpt.pth"
    torch.save(
        {
            "model": {f"module._orig_mod.{k}": v for k, v in sd.items()},
            "optimizer": {"state": {0: {"exp_avg": torch.zeros(1000)}}, "param_groups": [{"lr": 0.1}]},
            "step": 3,
            "args": {"lr": 0.1, "name": "run"},
        },
        f,
    )
    src = open_source(f)
    assert sorted(src.keys()) == sorted(sd) and src.container == "model"
    model = load(f)
    assert model.bytes_read == HC_BYTES_2_BLOCKS  # mmap: only the touched tensors
    assert model.bytes_total == sum(t.numel() * 4 for t in sd.values()) + 1000 * 4
    assert model.metadata["state_dict"] == "model"


@pytest.mark.parametrize("key", ["state_dict", "module", "model_state_dict"])
def test_pt_other_container_names(tmp_path, key):
    f = tmp_path / "c.pt"
    torch.save({key: _hc_sd(), "epoch": 1}, f)
    assert len(load(f).sites) == 4


def test_pt_plain_state_dict_and_legacy_format(tmp_path):
    f = tmp_path / "plain.pt"
    torch.save(_hc_sd(), f, _use_new_zipfile_serialization=False)
    model = load(f)
    assert len(model.sites) == 4
    assert model.bytes_read == model.bytes_total  # no mmap for the legacy format: all of it was read
    assert any("legacy" in n for n in model.notes)


def test_trust_pickle_loads_unsafe_globals(tmp_path):
    f = tmp_path / "unsafe.pt"
    torch.save({"model": _hc_sd(), "cfg": _Unsafe()}, f)
    err = _expect_input_error(f, r"_Unsafe.*--trust-pickle")
    assert "weights_only" in str(err)
    assert len(load(f, trust_pickle=True).sites) == 4


def test_strip_key_and_looks_hc():
    assert strip_key("module._orig_mod.module.layers.0.x") == "layers.0.x"
    assert strip_key("model._orig_mod.layers.0.x") == "model.layers.0.x"
    assert strip_key("module.") == "module."
    for k in ["layers.0.attn_hc.fn", "hc_head_fn", "blocks.1.static_alpha", "h.2.hyper_conn.beta",
              "layers.3.mhc.phi_res", "x.sinkhorn_logits", "l.0.comb", "blocks.0.H_res"]:  # fmt: skip
        assert looks_hc(k), k
    for k in ["model.layers.0.mlp.weight", "lm_head.weight", "which.weight", "encoder.schedule", "chc.w"]:
        assert not looks_hc(k), k


def test_sharded_dir_index_given_directly_and_missing_shard(tmp_path):
    sd = _hc_sd(blocks=3)
    keys = sorted(sd)
    shards = {f"model-0000{i}-of-00003.safetensors": keys[i::3] for i in range(3)}
    wmap = {}
    for name, ks in shards.items():
        save_file({k: sd[k] for k in ks}, str(tmp_path / name))
        wmap.update({k: name for k in ks})
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": wmap}))
    (tmp_path / "config.json").write_text(json.dumps({"hc_mult": N, "hidden_size": C}))
    model = load(tmp_path)
    assert len(model.sites) == 6 and model.settings_source["n"] == "config.json (hc_mult)"
    assert load(tmp_path / "model.safetensors.index.json").settings_source["n"] == "config.json (hc_mult)"
    # a shard missing: its HC keys are gone, the incomplete site is named
    (tmp_path / "model-00002-of-00003.safetensors").unlink()
    err = _expect_input_error(tmp_path, r"is incomplete")
    assert "missing shard" in str(err)
    src = open_source(tmp_path)
    assert any("missing" in note for note in src.notes)


def test_dir_with_single_safetensors_or_bin(tmp_path):
    (tmp_path / "a").mkdir()
    save_file(_hc_sd(), str(tmp_path / "a" / "weights.safetensors"))
    assert len(load(tmp_path / "a").sites) == 4
    (tmp_path / "b").mkdir()
    torch.save(_hc_sd(), tmp_path / "b" / "pytorch_model.bin")
    assert len(load(tmp_path / "b").sites) == 4


# ---------------------------------------------------------------------------------------------------------------
# hostile files: every one an InputError naming the path, never a traceback


def test_empty_file(tmp_path):
    for name in ["e.pt", "e.safetensors", "e"]:
        f = tmp_path / name
        f.write_bytes(b"")
        _expect_input_error(f, "not a PyTorch or safetensors checkpoint .*empty file")


def test_random_bytes_with_pt_suffix(tmp_path):
    g = torch.Generator().manual_seed(0)
    data = bytes(torch.randint(0, 256, (4096,), generator=g, dtype=torch.uint8).tolist())
    for name, blob in [("r.pt", data), ("p.pt", b"\x80\x02" + data), ("z.pt", b"PK\x03\x04" + data)]:
        f = tmp_path / name
        f.write_bytes(blob)
        _expect_input_error(f, "not a PyTorch or safetensors checkpoint")


def test_truncated_safetensors(tmp_path):
    good = tmp_path / "good.safetensors"
    save_file(_hc_sd(), str(good))
    data = good.read_bytes()
    for cut in [4, 20, len(data) // 2, len(data) - 1]:
        f = tmp_path / f"cut{cut}.safetensors"
        f.write_bytes(data[:cut])
        _expect_input_error(f, "not a PyTorch or safetensors checkpoint")


@pytest.mark.parametrize("fmt", ["safetensors", "pt"])
def test_truncation_fuzz_never_tracebacks(tmp_path, fmt):
    good = tmp_path / f"good.{fmt}"
    if fmt == "safetensors":
        save_file(_hc_sd(), str(good))
    else:
        torch.save({"model": _hc_sd()}, good)
    data = good.read_bytes()
    for i, cut in enumerate(range(1, len(data), max(1, len(data) // 23))):
        f = tmp_path / f"t{i}.{fmt}"
        f.write_bytes(data[:cut])
        with pytest.raises(InputError):
            load(f)
    flipped = bytearray(data)
    for pos in range(8, len(flipped), max(1, len(flipped) // 17)):
        flipped[pos] ^= 0xFF
        f = tmp_path / f"flip{pos}.{fmt}"
        f.write_bytes(bytes(flipped))
        try:
            load(f)
        except InputError:
            pass


def test_lying_safetensors_header(tmp_path):
    header = {"a": {"dtype": "F32", "shape": [1000, 1000], "data_offsets": [0, 16]}}
    raw = json.dumps(header).encode()
    f = tmp_path / "lie.safetensors"
    f.write_bytes(struct.pack("<Q", len(raw)) + raw + b"\0" * 16)
    _expect_input_error(f, "bytes stored for shape")
    header = {"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}
    raw = json.dumps(header).encode()
    f.write_bytes(struct.pack("<Q", len(raw)) + raw + b"\0" * 8)
    _expect_input_error(f, "truncated")


def test_unsafe_pickle_is_refused(tmp_path):
    f = tmp_path / "evil.pt"
    torch.save({"model": _hc_sd(), "hook": _Unsafe()}, f)
    _expect_input_error(f, r"refusing to unpickle non-tensor globals .*_Unsafe.*--trust-pickle")


def test_plain_pickle_and_foreign_zip(tmp_path):
    f = tmp_path / "plain.pt"
    f.write_bytes(pickle.dumps({"a": [1, 2, 3]}))
    _expect_input_error(f, "plain pickle")
    z = tmp_path / "z.pt"
    with zipfile.ZipFile(z, "w") as zf:
        zf.writestr("readme.txt", "hello")
    _expect_input_error(z, "torch.load failed")


def test_nan_in_hc_tensor(tmp_path):
    sd = _hc_sd()
    sd["model.layers.1.ffn_hc.fn"][3, 2] = float("nan")
    f = tmp_path / "nan.safetensors"
    save_file(sd, str(f))
    _expect_input_error(f, r"model\.layers\.1\.ffn_hc\.fn \(site ffn_1\) holds 1 NaN/Inf")


def test_no_hc_keys(tmp_path):
    f = tmp_path / "plain.safetensors"
    save_file({"model.layers.0.mlp.weight": torch.zeros(4, 4), "lm_head.weight": torch.zeros(2, 4)}, str(f))
    _expect_input_error(f, "no hyper-connection tensors found among 2 tensors.*--layout-file")
    g = tmp_path / "plain.pt"
    torch.save({"model": {"w": torch.zeros(3)}, "step": 1}, g)
    _expect_input_error(g, "no hyper-connection tensors found")


def test_hc_looking_keys_without_layout(tmp_path):
    f = tmp_path / "odd.safetensors"
    save_file({"blocks.0.hyper_mix.weight": torch.zeros(4, 4), "blocks.0.mlp.w": torch.zeros(2)}, str(f))
    _expect_input_error(f, r"1 tensors look HC-related .*blocks\.0\.hyper_mix\.weight \[4, 4\].*--layout-file")


def test_dir_without_weights_and_other_non_checkpoints(tmp_path):
    d = tmp_path / "empty_dir"
    d.mkdir()
    (d / "config.json").write_text("{}")
    _expect_input_error(d, "directory holds no")
    j = tmp_path / "x.json"
    j.write_text('{"weight_map": 1}')
    _expect_input_error(j, "JSON text")
    _expect_input_error(tmp_path / "missing.pt", "no such file")
    b = tmp_path / "badcfg"
    b.mkdir()
    (b / "config.json").write_text("{oops")
    save_file(_hc_sd(), str(b / "model.safetensors"))
    _expect_input_error(b, "config.json is not valid JSON")
    t = tmp_path / "tensor.pt"
    torch.save([torch.zeros(2)], t)
    _expect_input_error(t, "holds no dict of tensors")


def test_inconsistent_shapes_name_the_key(tmp_path):
    sd = _hc_sd()
    sd["model.layers.0.ffn_hc.base"] = torch.zeros(7)
    f = tmp_path / "shape.safetensors"
    save_file(sd, str(f))
    _expect_input_error(f, r"model\.layers\.0\.ffn_hc\.base has 7 entries")


def test_index_pointing_outside_the_directory(tmp_path):
    d = tmp_path / "ckpt"
    d.mkdir()
    save_file(_hc_sd(), str(tmp_path / "outside.safetensors"))
    wmap = {k: "../outside.safetensors" for k in _hc_sd()}
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": wmap}))
    with pytest.raises(InputError, match="outside the checkpoint directory"):
        load(d)


def test_training_loop_settings_are_exposed_as_config(tmp_path):
    # nanoGPT saves model_args beside the weights; layouts read hyper_conn_type from there
    from hcdiag.io.base import LoadOptions
    from hcdiag.io.nanogpt_layout import hyper_conn_type
    from hcdiag.io.source import open_source

    path = tmp_path / "ckpt.pt"
    torch.save({"model": {"w": torch.zeros(2)}, "model_args": {"hyper_conn_type": "tbp", "n_layer": 2,
                                                               "bias": False}, "iter_num": 5}, path)
    src = open_source(path)
    assert src.config == {"model_args": {"hyper_conn_type": "tbp", "n_layer": 2, "bias": False}}
    assert hyper_conn_type(src, LoadOptions()) == ("tbp", "config")

"""Benchmark: ``hcdiag verify`` against ``hcdiag stochasticity --probe activations`` on the same recorded pass.

Generates (in a temporary directory) a DeepSeek-V4-Flash-shaped model: B blocks of two transformers
``DeepseekV4HyperConnection`` modules (the real library code, random weights), n = 4 streams of width C, wrapped
in a decoder layer that applies the 5.24 update (post F + comb^T x) with a cheap branch (tanh) in place of the
attention / MLP. The checkpoint (``model.safetensors`` + ``config.json``, transformers layout) is saved, one
forward pass of T tokens is recorded with ``hcdiag.capture``, and then, in the same process:

* ``verify`` with the fingerprint (the default), and without it (``--no-fingerprint``);
* ``analyze_stochasticity`` with ``--probe activations`` on the same file (the baseline).

Each phase loads the checkpoint and reads the activations itself, as the command would. Ratios are verify /
stochasticity.

    python bench/bench_verify.py            # 86 sites (43 blocks), C = 4096, n = 4, T = 256 tokens
    python bench/bench_verify.py --tokens 4096   # the full DeepSeek-V4-Flash pass: ~52 GB of float32
                                                 # activations (x, y, F per site); needs a machine with that RAM
    python bench/bench_verify.py --quick    # 8 sites, C = 512, T = 128 (seconds)

Why T = 256 by default: one site's x at T = 4096, C = 4096 is 268 MB in float32, and x, y, F over 86 sites are
~52 GB; both commands hold the recording in memory (``ActivationsProbe`` caches every site), so on a 24 GB
machine the full size cannot run. Both costs are linear in T (per-token matrix products, per-token Sinkhorn),
except the fingerprint, which works on 64 sampled tokens whatever T is. Not a pytest test.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
from torch import nn


def _model(blocks: int, n: int, C: int):
    from transformers import DeepseekV4Config
    from transformers.models.deepseek_v4.modeling_deepseek_v4 import DeepseekV4HyperConnection

    cfg = DeepseekV4Config(hidden_size=C, hc_mult=n, num_hidden_layers=blocks, vocab_size=16,
                           num_attention_heads=1, num_key_value_heads=1, head_dim=16, q_lora_rank=16,
                           moe_intermediate_size=16, n_routed_experts=2, num_experts_per_tok=1, o_groups=1,
                           o_lora_rank=16, index_n_heads=1, index_head_dim=8, index_topk=4)

    class Layer(nn.Module):
        """DeepseekV4DecoderLayer's update (transformers 5.24) around a tanh branch."""

        def __init__(self) -> None:
            super().__init__()
            self.attn_hc = DeepseekV4HyperConnection(cfg)
            self.ffn_hc = DeepseekV4HyperConnection(cfg)
            self.self_attn = nn.Tanh()
            self.mlp = nn.Tanh()

        def forward(self, h: torch.Tensor) -> torch.Tensor:
            post, comb, collapsed = self.attn_hc(h)
            h = post.unsqueeze(-1) * self.self_attn(collapsed).unsqueeze(-2) + torch.matmul(comb.mT, h)
            post, comb, collapsed = self.ffn_hc(h)
            return post.unsqueeze(-1) * self.mlp(collapsed).unsqueeze(-2) + torch.matmul(comb.mT, h)

    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layers = nn.ModuleList([Layer() for _ in range(blocks)])

        def forward(self, h: torch.Tensor) -> torch.Tensor:
            for layer in self.layers:
                h = layer(h)
            return h

    m = Model()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in m.named_parameters():
            scale = {"fn": 0.3, "base": 1.0, "scale": 1.5}[name.rsplit(".", 1)[-1]]
            p.copy_(torch.randn(p.shape, generator=g) * scale)
    return m.eval(), cfg


def _timed(fn, repeat: int = 1):
    """(result, best wall time of ``repeat`` runs): the minimum is the least disturbed by other processes."""
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return out, best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--blocks", type=int, default=43, help="decoder blocks (2 sites each; default 43 = 86 sites)")
    ap.add_argument("--C", type=int, default=4096, help="stream width (default 4096)")
    ap.add_argument("--n", type=int, default=4, help="streams (default 4)")
    ap.add_argument("--tokens", type=int, default=256, help="recorded tokens (default 256; see the docstring)")
    ap.add_argument("--quick", action="store_true", help="8 sites, C = 512, 128 tokens, best of 5 runs")
    ap.add_argument("--repeat", type=int, default=1, help="runs per phase; the best is reported (default 1)")
    args = ap.parse_args()
    if args.quick:
        args.blocks, args.C, args.tokens, args.repeat = 4, 512, 128, max(args.repeat, 5)

    from safetensors.torch import save_file

    from hcdiag.capture import capture
    from hcdiag.io.load import load
    from hcdiag.probes import make_probe
    from hcdiag.stochasticity import analyze_stochasticity
    from hcdiag.verification import verify

    sites = 2 * args.blocks
    print(f"{sites} sites, n = {args.n}, C = {args.C}, {args.tokens} tokens; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; best of {args.repeat} run(s) per phase")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model, cfg = _model(args.blocks, args.n, args.C)
        ckpt = root / "ckpt"
        ckpt.mkdir()
        state = {f"model.{k}": v.contiguous() for k, v in model.state_dict().items()}
        save_file(state, str(ckpt / "model.safetensors"))
        (ckpt / "config.json").write_text(json.dumps(cfg.to_dict()))
        x0 = torch.randn(1, args.tokens, args.n, args.C, generator=torch.Generator().manual_seed(1))
        acts = root / "acts.safetensors"
        _, t_cap = _timed(lambda: _capture(model, acts, x0, capture))
        print(f"capture: {t_cap:.2f} s, file {acts.stat().st_size / 1e9:.2f} GB")

        r = args.repeat
        report, t_v = _timed(lambda: verify(str(ckpt), acts), r)
        assert report.conforms, report.verdict
        _, t_vn = _timed(lambda: verify(str(ckpt), acts, fingerprint=False), r)
        _, t_s = _timed(lambda: analyze_stochasticity(load(str(ckpt)),
                                                       probe=make_probe("activations", activations=acts)), r)
    print(f"stochasticity --probe activations: {t_s:8.2f} s  (baseline)")
    print(f"verify (with fingerprint):         {t_v:8.2f} s  = {t_v / t_s:.2f} x baseline")
    print(f"verify --no-fingerprint:           {t_vn:8.2f} s  = {t_vn / t_s:.2f} x baseline")
    print(f"fingerprint ({sites} sites, 64 tokens, 10 families x 1..100 iterations): {t_v - t_vn:.2f} s")
    print(f"verdict: {report.verdict}")


def _capture(model: nn.Module, path: Path, x0: torch.Tensor, capture) -> None:
    with torch.no_grad(), capture(model, path, max_tokens=x0.shape[1]):
        model(x0)


if __name__ == "__main__":
    main()

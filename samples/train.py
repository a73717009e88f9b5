"""Train a tiny character-level transformer LM once per HC variant and save hcdiag sample checkpoints.

Dimension letters: B batch, S sequence, n streams, C stream width, V vocabulary, L = 2 * blocks HC sites.

Each block has two HC sites (attn_b, ffn_b). With x the streams [B, S, n, C], a site gives H_pre [B, S, n],
H_post [B, S, n], H_res [B, S, n, n] in paper convention and the update is (mHC Eq. 3)

    x <- H_res x + H_post^T F(H_pre x)          F = causal attention (attn sites) or an MLP (ffn sites)

with F carrying its own pre-LayerNorm. The embedding is copied into the n streams; the head averages the
streams, applies a LayerNorm and the tied unembedding. The HC sites are the registry modules themselves
(``hcdiag.registry.get(variant).build(...)``), held at ``model.hc.sites[i]``, so the model's own state_dict keys
for them are hcdiag's native keys ``hc.sites.{i}.{param}``.

Corpus: generated here, deterministically, from a small hand-written English grammar plus arithmetic and
counting lines, with a self-contained 64-bit PRNG (splitmix64), so the text does not depend on the Python
version and carries no licence. Nothing is downloaded.

Outputs (in --out-dir, default: this directory):
    <variant>.safetensors        hcdiag native layout; HC tensors float32, other weights bfloat16 (size < 1 MB)
    mhc_trainloop.pt             torch.save({"model", "optimizer", "step"}) of a smaller mhc run (C = 32,
    mhc_trainloop.pt.json        4 blocks) as a training loop saves it, keys under torch.compile's "_orig_mod."
                                 prefix; its hcdiag metadata lives in the sidecar JSON

Usage:
    python samples/train.py                                  # all variants + the .pt (a few minutes, 2 cores)
    python samples/train.py --variants mhc,tbp --steps 50 --out-dir /tmp/s --no-trainloop
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from hcdiag import registry
from hcdiag.enums import Form
from hcdiag.fileio import atomic_write
from hcdiag.io.native import native_metadata, save_native

DEFAULT_VARIANTS = ("identity", "hc-static", "hc-dynamic", "mhc", "mhc-lite", "kromhc", "tbp", "ihc")
MASK64 = (1 << 64) - 1


# ----------------------------------------------------------------------------------------------------------------
# Corpus


class SplitMix64:
    """Tiny deterministic PRNG (Steele et al. 2014), independent of Python's ``random`` implementation."""

    def __init__(self, seed: int) -> None:
        self.state = seed & MASK64

    def next(self) -> int:
        self.state = (self.state + 0x9E3779B97F4A7C15) & MASK64
        z = self.state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK64
        return z ^ (z >> 31)

    def below(self, k: int) -> int:
        return self.next() % k

    def choice(self, seq: tuple[str, ...]) -> str:
        return seq[self.below(len(seq))]


_SUBJ = (
    "the old miller",
    "a young fox",
    "the river",
    "my sister",
    "the clockmaker",
    "a tired sailor",
    "the baker",
    "the small dog",
    "an owl",
    "the teacher",
    "the king",
    "a stranger",
    "the children",
    "the farmer",
)
_VERB = (
    "watches",
    "carries",
    "follows",
    "remembers",
    "paints",
    "finds",
    "loses",
    "mends",
    "sells",
    "hides",
    "counts",
    "greets",
)
_OBJ = (
    "the bread",
    "a red kite",
    "the silver key",
    "an old map",
    "the lantern",
    "a letter",
    "the boat",
    "seven stones",
    "the green door",
    "a basket of apples",
    "the bell",
    "a song",
)
_PLACE = (
    "near the mill",
    "by the sea",
    "in the garden",
    "under the bridge",
    "at the market",
    "on the hill",
    "behind the church",
    "in the forest",
    "at dawn",
    "before supper",
)
_INTRANS = ("sleeps", "sings", "waits", "laughs", "runs home", "stays quiet", "looks up")
_NUM = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve")


def make_corpus(n_chars: int = 120_000, seed: int = 1234) -> str:
    """Deterministic English-like text: grammar sentences, sums, counting runs, in paragraphs."""
    rng = SplitMix64(seed)
    parts: list[str] = []
    total = 0
    while total < n_chars:
        para: list[str] = []
        for _ in range(3 + rng.below(4)):
            kind = rng.below(10)
            if kind < 5:
                s = f"{rng.choice(_SUBJ)} {rng.choice(_VERB)} {rng.choice(_OBJ)} {rng.choice(_PLACE)}."
            elif kind < 7:
                s = f"when {rng.choice(_SUBJ)} {rng.choice(_INTRANS)}, {rng.choice(_SUBJ)} {rng.choice(_VERB)} "
                s += f"{rng.choice(_OBJ)}."
            elif kind < 9:
                a, b = rng.below(50), rng.below(50)
                s = f"{a} plus {b} is {a + b}."
            else:
                start = rng.below(8)
                s = " ".join(_NUM[start : start + 3 + rng.below(3)]) + "."
            para.append(s[0].upper() + s[1:])
        text = " ".join(para) + "\n"
        parts.append(text)
        total += len(text)
    return "".join(parts)[:n_chars]


# ----------------------------------------------------------------------------------------------------------------
# Model


class Attention(nn.Module):
    def __init__(self, C: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm = nn.LayerNorm(C)
        self.qkv = nn.Linear(C, 3 * C, bias=False)
        self.proj = nn.Linear(C, C, bias=False)

    def forward(self, h: torch.Tensor) -> torch.Tensor:  # h [B, S, C]
        B, S, C = h.shape
        q, k, v = self.qkv(self.norm(h)).view(B, S, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(B, S, C))


class MLP(nn.Module):
    def __init__(self, C: int, hidden: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(C)
        self.fc = nn.Linear(C, hidden, bias=False)
        self.out = nn.Linear(hidden, C, bias=False)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.out(F.gelu(self.fc(self.norm(h))))


class Block(nn.Module):
    def __init__(self, C: int, heads: int, hidden: int) -> None:
        super().__init__()
        self.attn = Attention(C, heads)
        self.ffn = MLP(C, hidden)


class HCSites(nn.Module):
    """Holds the registry site modules so that their keys are ``hc.sites.{i}.{param}``."""

    def __init__(self, sites: list[nn.Module]) -> None:
        super().__init__()
        self.sites = nn.ModuleList(sites)


class TinyLM(nn.Module):
    def __init__(
        self, vocab: int, seq: int, *, variant: str, n: int, C: int, blocks: int, heads: int, hidden: int, seed: int
    ) -> None:
        super().__init__()
        self.n = n
        # Base weights first, from one seed, so that every variant starts from the same transformer.
        torch.manual_seed(seed)
        self.tok_emb = nn.Embedding(vocab, C)
        self.pos_emb = nn.Parameter(torch.zeros(seq, C))
        self.blocks = nn.ModuleList(Block(C, heads, hidden) for _ in range(blocks))
        self.norm_f = nn.LayerNorm(C)
        for name, p in self.named_parameters():
            if p.ndim == 2:
                std = 0.02 / math.sqrt(2 * blocks) if name.endswith(("proj.weight", "out.weight")) else 0.02
                nn.init.normal_(p, std=std)
        torch.manual_seed(seed + 1)
        spec = registry.get(variant)
        self.hc = HCSites([spec.build(n, C, layer_index=i, form=Form.CODE) for i in range(2 * blocks)])

    def branches(self) -> list[nn.Module]:
        return [m for b in self.blocks for m in (b.attn, b.ffn)]

    def forward(self, idx: torch.Tensor) -> torch.Tensor:  # idx [B, S] -> logits [B, S, V]
        S = idx.shape[1]
        x0 = self.tok_emb(idx) + self.pos_emb[:S]
        x = x0.unsqueeze(-2).expand(*x0.shape[:-1], self.n, x0.shape[-1])  # [B, S, n, C]: n copies
        for site, branch in zip(self.hc.sites, self.branches(), strict=True):
            pre, post, res = site(x)
            # broadcast-and-sum instead of einsum: einsum lowers to B*S tiny bmm's, several times slower on CPU
            h = (pre.unsqueeze(-1) * x).sum(-2)  # H_pre x: [B, S, C]
            f = branch(h)
            mixed = (res.unsqueeze(-1) * x.unsqueeze(-3)).sum(-2)  # H_res x: [B, S, n, C]
            x = mixed + post.unsqueeze(-1) * f.unsqueeze(-2)  # + H_post^T F(H_pre x)
        y = self.norm_f(x.mean(-2))
        return y @ self.tok_emb.weight.T


# ----------------------------------------------------------------------------------------------------------------
# Training


def _round(xs: list[float], sig: int = 6) -> list[float]:
    return [float(f"{v:.{sig}g}") for v in xs]


def train_one(
    variant: str,
    data: torch.Tensor,
    vocab: int,
    *,
    steps: int,
    seed: int,
    n: int,
    C: int,
    blocks: int,
    heads: int,
    hidden: int,
    batch: int,
    seq: int,
    lr: float,
    log_every: int,
) -> tuple[TinyLM, torch.optim.Optimizer, dict]:
    model = TinyLM(vocab, seq, variant=variant, n=n, C=C, blocks=blocks, heads=heads, hidden=hidden, seed=seed)
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        # weight decay only on the base model's matrices; HC parameters, norms and embeddings get none
        (decay if p.ndim == 2 and not name.startswith(("hc.", "tok_emb", "pos_emb")) else no_decay).append(p)
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
        lr=lr,
        betas=(0.9, 0.95),
    )
    warmup = max(1, min(20, steps // 10))

    def lr_at(step: int) -> float:  # linear warmup, cosine decay to 10 %
        if step < warmup:
            return lr * (step + 1) / warmup
        t = (step - warmup) / max(1, steps - warmup)
        return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))

    split = int(0.9 * len(data))
    train, val = data[:split], data[split:]
    gen = torch.Generator().manual_seed(seed + 2)  # same batches for every variant
    losses: list[float] = []
    gnorms: list[float] = []
    t0 = time.perf_counter()
    model.train()
    for step in range(steps):
        ix = torch.randint(0, len(train) - seq - 1, (batch,), generator=gen)
        xb = torch.stack([train[i : i + seq] for i in ix.tolist()])
        yb = torch.stack([train[i + 1 : i + seq + 1] for i in ix.tolist()])
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        loss = F.cross_entropy(model(xb).flatten(0, 1), yb.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        # the norm before clipping is what is recorded: HC's unconstrained growth shows up here
        gn = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        gnorms.append(gn.item())
        if (step + 1) % log_every == 0 or step == 0 or step + 1 == steps:
            print(
                f"[{variant:>10}] step {step + 1:4d}/{steps}  loss {losses[-1]:.4f}  grad-norm {gnorms[-1]:.3f}  "
                f"{time.perf_counter() - t0:5.1f}s",
                file=sys.stderr,
                flush=True,
            )
    model.eval()
    with torch.no_grad():
        vx = val[: (len(val) - 1) // seq * seq]
        vy = val[1 : len(vx) + 1]
        val_loss = F.cross_entropy(model(vx.view(-1, seq)).flatten(0, 1), vy).item()
    wall = time.perf_counter() - t0
    tail = losses[-max(1, min(20, steps)) :]
    info = {
        "task": "character-level language model, generated English-like corpus (samples/train.py make_corpus)",
        "corpus_chars": len(data),
        "vocab_size": vocab,
        "model": {"blocks": blocks, "heads": heads, "ffn_hidden": hidden, "seq_len": seq, "head": "mean of streams"},
        "steps": steps,
        "batch_size": batch,
        "optimizer": "AdamW(betas=(0.9, 0.95)); weight_decay 0.1 on base matrices, 0 on HC/norm/embedding",
        "lr": lr,
        "schedule": f"linear warmup {warmup} steps, cosine to 10%",
        "grad_clip": 1.0,
        "seed": seed,
        "torch": torch.__version__,
        "final_loss": round(losses[-1], 6),
        "final_loss_mean_last": round(sum(tail) / len(tail), 6),
        "val_loss": round(val_loss, 6),
        "loss": _round(losses),
        "grad_norm": _round(gnorms),
    }
    return model, opt, info | {"_wall_s": wall}


def _hc_modules(model: TinyLM) -> list:
    return list(model.hc.sites)


def _sinkhorn(model: TinyLM):
    return getattr(model.hc.sites[0], "sinkhorn", None)


def save_sample(model: TinyLM, path: Path, *, variant: str, n: int, C: int, blocks: int, info: dict) -> None:
    """Native safetensors: HC tensors float32 (the modules' dtype), the rest of the model bfloat16."""
    extra = {k: v.to(torch.bfloat16) for k, v in model.state_dict().items() if not k.startswith("hc.")}
    save_native(
        path,
        _hc_modules(model),
        variant=variant,
        n=n,
        C=C,
        blocks=blocks,
        sinkhorn=_sinkhorn(model),
        form=Form.CODE,
        extra_tensors=extra,
        metadata={"training": info, "other_weights_dtype": "bfloat16", "producer": "hcdiag samples/train.py"},
    )


def save_trainloop(
    model: TinyLM, opt: torch.optim.Optimizer, path: Path, *, variant: str, n: int, C: int, blocks: int, info: dict
) -> None:
    """torch.save({"model", "optimizer", "step"}) as a training loop writes it, plus ``<file>.json`` metadata.

    The state_dict keys carry torch.compile's ``_orig_mod.`` prefix (what ``torch.compile(model).state_dict()``
    gives), which readers strip. Written through a BytesIO so that the zip's internal archive name is fixed
    ("archive") and the bytes do not depend on the file name.
    """
    sd = {f"_orig_mod.{k}": v for k, v in model.state_dict().items()}
    buf = io.BytesIO()
    torch.save({"model": sd, "optimizer": opt.state_dict(), "step": info["steps"]}, buf)
    data = buf.getvalue()
    atomic_write(path, lambda tmp: tmp.write_bytes(data), option="--out-dir")
    meta = native_metadata(
        _hc_modules(model),
        variant=variant,
        n=n,
        C=C,
        blocks=blocks,
        sinkhorn=_sinkhorn(model),
        form=Form.CODE,
        metadata={"training": info, "producer": "hcdiag samples/train.py"},
    )
    # JSON-valued entries as nested JSON (readable); readers re-encode non-string sidecar values as JSON text
    doc = {k: json.loads(v) if k in ("sites", "training") else v for k, v in meta.items()}
    text = json.dumps(doc, indent=1) + "\n"
    atomic_write(path.with_name(path.name + ".json"), lambda tmp: tmp.write_text(text, encoding="utf-8"))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--variants", default=",".join(DEFAULT_VARIANTS), help="comma-separated registry names")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--out-dir", default=str(Path(__file__).resolve().parent))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--n", type=int, default=4)
    ap.add_argument("--C", type=int, default=64)
    ap.add_argument("--blocks", type=int, default=8)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--ffn-mult", type=float, default=1.0, help="MLP hidden width = ffn-mult * C")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--log-every", type=int, default=50)
    ap.add_argument(
        "--trainloop",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also write mhc_trainloop.pt (+ .json sidecar): mhc, C = 32, 4 blocks",
    )
    ap.add_argument("--trainloop-steps", type=int, default=None, help="default: --steps")
    ap.add_argument("--trainloop-C", type=int, default=32)
    ap.add_argument("--trainloop-blocks", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    text = make_corpus()
    chars = sorted(set(text))
    stoi = {c: i for i, c in enumerate(chars)}
    data = torch.tensor([stoi[c] for c in text], dtype=torch.long)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    for v in variants:
        registry.get(v)  # fail early on a typo
    common = dict(heads=args.heads, batch=args.batch, seq=args.seq, lr=args.lr, log_every=args.log_every)
    t_all = time.perf_counter()
    summary = []
    for v in variants:
        hidden = int(round(args.ffn_mult * args.C))
        model, _, info = train_one(
            v,
            data,
            len(chars),
            steps=args.steps,
            seed=args.seed,
            n=args.n,
            C=args.C,
            blocks=args.blocks,
            hidden=hidden,
            **common,
        )
        wall = info.pop("_wall_s")
        path = out / f"{v}.safetensors"
        save_sample(model, path, variant=v, n=args.n, C=args.C, blocks=args.blocks, info=info)
        summary.append((path.name, v, info["final_loss"], info["val_loss"], wall, path.stat().st_size))
    if args.trainloop:
        steps = args.trainloop_steps or args.steps
        C, blocks = args.trainloop_C, args.trainloop_blocks
        model, opt, info = train_one(
            "mhc",
            data,
            len(chars),
            steps=steps,
            seed=args.seed,
            n=args.n,
            C=C,
            blocks=blocks,
            hidden=int(round(args.ffn_mult * C)),
            **common,
        )
        wall = info.pop("_wall_s")
        path = out / "mhc_trainloop.pt"
        save_trainloop(model, opt, path, variant="mhc", n=args.n, C=C, blocks=blocks, info=info)
        summary.append((path.name, "mhc", info["final_loss"], info["val_loss"], wall, path.stat().st_size))
    print(f"{'file':<26} {'variant':<11} {'final':>7} {'val':>7} {'wall_s':>7} {'bytes':>9}", file=sys.stderr)
    for row in summary:
        print(f"{row[0]:<26} {row[1]:<11} {row[2]:7.4f} {row[3]:7.4f} {row[4]:7.1f} {row[5]:9d}", file=sys.stderr)
    print(f"total wall time {time.perf_counter() - t_all:.1f}s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    raise SystemExit(main())

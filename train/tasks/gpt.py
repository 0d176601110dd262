"""A small GPT-style causal language model on deterministic synthetic tokens.

The tokens follow a fixed sparse Markov chain (each token has `branching` possible successors,
chosen uniformly), so the best achievable loss is ln(branching) while an untrained model starts near
ln(vocab_size): the loss falls visibly within a few hundred steps.
"""

from __future__ import annotations

import math
from typing import Dict

import torch
import torch.nn.functional as F
from torch import nn

from train.data import held_out_generator, sample_generator
from train.task import Task


class CausalSelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.qkv(x).split(c, dim=2)
        q, k, v = (z.view(b, t, self.heads, c // self.heads).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).contiguous().view(b, t, c))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.ln1 = nn.LayerNorm(dim)
        self.attn = CausalSelfAttention(dim, heads)
        self.ln2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    def __init__(self, vocab_size: int, seq_len: int, dim: int, layers: int, heads: int):
        super().__init__()
        self.tok = nn.Embedding(vocab_size, dim)
        self.pos = nn.Embedding(seq_len, dim)
        self.blocks = nn.ModuleList(Block(dim, heads) for _ in range(layers))
        self.ln_f = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab_size, bias=False)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(idx.shape[1], device=idx.device)
        x = self.tok(idx) + self.pos(pos)
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))


class CausalLM(Task):
    """What a GPT task shares, whatever its data: the model, AdamW with a warm-up and cosine
    schedule, next-token cross-entropy over `batch["tokens"]`, blocks sharded one by one. A
    subclass sets vocab_size, seq_len, dim, layers, heads, lr and warmup_steps, and says what the
    samples are."""

    vocab_size: int
    seq_len: int
    dim: int
    layers: int
    heads: int
    lr: float
    warmup_steps: int

    def build_model(self) -> nn.Module:
        return GPT(self.vocab_size, self.seq_len, self.dim, self.layers, self.heads)

    def build_optimizer(self, model: nn.Module) -> torch.optim.Optimizer:
        return torch.optim.AdamW(model.parameters(), lr=self.lr, weight_decay=0.01)

    def build_scheduler(self, optimizer, total_steps):
        warm = max(1, self.warmup_steps)

        def factor(step: int) -> float:  # linear warm-up, then cosine to 10%
            if step < warm:
                return (step + 1) / warm
            progress = min(1.0, (step - warm) / max(1, total_steps - warm))
            return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

        return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)

    def loss(self, model: nn.Module, batch: Dict[str, torch.Tensor]) -> torch.Tensor:
        tokens = batch["tokens"]
        logits = model(tokens[:, :-1])
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))

    def fsdp_units(self, model: nn.Module):
        return list(model.blocks)


class TinyGPT(CausalLM):
    def __init__(self, vocab_size: int = 64, seq_len: int = 32, dim: int = 64, layers: int = 2,
                 heads: int = 4, branching: int = 2, lr: float = 3e-3, warmup_steps: int = 10,
                 chain_seed: int = 1234):
        if dim % heads:
            raise ValueError(f"dim ({dim}) must be divisible by heads ({heads})")
        self.vocab_size, self.seq_len, self.dim = vocab_size, seq_len, dim
        self.layers, self.heads, self.lr, self.warmup_steps = layers, heads, lr, warmup_steps
        # The chain is part of the task, not of the job: fixed by chain_seed.
        g = torch.Generator().manual_seed(chain_seed)
        self.successors = [torch.randperm(vocab_size, generator=g)[:branching].tolist()
                           for _ in range(vocab_size)]
        self.branching = branching

    def sample(self, index: int, seed: int) -> Dict[str, torch.Tensor]:
        return self._walk(sample_generator(seed, index))

    def eval_sample(self, index: int, seed: int) -> Dict[str, torch.Tensor]:
        return self._walk(held_out_generator(seed, index))

    def _walk(self, g: torch.Generator) -> Dict[str, torch.Tensor]:
        """A sequence of the chain, drawn from `g`."""
        first = int(torch.randint(self.vocab_size, (1,), generator=g))
        picks = torch.randint(self.branching, (self.seq_len,), generator=g).tolist()
        tokens = [first]
        for p in picks:
            tokens.append(self.successors[tokens[-1]][p])
        return {"tokens": torch.tensor(tokens, dtype=torch.long)}

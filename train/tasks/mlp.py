"""An MLP regressing a fixed random teacher network on Gaussian inputs."""

from __future__ import annotations

from typing import Dict, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from train.data import held_out_generator, sample_generator
from train.task import Task


class MLPRegression(Task):
    """`nan_samples`: global sample indices whose inputs are NaN, a bad batch on purpose (to try
    `failure.nonfinite`: the steps that draw them are non-finite)."""

    def __init__(self, in_dim: int = 16, hidden: int = 64, out_dim: int = 4, lr: float = 1e-2,
                 teacher_seed: int = 99, nan_samples: Iterable[int] = ()):
        self.in_dim, self.hidden, self.out_dim, self.lr = in_dim, hidden, out_dim, lr
        self.nan_samples = frozenset(int(i) for i in nan_samples)
        g = torch.Generator().manual_seed(teacher_seed)
        self.teacher_w = torch.randn(in_dim, out_dim, generator=g) / in_dim ** 0.5

    def build_model(self) -> nn.Module:
        return nn.Sequential(nn.Linear(self.in_dim, self.hidden), nn.Tanh(),
                             nn.Linear(self.hidden, self.hidden), nn.Tanh(),
                             nn.Linear(self.hidden, self.out_dim))

    def build_optimizer(self, model: nn.Module) -> torch.optim.Optimizer:
        return torch.optim.SGD(model.parameters(), lr=self.lr, momentum=0.9)

    def sample(self, index: int, seed: int) -> Dict[str, torch.Tensor]:
        x = torch.randn(self.in_dim, generator=sample_generator(seed, index))
        if index in self.nan_samples:
            x = torch.full_like(x, float("nan"))
        return {"x": x, "y": torch.sin(x @ self.teacher_w)}

    def eval_sample(self, index: int, seed: int) -> Dict[str, torch.Tensor]:
        x = torch.randn(self.in_dim, generator=held_out_generator(seed, index))
        return {"x": x, "y": torch.sin(x @ self.teacher_w)}

    def loss(self, model: nn.Module, batch: Dict[str, torch.Tensor]) -> torch.Tensor:
        return F.mse_loss(model(batch["x"]), batch["y"])

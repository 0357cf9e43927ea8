"""Modules that go wrong in the ways a user's do, for tests/torchscript.rs:
each must be a one-line error naming what was wrong."""
import torch
from torch import nn


class Small(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.head = nn.Linear(8, 10)

    def logits(self, x):
        return self.head(self.conv(x).mean(dim=(2, 3)))


class Raises(Small):
    def forward(self, x):
        raise ValueError(f"this net wants 1 channel, got {x.shape[1]}")


class Tuple(Small):
    def forward(self, x):
        return self.logits(x), x


class NoLogits(Small):
    def forward(self, x):
        return {"out": self.logits(x)}


class Elsewhere(Small):
    def forward(self, x):
        return self.logits(x).to("meta")


class PerSample(nn.Module):
    """A loss that forgot its reduction."""

    def forward(self, student, teacher, target):
        return nn.functional.cross_entropy(student["logits"], target, reduction="none")


class Fine(Small):
    def forward(self, x):
        return self.logits(x)

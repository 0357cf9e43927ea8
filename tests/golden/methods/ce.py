"""Cross-entropy with the labels (F.cross_entropy), plain and label-smoothed."""
import torch
import torch.nn.functional as F

from gen import fixture, resnet_taps


def make():
    for name, eps in [("ce", 0.0), ("ce_smooth", 0.1)]:
        s = resnet_taps(8, 5)
        y = torch.arange(8) % 10
        fixture(name, "ce", {"label_smoothing": eps}, {"logits": s["logits"]}, {}, y,
                loss_fn=lambda s, t, y, *_ , eps=eps: F.cross_entropy(s["logits"], y, label_smoothing=eps))

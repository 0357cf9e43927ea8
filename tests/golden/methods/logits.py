"""Logit regression, as KD-Zoo's kd_losses/logits.py: MSE between logits."""
import torch.nn.functional as F

from gen import fixture, resnet_taps


def make():
    s, t = resnet_taps(8, 3), resnet_taps(8, 4)
    fixture("logits", "logits", {}, {"logits": s["logits"]}, {"logits": t["logits"]},
            s["logits"].argmax(1), loss_fn=lambda s, t, y, *_: F.mse_loss(s["logits"], t["logits"]))

"""Deep mutual learning, as KD-Zoo's kd_losses/dml.py: batchmean KL(p_peer || p_self)
at temperature 1, the peer's logits detached (the teacher side of the fixture)."""
import torch

from gen import fixture, resnet_taps


def dml_loss(own, peer):
    # Written out rather than through F.kl_div, so the direction is explicit.
    log_p = torch.log_softmax(own, 1)
    log_q = torch.log_softmax(peer.detach(), 1)
    return (log_q.exp() * (log_q - log_p)).sum() / own.shape[0]


def make():
    for name, classes in [("dml", 10), ("dml_c100", 100)]:
        s = resnet_taps(8, 11, classes=classes)
        t = resnet_taps(8, 12, classes=classes)
        target = torch.arange(8) % classes
        fixture(name, "dml", {}, {"logits": s["logits"]}, {"logits": t["logits"]}, target,
                loss_fn=lambda s, t, *_: dml_loss(s["logits"], t["logits"]))

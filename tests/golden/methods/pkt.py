"""PKT, as KD-Zoo's kd_losses/pkt.py (eps 1e-6) on the pooled embedding."""
import torch

from gen import fixture, resnet_taps

EPS = 1e-6


def cond_prob(x):
    x = x / (torch.sqrt((x ** 2).sum(dim=1, keepdim=True)) + EPS)
    x = torch.where(torch.isnan(x), torch.zeros_like(x), x)
    sim = (x @ x.t() + 1.0) / 2.0
    return sim / sim.sum(dim=1, keepdim=True)


def pkt(s, t, *_):
    p_s, p_t = cond_prob(s["embed"]), cond_prob(t["embed"])
    return torch.mean(p_t * torch.log((p_t + EPS) / (p_s + EPS)))


def make():
    s = resnet_taps(16, 41)
    t = resnet_taps(16, 42, channels=(16, 32, 64, 128))
    # Centre the teacher embedding so its similarities spread over [0, 1].
    t["embed"] = t["embed"] - t["embed"].mean(0, keepdim=True)
    fixture("pkt", "pkt", {}, {"embed": s["embed"]}, {"embed": t["embed"]}, t["logits"].argmax(1), loss_fn=pkt)

"""WTTM, as the authors' distiller_zoo/wttm.py (zkxufo/TTM): TTM's per-sample
KL (teacher softmax ** l, renormalised, against the student's plain
log-softmax) weighted by the sample's sum of powers sum_c p_t,c ** l, batch
mean."""
import torch
import torch.nn.functional as F

from gen import fixture, resnet_taps


def make():
    for k, (name, l, classes) in enumerate([("wttm", 1.0, 10), ("wttm_l05", 0.5, 10), ("wttm_l02_c100", 0.2, 100)]):
        s, t = resnet_taps(8, 51 + 2 * k, classes=classes), resnet_taps(8, 52 + 2 * k, classes=classes)
        target = t["logits"].argmax(1)

        def loss(s, t, y, idx, cidx, mod, l=l):
            p_s = F.log_softmax(s["logits"], dim=1)
            p_t = torch.pow(torch.softmax(t["logits"], dim=1), l)
            norm = torch.sum(p_t, dim=1)
            p_t = p_t / norm.unsqueeze(1)
            kl = torch.sum(F.kl_div(p_s, p_t, reduction="none"), dim=1)
            return torch.mean(norm * kl)

        fixture(name, "wttm", {"l": l}, {"logits": s["logits"]}, {"logits": t["logits"]}, target, loss_fn=loss)

"""TTM, as the authors' distiller_zoo/ttm.py (zkxufo/TTM): the teacher's
softmax raised to the power l and renormalised, KL to the student's plain
log-softmax summed over classes (F.kl_div, reduction='none'), batch mean."""
import torch
import torch.nn.functional as F

from gen import fixture, resnet_taps


def make():
    for k, (name, l, classes) in enumerate([("ttm", 1.0, 10), ("ttm_l05", 0.5, 10), ("ttm_l01_c100", 0.1, 100)]):
        s, t = resnet_taps(8, 31 + 2 * k, classes=classes), resnet_taps(8, 32 + 2 * k, classes=classes)
        target = t["logits"].argmax(1)

        def loss(s, t, y, idx, cidx, mod, l=l):
            p_s = F.log_softmax(s["logits"], dim=1)
            p_t = torch.pow(torch.softmax(t["logits"], dim=1), l)
            p_t = p_t / p_t.sum(dim=1).unsqueeze(1)
            return torch.mean(torch.sum(F.kl_div(p_s, p_t, reduction="none"), dim=1))

        fixture(name, "ttm", {"l": l}, {"logits": s["logits"]}, {"logits": t["logits"]}, target, loss_fn=loss)

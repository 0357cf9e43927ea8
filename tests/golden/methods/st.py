"""Soft targets, as KD-Zoo's kd_losses/st.py: batchmean KL at temperature T, times T²."""
import torch.nn.functional as F

from gen import fixture, resnet_taps


def make():
    for name, T in [("st", 4.0), ("st_t1", 1.0)]:
        s, t = resnet_taps(8, 1), resnet_taps(8, 2)
        target = t["logits"].argmax(1)

        def loss(s, t, y, idx, cidx, mod, T=T):
            return F.kl_div(F.log_softmax(s["logits"] / T, 1), F.softmax(t["logits"] / T, 1),
                            reduction="batchmean") * T * T

        fixture(name, "st", {"T": T}, {"logits": s["logits"]}, {"logits": t["logits"]}, target, loss_fn=loss)

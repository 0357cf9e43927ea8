"""SP (Tung & Mori 2019), as KD-Zoo's kd_losses/sp.py: per tap, the batch Gram
matrix of the flattened features, each row divided by its L2 norm; MSE between
student and teacher; mean over the taps (the train script's feat/1..3)."""
import torch

from gen import fixture, resnet_taps

S_CH, T_CH = (16, 16, 32, 64), (32, 64, 128, 256)


def gram(fm):
    f = fm.flatten(1)
    g = f @ f.T
    return g / g.norm(dim=1, keepdim=True).clamp(min=1e-12)


def make():
    for name, taps in [("sp", ["feat/1", "feat/2", "feat/3"]), ("sp_preact", ["preact/2", "preact/3"])]:
        s, t = resnet_taps(8, 11, channels=S_CH), resnet_taps(8, 12, channels=T_CH)

        def loss(s, t, y, idx, cidx, mod, taps=taps):
            per_tap = [((gram(s[k]) - gram(t[k])) ** 2).mean() for k in taps]
            return sum(per_tap) / len(per_tap)

        fixture(name, "sp", {"taps": taps}, {k: s[k] for k in taps}, {k: t[k] for k in taps},
                t["logits"].argmax(1), loss_fn=loss)

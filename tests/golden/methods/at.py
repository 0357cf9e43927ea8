"""Attention transfer, as KD-Zoo's kd_losses/at.py and train_kd.py (mean over
feat/1..3), and RepDistiller's distiller_zoo/AT.py (sum over taps, larger map
average-pooled to the smaller)."""
import torch
import torch.nn.functional as F

from gen import fixture, resnet_taps

TAPS = ["feat/1", "feat/2", "feat/3"]


def kd_zoo_map(fm, p):
    am = fm.abs().pow(p).sum(dim=1, keepdim=True)
    return am / (torch.norm(am, dim=(2, 3), keepdim=True) + 1e-6)


def repdistiller_map(fm, p):
    return F.normalize(fm.pow(p).mean(1).view(fm.size(0), -1))


def make():
    s = resnet_taps(8, 11)
    t = resnet_taps(8, 12, channels=(16, 32, 64, 128))
    pick = lambda taps: {k: taps[k] for k in TAPS}

    def kd_zoo(s, t, *_, p=2.0):
        return sum(F.mse_loss(kd_zoo_map(s[k], p), kd_zoo_map(t[k], p)) for k in TAPS) / len(TAPS)

    fixture("at", "at", {}, pick(s), pick(t), t["logits"].argmax(1), loss_fn=kd_zoo)
    fixture("at_p3", "at", {"p": 3.0}, pick(s), pick(t), t["logits"].argmax(1),
            loss_fn=lambda s, t, *_: kd_zoo(s, t, p=3.0))

    # Teacher maps of other sizes: stage 1 and 3 pool the student, stage 2 the teacher.
    t = resnet_taps(8, 13, channels=(16, 32, 64, 128), spatial=(32, 16, 32, 4))

    def repdistiller(s, t, *_):
        total = 0
        for k in TAPS:
            fs, ft = s[k], t[k]
            if fs.shape[2] > ft.shape[2]:
                fs = F.adaptive_avg_pool2d(fs, ft.shape[2:])
            elif fs.shape[2] < ft.shape[2]:
                ft = F.adaptive_avg_pool2d(ft, fs.shape[2:])
            total = total + (repdistiller_map(fs, 2) - repdistiller_map(ft, 2)).pow(2).mean()
        return total

    fixture("at_repdistiller", "at", {"variant": "repdistiller"}, pick(s), pick(t), t["logits"].argmax(1),
            loss_fn=repdistiller)

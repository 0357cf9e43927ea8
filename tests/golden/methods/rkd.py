"""RKD, as KD-Zoo's kd_losses/rkd.py: Huber loss on mean-normalised pairwise
distances (w_dist 25) and on triplet angles (w_angle 50), on the embedding."""
import torch
import torch.nn.functional as F

from gen import fixture, resnet_taps


def pdist(e):
    sq = e.pow(2).sum(1)
    d = (sq.unsqueeze(0) + sq.unsqueeze(1) - 2 * e @ e.t()).clamp(min=1e-12).sqrt().clone()
    d[range(len(e)), range(len(e))] = 0
    return d / d[d > 0].mean()


def angles(e):
    vd = F.normalize(e.unsqueeze(0) - e.unsqueeze(1), p=2, dim=2)
    return torch.bmm(vd, vd.transpose(1, 2)).view(-1)


def rkd(w_dist, w_angle):
    def loss(s, t, *_):
        fs, ft = s["embed"], t["embed"]
        return (w_dist * F.smooth_l1_loss(pdist(fs), pdist(ft))
                + w_angle * F.smooth_l1_loss(angles(fs), angles(ft)))
    return loss


def make():
    s = resnet_taps(8, 51)
    t = resnet_taps(8, 52, channels=(16, 32, 64, 128))
    pick = lambda taps: {"embed": taps["embed"]}
    fixture("rkd", "rkd", {}, pick(s), pick(t), t["logits"].argmax(1), loss_fn=rkd(25.0, 50.0))
    fixture("rkd_dist", "rkd", {"w_dist": 1.0, "w_angle": 0.0}, pick(s), pick(t), t["logits"].argmax(1),
            loss_fn=rkd(1.0, 0.0))

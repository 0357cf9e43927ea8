"""SKD, Streamlined Knowledge Distillation (Jeong et al., CVPR 2026), as
torchdistill's SKDInstanceLoss and SKDDirectionLoss
(torchdistill/losses/mid_level.py): term `instance` = KL(batchmean) of
log_softmax(s / T) against softmax(t / T), no T^2; term `direction` = mean
over rows of sqrt(D_i (cov(D^T) + tikhonov I)^-1 D_i^T), D the difference of
the Gram matrices of L2-normalised logits, the inverse through Cholesky."""
import torch
import torch.nn.functional as F

from gen import fixture, resnet_taps


def skd(s, t, temperature, tikhonov):
    zs, zt = s["logits"], t["logits"]
    instance = F.kl_div(torch.log_softmax(zs / temperature, dim=1), torch.softmax(zt / temperature, dim=1),
                        reduction="batchmean")
    gs, gt = F.normalize(zs, p=2, dim=1), F.normalize(zt, p=2, dim=1)
    diff = gs @ gs.t() - gt @ gt.t()
    cov = torch.cov(diff.t()) + tikhonov * torch.eye(diff.size(1))
    inv = torch.cholesky_inverse(torch.linalg.cholesky(cov))
    direction = torch.sqrt(torch.einsum("bi,ij,bj->b", diff, inv, diff)).mean()
    return instance + direction, {"instance": instance, "direction": direction}


def make():
    s = resnet_taps(16, 121)
    t = resnet_taps(16, 122)
    target = t["logits"].argmax(1)
    for name, params, temperature, tikhonov in [("skd", {}, 4.0, 0.1),
                                                ("skd_t2", {"T": 2.0, "tikhonov": 0.5}, 2.0, 0.5)]:
        fixture(name, "skd", params, {"logits": s["logits"]}, {"logits": t["logits"]}, target,
                loss_fn=lambda s, t, *_: skd(s, t, temperature, tikhonov))

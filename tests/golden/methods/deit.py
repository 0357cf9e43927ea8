"""DeiT's distillation loss as the authors write it (facebookresearch/deit
losses.py `DistillationLoss`): the base criterion on the class head's output,
plus the soft (KL with log targets, summed, times tau^2 over the number of
logits) or hard (CE with the teacher's argmax) term on the distillation head,
mixed (1 - alpha) / alpha. The base criterion is chosen as DeiT's main.py
does without Mixup: timm's LabelSmoothingCrossEntropy when smoothing > 0,
else cross-entropy. A student without a distillation head feeds its class
output to both terms."""
import torch
import torch.nn.functional as F
from timm.loss import LabelSmoothingCrossEntropy

from gen import fixture, resnet_taps


def deit_loss(outputs, outputs_kd, teacher_outputs, labels, kind, alpha, tau, smoothing):
    criterion = LabelSmoothingCrossEntropy(smoothing) if smoothing > 0 else torch.nn.CrossEntropyLoss()
    base = criterion(outputs, labels)
    if kind == "soft":
        kl = F.kl_div(F.log_softmax(outputs_kd / tau, dim=1), F.log_softmax(teacher_outputs / tau, dim=1),
                      reduction="sum", log_target=True)
        dist = kl * tau * tau / outputs_kd.numel()
    else:
        dist = F.cross_entropy(outputs_kd, teacher_outputs.argmax(dim=1))
    base, dist = base * (1 - alpha), dist * alpha
    return base + dist, {"base": base, "distill": dist}


def make():
    # (name, type, alpha, tau, smoothing, classes, distillation head)
    settings = [
        ("deit", "soft", 0.5, 1.0, 0.0, 10, True),
        ("deit_soft_t3_nodist", "soft", 0.3, 3.0, 0.1, 100, False),
        ("deit_hard", "hard", 0.5, 1.0, 0.1, 10, True),
        ("deit_hard_nodist", "hard", 0.7, 1.0, 0.0, 100, False),
    ]
    for k, (name, kind, alpha, tau, eps, classes, has_dist) in enumerate(settings):
        s, t = resnet_taps(8, 301 + 2 * k, classes=classes), resnet_taps(8, 302 + 2 * k, classes=classes)
        g = torch.Generator().manual_seed(400 + k)
        target = torch.where(torch.arange(8) % 2 == 0, t["logits"].argmax(1),
                             torch.randint(0, classes, (8,), generator=g))
        student = {"logits": s["logits"]}
        if has_dist:
            student["logits_dist"] = torch.randn(8, classes, generator=g) * 3

        def loss(s, t, y, *_, kind=kind, alpha=alpha, tau=tau, eps=eps, has_dist=has_dist):
            kd_out = s["logits_dist"] if has_dist else s["logits"]
            return deit_loss(s["logits"], kd_out, t["logits"], y, kind, alpha, tau, eps)

        params = {"distillation_type": kind, "alpha": alpha, "tau": tau, "label_smoothing": eps}
        fixture(name, "deit", params, student, {"logits": t["logits"]}, target, loss_fn=loss)

"""Decoupled KD as the authors' code: mdistiller/distillers/DKD.py (dkd_loss,
_get_gt_mask, _get_other_mask, cat_mask), and its logit-standardised form from
sunshangquan/logit-standardization-KD (mdistiller/distillers/DKD.py: normalize
before dkd_loss). Returns alpha * TCKD + beta * NCKD, each times T^2; the
warm-up factor min(epoch / 20, 1) is the recipe's weight, not part of the loss."""
import torch
import torch.nn.functional as F

from gen import fixture, resnet_taps


def normalize(logit):
    mean = logit.mean(dim=-1, keepdims=True)
    stdv = logit.std(dim=-1, keepdims=True)
    return (logit - mean) / (1e-7 + stdv)


def _get_gt_mask(logits, target):
    target = target.reshape(-1)
    return torch.zeros_like(logits).scatter_(1, target.unsqueeze(1), 1).bool()


def _get_other_mask(logits, target):
    target = target.reshape(-1)
    return torch.ones_like(logits).scatter_(1, target.unsqueeze(1), 0).bool()


def cat_mask(t, mask1, mask2):
    t1 = (t * mask1).sum(dim=1, keepdims=True)
    t2 = (t * mask2).sum(1, keepdims=True)
    return torch.cat([t1, t2], dim=1)


def dkd_loss(logits_student, logits_teacher, target, alpha, beta, temperature, logit_stand):
    if logit_stand:
        logits_student, logits_teacher = normalize(logits_student), normalize(logits_teacher)
    gt_mask = _get_gt_mask(logits_student, target)
    other_mask = _get_other_mask(logits_student, target)
    pred_student = F.softmax(logits_student / temperature, dim=1)
    pred_teacher = F.softmax(logits_teacher / temperature, dim=1)
    pred_student = cat_mask(pred_student, gt_mask, other_mask)
    pred_teacher = cat_mask(pred_teacher, gt_mask, other_mask)
    log_pred_student = torch.log(pred_student)
    tckd = F.kl_div(log_pred_student, pred_teacher, reduction="sum") * temperature**2 / target.shape[0]
    pred_teacher_part2 = F.softmax(logits_teacher / temperature - 1000.0 * gt_mask, dim=1)
    log_pred_student_part2 = F.log_softmax(logits_student / temperature - 1000.0 * gt_mask, dim=1)
    nckd = F.kl_div(log_pred_student_part2, pred_teacher_part2, reduction="sum") * temperature**2 / target.shape[0]
    return alpha * tckd + beta * nckd


def make():
    # (name, alpha, beta, T, ls, classes): mdistiller's default (beta 8) and
    # small-pair (beta 2) settings, a T of 1, and the LS paper's DKD+LS
    # (alpha, beta x 9, base T 2), on 10 and 100 classes.
    settings = [
        ("dkd", 1.0, 8.0, 4.0, False, 10),
        ("dkd_b2_c100", 1.0, 2.0, 4.0, False, 100),
        ("dkd_t1", 0.5, 6.0, 1.0, False, 10),
        ("dkd_ls", 9.0, 72.0, 2.0, True, 100),
        ("dkd_ls_t3", 18.0, 36.0, 3.0, True, 10),
    ]
    for k, (name, alpha, beta, T, ls, classes) in enumerate(settings):
        s, t = resnet_taps(8, 1 + 2 * k, classes=classes), resnet_taps(8, 2 + 2 * k, classes=classes)
        g = torch.Generator().manual_seed(100 + k)
        # Half the targets are the teacher's top class, half random.
        target = torch.where(torch.arange(8) % 2 == 0, t["logits"].argmax(1),
                             torch.randint(0, classes, (8,), generator=g))

        def loss(s, t, y, idx, cidx, mod, alpha=alpha, beta=beta, T=T, ls=ls):
            return dkd_loss(s["logits"], t["logits"], y, alpha, beta, T, ls)

        fixture(name, "dkd", {"alpha": alpha, "beta": beta, "T": T, "ls": ls},
                {"logits": s["logits"]}, {"logits": t["logits"]}, target, loss_fn=loss)

"""Soft targets on standardised logits, as the LS authors' code
(sunshangquan/logit-standardization-KD, mdistiller/distillers/KD.py: normalize,
kd_loss): z-score each sample's logits (unbiased std, + 1e-7), then batchmean
KL at the base temperature T, times T^2."""
import torch.nn.functional as F

from gen import fixture, resnet_taps


def normalize(logit):
    mean = logit.mean(dim=-1, keepdims=True)
    stdv = logit.std(dim=-1, keepdims=True)
    return (logit - mean) / (1e-7 + stdv)


def kd_loss(logits_student_in, logits_teacher_in, temperature, logit_stand):
    logits_student = normalize(logits_student_in) if logit_stand else logits_student_in
    logits_teacher = normalize(logits_teacher_in) if logit_stand else logits_teacher_in
    log_pred_student = F.log_softmax(logits_student / temperature, dim=1)
    pred_teacher = F.softmax(logits_teacher / temperature, dim=1)
    loss_kd = F.kl_div(log_pred_student, pred_teacher, reduction="none").sum(1).mean()
    return loss_kd * temperature**2


def make():
    # The LS paper's base temperature 2 (CIFAR-100 KD+LS) and 3 (some pairs).
    for k, (name, T, classes) in enumerate([("st_ls", 2.0, 100), ("st_ls_t3", 3.0, 10)]):
        s, t = resnet_taps(8, 11 + 2 * k, classes=classes), resnet_taps(8, 12 + 2 * k, classes=classes)
        target = t["logits"].argmax(1)

        def loss(s, t, y, idx, cidx, mod, T=T):
            return kd_loss(s["logits"], t["logits"], T, True)

        fixture(name, "st", {"T": T, "ls": True}, {"logits": s["logits"]}, {"logits": t["logits"]},
                target, loss_fn=loss)

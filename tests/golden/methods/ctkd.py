"""Curriculum temperature for KD, as zhengli97/CTKD: models/temp_global.py
(Global_T: a parameter `global_T` initialised to 1, returned through
GradientReversalFunction, whose backward multiplies the gradient by
`lambda_`), helper/loops.py (temp = t_start + t_end * sigmoid(mlp(...)),
lines 132-134) and distiller_zoo/KD.py (batchmean KL at temp, times temp²).

The authors' `lambda_` is their CosineDecay value, from 0 down to -1
(train_student.py, decay_max 0, decay_min -1); kd's `lambda` is its negative,
the strength of the reversal, so the fixture passes `lambda_ = -lambda`.

Also checks numerically that kd's gradient-reversal formulation (value x,
gradient -lambda * g, written without a custom autograd function) gives the
authors' gradient on the temperature parameter, and prints that gradient:
plugins/ctkd's unit test `theta_gradient_matches_the_authors` checks kd's
against these numbers (the probe compares method state, not its gradient).
"""
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.autograd import Function

from gen import fixture, resnet_taps


class GradientReversalFunction(Function):
    @staticmethod
    def forward(ctx, x, lambda_):
        ctx.lambda_ = lambda_
        return x.clone()

    @staticmethod
    def backward(ctx, grads):
        return grads.new_tensor(ctx.lambda_) * grads, None


class Global_T(nn.Module):
    def __init__(self):
        super().__init__()
        self.global_T = nn.Parameter(torch.ones(1), requires_grad=True)

    def forward(self, fake_input1, fake_input2, lambda_):
        return GradientReversalFunction.apply(self.global_T, lambda_)


def distill_kl(y_s, y_t, T):
    return nn.KLDivLoss(reduction="batchmean")(F.log_softmax(y_s / T, dim=1),
                                               F.softmax(y_t / T, dim=1)) * T * T


def authors_loss(s, t, mod, lam, t_start, t_end):
    temp = mod(t, s, -lam)
    temp = t_start + t_end * torch.sigmoid(temp)
    return distill_kl(s, t, temp)


def detach_grl_theta_grad(s, t, theta, lam, t_start, t_end):
    """kd's formulation: x.detach() + (x - x.detach()) * (-lambda)."""
    x = theta.detach().clone().requires_grad_(True)
    rev = x.detach() + (x - x.detach()) * (-lam)
    temp = t_start + t_end * torch.sigmoid(rev)
    distill_kl(s.detach(), t, temp).backward()
    return x.grad


CASES = [
    # name, seeds, classes, theta, lambda, t_start, t_end
    ("ctkd", (1, 2), 10, 1.0, 1.0, 1.0, 20.0),
    ("ctkd_theta", (3, 4), 100, -0.7, 0.3, 2.0, 10.0),
    ("ctkd_lambda0", (5, 6), 10, 2.5, 0.0, 1.0, 20.0),
]


def make():
    for name, (ss, ts), classes, theta, lam, t_start, t_end in CASES:
        s = resnet_taps(8, ss, classes=classes)["logits"]
        t = resnet_taps(8, ts, classes=classes)["logits"]
        target = t.argmax(1)
        mod = Global_T()
        with torch.no_grad():
            mod.global_T.fill_(theta)

        def loss(s, t, y, idx, cidx, mod, lam=lam, t_start=t_start, t_end=t_end):
            return authors_loss(s["logits"], t["logits"], mod, lam, t_start, t_end)

        params = {"t_start": t_start, "t_end": t_end, "lambda": lam, "global_T_init": 1.0}
        fixture(name, "ctkd", params, {"logits": s}, {"logits": t}, target, module=mod, loss_fn=loss)
        ours = detach_grl_theta_grad(s, t, mod.global_T, lam, t_start, t_end)
        assert torch.allclose(ours, mod.global_T.grad, rtol=1e-6, atol=1e-9), (ours, mod.global_T.grad)
        print(f"  {name}: d loss / d global_T = {mod.global_T.grad.item():.9g}")

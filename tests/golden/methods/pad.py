"""PAD-L2 (Zhang et al., ECCV 2020), as torchdistill's PADL2Loss with its
VarianceBranch4PAD wrapper (torchdistill/losses/mid_level.py,
models/wrapper.py): log_var = BatchNorm1d(Linear(s)) of the student's
flattened embedding (training mode); loss = mean over the batch of the mean
over dimensions of (t - s)^2 / (eps + exp(log_var)) + log_var. State names:
var_estimator.0 (Linear), var_estimator.1 (BatchNorm1d)."""
import torch
import torch.nn as nn

from gen import fixture, resnet_taps


class Branch(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.var_estimator = nn.Sequential(nn.Linear(d, d), nn.BatchNorm1d(d))
        with torch.no_grad():
            self.var_estimator[1].weight.uniform_(0.5, 1.5)
            self.var_estimator[1].bias.uniform_(-0.5, 0.5)


def pad(s, t, mod, eps):
    s_e, t_e = s["embed"].flatten(1), t["embed"].flatten(1)
    log_var = mod.var_estimator(s_e)
    return torch.mean(torch.mean((t_e - s_e) ** 2 / (eps + torch.exp(log_var)) + log_var, dim=1))


def make():
    s = resnet_taps(16, 111)
    t = resnet_taps(16, 112)
    target = t["logits"].argmax(1)
    for name, params, eps in [("pad", {}, 1e-6), ("pad_eps", {"eps": 0.1}, 0.1)]:
        mod = Branch(s["embed"].shape[1])
        fixture(name, "pad", params, {"embed": s["embed"]}, {"embed": t["embed"]}, target, module=mod,
                loss_fn=lambda s, t, y, i, c, m: pad(s, t, m, eps))

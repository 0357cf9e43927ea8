"""FitNet: KD-Zoo's kd_losses/fitnet.py (MSE on feat/3, no connector) and
RepDistiller's HintLoss behind models/util.py's ConvReg (conv, BN, ReLU)."""
import torch
import torch.nn as nn
import torch.nn.functional as F

from gen import fixture, resnet_taps


class ConvReg(nn.Module):
    """RepDistiller's regressor, PyTorch default initialisation."""

    def __init__(self, s_shape, t_shape):
        super().__init__()
        s_c, s_h, s_w = s_shape
        t_c, t_h, t_w = t_shape
        if s_h == 2 * t_h:
            self.conv = nn.Conv2d(s_c, t_c, kernel_size=3, stride=2, padding=1)
        elif s_h * 2 == t_h:
            self.conv = nn.ConvTranspose2d(s_c, t_c, kernel_size=4, stride=2, padding=1)
        else:
            self.conv = nn.Conv2d(s_c, t_c, kernel_size=(1 + s_h - t_h, 1 + s_w - t_w))
        self.bn = nn.BatchNorm2d(t_c)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


def make():
    s, t = resnet_taps(8, 21), resnet_taps(8, 22)
    fixture("fitnet", "fitnet", {}, {"feat/3": s["feat/3"]}, {"feat/3": t["feat/3"]}, t["logits"].argmax(1),
            loss_fn=lambda s, t, *_: F.mse_loss(s["feat/3"], t["feat/3"]))

    def hint(tap):
        return lambda s, t, y, i, c, mod: F.mse_loss(mod(s[tap]), t[tap])

    # Channels differ (32 → 64), same size: a 1×1 regressor.
    t = resnet_taps(8, 23, channels=(16, 32, 64, 128))
    torch.manual_seed(24)
    reg = ConvReg(s["feat/2"].shape[1:], t["feat/2"].shape[1:])
    fixture("fitnet_convreg", "fitnet", {"tap": "feat/2", "connector": "conv_reg"}, {"feat/2": s["feat/2"]},
            {"feat/2": t["feat/2"]}, t["logits"].argmax(1), module=reg, loss_fn=hint("feat/2"))

    # Student map half the teacher's size: a stride-2 transposed convolution.
    t = resnet_taps(4, 25, channels=(16, 32, 64, 32), spatial=(16, 16, 8, 8))
    torch.manual_seed(26)
    reg = ConvReg(s["feat/3"].shape[1:], t["feat/3"].shape[1:])
    s4 = {"feat/3": s["feat/3"][:4]}
    fixture("fitnet_convreg_up", "fitnet", {"connector": "conv_reg"}, s4, {"feat/3": t["feat/3"]},
            t["logits"].argmax(1), module=reg, loss_fn=hint("feat/3"))

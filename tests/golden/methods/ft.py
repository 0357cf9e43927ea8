"""Factor transfer, as KD-Zoo's network.py (paraphraser, translator, both
initialised as there) and train_ft.py: the paraphraser stage reconstructs the
teacher's feat/3 (MSE, training mode); the transfer stage compares
F.normalize'd flattened factors under L1 with the paraphraser in eval mode."""
import torch
import torch.nn as nn
import torch.nn.functional as F

from gen import fixture, resnet_taps


def block(conv, c_out, use_bn):
    return [conv, nn.BatchNorm2d(c_out) if use_bn else nn.Sequential(), nn.LeakyReLU(0.1)]


def convs(chans, use_bn, transposed=False):
    layers = []
    for c_in, c_out in zip(chans, chans[1:]):
        cls = nn.ConvTranspose2d if transposed else nn.Conv2d
        layers += block(cls(c_in, c_out, 3, 1, 1, bias=not use_bn), c_out, use_bn)
    return nn.Sequential(*layers)


def kd_zoo_init(module):
    for m in module.modules():
        if isinstance(m, nn.Conv2d):  # ConvTranspose2d keeps PyTorch's default
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.constant_(m.bias, 0)
        if isinstance(m, nn.BatchNorm2d):
            nn.init.constant_(m.weight, 1)
            nn.init.constant_(m.bias, 0)


class Paraphraser(nn.Module):
    def __init__(self, c_t, k, use_bn):
        super().__init__()
        f = int(c_t * k)
        self.encoder = convs([c_t, c_t, f, f], use_bn)
        self.decoder = convs([f, f, c_t, c_t], use_bn, transposed=True)
        kd_zoo_init(self)


class Translator(nn.Module):
    def __init__(self, c_s, c_t, k, use_bn):
        super().__init__()
        f = int(c_t * k)
        self.encoder = convs([c_s, c_s, f, f], use_bn)
        kd_zoo_init(self)


class FtModules(nn.Module):
    def __init__(self, c_s, c_t, k, use_bn):
        super().__init__()
        self.paraphraser = Paraphraser(c_t, k, use_bn)
        self.translator = Translator(c_s, c_t, k, use_bn)
        # As if trained: non-trivial affine and running statistics.
        g = torch.Generator().manual_seed(c_s + c_t)
        for m in self.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.data.uniform_(0.5, 1.5, generator=g)
                m.bias.data.normal_(0, 0.1, generator=g)
                m.running_mean.normal_(0, 0.1, generator=g)
                m.running_var.uniform_(0.5, 1.5, generator=g)


def transfer(s, t, y, i, c, mod):
    mod.paraphraser.eval()
    factor_s = mod.translator.encoder(s["feat/3"])
    with torch.no_grad():
        factor_t = mod.paraphraser.encoder(t["feat/3"])
    norm = lambda f: F.normalize(f.view(f.size(0), -1))
    return F.l1_loss(norm(factor_s), norm(factor_t))


def paraphrase(s, t, y, i, c, mod):
    rec = mod.paraphraser.decoder(mod.paraphraser.encoder(t["feat/3"]))
    return F.mse_loss(rec, t["feat/3"])


def make():
    s = resnet_taps(8, 81, channels=(16, 16, 32, 32))
    t = resnet_taps(8, 82)
    sf, tf = {"feat/3": s["feat/3"]}, {"feat/3": t["feat/3"]}
    y = t["logits"].argmax(1)

    torch.manual_seed(83)
    fixture("ft", "ft", {"use_bn": True}, sf, tf, y, module=FtModules(32, 64, 0.5, True), loss_fn=transfer)
    torch.manual_seed(84)
    fixture("ft_para", "ft", {"use_bn": True, "phase": "paraphraser"}, sf, tf, y,
            module=FtModules(32, 64, 0.5, True), loss_fn=paraphrase)
    # 100 classes: KD-Zoo's default drops BatchNorm (biased convolutions).
    torch.manual_seed(85)
    s100 = dict(sf, logits=torch.randn(8, 100))
    fixture("ft_cifar100", "ft", {}, s100, tf, y, module=FtModules(32, 64, 0.5, False), loss_fn=transfer)
    torch.manual_seed(86)
    fixture("ft_para_k", "ft", {"k": 0.25, "phase": "paraphraser", "use_bn": False}, sf, tf, y,
            module=FtModules(32, 64, 0.25, False), loss_fn=paraphrase)

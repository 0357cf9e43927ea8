"""OFA-KD as the authors' code (Hao840/OFAKD distillers/ofa.py, utils.py):
`ofa_loss` = mean over the batch of sum_c -((p_t + m)^eps - m) * log p_s at
temperature T, m the one-hot label; one term per projector branch on a
student stage (times ofa_loss_weight, eps per stage) plus one on the
student's logits (times kd_loss_weight, the last eps). Branches as the
authors build them: for a CNN student, (n - k) SepConvs (a 1x1 conv at the
last stage), average pooling, a linear head, widths max(student, teacher
feature dim); for a token student without prefix tokens (kd's ViT feat/k
maps read as patch tokens), PatchMergings to a 7x7 grid, max(n - k, 1)
timm Blocks with 4 heads, the token mean and a linear head. Parameters keep
the authors' state_dict keys under `projector.{k}`; after the authors'
init_weights they are perturbed so that every one moves the loss."""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import trunc_normal_
from timm.models.vision_transformer import Block

from gen import fixture, resnet_taps


def ofa_loss(z_s, z_t, mask, eps, temperature):
    p_s = F.softmax(z_s / temperature, dim=1)
    p_t = F.softmax(z_t / temperature, dim=1)
    weight = (p_t + mask) ** eps - mask
    return torch.sum(-weight * torch.log(p_s), dim=-1).mean()


def sep_conv(c_in, c_out):
    """Depthwise (stride 2) + pointwise, BN, ReLU; depthwise + pointwise, BN, ReLU."""
    return nn.Sequential(
        nn.Conv2d(c_in, c_in, 3, 2, 1, groups=c_in, bias=False), nn.Conv2d(c_in, c_in, 1, bias=False),
        nn.BatchNorm2d(c_in), nn.ReLU(),
        nn.Conv2d(c_in, c_in, 3, 1, 1, groups=c_in, bias=False), nn.Conv2d(c_in, c_out, 1, bias=False),
        nn.BatchNorm2d(c_out), nn.ReLU())


class SepConv(nn.Module):
    def __init__(self, c_in, c_out):
        super().__init__()
        self.op = sep_conv(c_in, c_out)

    def forward(self, x):
        return self.op(x)


def cnn_branch(c, down, width, classes):
    if down == 0:
        blocks = [nn.Conv2d(c, width, 1)]
    else:
        blocks = [SepConv(c * 2 ** i, width if i == down - 1 else c * 2 ** (i + 1)) for i in range(down)]
    return nn.Sequential(*blocks, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, classes))


class Merge(nn.Module):
    """2x2 neighbourhoods of a (B, H*W, C) token grid concatenated in the
    order (0,0), (1,0), (0,1), (1,1), LayerNorm, bias-free linear, activation."""

    def __init__(self, grid, c, c_out, act):
        super().__init__()
        self.grid = grid
        self.norm = nn.LayerNorm(4 * c)
        self.reduction = nn.Linear(4 * c, c_out, bias=False)
        self.act = act

    def forward(self, x):
        b, _, c = x.shape
        x = x.reshape(b, self.grid, self.grid, c)
        parts = [x[:, i::2, j::2, :] for i, j in ((0, 0), (1, 0), (0, 1), (1, 1))]
        x = torch.cat(parts, dim=-1).reshape(b, -1, 4 * c)
        return self.act(self.reduction(self.norm(x)))


class Tokens(nn.Module):
    """The authors' TokenFnContext without prefix tokens: fn on all tokens."""

    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x)


class TokenMean(nn.Module):
    def forward(self, x):
        return x.mean(1)


def vit_branch(grid, c, dim, n_blocks, classes):
    # Blocks as timm 0.6.5 (the authors' requirements.txt) makes them:
    # nn.LayerNorm (eps 1e-5; newer timm defaults to 1e-6), no qkv bias.
    merges = max(int(math.log2(grid / 7)), 0)
    layers = [Merge(grid // 2 ** i, c if i == 0 else dim, dim,
                    nn.GELU() if i == 0 or i != merges - 1 else nn.Identity()) for i in range(merges)]
    return nn.Sequential(Tokens(nn.Sequential(*layers)),
                         nn.Sequential(*[Block(dim=dim, num_heads=4, norm_layer=nn.LayerNorm) for _ in range(n_blocks)]),
                         TokenMean(), nn.Linear(dim, classes))


class Projectors(nn.Module):
    def __init__(self, branches):
        super().__init__()
        self.projector = nn.ModuleDict({str(k): b for k, b in branches.items()})
        for m in self.modules():  # the authors' init_weights
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                trunc_normal_(m.weight, std=.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        with torch.no_grad():
            for name, p in self.named_parameters():
                if p.dim() == 1:
                    p.add_(0.2 * torch.randn_like(p))
                elif p.dim() == 2:
                    p.normal_(0, 1 / math.sqrt(p.shape[1]))
            for name, b in self.named_buffers():
                if name.endswith("running_mean"):
                    b.normal_(0, 0.1)
                elif name.endswith("running_var"):
                    b.uniform_(0.5, 1.5)


def one_case(name, params, student, teacher, target, branches, vit=False):
    stages = params.get("stages", [1, 2, 3, 4])
    eps = params.get("eps", 1.0)
    eps = [eps] * (len(stages) + 1) if not isinstance(eps, list) else eps
    temperature = params.get("temperature", 1.0)
    w_ofa, w_kd = params.get("loss_weight", 1.0), params.get("kd_loss_weight", 1.0)
    module = Projectors(branches)
    classes = student["logits"].shape[1]

    def loss(s, t, y, idx, cidx, mod):
        mask = F.one_hot(y, classes)
        terms = {}
        for k, e in zip(stages, eps):
            x = s[f"feat/{k}"]
            if vit:
                x = x.flatten(2).transpose(1, 2)
            z = mod.projector[str(k)](x)
            terms[f"stage{k}"] = w_ofa * ofa_loss(z, t["logits"], mask, e, temperature)
        terms["kd"] = w_kd * ofa_loss(s["logits"], t["logits"], mask, eps[-1], temperature)
        return sum(terms.values()), terms

    fixture(name, "ofa", params, student, teacher, target, module=module, loss_fn=loss)


def targets(t, classes, seed):
    g = torch.Generator().manual_seed(seed)
    b = t.shape[0]
    return torch.where(torch.arange(b) % 2 == 0, t.argmax(1), torch.randint(0, classes, (b,), generator=g))


def make():
    # A four-stage CNN student (channels 8..64, 8x8 down to 1x1) and a
    # teacher with a wider feature (96): every branch type of the default
    # stages [1, 2, 3, 4], eps 1.
    s = resnet_taps(6, 501, channels=(8, 8, 16, 32, 64), spatial=(8, 8, 4, 2, 1))
    t = resnet_taps(6, 502, channels=(96,), spatial=(1,))
    student = {f"feat/{k}": s[f"feat/{k}"] for k in range(1, 5)}
    student.update(embed=s["embed"], logits=s["logits"])
    teacher = {"embed": t["embed"], "logits": t["logits"]}
    torch.manual_seed(503)
    widths = {1: 8, 2: 16, 3: 32, 4: 64}
    branches = {k: cnn_branch(c, 4 - k, 96, 10) for k, c in widths.items()}
    one_case("ofa", {}, student, teacher, targets(t["logits"], 10, 504), branches)

    # A three-stage CIFAR-like student on 100 classes, stages 2 and 3, eps
    # per term, temperature 2, weights 0.5 / 0.7; the teacher's feature is
    # narrower than the student's (64 > 32).
    s = resnet_taps(8, 511, channels=(16, 16, 32, 64), spatial=(8, 8, 4, 2), classes=100)
    t = resnet_taps(8, 512, channels=(32,), spatial=(1,), classes=100)
    student = {f"feat/{k}": s[f"feat/{k}"] for k in range(1, 4)}
    student.update(embed=s["embed"], logits=s["logits"])
    teacher = {"embed": t["embed"], "logits": t["logits"]}
    torch.manual_seed(513)
    branches = {2: cnn_branch(32, 1, 64, 100), 3: cnn_branch(64, 0, 64, 100)}
    params = {"stages": [2, 3], "eps": [1.5, 0.8, 1.2], "temperature": 2.0, "loss_weight": 0.5,
              "kd_loss_weight": 0.7}
    one_case("ofa_eps_t2_c100", params, student, teacher, targets(t["logits"], 100, 514), branches)

    # A ViT student (a `cls` tap) of width 8 on a 14x14 patch grid, stages 2
    # and 4 of 4: one PatchMerging to 7x7, then 2 and 1 Blocks; eps 1.5 (the
    # authors' ImageNet command).
    g = torch.Generator().manual_seed(521)
    student = {f"feat/{k}": torch.randn(2, 8, 14, 14, generator=g) for k in (2, 4)}
    student.update(cls=torch.randn(2, 8, generator=g), embed=torch.randn(2, 8, generator=g),
                   logits=torch.randn(2, 10, generator=g) * 3)
    teacher = {"embed": torch.randn(2, 32, generator=g), "logits": torch.randn(2, 10, generator=g) * 3}
    torch.manual_seed(522)
    branches = {2: vit_branch(14, 8, 8, 2, 10), 4: vit_branch(14, 8, 8, 1, 10)}
    params = {"stages": [2, 4], "eps": 1.5}
    one_case("ofa_vit", params, student, teacher, targets(teacher["logits"], 10, 523), branches, vit=True)

"""PyTorch reference of the kd-models zoo and the fixtures its tests read.

The architectures are RepDistiller's CIFAR ResNet (models/resnet.py), WRN
(models/wrn.py) and VGG-BN (models/vgg.py), with the same module names so the
state_dict keys match; forward() returns kd's taps:
  feat/0 stem, feat/k stage k, preact/k the same point before its last ReLU,
  embed the pooled vector, logits.
Where kd's taps differ from RepDistiller's `is_feat=True, preact=True` lists:
  ResNet, VGG  preact/0 is the stem before its ReLU (RepDistiller repeats feat/0).
  WRN          preact/k is the BN that reads stage k (as RepDistiller), computed
               once in the forward instead of re-applied.

Writes into fixtures/:
  model_<name>.safetensors     the state_dict as PyTorch has it (keys as-is,
                               num_batches_tracked included); big models in
                               float16 (their weights are rounded to float16
                               first, so the expectations are exact for them)
  model_<name>_io.safetensors  `input` [4, 3, 32, 32]; eval-mode `logits`,
                               `embed` and every tap, spatial taps as
                               `x.flatten(1)[:, ::TAP_STRIDE]` to keep files
                               small; `train/logits` and `train/<bn buffer>`
                               after one train-mode forward of `input` from the
                               saved state. Metadata `fixture`: JSON with
                               model, arch, num_classes, tap_stride, tap_shapes.
  model_zoo.json               per zoo name (100 classes): state_dict keys with
                               shapes, trainable parameter count, tap shapes
                               for one 32x32 input.
Run: ~/.cache/kd/venv/bin/python tests/golden/models.py
"""
import json
import math
import pathlib

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import save_file

OUT = pathlib.Path(__file__).resolve().parent / "fixtures"
TAP_STRIDE = 13  # prime: every channel and position class gets sampled
NUM_CLASSES = 10


def conv(c_in, c_out, k, stride=1, bias=False):
    return nn.Conv2d(c_in, c_out, k, stride=stride, padding=k // 2, bias=bias)


def he_fan_out(m):
    # RepDistiller: kaiming_normal_(fan_out) / normal_(0, sqrt(2 / (k*k*out))).
    k = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
    with torch.no_grad():
        m.weight.normal_(0, math.sqrt(2.0 / k))
        if m.bias is not None:
            m.bias.zero_()


def init_common(model):
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            he_fan_out(m)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def taps(feat, pre, embed, logits):
    out = {f"feat/{k}": t for k, t in enumerate(feat)}
    out.update({f"preact/{k}": t for k, t in enumerate(pre)})
    out["embed"] = embed
    out["logits"] = logits
    return out


# ---------------------------------------------------------------- ResNet

class ResBlock(nn.Module):
    def __init__(self, c_in, c_out, stride):
        super().__init__()
        self.conv1 = conv(c_in, c_out, 3, stride)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = conv(c_out, c_out, 3)
        self.bn2 = nn.BatchNorm2d(c_out)
        if stride != 1 or c_in != c_out:
            self.downsample = nn.Sequential(conv(c_in, c_out, 1, stride), nn.BatchNorm2d(c_out))
        else:
            self.downsample = None

    def forward(self, x):
        """Residual sum before the closing ReLU."""
        h = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        return h + (x if self.downsample is None else self.downsample(x))


class ResNet(nn.Module):
    def __init__(self, depth, filters, num_classes):
        super().__init__()
        n = (depth - 2) // 6
        self.conv1 = conv(3, filters[0], 3)
        self.bn1 = nn.BatchNorm2d(filters[0])
        for s in (1, 2, 3):
            c_in, c_out = filters[s - 1], filters[s]
            blocks = [ResBlock(c_in if i == 0 else c_out, c_out, (1 if s == 1 else 2) if i == 0 else 1)
                      for i in range(n)]
            setattr(self, f"layer{s}", nn.Sequential(*blocks))
        self.fc = nn.Linear(filters[3], num_classes)
        init_common(self)

    def forward(self, x):
        pre = [self.bn1(self.conv1(x))]
        feat = [F.relu(pre[0])]
        for layer in (self.layer1, self.layer2, self.layer3):
            h = feat[-1]
            for block in list(layer)[:-1]:
                h = F.relu(block(h))
            pre.append(layer[-1](h))
            feat.append(F.relu(pre[-1]))
        embed = F.avg_pool2d(feat[-1], 8).flatten(1)  # RepDistiller's AvgPool2d(8)
        return taps(feat, pre, embed, self.fc(embed))


# ---------------------------------------------------------------- WRN

class WideBlock(nn.Module):
    def __init__(self, c_in, c_out, stride):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(c_in)
        self.conv1 = conv(c_in, c_out, 3, stride)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.conv2 = conv(c_out, c_out, 3)
        self.convShortcut = conv(c_in, c_out, 1, stride) if c_in != c_out else None

    def forward(self, x):
        """(output, bn1(x))."""
        pre = self.bn1(x)
        a = F.relu(pre)
        h = self.conv2(F.relu(self.bn2(self.conv1(a))))
        return h + (x if self.convShortcut is None else self.convShortcut(a)), pre


class WideStage(nn.Module):
    def __init__(self, n, c_in, c_out, stride):
        super().__init__()
        self.layer = nn.Sequential(*[WideBlock(c_in if i == 0 else c_out, c_out, stride if i == 0 else 1)
                                     for i in range(n)])


class WideResNet(nn.Module):
    def __init__(self, depth, widen, num_classes):
        super().__init__()
        n = (depth - 4) // 6
        c = [16, 16 * widen, 32 * widen, 64 * widen]
        self.conv1 = conv(3, c[0], 3)
        self.block1 = WideStage(n, c[0], c[1], 1)
        self.block2 = WideStage(n, c[1], c[2], 2)
        self.block3 = WideStage(n, c[2], c[3], 2)
        self.bn1 = nn.BatchNorm2d(c[3])
        self.fc = nn.Linear(c[3], num_classes)
        init_common(self)
        nn.init.zeros_(self.fc.bias)

    def forward(self, x):
        f0 = self.conv1(x)
        feat, pre = [f0], [f0]
        h = f0
        for s, stage in enumerate((self.block1, self.block2, self.block3)):
            for i, block in enumerate(stage.layer):
                h, p = block(h)
                if i == 0 and s > 0:
                    pre.append(p)  # bn1 of this stage's first block reads stage s-1
            feat.append(h)
        pre.append(self.bn1(h))
        embed = F.avg_pool2d(F.relu(pre[-1]), 8).flatten(1)
        return taps(feat, pre, embed, self.fc(embed))


# ---------------------------------------------------------------- VGG

VGG_CFG = {
    8: [[64], [128], [256], [512], [512]],
    11: [[64], [128], [256, 256], [512, 512], [512, 512]],
    13: [[64, 64], [128, 128], [256, 256], [512, 512], [512, 512]],
    16: [[64, 64], [128, 128], [256, 256, 256], [512, 512, 512], [512, 512, 512]],
    19: [[64, 64], [128, 128], [256] * 4, [512] * 4, [512] * 4],
}


class VGG(nn.Module):
    def __init__(self, cfg, num_classes):
        super().__init__()
        c_in = 3
        for i, widths in enumerate(cfg):
            layers = []
            for w in widths:
                layers += [nn.Conv2d(c_in, w, 3, padding=1), nn.BatchNorm2d(w), nn.ReLU()]
                c_in = w
            setattr(self, f"block{i}", nn.Sequential(*layers[:-1]))
        self.classifier = nn.Linear(c_in, num_classes)
        init_common(self)
        nn.init.normal_(self.classifier.weight, 0, 0.01)
        nn.init.zeros_(self.classifier.bias)

    def forward(self, x):
        feat, pre = [], []
        h = x
        for i in range(5):
            if i in (1, 2, 3) or (i == 4 and x.shape[2] == 64):
                h = F.max_pool2d(feat[-1], 2, 2)
            elif i == 4:
                h = feat[-1]
            pre.append(getattr(self, f"block{i}")(h))
            feat.append(F.relu(pre[-1]))
        embed = F.adaptive_avg_pool2d(feat[-1], 1).flatten(1)
        return taps(feat, pre, embed, self.classifier(embed))


# ---------------------------------------------------------------- zoo

def arch_of(name):
    if name.startswith("resnet"):
        x4 = name.endswith("x4")
        depth = int(name[len("resnet"):].removesuffix("x4"))
        return {"family": "resnet", "depth": depth,
                "filters": [32, 64, 128, 256] if x4 else [16, 16, 32, 64]}
    if name.startswith("wrn_"):
        _, depth, widen = name.split("_")
        return {"family": "wrn", "depth": int(depth), "widen": int(widen)}
    return {"family": "vgg", "cfg": VGG_CFG[int(name[len("vgg"):])]}


def build(arch, num_classes):
    if arch["family"] == "resnet":
        return ResNet(arch["depth"], arch["filters"], num_classes)
    if arch["family"] == "wrn":
        return WideResNet(arch["depth"], arch["widen"], num_classes)
    return VGG(arch["cfg"], num_classes)


ZOO = ["resnet8", "resnet14", "resnet20", "resnet32", "resnet44", "resnet56", "resnet110",
       "resnet8x4", "resnet32x4", "wrn_16_1", "wrn_16_2", "wrn_40_1", "wrn_40_2",
       "vgg8", "vgg11", "vgg13", "vgg16", "vgg19"]

# name -> (arch, float16 weights). Full vgg8 is 4M parameters (16 MB), so VGG
# is checked at 1/8 width with vgg11's two-conv blocks, which exercises the
# Sequential indices vgg8 never reaches; vgg8 itself is covered by the zoo
# table (keys, shapes, parameter and tap shapes).
GOLDEN = {
    "resnet20": (arch_of("resnet20"), False),
    "resnet8x4": (arch_of("resnet8x4"), True),
    "wrn_16_2": (arch_of("wrn_16_2"), True),
    "vgg_slim": ({"family": "vgg", "cfg": [[8], [16], [32, 32], [32, 32], [32, 32]]}, False),
}


def perturb_and_calibrate(model):
    """Moves every parameter off its structured init (BN weight 1, bias 0)
    so swapped or ignored tensors show, and gives BN running statistics that
    differ from any test batch's own."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.2)
            elif isinstance(m, (nn.Conv2d, nn.Linear)) and m.bias is not None:
                m.bias.normal_(0, 0.1)
        model.train()
        for _ in range(3):
            model(torch.randn(16, 3, 32, 32) * 1.5 + 0.3)


def sampled(t):
    return t.flatten(1)[:, ::TAP_STRIDE].contiguous() if t.dim() > 2 else t.contiguous()


def golden(name, arch, half):
    model = build(arch, NUM_CLASSES)
    perturb_and_calibrate(model)
    if half:
        with torch.no_grad():
            for t in model.state_dict().values():
                if t.is_floating_point():
                    t.copy_(t.half().float())
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    x = torch.randn(4, 3, 32, 32)
    model.eval()
    with torch.no_grad():
        out = model(x)
    io = {"input": x}
    io.update({k: sampled(v) for k, v in out.items()})
    shapes = {k: list(v.shape) for k, v in out.items()}
    model.train()
    with torch.no_grad():
        io["train/logits"] = model(x)["logits"].contiguous()
    for k, v in model.state_dict().items():
        if k.endswith("running_mean") or k.endswith("running_var"):
            io[f"train/{k}"] = v.clone()

    saved = {k: (v.half() if half and v.is_floating_point() else v).contiguous() for k, v in state.items()}
    save_file(saved, str(OUT / f"model_{name}.safetensors"))
    # One metadata entry: safetensors writes several in hash order, which
    # would change the file on every regeneration.
    meta = {"model": name, "arch": arch, "num_classes": NUM_CLASSES,
            "tap_stride": TAP_STRIDE, "tap_shapes": shapes}
    save_file(io, str(OUT / f"model_{name}_io.safetensors"), metadata={"fixture": json.dumps(meta)})
    print(f"{name}: logits[0,:3]={out['logits'][0, :3].tolist()}")


def zoo_table():
    table = {}
    for name in ZOO:
        model = build(arch_of(name), 100).eval()
        with torch.no_grad():
            out = model(torch.randn(1, 3, 32, 32))
        table[name] = {
            "params": sum(p.numel() for p in model.parameters()),
            "state": [[k, list(v.shape)] for k, v in model.state_dict().items()],
            "taps": {k: list(v.shape[1:]) for k, v in out.items()},
        }
    (OUT / "model_zoo.json").write_text(json.dumps(table, indent=None, separators=(",", ":")) + "\n")
    print("zoo:", {k: v["params"] for k, v in table.items()})


def main():
    torch.manual_seed(0)
    torch.use_deterministic_algorithms(True)
    OUT.mkdir(exist_ok=True)
    for name, (arch, half) in GOLDEN.items():
        golden(name, arch, half)
    zoo_table()


if __name__ == "__main__":
    main()

"""PyTorch reference of the kd-models zoo and the fixtures its tests read.

The architectures are RepDistiller's CIFAR ResNet (models/resnet.py), WRN
(models/wrn.py), VGG-BN (models/vgg.py), Bottleneck ResNet (models/resnetv2.py),
MobileNetV2 (models/mobilenetv2.py), ShuffleNet V1 (models/ShuffleNetv1.py) and
V2 (models/ShuffleNetv2.py), then the ImageNet nets of mdistiller's zoo:
torchvision's ResNets (torchvision/models/resnet.py; resnet18, resnet34,
resnet50) and mdistiller's MobileNetV1 (mdistiller/models/imagenet/
mobilenetv1.py), with the same module names so the state_dict keys match;
check_imagenet_references() confirms the torchvision ones against
torchvision itself. forward() returns kd's taps:
  feat/0 stem, feat/k stage k, preact/k the same point before its last ReLU,
  embed the pooled vector, logits.
Where kd's taps differ from RepDistiller's `is_feat=True, preact=True` lists:
  all but WRN  preact/0 is the stem before its ReLU (RepDistiller repeats feat/0).
  WRN          preact/k is the BN that reads stage k (as RepDistiller), computed
               once in the forward instead of re-applied.
RepDistiller's own oddities kept as they are:
  MobileNetV2  stages end in a linear projection: preact/k = feat/k for k >= 1
               (RepDistiller ignores `preact`).
  ShuffleV2    preact/k is the last block's [kept half, branch before ReLU],
               not channel-shuffled, while feat/k is shuffled.

Writes into fixtures/:
  model_<name>.safetensors     the state_dict as PyTorch has it (keys as-is,
                               num_batches_tracked included); big models in
                               float16 (their weights are rounded to float16
                               first, so the expectations are exact for them)
  model_<name>_io.safetensors  `input` [B, 3, S, S] (B = 4, 2 for the
                               models added later; S = 32, 64 for the
                               ImageNet nets); eval-mode `logits`,
                               `embed` and every tap, spatial taps as
                               `x.flatten(1)[:, ::TAP_STRIDE]` to keep files
                               small; `train/logits` and `train/<bn buffer>`
                               after one train-mode forward of `input` from the
                               saved state. Metadata `fixture`: JSON with
                               model, arch, num_classes, tap_stride, tap_shapes.
  model_zoo.json               per zoo name (100 classes): state_dict keys with
                               shapes, trainable parameter count, tap shapes
                               for one 32x32 input; for the ImageNet nets
                               also `imagenet_params`, the count at 1000
                               classes (torchvision's own for the ResNets).
Run: ~/.cache/kd/venv/bin/python tests/golden/models.py
"""
import json
import math
import pathlib

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
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


# ---------------------------------------------------------------- ResNet50

class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, c_in, planes, stride):
        super().__init__()
        c_out = self.expansion * planes
        self.conv1 = conv(c_in, planes, 1)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = conv(planes, planes, 3, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = conv(planes, c_out, 1)
        self.bn3 = nn.BatchNorm2d(c_out)
        # An empty Sequential is the identity and holds no state, as in resnetv2.py.
        self.shortcut = nn.Sequential()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(conv(c_in, c_out, 1, stride), nn.BatchNorm2d(c_out))

    def forward(self, x):
        """Residual sum before the closing ReLU."""
        h = F.relu(self.bn1(self.conv1(x)))
        h = F.relu(self.bn2(self.conv2(h)))
        return self.bn3(self.conv3(h)) + self.shortcut(x)


class ResNetV2(nn.Module):
    def __init__(self, blocks, stem, planes, num_classes):
        super().__init__()
        self.conv1 = conv(3, stem, 3)
        self.bn1 = nn.BatchNorm2d(stem)
        c_in = stem
        for s, (n, p) in enumerate(zip(blocks, planes)):
            layer = []
            for i in range(n):
                layer.append(Bottleneck(c_in, p, (1 if s == 0 else 2) if i == 0 else 1))
                c_in = p * Bottleneck.expansion
            setattr(self, f"layer{s + 1}", nn.Sequential(*layer))
        self.linear = nn.Linear(c_in, num_classes)
        init_common(self)  # kaiming_normal_(fan_out), BN 1/0; Linear left as PyTorch makes it

    def forward(self, x):
        pre = [self.bn1(self.conv1(x))]
        feat = [F.relu(pre[0])]
        for layer in (self.layer1, self.layer2, self.layer3, self.layer4):
            h = feat[-1]
            for block in list(layer)[:-1]:
                h = F.relu(block(h))
            pre.append(layer[-1](h))
            feat.append(F.relu(pre[-1]))
        embed = F.adaptive_avg_pool2d(feat[-1], 1).flatten(1)
        return taps(feat, pre, embed, self.linear(embed))


# ---------------------------------------------------------------- MobileNetV2

class InvertedResidual(nn.Module):
    def __init__(self, c_in, c_out, stride, t):
        super().__init__()
        hidden = c_in * t
        self.residual = stride == 1 and c_in == c_out
        self.conv = nn.Sequential(
            nn.Conv2d(c_in, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU(),
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False), nn.BatchNorm2d(hidden), nn.ReLU(),
            nn.Conv2d(hidden, c_out, 1, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x):
        h = self.conv(x)
        return x + h if self.residual else h


class MobileNetV2(nn.Module):
    # (expands by T, channels, blocks, stride of the first block)
    SETTING = [(False, 16, 1, 1), (True, 24, 2, 1), (True, 32, 3, 2), (True, 64, 4, 2),
               (True, 96, 3, 1), (True, 160, 3, 2), (True, 320, 1, 1)]
    TAPPED = (1, 2, 4, 6)

    def __init__(self, T, width, num_classes):
        super().__init__()
        c_in = int(32 * width)
        self.conv1 = nn.Sequential(nn.Conv2d(3, c_in, 3, 2, 1, bias=False), nn.BatchNorm2d(c_in), nn.ReLU())
        self.blocks = nn.ModuleList()
        for expands, c, n, s in self.SETTING:
            c_out = int(c * width)
            stage = []
            for i in range(n):
                stage.append(InvertedResidual(c_in, c_out, s if i == 0 else 1, T if expands else 1))
                c_in = c_out
            self.blocks.append(nn.Sequential(*stage))
        last = int(1280 * width) if width > 1.0 else 1280
        self.conv2 = nn.Sequential(nn.Conv2d(c_in, last, 1, bias=False), nn.BatchNorm2d(last), nn.ReLU())
        self.classifier = nn.Sequential(nn.Linear(last, num_classes))
        init_common(self)
        nn.init.normal_(self.classifier[0].weight, 0, 0.01)
        nn.init.zeros_(self.classifier[0].bias)

    def forward(self, x):
        pre = [self.conv1[1](self.conv1[0](x))]
        feat = [F.relu(pre[0])]
        h = feat[0]
        for i, stage in enumerate(self.blocks):
            h = stage(h)
            if i in self.TAPPED:
                feat.append(h)
                pre.append(h)
        h = self.conv2(h)
        # RepDistiller's AvgPool2d(input_size // 16, ceil_mode=True) at 32 pixels.
        embed = F.avg_pool2d(h, 2, ceil_mode=True).flatten(1)
        return taps(feat, pre, embed, self.classifier(embed))


# ---------------------------------------------------------------- ShuffleNets

def channel_shuffle(x, g):
    n, c, h, w = x.shape
    return x.reshape(n, g, c // g, h, w).transpose(1, 2).reshape(n, c, h, w)


class ShuffleUnit(nn.Module):
    """ShuffleNet V1 Bottleneck."""

    def __init__(self, c_in, c_out, stride, groups):
        super().__init__()
        mid = c_out // 4
        self.g1 = 1 if c_in == 24 else groups
        self.stride = stride
        self.conv1 = nn.Conv2d(c_in, mid, 1, groups=self.g1, bias=False)
        self.bn1 = nn.BatchNorm2d(mid)
        self.conv2 = nn.Conv2d(mid, mid, 3, stride, 1, groups=mid, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv3 = nn.Conv2d(mid, c_out, 1, groups=groups, bias=False)
        self.bn3 = nn.BatchNorm2d(c_out)

    def forward(self, x):
        """Output before the closing ReLU."""
        h = channel_shuffle(F.relu(self.bn1(self.conv1(x))), self.g1)
        h = F.relu(self.bn2(self.conv2(h)))
        h = self.bn3(self.conv3(h))
        if self.stride == 2:
            return torch.cat([h, F.avg_pool2d(x, 3, 2, 1)], 1)
        return h + x


class ShuffleNetV1(nn.Module):
    def __init__(self, out_planes, num_blocks, groups, num_classes):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 24, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(24)
        c_in = 24
        for s, (out, n) in enumerate(zip(out_planes, num_blocks)):
            units = []
            for i in range(n):
                units.append(ShuffleUnit(c_in, out - c_in if i == 0 else out, 2 if i == 0 else 1, groups))
                c_in = out
            setattr(self, f"layer{s + 1}", nn.Sequential(*units))
        self.linear = nn.Linear(c_in, num_classes)
        # PyTorch's default initialisation, as RepDistiller.

    def forward(self, x):
        pre = [self.bn1(self.conv1(x))]
        feat = [F.relu(pre[0])]
        for layer in (self.layer1, self.layer2, self.layer3):
            h = feat[-1]
            for unit in list(layer)[:-1]:
                h = F.relu(unit(h))
            pre.append(layer[-1](h))
            feat.append(F.relu(pre[-1]))
        embed = F.avg_pool2d(feat[-1], 4).flatten(1)
        return taps(feat, pre, embed, self.linear(embed))


class V2Down(nn.Module):
    def __init__(self, c_in, c_out):
        super().__init__()
        mid = c_out // 2
        self.conv1 = nn.Conv2d(c_in, c_in, 3, 2, 1, groups=c_in, bias=False)
        self.bn1 = nn.BatchNorm2d(c_in)
        self.conv2 = nn.Conv2d(c_in, mid, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv3 = nn.Conv2d(c_in, mid, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(mid)
        self.conv4 = nn.Conv2d(mid, mid, 3, 2, 1, groups=mid, bias=False)
        self.bn4 = nn.BatchNorm2d(mid)
        self.conv5 = nn.Conv2d(mid, mid, 1, bias=False)
        self.bn5 = nn.BatchNorm2d(mid)

    def forward(self, x):
        left = F.relu(self.bn2(self.conv2(self.bn1(self.conv1(x)))))
        right = F.relu(self.bn3(self.conv3(x)))
        right = F.relu(self.bn5(self.conv5(self.bn4(self.conv4(right)))))
        return channel_shuffle(torch.cat([left, right], 1), 2)


class V2Split(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.half = c // 2
        h = self.half
        self.conv1 = nn.Conv2d(h, h, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(h)
        self.conv2 = nn.Conv2d(h, h, 3, 1, 1, groups=h, bias=False)
        self.bn2 = nn.BatchNorm2d(h)
        self.conv3 = nn.Conv2d(h, h, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(h)

    def forward(self, x):
        """(output, RepDistiller's preact: [kept, branch before ReLU], unshuffled)."""
        kept, rest = x[:, :self.half], x[:, self.half:]
        h = F.relu(self.bn1(self.conv1(rest)))
        pre = self.bn3(self.conv3(self.bn2(self.conv2(h))))
        return channel_shuffle(torch.cat([kept, F.relu(pre)], 1), 2), torch.cat([kept, pre], 1)


class ShuffleNetV2(nn.Module):
    def __init__(self, out_channels, num_blocks, num_classes):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 24, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(24)
        c_in = 24
        for s, n in enumerate(num_blocks):
            c = out_channels[s]
            setattr(self, f"layer{s + 1}", nn.Sequential(V2Down(c_in, c), *[V2Split(c) for _ in range(n)]))
            c_in = c
        self.conv2 = nn.Conv2d(c_in, out_channels[3], 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels[3])
        self.linear = nn.Linear(out_channels[3], num_classes)
        # PyTorch's default initialisation, as RepDistiller.

    def forward(self, x):
        pre = [self.bn1(self.conv1(x))]
        feat = [F.relu(pre[0])]
        for layer in (self.layer1, self.layer2, self.layer3):
            h = layer[0](feat[-1])
            for block in list(layer)[1:]:
                h, p = block(h)
            pre.append(p)
            feat.append(h)
        h = F.relu(self.bn2(self.conv2(feat[-1])))
        embed = F.avg_pool2d(h, 4).flatten(1)
        return taps(feat, pre, embed, self.linear(embed))


# ---------------------------------------------------------------- torchvision ResNets

class TvBlock(nn.Module):
    """torchvision's BasicBlock or Bottleneck (the stride on the 3x3), its
    modules registered in torchvision's order."""

    def __init__(self, c_in, planes, stride, bottleneck):
        super().__init__()
        self.expansion = 4 if bottleneck else 1
        c_out = planes * self.expansion
        if bottleneck:
            self.conv1 = conv(c_in, planes, 1)
            self.bn1 = nn.BatchNorm2d(planes)
            self.conv2 = conv(planes, planes, 3, stride)
            self.bn2 = nn.BatchNorm2d(planes)
            self.conv3 = conv(planes, c_out, 1)
            self.bn3 = nn.BatchNorm2d(c_out)
            self.chain = [(self.conv1, self.bn1), (self.conv2, self.bn2), (self.conv3, self.bn3)]
        else:
            self.conv1 = conv(c_in, planes, 3, stride)
            self.bn1 = nn.BatchNorm2d(planes)
            self.conv2 = conv(planes, planes, 3)
            self.bn2 = nn.BatchNorm2d(planes)
            self.chain = [(self.conv1, self.bn1), (self.conv2, self.bn2)]
        self.downsample = None
        if stride != 1 or c_in != c_out:
            self.downsample = nn.Sequential(conv(c_in, c_out, 1, stride), nn.BatchNorm2d(c_out))

    def forward(self, x):
        """Residual sum before the closing ReLU."""
        h = x
        for c, b in self.chain[:-1]:
            h = F.relu(b(c(h)))
        c, b = self.chain[-1]
        return b(c(h)) + (x if self.downsample is None else self.downsample(x))


class TvResNet(nn.Module):
    def __init__(self, bottleneck, blocks, stem, planes, num_classes):
        super().__init__()
        self.conv1 = nn.Conv2d(3, stem, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(stem)
        c_in = stem
        for s, (n, p) in enumerate(zip(blocks, planes)):
            layer = []
            for i in range(n):
                layer.append(TvBlock(c_in, p, (1 if s == 0 else 2) if i == 0 else 1, bottleneck))
                c_in = layer[-1].expansion * p
            setattr(self, f"layer{s + 1}", nn.Sequential(*layer))
        self.fc = nn.Linear(c_in, num_classes)
        # torchvision's, zero_init_residual=False; fc left as PyTorch makes it.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x):
        # mdistiller's taps: the stem before the max pool, each stage's
        # output before its closing ReLU.
        pre = [self.bn1(self.conv1(x))]
        feat = [F.relu(pre[0])]
        h = F.max_pool2d(feat[0], 3, 2, 1)
        for layer in (self.layer1, self.layer2, self.layer3, self.layer4):
            for block in list(layer)[:-1]:
                h = F.relu(block(h))
            pre.append(layer[-1](h))
            feat.append(F.relu(pre[-1]))
            h = feat[-1]
        embed = F.adaptive_avg_pool2d(h, 1).flatten(1)
        return taps(feat, pre, embed, self.fc(embed))


# ---------------------------------------------------------------- MobileNetV1 (mdistiller, ImageNet)

class MobileNetV1(nn.Module):
    # Output width and stride of model.1 .. model.13 (mdistiller's conv_dw).
    LAYERS = [(64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2), (512, 1), (512, 1),
              (512, 1), (512, 1), (512, 1), (1024, 2), (1024, 1)]
    STAGE_ENDS = (3, 5, 11, 13)

    def __init__(self, width, num_classes):
        super().__init__()
        c = int(32 * width)
        layers = [nn.Sequential(nn.Conv2d(3, c, 3, 2, 1, bias=False), nn.BatchNorm2d(c), nn.ReLU())]
        for out, stride in self.LAYERS:
            o = int(out * width)
            layers.append(nn.Sequential(
                nn.Conv2d(c, c, 3, stride, 1, groups=c, bias=False), nn.BatchNorm2d(c), nn.ReLU(),
                nn.Conv2d(c, o, 1, 1, 0, bias=False), nn.BatchNorm2d(o), nn.ReLU()))
            c = o
        layers.append(nn.AvgPool2d(7))  # model.14: the global mean at 224 pixels; no state
        self.model = nn.Sequential(*layers)
        self.fc = nn.Linear(c, num_classes)
        # PyTorch's default initialisation, as mdistiller.

    def forward(self, x):
        pre = [self.model[0][:-1](x)]
        feat = [F.relu(pre[0])]
        start = 1
        for end in self.STAGE_ENDS:
            h = self.model[start:end](feat[-1])
            pre.append(self.model[end][:-1](h))
            feat.append(F.relu(pre[-1]))
            start = end + 1
        embed = F.adaptive_avg_pool2d(feat[-1], 1).flatten(1)
        return taps(feat, pre, embed, self.fc(embed))

    def mdistiller_forward(self, x):
        """mdistiller's forward(), verbatim in its indexing: (logits, feats)."""
        feat1 = self.model[3][:-1](self.model[0:3](x))
        feat2 = self.model[5][:-1](self.model[4:5](F.relu(feat1)))
        feat3 = self.model[11][:-1](self.model[6:11](F.relu(feat2)))
        feat4 = self.model[13][:-1](self.model[12:13](F.relu(feat3)))
        avg = self.model[14](F.relu(feat4)).flatten(1)
        return self.fc(avg), {"pooled_feat": avg, "preact_feats": [feat1, feat2, feat3, feat4]}


# ---------------------------------------------------------------- zoo

TV_RESNETS = {"resnet18": (False, [2, 2, 2, 2]), "resnet34": (False, [3, 4, 6, 3]),
              "resnet50": (True, [3, 4, 6, 3])}


def arch_of(name):
    if name in TV_RESNETS:
        bottleneck, blocks = TV_RESNETS[name]
        return {"family": "tvresnet", "block": "bottleneck" if bottleneck else "basic", "blocks": blocks,
                "stem": 64, "planes": [64, 128, 256, 512]}
    if name == "MobileNetV1":
        return {"family": "mobilenetv1", "width": 1.0}
    if name == "ResNet50":
        return {"family": "resnetv2", "blocks": [3, 4, 6, 3], "stem": 64, "planes": [64, 128, 256, 512]}
    if name.startswith("mobile_"):
        return {"family": "mobilenetv2", "expansion": 6, "width": 0.5 if name == "mobile_half" else 1.0}
    if name == "ShuffleV1":
        return {"family": "shufflev1", "out_planes": [240, 480, 960], "num_blocks": [4, 8, 4], "groups": 3}
    if name == "ShuffleV2":
        return {"family": "shufflev2", "out_channels": [116, 232, 464, 1024], "num_blocks": [3, 7, 3]}
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
    if arch["family"] == "resnetv2":
        return ResNetV2(arch["blocks"], arch["stem"], arch["planes"], num_classes)
    if arch["family"] == "mobilenetv2":
        return MobileNetV2(arch["expansion"], arch["width"], num_classes)
    if arch["family"] == "shufflev1":
        return ShuffleNetV1(arch["out_planes"], arch["num_blocks"], arch["groups"], num_classes)
    if arch["family"] == "shufflev2":
        return ShuffleNetV2(arch["out_channels"], arch["num_blocks"], num_classes)
    if arch["family"] == "tvresnet":
        return TvResNet(arch["block"] == "bottleneck", arch["blocks"], arch["stem"], arch["planes"], num_classes)
    if arch["family"] == "mobilenetv1":
        return MobileNetV1(arch["width"], num_classes)
    return VGG(arch["cfg"], num_classes)


ZOO = ["resnet8", "resnet14", "resnet20", "resnet32", "resnet44", "resnet56", "resnet110",
       "resnet8x4", "resnet32x4", "wrn_16_1", "wrn_16_2", "wrn_40_1", "wrn_40_2",
       "vgg8", "vgg11", "vgg13", "vgg16", "vgg19",
       "ResNet50", "mobile_half", "mobile_full", "ShuffleV1", "ShuffleV2",
       "resnet18", "resnet34", "resnet50", "MobileNetV1"]
IMAGENET = ("resnet18", "resnet34", "resnet50", "MobileNetV1")

# name -> (arch, float16 weights, batch[, input size]). Full vgg8 is 4M parameters (16 MB),
# so VGG is checked at 1/8 width with vgg11's two-conv blocks, which exercises
# the Sequential indices vgg8 never reaches; vgg8 itself is covered by the zoo
# table (keys, shapes, parameter and tap shapes). ResNet50 (23.5M parameters)
# likewise: resnet50_slim has its Bottlenecks, shortcuts where the width
# changes without a stride (layer1.0) and identities, at 1/8 width (stem
# 1/4) and fewer blocks. ShuffleV2 (2.6 MB even in float16) is checked at
# RepDistiller's net size 0.5: the same blocks and head, stages at 41% width.
# The ImageNet nets (11.7M to 25.6M parameters, 8 to 51 MB even in float16)
# likewise, on 64x64 inputs: tv_resnet{18,34,50}_slim are resnet18, resnet34
# and resnet50 with every width at 1/8 (resnet50's stem at 1/4, so layer1.0
# has its shape-changing downsample without a stride), MobileNetV1_slim is
# MobileNetV1 at width 1/4; check_imagenet_references() ties the full-width
# ResNets to torchvision and the MobileNetV1 reference to mdistiller's
# forward.
# Entries are generated in this order from one seed: new ones go at the end,
# so the fixtures before them stay as they are.
GOLDEN = {
    "resnet20": (arch_of("resnet20"), False, 4),
    "resnet8x4": (arch_of("resnet8x4"), True, 4),
    "wrn_16_2": (arch_of("wrn_16_2"), True, 4),
    "vgg_slim": ({"family": "vgg", "cfg": [[8], [16], [32, 32], [32, 32], [32, 32]]}, False, 4),
    "mobile_half": (arch_of("mobile_half"), True, 2),
    "ShuffleV1": (arch_of("ShuffleV1"), True, 2),
    "shufflev2_slim": ({"family": "shufflev2", "out_channels": [48, 96, 192, 1024], "num_blocks": [3, 7, 3]},
                       True, 2),
    "resnet50_slim": ({"family": "resnetv2", "blocks": [2, 1, 2, 1], "stem": 16, "planes": [8, 16, 32, 64]},
                      False, 2),
    "tv_resnet18_slim": ({"family": "tvresnet", "block": "basic", "blocks": [2, 2, 2, 2], "stem": 8,
                          "planes": [8, 16, 32, 64]}, True, 2, 64),
    "tv_resnet34_slim": ({"family": "tvresnet", "block": "basic", "blocks": [3, 4, 6, 3], "stem": 8,
                          "planes": [8, 16, 32, 64]}, True, 2, 64),
    "tv_resnet50_slim": ({"family": "tvresnet", "block": "bottleneck", "blocks": [3, 4, 6, 3], "stem": 16,
                          "planes": [8, 16, 32, 64]}, True, 2, 64),
    "MobileNetV1_slim": ({"family": "mobilenetv1", "width": 0.25}, True, 2, 64),
}


def perturb_and_calibrate(model, size=32):
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
            model(torch.randn(16, 3, size, size) * 1.5 + 0.3)


def sampled(t):
    return t.flatten(1)[:, ::TAP_STRIDE].contiguous() if t.dim() > 2 else t.contiguous()


def golden(name, arch, half, batch, size=32):
    model = build(arch, NUM_CLASSES)
    perturb_and_calibrate(model, size)
    if half:
        with torch.no_grad():
            for t in model.state_dict().values():
                if t.is_floating_point():
                    t.copy_(t.half().float())
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    x = torch.randn(batch, 3, size, size)
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


def assert_close(what, got, want):
    assert got.shape == want.shape, (what, got.shape, want.shape)
    err = (got - want).abs().max().item()
    assert err <= 1e-4 * max(1.0, want.abs().max().item()), f"{what}: max |diff| {err}"


def check_imagenet_references():
    """The ImageNet references are what they claim to be: each TvResNet
    has torchvision's state_dict (keys in order, shapes) and, with
    torchvision's weights, its logits and BN statistics in eval and train
    mode; MobileNetV1's taps are mdistiller's forward at 224 pixels."""
    for name, ctor in (("resnet18", torchvision.models.resnet18), ("resnet34", torchvision.models.resnet34),
                       ("resnet50", torchvision.models.resnet50)):
        tv = ctor(num_classes=NUM_CLASSES)
        ours = build(arch_of(name), NUM_CLASSES)
        shapes = lambda m: [(k, tuple(v.shape)) for k, v in m.state_dict().items()]
        assert shapes(ours) == shapes(tv), name
        perturb_and_calibrate(tv)
        ours.load_state_dict(tv.state_dict())
        x = torch.randn(2, 3, 64, 64)
        for train in (False, True):
            tv.train(train)
            ours.train(train)
            with torch.no_grad():
                assert_close(f"{name} train={train}", ours(x)["logits"], tv(x))
        for (k, a), (_, b) in zip(ours.state_dict().items(), tv.state_dict().items()):
            assert_close(f"{name} {k}", a.float(), b.float())
    net = MobileNetV1(1.0, 1000)
    perturb_and_calibrate(net)
    net.eval()
    with torch.no_grad():
        x = torch.randn(1, 3, 224, 224)
        out = net(x)
        logits, feats = net.mdistiller_forward(x)
    assert_close("MobileNetV1 logits", out["logits"], logits)
    assert_close("MobileNetV1 embed", out["embed"], feats["pooled_feat"])
    for k, t in enumerate(feats["preact_feats"]):
        assert_close(f"MobileNetV1 preact/{k + 1}", out[f"preact/{k + 1}"], t)
    print("imagenet references: torchvision and mdistiller agree")


def imagenet_params(name):
    """Trainable parameters at ImageNet's 1000 classes; torchvision's own
    model for the ResNets."""
    model = getattr(torchvision.models, name)() if name in TV_RESNETS else build(arch_of(name), 1000)
    return sum(p.numel() for p in model.parameters())


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
        if name in IMAGENET:
            table[name]["imagenet_params"] = imagenet_params(name)
    (OUT / "model_zoo.json").write_text(json.dumps(table, indent=None, separators=(",", ":")) + "\n")
    print("zoo:", {k: v["params"] for k, v in table.items()})


def main():
    torch.manual_seed(0)
    torch.use_deterministic_algorithms(True)
    OUT.mkdir(exist_ok=True)
    for name, spec in GOLDEN.items():
        golden(name, *spec)
    check_imagenet_references()
    zoo_table()


if __name__ == "__main__":
    main()


def zoo(name, num_classes=100):
    """The zoo network `name` (kd's names), for a `python:` spec:
    `python:tests/golden/models.py:zoo("resnet8", num_classes=10)`."""
    return build(arch_of(name), num_classes)

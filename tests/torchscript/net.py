"""A network that is no zoo shape (grouped convolution, GELU, a LayerNorm
head), saved as TorchScript for tests/torchscript.rs: scripted, and traced
in eval mode (which bakes BatchNorm into inference). Also writes an input
batch and the module's eval-mode outputs on it, computed by PyTorch.

    python net.py OUT_DIR
"""
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn


class Net(nn.Module):
    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        self.bn0 = nn.BatchNorm2d(16)
        self.block1 = nn.Sequential(
            nn.Conv2d(16, 32, 3, stride=2, padding=1, groups=4, bias=False),
            nn.BatchNorm2d(32),
            nn.GELU(),
        )
        self.block2 = nn.Sequential(
            nn.Conv2d(32, 64, 3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(64),
            nn.GELU(),
        )
        self.norm = nn.LayerNorm(64)
        self.head = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        f0 = torch.relu(self.bn0(self.stem(x)))
        f1 = self.block1(f0)
        f2 = self.block2(f1)
        embed = self.norm(f2.mean(dim=(2, 3)))
        return {"feat/0": f0, "feat/1": f1, "feat/2": f2, "embed": embed, "logits": self.head(embed)}


def main(out: Path):
    torch.manual_seed(0)
    net = Net()
    # Running statistics off their init, so eval mode is not the identity.
    with torch.no_grad():
        net.train()
        for _ in range(3):
            net(torch.randn(16, 3, 32, 32))
    net.eval()
    torch.jit.script(net).save(str(out / "scripted.pt"))
    torch.jit.trace(net, torch.randn(2, 3, 32, 32), strict=False).save(str(out / "traced_eval.pt"))
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(out / "weights.safetensors"))
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        y = net(x)
    save_file({"input": x}, str(out / "input.safetensors"))
    save_file({k: v.contiguous() for k, v in y.items()}, str(out / "expect.safetensors"))


if __name__ == "__main__":
    main(Path(sys.argv[1]))

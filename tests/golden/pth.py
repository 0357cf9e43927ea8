"""Writes checkpoints the way PyTorch users save them, for the test that kd
reads them without Python (crates/kd-models/tests/pth.rs):

  pth_resnet8_bare.pth        torch.save(model.state_dict())
  pth_resnet8_checkpoint.pth  RepDistiller's {'epoch', 'model', 'best_acc',
                              'optimizer'}, the model wrapped in DataParallel
                              (keys prefixed `module.`)
  pth_resnet8.safetensors     the same weights, for comparison
"""
import pathlib

import torch
from safetensors.torch import save_file

import models

OUT = pathlib.Path(__file__).resolve().parent / "fixtures"


def main():
    torch.manual_seed(7)
    net = models.build(models.arch_of("resnet8"), 10)
    models.perturb_and_calibrate(net)
    sd = {k: v.detach().clone() for k, v in net.state_dict().items()}
    torch.save(sd, OUT / "pth_resnet8_bare.pth")
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    out = net(torch.randn(2, 3, 32, 32))
    (out["logits"] if isinstance(out, dict) else out).sum().backward()
    opt.step()
    wrapped = torch.nn.DataParallel(net)
    state = {
        "epoch": 240,
        "model": {k: v.detach().clone() for k, v in wrapped.state_dict().items()},
        "best_acc": torch.tensor(72.5),
        "optimizer": opt.state_dict(),
    }
    torch.save(state, OUT / "pth_resnet8_checkpoint.pth")
    after = {k[len("module."):]: v for k, v in state["model"].items()}
    save_file({k: v.contiguous() for k, v in sd.items()}, str(OUT / "pth_resnet8.safetensors"))
    save_file({k: v.contiguous() for k, v in after.items()},
              str(OUT / "pth_resnet8_checkpoint.safetensors"))
    print("wrote", sorted(p.name for p in OUT.glob("pth_*")))


if __name__ == "__main__":
    main()

"""Writes checkpoints the way PyTorch users save them, for the test that kd
reads them without Python (crates/kd-models/tests/pth.rs):

  pth_resnet8_bare.pth        torch.save of the state_dict as a plain dict
  pth_resnet8_ordered.pth     torch.save(model.state_dict()) itself: an
                              OrderedDict with `_metadata`, as every
                              torchvision checkpoint is saved
  pth_resnet8_state_dict.pth  {'state_dict': model.state_dict(), 'epoch'}
  pth_resnet8_fp16.pth        model.half().state_dict()
  pth_resnet8_checkpoint.pth  RepDistiller's {'epoch', 'model', 'best_acc',
                              'optimizer'}, the model wrapped in DataParallel
                              (keys prefixed `module.`), its state_dict()
                              saved as it is (an OrderedDict)
  pth_no_tensors.pth          {'epoch': 3, 'acc': 71.2}: a file that is no weights
  pth_resnet8.safetensors     the same weights, for comparison (and
                              pth_resnet8_fp16.safetensors for the fp16 file)
"""
import collections
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
    torch.save({"epoch": 3, "acc": 71.2}, OUT / "pth_no_tensors.pth")
    torch.save(net.state_dict(), OUT / "pth_resnet8_ordered.pth")
    torch.save({"state_dict": net.state_dict(), "epoch": 3}, OUT / "pth_resnet8_state_dict.pth")
    half = {k: v.half() if v.is_floating_point() else v for k, v in net.state_dict().items()}
    torch.save(collections.OrderedDict(half), OUT / "pth_resnet8_fp16.pth")
    save_file({k: v.contiguous() for k, v in half.items()}, str(OUT / "pth_resnet8_fp16.safetensors"))
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    out = net(torch.randn(2, 3, 32, 32))
    (out["logits"] if isinstance(out, dict) else out).sum().backward()
    opt.step()
    wrapped = torch.nn.DataParallel(net)
    state = {
        "epoch": 240,
        "model": wrapped.state_dict(),
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

"""Writes the golden fixtures that `kd probe loss` is checked against.

Each module in `methods/` computes a method's loss with PyTorch, following the
reference implementation's formulas, and returns fixtures through `fixture()`.
Run through `make golden`; the fixtures are committed so that tests need no
Python at run time.

Fixture layout (safetensors):
  metadata  method = registered name, params = JSON of the method's config,
            optionally n_data = data set size (memory banks; default: max index + 1)
  inputs    student/<tap>, teacher/<tap> (float32), batch/target (int64 [B]),
            optionally batch/index (int64 [B]), batch/contrast_index (int64 [B, K+1]),
            method/<state_dict key> (parameters and buffers set before the call)
  expected  expect/loss (float32 scalar, before the recipe's weight),
            expect/grad/student/<tap> (d loss / d tap for every student tap given),
            expect/method/<state_dict key> (parameters and buffers after the call)
"""
import importlib
import json
import pathlib
import sys

import torch
from safetensors.torch import save_file

HERE = pathlib.Path(__file__).resolve().parent
OUT = HERE / "fixtures"


def fixture(name, method, params, student, teacher, target, *, index=None,
            contrast_index=None, module=None, n_data=None, loss_fn):
    """Runs `loss_fn(student, teacher, target, index, contrast_index, module)`
    on leaf copies of the student taps and saves inputs plus expectations.

    `module` is an nn.Module holding the method's own parameters and buffers
    (or None); its state_dict is saved before and after the call, so the probe
    starts from the same values and its updates (running statistics, memory
    banks) can be compared.
    """
    tensors = {}
    s_leaf = {k: v.detach().clone().float().requires_grad_(True) for k, v in student.items()}
    t_det = {k: v.detach().clone().float() for k, v in teacher.items()}
    for k, v in s_leaf.items():
        tensors[f"student/{k}"] = v.detach().clone()
    for k, v in t_det.items():
        tensors[f"teacher/{k}"] = v.clone()
    tensors["batch/target"] = target.long().clone()
    if index is not None:
        tensors["batch/index"] = index.long().clone()
    if contrast_index is not None:
        tensors["batch/contrast_index"] = contrast_index.long().clone()
    if module is not None:
        module.train()
        for k, v in module.state_dict().items():
            if k.endswith("num_batches_tracked"):
                continue
            tensors[f"method/{k}"] = v.detach().clone().float()
    loss = loss_fn(s_leaf, t_det, target, index, contrast_index, module)
    loss.backward()
    tensors["expect/loss"] = loss.detach().float().reshape(())
    for k, v in s_leaf.items():
        g = v.grad if v.grad is not None else torch.zeros_like(v)
        tensors[f"expect/grad/student/{k}"] = g.detach().clone()
    if module is not None:
        for k, v in module.state_dict().items():
            if k.endswith("num_batches_tracked"):
                continue
            tensors[f"expect/method/{k}"] = v.detach().clone().float()
    tensors = {k: v.contiguous() for k, v in tensors.items()}
    OUT.mkdir(exist_ok=True)
    meta = {"method": method, "params": json.dumps(params)}
    if n_data is not None:
        meta["n_data"] = str(n_data)  # data set size the method is built for (memory banks)
    save_file(tensors, str(OUT / f"{name}.safetensors"), metadata=meta)
    print(f"{name}: {method} loss={loss.item():.6g}")


def resnet_taps(batch, seed, channels=(16, 16, 32, 64), spatial=(32, 32, 16, 8), classes=10):
    """Random taps shaped like a CIFAR ResNet's: feat/0..3, preact/0..3, embed, logits.
    Preactivations are drawn first; feats are their ReLU, as in the network."""
    g = torch.Generator().manual_seed(seed)
    taps = {}
    for k, (c, s) in enumerate(zip(channels, spatial)):
        pre = torch.randn(batch, c, s, s, generator=g)
        taps[f"preact/{k}"] = pre
        taps[f"feat/{k}"] = torch.relu(pre)
    taps["embed"] = taps[f"feat/{len(channels) - 1}"].mean(dim=(2, 3))
    taps["logits"] = torch.randn(batch, classes, generator=g) * 3
    return taps


def main(only):
    torch.manual_seed(0)
    torch.use_deterministic_algorithms(True)
    for path in sorted((HERE / "methods").glob("*.py")):
        if only and path.stem not in only:
            continue
        sys.path.insert(0, str(HERE))
        importlib.import_module(f"methods.{path.stem}").make()


if __name__ == "__main__":
    main(sys.argv[1:])

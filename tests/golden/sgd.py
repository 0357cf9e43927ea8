"""Golden trajectories of torch.optim.SGD for kd's optimiser
(crates/kd-engine/tests/sgd.rs): given parameters and a gradient per step,
the parameters after every step, for momentum, Nesterov and weight decay.

Writes optim/sgd.safetensors (apart from fixtures/, which holds the probes' fixtures):
  metadata  cases = JSON list of {name, lr: [per step], momentum, nesterov, weight_decay}
  tensors   init/<i> (parameter i), grad/<step>/<i>, expect/<case>/<step>/<i>
Run: ~/.cache/kd/venv/bin/python tests/golden/sgd.py
"""
import json
import pathlib

import torch
from safetensors.torch import save_file

OUT = pathlib.Path(__file__).resolve().parent / "optim" / "sgd.safetensors"
SHAPES = [(4, 3, 3, 3), (16,), (5, 7)]
LRS = [0.1, 0.05, 0.05, 0.01]
CASES = [
    {"name": "momentum_wd", "momentum": 0.9, "nesterov": False, "weight_decay": 5e-4},
    {"name": "nesterov_wd", "momentum": 0.9, "nesterov": True, "weight_decay": 5e-4},
    {"name": "nesterov", "momentum": 0.9, "nesterov": True, "weight_decay": 0.0},
    {"name": "plain", "momentum": 0.0, "nesterov": False, "weight_decay": 0.0},
]


def trajectory(init, grads, case, foreach):
    params = [torch.nn.Parameter(t.clone()) for t in init]
    opt = torch.optim.SGD(params, lr=LRS[0], momentum=case["momentum"], nesterov=case["nesterov"],
                          weight_decay=case["weight_decay"], foreach=foreach)
    out = []
    for step, lr in enumerate(LRS):
        for group in opt.param_groups:
            group["lr"] = lr
        opt.zero_grad(set_to_none=True)
        for p, g in zip(params, grads[step]):
            p.grad = g.clone()
        opt.step()
        out.append([p.detach().clone() for p in params])
    return out


def main():
    gen = torch.Generator().manual_seed(20261129)
    init = [torch.randn(s, generator=gen) for s in SHAPES]
    grads = [[torch.randn(s, generator=gen) for s in SHAPES] for _ in LRS]
    tensors = {f"init/{i}": t for i, t in enumerate(init)}
    tensors.update({f"grad/{k}/{i}": g for k, gs in enumerate(grads) for i, g in enumerate(gs)})
    for case in CASES:
        loop = trajectory(init, grads, case, foreach=False)
        multi = trajectory(init, grads, case, foreach=True)
        for k, (a, b) in enumerate(zip(loop, multi)):
            for i, (x, y) in enumerate(zip(a, b)):
                # PyTorch's two implementations agree bit for bit on the CPU,
                # so kd's must equal both.
                assert torch.equal(x, y), (case["name"], k, i)
                tensors[f"expect/{case['name']}/{k}/{i}"] = x
    meta = {"cases": json.dumps([dict(c, lr=LRS) for c in CASES])}
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(OUT), metadata=meta)
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()

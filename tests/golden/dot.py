"""Golden trajectories of mdistiller's Distillation-Oriented Trainer
(mdistiller/engine/dot.py, `DistillationOrientedTrainer` with the DOT
trainer's momenta `momentum - delta` for the task loss and `momentum + delta`
for the distillation loss) for kd's `dot` optimiser
(crates/kd-engine/tests/dot.rs).

Written from the reference's update rule, one tensor at a time as it does:
each step takes the distillation loss's gradients (`step_kd`), then the task
loss's (`step`), then updates every parameter the task loss reached and
after that every parameter the distillation loss reached. Parameter 0 is
reached by both losses, 1 by the task loss only, 2 by the distillation loss
only (a method's own layer), 3 by both.

Writes optim/dot.safetensors:
  metadata  cases = JSON list of {name, lr: [per step], momentum, delta, weight_decay}
            task = JSON list of the parameters the task loss reaches, kd likewise
  tensors   init/<i>, task/<step>/<i>, kd/<step>/<i>, expect/<case>/<step>/<i>
Run: ~/.cache/kd/venv/bin/python tests/golden/dot.py
"""
import json
import pathlib

import torch
from safetensors.torch import save_file

OUT = pathlib.Path(__file__).resolve().parent / "optim" / "dot.safetensors"
SHAPES = [(4, 3, 3, 3), (7, 5), (16,), (6,)]
TASK = [0, 1, 3]
KD = [0, 2, 3]
LRS = [0.05, 0.05, 0.02, 0.02, 0.005]
CASES = [
    # mdistiller's CIFAR-100 and ImageNet DOT configs ...
    {"name": "cifar", "momentum": 0.9, "delta": 0.075, "weight_decay": 5e-4},
    {"name": "imagenet", "momentum": 0.9, "delta": 0.09, "weight_decay": 1e-4},
    # ... and a task momentum of zero (the reference then keeps no buffer).
    {"name": "task_momentum_zero", "momentum": 0.3, "delta": 0.3, "weight_decay": 1e-3},
]


def trajectory(init, task, kd, case):
    params = [t.clone() for t in init]
    m_task = case["momentum"] - case["delta"]
    m_kd = case["momentum"] + case["delta"]
    m_mean = (m_kd + m_task) / 2.0
    wd = case["weight_decay"]
    buf_task, buf_kd = {}, {}
    out = []
    for step, lr in enumerate(LRS):
        g_task, g_kd = task[step], kd[step]
        for i, g in g_task.items():
            d = g.add(params[i], alpha=wd) if wd != 0 else g
            if m_task != 0:
                if i not in buf_task:
                    buf_task[i] = d.clone()
                elif i in g_kd:
                    buf_task[i].mul_(m_task).add_(d, alpha=1.0)
                else:
                    buf_task[i].mul_(m_mean).add_(d, alpha=1.0)
                d = buf_task[i]
            params[i].add_(d, alpha=-lr)
        for i, g in g_kd.items():
            d = g
            if i not in buf_kd:
                buf_kd[i] = d.clone()
            elif i in g_task:
                buf_kd[i].mul_(m_kd).add_(d, alpha=1.0)
            else:
                if wd != 0:
                    d = d.add(params[i], alpha=wd)
                buf_kd[i].mul_(m_mean).add_(d, alpha=1.0)
            params[i].add_(buf_kd[i], alpha=-lr)
        out.append([p.clone() for p in params])
    return out


def main():
    g = torch.Generator().manual_seed(23)
    init = [torch.randn(s, generator=g) for s in SHAPES]
    task = [{i: torch.randn(SHAPES[i], generator=g) for i in TASK} for _ in LRS]
    kd = [{i: torch.randn(SHAPES[i], generator=g) * 0.5 for i in KD} for _ in LRS]
    tensors = {f"init/{i}": t for i, t in enumerate(init)}
    for step in range(len(LRS)):
        tensors.update({f"task/{step}/{i}": t for i, t in task[step].items()})
        tensors.update({f"kd/{step}/{i}": t for i, t in kd[step].items()})
    for case in CASES:
        for step, params in enumerate(trajectory(init, task, kd, case)):
            tensors.update({f"expect/{case['name']}/{step}/{i}": p for i, p in enumerate(params)})
    meta = {
        "cases": json.dumps([dict(case, lr=LRS) for case in CASES]),
        "task": json.dumps(TASK),
        "kd": json.dumps(KD),
    }
    save_file({k: v.contiguous() for k, v in tensors.items()}, OUT, metadata=meta)


if __name__ == "__main__":
    main()

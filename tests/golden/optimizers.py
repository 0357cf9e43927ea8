"""Golden trajectories of torch.optim.AdamW, timm's Lamb, timm's parameter
groups (`param_groups_weight_decay`), torch.nn.utils.clip_grad_norm_ and
timm's ModelEmaV3 for kd's optimiser and EMA
(crates/kd-engine/tests/optimizers.rs): given parameters and a gradient per
step, the parameters after every step; given a network's state per step,
the EMA's state after every update.

Writes optim/optimizers.safetensors:
  metadata  params = JSON list of parameter names (a module's, in order)
            cases  = JSON list of {name, optimizer (kd's plan keys), clip_grad, lr: [per step]}
            ema    = JSON {keys: [state_dict keys], params: [parameter keys], cases: [{name, plan (kd's keys)}]}
  tensors   init/<i>, grad/<step>/<i>, expect/<case>/<step>/<i>;
            ema/init/<key> (the EMA's start, a copy of the network), ema/model/<step>/<key>
            (the network after update step+1), ema/expect/<case>/<step>/<key>
Run: ~/.cache/kd/venv/bin/python tests/golden/optimizers.py
"""
import json
import pathlib

import torch
from safetensors.torch import save_file
from timm.optim import Lamb
from timm.optim._param_groups import param_groups_weight_decay
from timm.utils.model_ema import ModelEmaV3

OUT = pathlib.Path(__file__).resolve().parent / "optim" / "optimizers.safetensors"
# A conv kernel, a norm weight, a bias, a linear weight and a ViT's
# position embedding (3-d, decayed unless named).
PARAMS = [
    ("pos_embed", (1, 5, 8)),
    ("conv.weight", (4, 3, 3, 3)),
    ("norm.weight", (16,)),
    ("head.bias", (7,)),
    ("head.weight", (7, 5)),
]
LRS = [1e-3, 8e-4, 5e-4, 5e-4, 1e-4]
VIT_NO_DECAY = {"pos_embed", "cls_token", "dist_token"}

CASES = [
    {"name": "adamw", "optimizer": {"kind": "adamw", "weight_decay": 0.05, "no_decay_1d": False}},
    {"name": "adamw_groups", "optimizer": {"kind": "adamw", "weight_decay": 0.05, "betas": [0.9, 0.95], "eps": 1e-6}},
    {"name": "adamw_groups_clip", "optimizer": {"kind": "adamw", "weight_decay": 0.05}, "clip_grad": 5.0},
    {"name": "sgd_groups_clip", "optimizer": {"lr": 0.1, "momentum": 0.9, "weight_decay": 5e-4, "no_decay_1d": True},
     "clip_grad": 3.0},
    {"name": "lamb_groups", "optimizer": {"kind": "lamb", "weight_decay": 0.01}},
    {"name": "lamb_adapt", "optimizer": {"kind": "lamb", "weight_decay": 0.02, "no_decay_1d": False,
                                         "trust_clip": True, "always_adapt": True, "max_grad_norm": 10.0}},
]
DEFAULTS = {
    "sgd": {"momentum": 0.9, "nesterov": False, "weight_decay": 5e-4, "no_decay_1d": False},
    "adamw": {"betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 0.01, "no_decay_1d": True},
    "lamb": {"betas": [0.9, 0.999], "eps": 1e-6, "weight_decay": 0.01, "no_decay_1d": True,
             "max_grad_norm": 1.0, "trust_clip": False, "always_adapt": False},
}


def module(init):
    m = torch.nn.Module()
    for (name, _), t in zip(PARAMS, init):
        *path, leaf = name.split(".")
        owner = m
        for p in path:
            if not hasattr(owner, p):
                owner.add_module(p, torch.nn.Module())
            owner = getattr(owner, p)
        owner.register_parameter(leaf, torch.nn.Parameter(t.clone()))
    assert [n for n, _ in m.named_parameters()] == [n for n, _ in PARAMS]
    return m


def optimizer(m, case, foreach):
    o = dict(DEFAULTS[case["optimizer"].get("kind", "sgd")], **case["optimizer"])
    kind = o.get("kind", "sgd")
    if o["no_decay_1d"]:
        params = param_groups_weight_decay(m, o["weight_decay"], no_weight_decay_list=VIT_NO_DECAY)
    else:
        params = [{"params": list(m.parameters()), "weight_decay": o["weight_decay"]}]
    if kind == "adamw":
        return torch.optim.AdamW(params, lr=LRS[0], betas=tuple(o["betas"]), eps=o["eps"], foreach=foreach)
    if kind == "lamb":
        return Lamb(params, lr=LRS[0], betas=tuple(o["betas"]), eps=o["eps"], max_grad_norm=o["max_grad_norm"],
                    trust_clip=o["trust_clip"], always_adapt=o["always_adapt"], foreach=foreach)
    return torch.optim.SGD(params, lr=LRS[0], momentum=o["momentum"], nesterov=o["nesterov"], foreach=foreach)


def trajectory(init, grads, case, foreach):
    m = module(init)
    params = list(m.parameters())
    opt = optimizer(m, case, foreach)
    out = []
    for step, lr in enumerate(LRS):
        for group in opt.param_groups:
            group["lr"] = lr
        opt.zero_grad(set_to_none=True)
        for p, g in zip(params, grads[step]):
            p.grad = g.clone()
        if case.get("clip_grad") is not None:
            torch.nn.utils.clip_grad_norm_(params, case["clip_grad"], foreach=True)
        opt.step()
        out.append([p.detach().clone() for p in params])
    return out


EMA_CASES = [
    {"name": "plain", "plan": {"decay": 0.9}},
    {"name": "warmup", "plan": {"decay": 0.95, "warmup": True, "warmup_power": 0.75, "warmup_gamma": 2.0,
                                "update_after_step": 1, "min_decay": 0.2}},
    {"name": "exclude_buffers", "plan": {"decay": 0.8, "exclude_buffers": True}},
]
EMA_STEPS = 5


def ema_golden(gen, tensors):
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    keys = list(net.state_dict().keys())
    param_keys = [k for k, _ in net.named_parameters()]
    init = {k: v.clone() for k, v in net.state_dict().items()}
    states = []
    for _ in range(EMA_STEPS):
        s = {}
        for k, v in init.items():
            s[k] = torch.randn(v.shape, generator=gen) if v.is_floating_point() else v + len(states) + 1
        states.append(s)
    for k, v in init.items():
        tensors[f"ema/init/{k}"] = v
    for i, s in enumerate(states):
        for k, v in s.items():
            tensors[f"ema/model/{i}/{k}"] = v
    for case in EMA_CASES:
        p = case["plan"]
        net.load_state_dict(init)
        ema = ModelEmaV3(net, decay=p["decay"], min_decay=p.get("min_decay", 0.0),
                         update_after_step=p.get("update_after_step", 0), use_warmup=p.get("warmup", False),
                         warmup_gamma=p.get("warmup_gamma", 1.0), warmup_power=p.get("warmup_power", 2 / 3),
                         exclude_buffers=p.get("exclude_buffers", False))
        for i, s in enumerate(states):
            net.load_state_dict(s)
            # timm's train.py: `model_ema.update(model, step=num_updates)`, 1 after the first update.
            ema.update(net, step=i + 1)
            for k, v in ema.module.state_dict().items():
                tensors[f"ema/expect/{case['name']}/{i}/{k}"] = v.clone()
    return {"keys": keys, "params": param_keys, "cases": EMA_CASES}


def main():
    gen = torch.Generator().manual_seed(20261130)
    init = [torch.randn(s, generator=gen) for _, s in PARAMS]
    grads = [[torch.randn(s, generator=gen) for _, s in PARAMS] for _ in LRS]
    tensors = {f"init/{i}": t for i, t in enumerate(init)}
    tensors.update({f"grad/{k}/{i}": g for k, gs in enumerate(grads) for i, g in enumerate(gs)})
    for case in CASES:
        loop = trajectory(init, grads, case, foreach=False)
        multi = trajectory(init, grads, case, foreach=True)
        kind = case["optimizer"].get("kind", "sgd")
        for k, (a, b) in enumerate(zip(loop, multi)):
            for i, (x, y) in enumerate(zip(a, b)):
                if kind == "lamb":
                    # timm's multi-tensor Lamb folds the bias corrections into
                    # scalars, so it rounds differently; kd's is the
                    # single-tensor one, timm's default on the CPU.
                    torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-6)
                    want = x
                else:
                    # PyTorch's for-loop and multi-tensor updates agree on the CPU.
                    assert torch.equal(x, y), (case["name"], k, i, (x - y).abs().max())
                    want = y
                tensors[f"expect/{case['name']}/{k}/{i}"] = want
    ema = ema_golden(gen, tensors)
    meta = {
        "params": json.dumps([n for n, _ in PARAMS]),
        "cases": json.dumps([dict(c, lr=LRS) for c in CASES]),
        "ema": json.dumps(ema),
    }
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(OUT), metadata=meta)
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()

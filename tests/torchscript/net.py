"""A network that is no zoo shape (grouped convolution, GELU, a LayerNorm
head), saved as TorchScript for tests/torchscript.rs: scripted, and traced
in eval mode (which bakes BatchNorm into inference). Also writes an input
batch and the module's eval-mode outputs on it, computed by PyTorch; given
the `at` golden fixture, KD-Zoo's AT loss as a scripted loss module and the
fixture pointed at it.

    python net.py OUT_DIR [AT_FIXTURE]
"""
import itertools
import pathlib
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




class EagerNet(Net):
    """Net's computation written as TorchScript cannot compile it (varargs,
    f-strings, a tuple of modules): kd runs it in its embedded Python."""

    def forward(self, x, *unused):
        feats = [torch.relu(self.bn0(self.stem(x)))]
        for block in (self.block1, self.block2):
            feats.append(block(feats[-1]))
        embed = self.norm(feats[-1].mean(dim=(2, 3)))
        out = {f"feat/{i}": f for i, f in enumerate(feats)}
        return dict(out, embed=embed, logits=self.head(embed))


class KdZooAt(nn.Module):
    """KD-Zoo's AT loss (its `at.py` and train_kd.py's mean over the
    stages), as a kd loss module: forward(student, teacher, target)."""

    def __init__(self, p: float = 2.0):
        super().__init__()
        self.p = p

    def attention_map(self, fm: torch.Tensor) -> torch.Tensor:
        am = torch.pow(torch.abs(fm), self.p).sum(dim=1, keepdim=True)
        norm = torch.norm(am, dim=(2, 3), keepdim=True)
        return am / (norm + 1e-6)

    def forward(self, student: dict[str, torch.Tensor], teacher: dict[str, torch.Tensor],
                target: torch.Tensor) -> torch.Tensor:
        # The mean over the feature taps it is given (KD-Zoo: feat/1..3).
        loss = torch.zeros(())
        n = 0
        for k in student.keys():
            if k.startswith("feat/"):
                loss = loss + nn.functional.mse_loss(self.attention_map(student[k]),
                                                     self.attention_map(teacher[k].detach()))
                n += 1
        return loss / n


def at_fixture(out: Path, golden: Path):
    """The `at` golden fixture, handed to the scripted AT module instead."""
    import json
    from safetensors import safe_open

    torch.jit.script(KdZooAt()).save(str(out / "at_loss.pt"))
    with safe_open(str(golden), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    taps = ["feat/1", "feat/2", "feat/3"]
    for name, method, source in [
            ("file", "torchscript", {"file": str(out / "at_loss.pt")}),
            ("entry", "python", {"entry": f"{pathlib.Path(__file__).resolve()}:KdZooAt(p=2.0)"})]:
        save_file(tensors, str(out / f"at_torchscript_{name}.safetensors"),
                  metadata={"method": method, "params": json.dumps(dict(source, taps=taps))})



def step_fixtures(out: Path):
    """Training steps of a foreign student (Net) from a foreign teacher
    (Net, other weights), computed by PyTorch on the modules themselves:
    the loss, every student gradient and its BatchNorm buffers after the
    step, for `kd probe step`. Both as TorchScript files
    (`step_{method}.safetensors`), and as Python modules that TorchScript
    cannot compile, run eagerly (`step_{method}_python.safetensors`). `st`
    on the logits, and LwM, whose Grad-CAMs differentiate through both
    modules (the student's twice), with KD-Zoo's formula from
    tests/golden/methods/lwm.py."""
    import json

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "golden"))
    from methods.lwm import lwm_loss

    nets = []
    for seed in (5, 6):
        torch.manual_seed(seed)
        net = Net()
        with torch.no_grad():
            net.train()
            for _ in range(3):
                net(torch.randn(16, 3, 32, 32))
            # float16-exact, as the zoo's step fixtures
            for t in net.state_dict().values():
                if t.is_floating_point():
                    t.copy_(t.half().float())
        nets.append(net)
    paths = {}
    for side, net in zip(("student", "teacher"), nets):
        paths[side] = str(out / f"step_{side}.pt")
        torch.jit.script(net).save(paths[side])
    g = torch.Generator().manual_seed(7)
    img = torch.randn(8, 3, 32, 32, generator=g).half().float()
    target = torch.randint(0, 10, (8,), generator=g)
    T = 4.0

    def st(s, t, x, y):
        with torch.no_grad():
            t_logits = t(x)["logits"]
        return nn.functional.kl_div(nn.functional.log_softmax(s(x)["logits"] / T, 1),
                                    nn.functional.softmax(t_logits / T, 1), reduction="batchmean") * T * T

    # feat/1: Net pools feat/2 globally right away, so the gradient there is
    # the same at every position and both CAMs are uniform (a loss of pure
    # rounding); feat/1's reaches it through block2.
    lwm_params = {"tap": "feat/1", "cam": "grad"}
    try:
        torch.jit.script(EagerNet())
    except Exception:
        pass
    else:
        raise SystemExit("EagerNet was meant to be beyond torch.jit.script")
    eager = f"python:{Path(__file__).resolve()}:EagerNet()"
    cases = [("st", {"T": T}, st),
             ("lwm", lwm_params, lambda s, t, x, y: lwm_loss(s, t, x, y, **lwm_params))]
    for (method, params, loss_fn), python in itertools.product(cases, (False, True)):
        tensors = {}
        for side, net in zip(("student", "teacher"), nets):
            for k, v in net.state_dict().items():
                tensors[f"{side}.weights/{k}"] = v.detach().clone()
        tensors["batch/input"], tensors["batch/target"] = img, target
        if python:
            s_mod, t_mod = EagerNet(), EagerNet()
            s_mod.load_state_dict(nets[0].state_dict())
            t_mod.load_state_dict(nets[1].state_dict())
        else:
            s_mod, t_mod = torch.jit.load(paths["student"]), torch.jit.load(paths["teacher"])
        s_mod.train()
        t_mod.eval()
        loss = loss_fn(s_mod, t_mod, img, target)
        loss.backward()
        tensors["expect/loss"] = loss.detach().reshape(())
        for k, p in s_mod.named_parameters():
            grad = p.grad if p.grad is not None else torch.zeros_like(p)
            tensors[f"expect/grad/student/{k}"] = grad.detach().clone()
        for k, b in s_mod.named_buffers():
            if not k.endswith("num_batches_tracked"):
                tensors[f"expect/buffers/student/{k}"] = b.detach().clone()
        student, teacher = (eager, eager) if python else (
            f"torchscript:{paths['student']}", f"torchscript:{paths['teacher']}")
        meta = {"probe": "step", "method": method, "params": json.dumps(params), "num_classes": "10",
                "student": student, "teacher": teacher}
        name = f"step_{method}_python" if python else f"step_{method}"
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(out / f"{name}.safetensors"),
                  metadata=meta)

if __name__ == "__main__":
    main(Path(sys.argv[1]))
    step_fixtures(Path(sys.argv[1]))
    if len(sys.argv) > 2:
        at_fixture(Path(sys.argv[1]), Path(sys.argv[2]))

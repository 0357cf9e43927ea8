"""The PyTorch half of scripts/bench-vs-torch: the training step a
RepDistiller / KD-Zoo user writes by hand, run on the networks, method
parameters and batch that `kd bench --dump DIR` saved in DIR/init.safetensors,
so both sides compute the same thing from the same numbers.

    python scripts/bench_torch.py --dir DIR --teacher resnet32x4 --student resnet8x4 \
        --method st --batch 64 --steps 20 --warmup 3 --device cpu --threads 2 \
        --classes 100 --mode eager          # writes DIR/torch_eager.json
    python scripts/bench_torch.py --info --device cuda   # torch version, machine (JSON)

init.safetensors holds `student/<key>`, `teacher/<key>` (the zoo's state_dict;
`num_batches_tracked` may be absent), `method/<label>/<key>` (the method's
own parameters under kd's names, label = method name), `batch/input`
[B, 3, 32, 32] float32 and `batch/target` [B] int64.

The recipe is fixed to what `kd bench` builds: SGD lr 0.05, momentum 0.9,
weight decay 5e-4 on the student's and the method's parameters; losses
  st   0.1 · CE + 0.9 · KL(p_t^T ‖ p_s^T) · T², T = 4
  vid  1.0 · CE + 1.0 · VID on feat/1..3 (sf 1, init_var 5)
"""
import argparse
import json
import pathlib
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests" / "golden"))
import models  # noqa: E402  (the zoo, with kd's state_dict keys and taps)
# The golden reference's VID tap module (names as kd's plugin names them);
# its random initial values are overwritten by kd's dump.
from methods.vid import Stage as VidStage  # noqa: E402

LR, MOMENTUM, WEIGHT_DECAY = 0.05, 0.9, 5e-4


# ---------------------------------------------------------------- methods

def ce(s, t, y):
    return F.cross_entropy(s["logits"], y)


def soft_targets(T):
    """Hinton et al.: batchmean KL at temperature T, times T² (as KD-Zoo's st.py)."""
    def loss(s, t, y):
        return F.kl_div(F.log_softmax(s["logits"] / T, 1), F.softmax(t["logits"] / T, 1),
                        reduction="batchmean") * T * T
    return loss


class Vid(nn.ModuleList):
    """Ahn et al. 2019 on several taps, averaged (tests/golden/methods/vid.py).
    A ModuleList so that its state_dict keys are kd's: `0.alpha`, ..."""

    def __init__(self, taps, s_shapes, t_shapes, sf=1.0, init_var=5.0):
        super().__init__(VidStage(s_shapes[k][0], t_shapes[k][0], sf, init_var) for k in taps)
        # The dump must replace every value, α included, or the strict load fails.
        self.taps = taps

    def forward(self, s, t, y):
        return sum(m(s[k], t[k]) for m, k in zip(self, self.taps)) / len(self.taps)


def tap_shapes(net, x):
    """Per-sample tap shapes from an eval-mode forward (eval: the student's
    BatchNorm running statistics must not move before the timed loop)."""
    was_training = net.training
    net.eval()
    with torch.no_grad():
        shapes = {k: tuple(v.shape[1:]) for k, v in net(x[:1]).items()}
    net.train(was_training)
    return shapes


def build_plan(method, student, teacher, x):
    """[(label, weight, loss_fn)] and the method's module (None if it has no
    parameters), as kd bench's plan."""
    if method == "st":
        return [("ce", 0.1, ce), ("st", 0.9, soft_targets(4.0))], None
    if method == "vid":
        vid = Vid(["feat/1", "feat/2", "feat/3"], tap_shapes(student, x), tap_shapes(teacher, x))
        return [("ce", 1.0, ce), ("vid", 1.0, vid)], vid
    raise SystemExit(f"bench_torch: unknown method {method!r} (known: st, vid)")


# ---------------------------------------------------------------- loading

def with_prefix(tensors, prefix):
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}


def load_strict(module, state, what):
    """load_state_dict(strict) except that BatchNorm's `num_batches_tracked`
    may be missing (kd keeps no such counter; it only matters with
    momentum=None, which no zoo network uses)."""
    own = module.state_dict()
    for k, v in own.items():
        if k.endswith("num_batches_tracked") and k not in state:
            state[k] = v
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise SystemExit(f"bench_torch: {what} does not match the dump:\n{e}")


def build_net(arch_name, classes, state):
    if arch_name.startswith("python:"):
        # A user's module, built as kd's embedded Python builds it.
        import importlib.util
        path = pathlib.Path(__file__).resolve().parents[1] / "crates/kd-aten/python/embed.py"
        loader = importlib.util.spec_from_file_location("kd_embed", path)
        embed = importlib.util.module_from_spec(loader)
        loader.loader.exec_module(embed)
        make, a, kw = embed.resolve(arch_name[len("python:"):])
        net = make(*a, **kw)
    elif arch_name.startswith(("vit_", "deit_")):
        net = timm_vit(arch_name, classes)
    else:
        net = models.build(models.arch_of(arch_name), classes)
    load_strict(net, state, f"{arch_name} ({classes} classes)")
    return net


def timm_vit(name, classes):
    """kd's transformer names are timm's, keyword arguments included:
    `vit_tiny_patch16_224(img_size=32,patch_size=4)`."""
    import re
    import timm
    m = re.fullmatch(r"(\w+)(?:\((.*)\))?", name)
    kwargs = {}
    for kv in filter(None, (m.group(2) or "").split(",")):
        k, v = kv.split("=")
        kwargs[k.strip()] = float(v) if "." in v else int(v)
    net = timm.create_model(m.group(1), pretrained=False, num_classes=classes, **kwargs)
    if hasattr(net, "set_distilled_training"):
        # A distilled DeiT trains on its class head's logits (the
        # distillation head is read by `deit` alone), as kd's does; timm
        # averages the heads unless told it is distilled-training, and then
        # gives both (class head first). Eval averages them either way.
        net.set_distilled_training(True)
    head = net.forward

    def logits_only(x):
        out = head(x)
        return out[0] if isinstance(out, tuple) else out
    # The losses read taps by name, as the zoo's forward returns them.
    net.forward = lambda x: {"logits": logits_only(x)}
    return net


def load(args):
    from safetensors.torch import load_file
    tensors = load_file(str(pathlib.Path(args.dir) / "init.safetensors"))
    x, y = tensors["batch/input"], tensors["batch/target"]
    if x.shape != (args.batch, 3, 32, 32) or y.shape != (args.batch,):
        raise SystemExit(f"bench_torch: the dump's batch is {list(x.shape)}/{list(y.shape)}, "
                         f"expected batch {args.batch}")
    student = build_net(args.student, args.classes, with_prefix(tensors, "student/"))
    teacher = build_net(args.teacher, args.classes, with_prefix(tensors, "teacher/"))
    terms, module = build_plan(args.method, student, teacher, x)
    method_state = with_prefix(tensors, f"method/{args.method}/")
    if module is not None:
        load_strict(module, method_state, f"method {args.method}")
    elif method_state:
        raise SystemExit(f"bench_torch: the dump has method/{args.method}/ tensors, "
                         f"but {args.method} has no parameters here: {sorted(method_state)}")
    return student, teacher, terms, module, x, y


# ---------------------------------------------------------------- the loop

def make_forward_loss(student, teacher, terms):
    """Forward of both networks and the weighted loss: the part that
    --mode compile hands to torch.compile."""
    def forward_loss(x, y):
        with torch.no_grad():
            t = teacher(x)
        s = student(x)
        return sum(w * fn(s, t, y) for _, w, fn in terms)
    return forward_loss


def train_step(forward_loss, opt, x, y):
    """One step in the order of RepDistiller's train_distill: loss, log it
    (loss.item(), a host sync every step, as kd's step reads its loss too),
    then zero_grad / backward / step."""
    loss = forward_loss(x, y)
    value = loss.item()
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return value


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run(args):
    device = torch.device(args.device)
    torch.manual_seed(0)
    if device.type == "cuda":
        # RepDistiller's train scripts set it; it picks conv algorithms per shape.
        torch.backends.cudnn.benchmark = not args.no_cudnn_benchmark
    student, teacher, terms, module, x, y = load(args)
    nets = [student, teacher] + ([module] if module is not None else [])
    for m in nets:
        m.to(device)
    x, y = x.to(device), y.to(device)
    teacher.eval()
    student.train()
    params = list(student.parameters()) + (list(module.parameters()) if module is not None else [])
    opt = torch.optim.SGD(params, lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)

    forward_loss = make_forward_loss(student, teacher, terms)
    if args.mode == "compile":
        forward_loss = torch.compile(forward_loss)

    losses = []
    t0 = time.perf_counter()
    for _ in range(args.warmup):
        losses.append(train_step(forward_loss, opt, x, y))
    sync(device)
    warmup_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(args.steps):
        losses.append(train_step(forward_loss, opt, x, y))
    sync(device)
    elapsed = time.perf_counter() - t0
    return {
        "images_per_sec": args.batch * args.steps / elapsed,
        "step_ms": 1000.0 * elapsed / args.steps,
        "losses": losses,
        "device": device_name(device),
        "threads": torch.get_num_threads(),
        "mode": args.mode,
        "warmup_s": warmup_s,
        "torch": torch.__version__,
    }


def device_name(device):
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    return "cpu"


def info(args):
    """What the driver prints in its header, and where libtorch lives (for
    the kd binary's LD_LIBRARY_PATH)."""
    out = {"torch": torch.__version__, "lib": str(pathlib.Path(torch.__file__).parent / "lib")}
    if args.device.startswith("cuda"):
        out["machine"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no CUDA device"
    return out


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--info", action="store_true", help="print torch version and device as JSON, exit")
    p.add_argument("--dir", help="folder with init.safetensors; torch_<mode>.json is written there")
    p.add_argument("--teacher")
    p.add_argument("--student")
    p.add_argument("--method", choices=["st", "vid"])
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--classes", type=int, default=100)
    p.add_argument("--mode", choices=["eager", "compile"], default="eager")
    p.add_argument("--no-cudnn-benchmark", action="store_true",
                   help="leave torch.backends.cudnn.benchmark off on CUDA")
    args = p.parse_args(argv)
    if not args.info and not all([args.dir, args.teacher, args.student, args.method]):
        p.error("--dir, --teacher, --student and --method are required")
    if args.steps < 1 or args.warmup < 0:
        p.error("--steps must be >= 1 and --warmup >= 0")
    return args


def main(argv):
    args = parse_args(argv)
    if args.info:
        print(json.dumps(info(args)))
        return
    torch.set_num_threads(args.threads)
    result = run(args)
    path = pathlib.Path(args.dir) / f"torch_{args.mode}.json"
    path.write_text(json.dumps(result) + "\n")
    print(f"{args.teacher}->{args.student} {args.method} torch {args.mode}: "
          f"{result['images_per_sec']:.1f} img/s, {result['step_ms']:.1f} ms/step")


if __name__ == "__main__":
    main(sys.argv[1:])

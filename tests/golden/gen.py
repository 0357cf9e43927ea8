"""Writes the golden fixtures that `kd probe loss` and `kd probe step` are
checked against.

Each module in `methods/` computes a method's loss with PyTorch, following the
reference implementation's formulas, and returns fixtures through `fixture()`.
Run through `make golden`; the fixtures are committed so that tests need no
Python at run time.

Fixture layout (safetensors):
  metadata  method = registered name, params = JSON of the method's config,
            optionally n_data = data set size (memory banks; default: max index + 1)
  inputs    student/<tap>, teacher/<tap> (float32), batch/target (int64 [B]),
            optionally batch/index (int64 [B]), batch/contrast_index (int64 [B, K+1]),
            method/<state_dict key> (parameters and buffers set before the call),
            optionally aug/student/<tap>, aug/teacher/<tap> (both networks on the
            augmented second view of the batch, MLKD's strong view)
  expected  expect/loss (float32 scalar, before the recipe's weight),
            expect/grad/student/<tap> (d loss / d tap for every student tap given),
            expect/grad/aug/student/<tap> (the same for the augmented view's taps),
            optionally expect/terms/<name> (a named loss term of the method),
            expect/method/<state_dict key> (parameters and buffers after the call)

Step fixtures (`step_fixture()`, metadata probe = step) are for methods that
need the networks themselves (input or feature gradients, adversarial views);
`kd probe step` runs one training step of the engine on them, without the
update: student in train mode (BatchNorm batch statistics, running statistics
updated), teacher in eval mode. A step whose expectations move with the
float32 evaluation order (a ReLU input within rounding of zero) is refused:
see check_conditioning.
  metadata  method, params as above; student, teacher = zoo names (models.py);
            optionally epoch, epochs (zero-based epoch of the stage, default 0 of 1)
  inputs    student.weights/<state_dict key>, teacher.weights/<state_dict key>
            (float16 holding float32 values rounded to float16 first, so exact),
            batch/input (NCHW, normalised; float16 the same way), batch/target (int64 [B]),
            optionally batch/attack_u (float32 [B]: one uniform draw per batch row
            for the method's random choice, e.g. BSS's attack class),
            method/<state_dict key>
  expected  expect/loss (the method's loss before the recipe's weight, any factor
            the method applies itself included),
            expect/grad/student/<parameter> (d loss / d parameter, every parameter),
            expect/buffers/student/<buffer> (BatchNorm running statistics after the step),
            expect/method/<state_dict key>
"""
import copy
import importlib
import json
import pathlib
import sys

import zlib

import torch
from safetensors.torch import save_file

HERE = pathlib.Path(__file__).resolve().parent
OUT = HERE / "fixtures"


def fixture(name, method, params, student, teacher, target, *, index=None,
            contrast_index=None, module=None, n_data=None, augmented=None,
            loss_fn):
    """Runs `loss_fn(student, teacher, target, index, contrast_index, module)`
    on leaf copies of the student taps and saves inputs plus expectations.

    `augmented` is a pair (student taps, teacher taps) on the augmented view;
    `loss_fn` then also gets `augmented=(student leaves, teacher taps)` and
    may return `(loss, {term name: value})` to have the terms checked too.

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
    extra = {}
    if augmented is not None:
        a_leaf = {k: v.detach().clone().float().requires_grad_(True) for k, v in augmented[0].items()}
        a_det = {k: v.detach().clone().float() for k, v in augmented[1].items()}
        for k, v in a_leaf.items():
            tensors[f"aug/student/{k}"] = v.detach().clone()
        for k, v in a_det.items():
            tensors[f"aug/teacher/{k}"] = v.clone()
        extra["augmented"] = (a_leaf, a_det)
    loss = loss_fn(s_leaf, t_det, target, index, contrast_index, module, **extra)
    if isinstance(loss, tuple):
        loss, terms = loss
        for k, v in terms.items():
            tensors[f"expect/terms/{k}"] = v.detach().float().reshape(())
    loss.backward()
    tensors["expect/loss"] = loss.detach().float().reshape(())
    for k, v in s_leaf.items():
        g = v.grad if v.grad is not None else torch.zeros_like(v)
        tensors[f"expect/grad/student/{k}"] = g.detach().clone()
    for k, v in extra.get("augmented", ({}, {}))[0].items():
        g = v.grad if v.grad is not None else torch.zeros_like(v)
        tensors[f"expect/grad/aug/student/{k}"] = g.detach().clone()
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


def zoo_net(arch, seed, num_classes=10):
    """A zoo network of models.py, its parameters moved off their init and its
    BatchNorm statistics calibrated, every value rounded to float16 so that
    step fixtures can store it at half the size without changing it."""
    import models
    # A private generator state: the fixtures written after this one draw
    # from the global generator and must not move when step fixtures change.
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        net = models.build(models.arch_of(arch), num_classes)
        models.perturb_and_calibrate(net)
    with torch.no_grad():
        for t in net.state_dict().values():
            if t.is_floating_point():
                t.copy_(t.half().float())
    net.arch = arch
    return net


def step_fixture(name, method, params, student, teacher, img, target, *, loss_fn,
                 attack_u=None, epoch=None, epochs=None):
    """Saves the networks and the batch, then runs `loss_fn(student, teacher,
    img, target)` with the student in train mode and the teacher in eval mode
    and saves the loss, the gradient of every student parameter and the
    student's buffers after it. Refuses a step whose expectations depend on
    the float32 evaluation order (`check_conditioning`)."""
    pristine = copy.deepcopy(student), copy.deepcopy(teacher)
    tensors = {}
    for side, net in (("student", student), ("teacher", teacher)):
        for k, v in net.state_dict().items():
            if k.endswith("num_batches_tracked"):
                continue
            assert torch.equal(v.half().float(), v), f"{side} {k} is not float16-exact"
            tensors[f"{side}.weights/{k}"] = v.detach().half().clone()
    assert torch.equal(img.half().float(), img), "input is not float16-exact"
    tensors["batch/input"] = img.half().clone()
    tensors["batch/target"] = target.long().clone()
    if attack_u is not None:
        tensors["batch/attack_u"] = attack_u.float().clone()
    expected = step_expectations(student, teacher, img, target, loss_fn)
    check_conditioning(name, expected, *pristine, img, target, loss_fn)
    tensors.update({k: v.float().clone() for k, v in expected.items()})
    tensors = {k: v.contiguous() for k, v in tensors.items()}
    meta = {"probe": "step", "method": method, "params": json.dumps(params),
            "student": student.arch, "teacher": teacher.arch}
    if epoch is not None:
        meta["epoch"], meta["epochs"] = str(epoch), str(epochs)
    OUT.mkdir(exist_ok=True)
    save_file(tensors, str(OUT / f"{name}.safetensors"), metadata=meta)
    print(f"{name}: {method} step loss={expected['expect/loss'].item():.6g}")


def step_expectations(student, teacher, img, target, loss_fn):
    """`expect/*` of one step: `loss_fn` with the student in train mode and
    the teacher in eval mode, on networks that are used up by it."""
    student.train()
    teacher.eval()
    student.zero_grad()
    loss = loss_fn(student, teacher, img, target)
    loss.backward()
    out = {"expect/loss": loss.detach().reshape(())}
    for k, p in student.named_parameters():
        g = p.grad if p.grad is not None else torch.zeros_like(p)
        out[f"expect/grad/student/{k}"] = g.detach()
    for k, b in student.named_buffers():
        if not k.endswith("num_batches_tracked"):
            out[f"expect/buffers/student/{k}"] = b.detach()
    return out


def fold_batchnorm(net, fuse=None):
    """`net` with each BatchNorm folded into the convolution registered just
    before it (the conv -> BN pairs of models.py's ResNets); eval mode only.
    `fuse(conv, bn)` makes the folded convolution; by default with the
    engine's formula (kd-models' ConvBn::fold), so that the same kernels
    round the same way."""
    def engine_fuse(conv, bn):
        scale = bn.weight / (bn.running_var + bn.eps).sqrt()
        shift = -bn.running_mean if conv.bias is None else conv.bias - bn.running_mean
        fused = copy.deepcopy(conv)
        fused.weight = torch.nn.Parameter(conv.weight * scale.view(-1, 1, 1, 1))
        fused.bias = torch.nn.Parameter(bn.bias + shift * scale)
        return fused
    with torch.no_grad():
        for m in list(net.modules()):
            kids = list(m.named_children())
            for (conv_name, conv), (bn_name, bn) in zip(kids, kids[1:]):
                if isinstance(conv, torch.nn.Conv2d) and isinstance(bn, torch.nn.BatchNorm2d):
                    setattr(m, conv_name, (fuse or engine_fuse)(conv, bn))
                    setattr(m, bn_name, torch.nn.Identity())
    return net


# tests/golden.rs's tolerances, (rtol, atol): the loss's, every other tensor's.
LOSS_TOL, TENSOR_TOL = (1e-5, 1e-7), (1e-4, 1e-6)
# The share of a tolerance that another float32 evaluation order may use.
CONDITIONING_MARGIN = 0.5


def tolerance_ratio(got, want, rtol, atol):
    """tests/golden.rs's measure, at most 1 to pass: max |got - want| /
    (atol + rtol |want|), the absolute floor at most a tenth of rtol at
    want's largest entry."""
    got, want = got.detach().double(), want.detach().double()
    diff = (got - want).abs()
    if diff.numel() == 0 or diff.max() == 0:
        return 0.0
    atol = min(atol, 0.1 * rtol * want.abs().max().item())
    return (diff / (want.abs() * rtol + atol)).max().item()


def check_conditioning(name, expected, student, teacher, img, target, loss_fn):
    """Recomputes the step in float64 and in other float32 evaluation orders
    (the engine's: teacher BatchNorm folded, networks and batch
    channels-last, with the threads given and with one; PyTorch's BatchNorm
    fusion; channels-last alone; one thread): every expectation must stay within CONDITIONING_MARGIN of its
    tolerance. Each order is a correct float32 computation, but where a ReLU
    input (or an argmax margin) lies within rounding of zero they decide
    differently, and a mask that turns moves a gradient tap, and with it the
    loss and the gradients, by far more than rounding: such a fixture would
    compare rounding orders, not implementations. `student` and `teacher`
    are the networks as they were before the step; the global generator is
    left as it was."""
    from torch.nn.utils.fusion import fuse_conv_bn_eval
    cl = torch.channels_last
    x_cl = img.contiguous(memory_format=cl)
    # (order, its networks and batch from copies of the given ones, threads)
    orders = [
        ("float64", lambda s, t: (s.double(), t.double(), img.double()), None),
        ("folded teacher, channels-last", lambda s, t: (
            s.to(memory_format=cl), fold_batchnorm(t.eval()).to(memory_format=cl), x_cl), None),
        ("teacher fused by torch", lambda s, t: (
            s, fold_batchnorm(t.eval(), fuse_conv_bn_eval), img), None),
        ("channels-last", lambda s, t: (s.to(memory_format=cl), t.to(memory_format=cl), x_cl), None),
        ("one thread", lambda s, t: (s, t, img), 1),
        # The engine's order as `make test` runs it (OMP_NUM_THREADS=1).
        ("folded teacher, channels-last, one thread", lambda s, t: (
            s.to(memory_format=cl), fold_batchnorm(t.eval()).to(memory_format=cl), x_cl), 1),
    ]
    threads = torch.get_num_threads()
    worst = []
    for order, convert, n in orders:
        with torch.random.fork_rng():
            torch.set_num_threads(n or threads)
            try:
                s, t, x = convert(copy.deepcopy(student), copy.deepcopy(teacher))
                got = step_expectations(s, t, x, target, loss_fn)
            finally:
                torch.set_num_threads(threads)
        for k, want in expected.items():
            rtol, atol = LOSS_TOL if k == "expect/loss" else TENSOR_TOL
            worst.append((tolerance_ratio(got[k], want, rtol, atol), k, order))
    ratio, k, order = max(worst)
    assert ratio <= CONDITIONING_MARGIN, (
        f"{name}: {k} in {order} uses {ratio:.3g} of its tolerance (at most "
        f"{CONDITIONING_MARGIN}): the step depends on float32 rounding order; pick other seeds")


def step_batch(seed, batch=8, num_classes=10):
    """A float16-exact batch of normalised-looking images and random labels."""
    g = torch.Generator().manual_seed(seed)
    img = torch.randn(batch, 3, 32, 32, generator=g).half().float()
    return img, torch.randint(0, num_classes, (batch,), generator=g)


def resnet_taps(batch, seed, channels=(16, 16, 32, 64), spatial=(16, 16, 8, 4), classes=10):
    """Random taps shaped like a CIFAR ResNet's (at half the spatial size, to keep
    fixtures small): feat/0..3, preact/0..3, embed, logits.
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
    torch.use_deterministic_algorithms(True)
    for path in sorted((HERE / "methods").glob("*.py")):
        if only and path.stem not in only:
            continue
        # Per module, so regenerating one module alone writes what a full run
        # writes (modules that initialise layers draw from the global generator).
        torch.manual_seed(zlib.crc32(path.stem.encode()))
        sys.path.insert(0, str(HERE))
        importlib.import_module(f"methods.{path.stem}").make()


if __name__ == "__main__":
    main(sys.argv[1:])

"""Golden outputs of timm's Mixup/CutMix (mode 'batch') and RandomErasing for
kd's implementations (crates/kd-data/tests/mixup.rs), and of timm's
SoftTargetCrossEntropy on mixed, smoothed targets for the `ce` method
(plugins/ce/tests/soft_target.rs).

timm's own code runs: `Mixup.__call__` (its `_params_per_batch`,
`cutmix_bbox_and_lam`, `rand_bbox`, `rand_bbox_minmax`, `mixup_target`) and
`RandomErasing.__call__` (its `_erase`). Only their random calls are
replaced: numpy's `np.random.rand/beta/randint` inside timm.data.mixup,
Python's `random.random/uniform/randint` inside timm.data.random_erasing
and its `_get_pixels` (torch's `normal_`) are recorded as they are called,
each with its arguments and the value it returned (drawn from a seeded
numpy Generator). kd replays those values through its `DrawSource` in the
order its code asks for them, checking each call's kind and arguments, so
the test fails if kd draws anything timm does not, in another order or
with other bounds, and compares the outputs.

Call kinds: 0 rand() -> u, 1 uniform(a, b), 2 integer in [a, b] (numpy's
randint(a, b + 1), Python's randint(a, b)), 3 beta(a, a), 4 normal values
(arg 0: how many; value: offset into <case>/noise).

Writes data/mixup.safetensors:
  mix/images float32 [6, 3, 10, 12], mix/labels int64 [6] (5 classes)
  mix/<k>/config  float64 [mixup_alpha, cutmix_alpha, minmax_lo, minmax_hi (-1: none), prob, switch_prob, correct_lam]
  mix/<k>/kind, /arg, /value: the calls; /images, /target (unsmoothed), /lam
  erase/images float32 [6, 3, 10, 12]
  erase/<k>/config float64 [prob, min_area, max_area, min_aspect, max_aspect, mode (0 const, 1 rand, 2 pixel), min_count, max_count]
  erase/<k>/kind, /arg, /value, /noise float32, /images
  ce/logits float32 [6, 5], ce/labels int64 [6], ce/<k>/lam, /smoothing, /loss
Run: ~/.cache/kd/venv/bin/python tests/golden/mixup.py
"""
import pathlib
import types

import numpy as np
import torch
from safetensors.torch import save_file

import timm.data.mixup as tmix
import timm.data.random_erasing as terase
from timm.data import Mixup
from timm.data.random_erasing import RandomErasing
from timm.loss import SoftTargetCrossEntropy

OUT = pathlib.Path(__file__).resolve().parent / "data" / "mixup.safetensors"
B, C, H, W, CLASSES = 6, 3, 10, 12, 5


class Recorder:
    """The random calls of one case, with the values handed back."""

    def __init__(self, seed):
        self.gen = np.random.default_rng(seed)
        self.kind, self.arg, self.value, self.noise = [], [], [], []

    def log(self, kind, a, b, value):
        self.kind.append(kind)
        self.arg.append((float(a), float(b)))
        self.value.append(float(value))
        return value

    # numpy's calls in timm.data.mixup
    def rand(self, *size):
        assert not size
        return self.log(0, 0, 0, self.gen.random())

    def beta(self, a, b, size=None):
        assert a == b and size is None
        return self.log(3, a, a, self.gen.beta(a, a))

    def np_randint(self, low, high=None, size=None):
        assert high is not None and size is None
        return self.log(2, low, high - 1, int(self.gen.integers(low, high)))

    # Python's calls in timm.data.random_erasing
    def random(self):
        return self.log(0, 0, 0, self.gen.random())

    def uniform(self, a, b):
        return self.log(1, a, b, a + (b - a) * self.gen.random())

    def randint(self, a, b):
        return self.log(2, a, b, int(self.gen.integers(a, b + 1)))

    def get_pixels(self, per_pixel, rand_color, patch_size, dtype=torch.float32, device="cpu"):
        if per_pixel:
            shape = patch_size
        elif rand_color:
            shape = (patch_size[0], 1, 1)
        else:
            return torch.zeros((patch_size[0], 1, 1), dtype=dtype, device=device)
        values = torch.from_numpy(self.gen.standard_normal(shape).astype(np.float32))
        self.log(4, values.numel(), 0, len(self.noise))
        self.noise.extend(values.flatten().tolist())
        return values.to(dtype)

    def tensors(self, prefix):
        out = {
            f"{prefix}/kind": torch.tensor(self.kind, dtype=torch.int64),
            f"{prefix}/arg": torch.tensor(self.arg, dtype=torch.float64).view(-1, 2),
            f"{prefix}/value": torch.tensor(self.value, dtype=torch.float64),
        }
        if self.noise:
            out[f"{prefix}/noise"] = torch.tensor(self.noise, dtype=torch.float32)
        return out


def patched(rec):
    """timm's modules with their random calls going to `rec`."""
    fake_np = types.SimpleNamespace(**{k: getattr(np, k) for k in dir(np) if not k.startswith("__")})
    fake_np.random = types.SimpleNamespace(rand=rec.rand, beta=rec.beta, randint=rec.np_randint)
    tmix.np = fake_np
    terase.random = types.SimpleNamespace(random=rec.random, uniform=rec.uniform, randint=rec.randint)
    terase._get_pixels = rec.get_pixels


# (name, Mixup kwargs, what the draw must have done)
MIX_CASES = [
    ("mixup", dict(mixup_alpha=0.8, cutmix_alpha=0.0), "mixup"),
    ("cutmix", dict(mixup_alpha=0.0, cutmix_alpha=1.0), "cutmix_clipped"),
    ("cutmix_uncorrected", dict(mixup_alpha=0.0, cutmix_alpha=1.0, correct_lam=False), "cutmix_clipped"),
    ("switch_cutmix", dict(mixup_alpha=0.8, cutmix_alpha=1.0, switch_prob=0.5), "cutmix"),
    ("switch_mixup", dict(mixup_alpha=0.8, cutmix_alpha=1.0, switch_prob=0.5), "mixup"),
    ("minmax", dict(mixup_alpha=0.0, cutmix_alpha=0.0, cutmix_minmax=(0.2, 0.8)), "cutmix"),
    ("missed", dict(mixup_alpha=0.8, cutmix_alpha=1.0, prob=0.3), "unmixed"),
    ("applied", dict(mixup_alpha=0.8, cutmix_alpha=1.0, prob=0.3), "any"),
]


def mix_case(images, labels, kwargs, want):
    """The first seed whose draw does `want`, and timm's output for it."""
    for seed in range(10_000):
        rec = Recorder(seed)
        patched(rec)
        m = Mixup(label_smoothing=0.0, num_classes=CLASSES, mode="batch", **kwargs)
        x = images.clone()
        out, target = m(x, labels.clone())
        kinds = rec.kind
        cut = 2 in kinds
        did = "unmixed" if len(kinds) <= 1 or torch.equal(out, images) else ("cutmix" if cut else "mixup")
        if cut and did == "cutmix":
            # Was the box clipped at a border (λ corrected)?
            beta = rec.value[kinds.index(3)]
            h = int(H * np.sqrt(1 - beta))
            w = int(W * np.sqrt(1 - beta))
            cy, cx = rec.value[-2], rec.value[-1]
            clipped = cy - h // 2 < 0 or cy + (h + 1) // 2 > H or cx - w // 2 < 0 or cx + (w + 1) // 2 > W
            if want == "cutmix_clipped" and clipped and h > 0 and w > 0:
                did = "cutmix_clipped"
        if want == did or (want == "any" and did != "unmixed"):
            return rec, out, target, seed
    raise SystemExit(f"no seed gives {want} for {kwargs}")


def lam_of(target, labels):
    # Row 0's weight on its own label when the reversed row's label differs.
    i = next(i for i in range(B) if labels[i] != labels.flip(0)[i])
    return float(target[i, labels[i]])


def config_mix(kw):
    lo, hi = kw.get("cutmix_minmax") or (-1.0, -1.0)
    return torch.tensor(
        [kw.get("mixup_alpha", 1.0), kw.get("cutmix_alpha", 0.0), lo, hi, kw.get("prob", 1.0),
         kw.get("switch_prob", 0.5), float(kw.get("correct_lam", True))],
        dtype=torch.float64,
    )


# (name, RandomErasing kwargs, what the case must show)
ERASE_CASES = [
    ("pixel", dict(probability=0.7, mode="pixel"), "erased"),
    ("rand", dict(probability=0.7, mode="rand"), "erased"),
    ("const", dict(probability=0.7, mode="const"), "erased"),
    ("count", dict(probability=1.0, mode="pixel", max_count=3, min_aspect=0.5, max_aspect=3.0), "count"),
    ("large", dict(probability=1.0, mode="rand", min_area=0.3, max_area=0.95), "failed"),
]


def erase_case(images, kwargs, want):
    for seed in range(10_000):
        rec = Recorder(seed)
        patched(rec)
        re = RandomErasing(device="cpu", **kwargs)
        out = re(images.clone())
        kinds, values = rec.kind, rec.value
        # Samples left alone (random() > p), erased, a try that did not fit.
        rands = [values[i] for i, k in enumerate(kinds) if k == 0]
        missed = any(u > re.probability for u in rands)
        erased = any(k == 2 for k in kinds)
        # Each try draws two uniforms; a box that fits, two integers from 0.
        tries = kinds.count(1) // 2
        boxes = sum(1 for k, (lo, _) in zip(kinds, rec.arg) if k == 2 and lo == 0) // 2
        failed = tries > boxes
        counts = [values[i] for i, k in enumerate(kinds) if k == 2 and rec.arg[i] == (1.0, 3.0)]
        ok = {
            "erased": erased and (missed or re.probability == 1.0),
            "count": any(c > 1 for c in counts),
            "failed": failed and erased,
        }[want]
        if ok:
            return rec, out, seed
    raise SystemExit(f"no seed gives {want} for {kwargs}")


def config_erase(kw):
    min_aspect = kw.get("min_aspect", 0.3)
    mode = {"const": 0, "rand": 1, "pixel": 2}[kw.get("mode", "const")]
    return torch.tensor(
        [kw.get("probability", 0.5), kw.get("min_area", 0.02), kw.get("max_area", 1 / 3), min_aspect,
         kw.get("max_aspect") or 1 / min_aspect, mode, kw.get("min_count", 1), kw.get("max_count") or kw.get("min_count", 1)],
        dtype=torch.float64,
    )


def main():
    torch.manual_seed(0)
    out = {}
    images = torch.randn(B, C, H, W)
    labels = torch.tensor([0, 3, 1, 4, 3, 2])
    out["mix/images"], out["mix/labels"] = images, labels
    for name, kw, want in MIX_CASES:
        rec, mixed, target, seed = mix_case(images, labels, kw, want)
        p = f"mix/{name}"
        out.update(rec.tensors(p))
        out[f"{p}/config"] = config_mix(kw)
        out[f"{p}/images"] = mixed
        out[f"{p}/target"] = target
        out[f"{p}/lam"] = torch.tensor([lam_of(target, labels)], dtype=torch.float64)
        print(f"mix {name}: seed {seed}, {len(rec.kind)} calls, λ = {lam_of(target, labels):.6f}")
    erase_images = torch.randn(B, C, H, W)
    out["erase/images"] = erase_images
    for name, kw, want in ERASE_CASES:
        rec, erased, seed = erase_case(erase_images, kw, want)
        p = f"erase/{name}"
        out.update(rec.tensors(p))
        out[f"{p}/config"] = config_erase(kw)
        out[f"{p}/images"] = erased
        print(f"erase {name}: seed {seed}, {len(rec.kind)} calls")
    # SoftTargetCrossEntropy on mixup_target(λ, smoothing), as timm trains.
    logits = torch.randn(B, CLASSES) * 3
    out["ce/logits"], out["ce/labels"] = logits, labels.clone()
    for k, (lam, smoothing) in enumerate([(1.0, 0.0), (0.7, 0.0), (0.35, 0.1), (1.0, 0.1)]):
        target = tmix.mixup_target(labels, CLASSES, lam, smoothing)
        out[f"ce/{k}/lam"] = torch.tensor([lam], dtype=torch.float64)
        out[f"ce/{k}/smoothing"] = torch.tensor([smoothing], dtype=torch.float64)
        out[f"ce/{k}/loss"] = SoftTargetCrossEntropy()(logits, target).reshape(1)
    OUT.parent.mkdir(exist_ok=True)
    save_file({k: v.contiguous() for k, v in out.items()}, OUT)
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()

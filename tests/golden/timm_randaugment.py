"""Golden outputs of timm's RandAugment (timm/data/auto_augment.py,
`rand_augment_transform('rand-m9-mstd0.5-inc1', hparams)`) for kd's version
(crates/kd-data/src/timm_augment.rs, tested by crates/kd-data/tests/timm_randaugment.rs).

Every op of `_RAND_INCREASING_TRANSFORMS` and the plain variants of
`_RAND_TRANSFORMS` runs through timm's own level functions (`LEVEL_TO_ARG`)
and op functions (`NAME_TO_OP`) on the same PIL images, with the draws
timm would make (`_randomly_negate`'s coin, the interpolation) fixed and
written alongside, so that kd can replay each one. A whole transform is
also run from a seed, its ops wrapped to record what they drew.

Images are 20 x 28 (H x W, not square), the fill colour is what timm's
create_transform passes for ImageNet's mean, `round(255 * mean)`.

Writes data/timm_randaugment.safetensors:
  images              uint8 [N, 3, H, W]
  fill                int64 [3]
  <Name>/level        float64 [N]  the magnitude handed to the level function
  <Name>/negate       int64 [N]    whether _randomly_negate's coin negated
  <Name>/bicubic      int64 [N]    1: BICUBIC, 0: BILINEAR (geometric ops)
  <Name>/arg          float64 [N]  timm's op argument (0 for argument-less ops)
  <Name>/out          uint8 [N, 3, H, W]
  chain/op            int64 [N, 2]  index in the list (-1: skipped by its coin)
  chain/arg, chain/bicubic          as above, per layer
  chain/out           uint8 [N, 3, H, W]
Run: ~/.cache/kd/venv/bin/python tests/golden/timm_randaugment.py
"""
import pathlib
import random

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file
from timm.data import auto_augment as aa

OUT = pathlib.Path(__file__).resolve().parent / "data" / "timm_randaugment.safetensors"
N = 24
H, W = 20, 28
MEAN = (0.485, 0.456, 0.406)
FILL = tuple(min(255, round(255 * x)) for x in MEAN)
PLAIN = ["Posterize", "Solarize", "Color", "Contrast", "Brightness", "Sharpness"]


def make_images(rng):
    y, x = np.mgrid[0:H, 0:W]
    out = []
    for n in range(N):
        base = rng.integers(0, 256, size=3)
        grad = np.stack([(x * rng.integers(1, 10) + y * rng.integers(0, 10) + base[c]) % 256 for c in range(3)])
        noise = rng.integers(-40, 41, size=(3, H, W))
        img = np.clip(grad + noise, 0, 255)
        if n % 6 == 5:
            img = img // 64 * 64  # few levels
        out.append(img.astype(np.uint8))
    return np.stack(out)


def levels(rng):
    fixed = [0.0, 10.0, 9.0, 5.0, 0.3, 9.7]
    return np.array(fixed + list(rng.uniform(0, 10, N - len(fixed))))


class Coin:
    """random.random() for _randomly_negate: > 0.5 negates."""

    def __init__(self, negate):
        self.value = 0.9 if negate else 0.1

    def __enter__(self):
        self.saved = aa.random.random
        aa.random.random = lambda: self.value

    def __exit__(self, *_):
        aa.random.random = self.saved


def main():
    rng = np.random.default_rng(20261206)
    images = make_images(rng)
    pil = [Image.fromarray(im.transpose(1, 2, 0)) for im in images]

    def back(img):
        assert img.mode == "RGB" and img.size == (W, H)
        return np.asarray(img).transpose(2, 0, 1)

    interp = [Image.Resampling.BILINEAR, Image.Resampling.BICUBIC]
    hparams = dict(aa._HPARAMS_DEFAULT, img_mean=FILL)
    tensors = {"images": torch.from_numpy(images), "fill": torch.tensor(FILL, dtype=torch.int64)}
    for name in aa._RAND_INCREASING_TRANSFORMS + PLAIN:
        lv = levels(rng)
        if name == "PosterizeIncreasing":
            # Level 10 keeps 0 bits, which Pillow 13's ImageOps.posterize
            # refuses (ValueError); kd clears every bit there, as older
            # Pillow's LUT did. Not a level timm can run here.
            lv[lv >= 10.0] = 9.99
        if name == "Posterize":
            # Likewise levels below 2.5 (0 bits) for the plain Posterize.
            lv = np.maximum(lv, 2.5)
        neg = rng.integers(0, 2, N)
        cubic = rng.integers(0, 2, N)
        args, outs = [], []
        for n, im in enumerate(pil):
            fn = aa.LEVEL_TO_ARG[name]
            with Coin(bool(neg[n])):
                a = fn(lv[n], hparams) if fn is not None else ()
            outs.append(back(aa.NAME_TO_OP[name](im, *a, fillcolor=FILL, resample=interp[cubic[n]])))
            args.append(float(a[0]) if a else 0.0)
        tensors[f"{name}/level"] = torch.from_numpy(lv)
        tensors[f"{name}/negate"] = torch.from_numpy(neg.astype(np.int64))
        tensors[f"{name}/bicubic"] = torch.from_numpy(cubic.astype(np.int64))
        tensors[f"{name}/arg"] = torch.tensor(args, dtype=torch.float64)
        tensors[f"{name}/out"] = torch.from_numpy(np.stack(outs))

    # A whole transform as create_transform builds it (random interpolation:
    # no `interpolation` hparam), its op functions wrapped to record the
    # arguments and the interpolation drawn, consuming the same draws.
    ra = aa.rand_augment_transform("rand-m9-mstd0.5-inc1", dict(translate_const=100, img_mean=FILL))
    names = [op.name for op in ra.ops]
    assert names == aa._RAND_INCREASING_TRANSFORMS
    log = []

    def recorder(k, fn):
        def run(img, *a, **kw):
            r = kw.get("resample")
            if isinstance(r, (list, tuple)):
                r = random.choice(r)
                kw["resample"] = r
            log.append((k, float(a[0]) if a else 0.0, int(r == Image.Resampling.BICUBIC)))
            return fn(img, *a, **kw)

        return run

    for k, op in enumerate(ra.ops):
        op.aug_fn = recorder(k, op.aug_fn)
    random.seed(11)
    np.random.seed(11)
    c_op, c_arg, c_cubic, c_out = [], [], [], []
    for im in pil:
        log.clear()
        out = back(ra(im))
        rows = log + [(-1, 0.0, 0)] * (2 - len(log))
        c_op.append([r[0] for r in rows])
        c_arg.append([r[1] for r in rows])
        c_cubic.append([r[2] for r in rows])
        c_out.append(out)
    tensors["chain/op"] = torch.tensor(c_op, dtype=torch.int64)
    tensors["chain/arg"] = torch.tensor(c_arg, dtype=torch.float64)
    tensors["chain/bicubic"] = torch.tensor(c_cubic, dtype=torch.int64)
    tensors["chain/out"] = torch.from_numpy(np.stack(c_out))
    OUT.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(OUT))
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()

"""Golden outputs of MLKD's strong augmentation for kd's tensor version
(crates/kd-data/src/randaugment.rs, tested by crates/kd-data/tests/randaugment.rs),
computed with Pillow exactly as the reference computes them
(sunshangquan/logit-standardization-KD, mdistiller/dataset/cifar100.py):
RandAugment(2, 10) draws two of 14 PIL ops with replacement, each with a
uniform magnitude in its range, then Cutout of a random size and centre.

The op functions below are the reference's, called on the same PIL images;
only the random draws are taken out of them and written alongside, so that
kd can replay each one.

Writes data/randaugment.safetensors (apart from fixtures/, which holds the probes' fixtures):
  images          uint8 [N, 3, 32, 32]    inputs, CHW
  op/magnitude    float64 [N, 14]         magnitude of op k on image n
  op/out          uint8 [N, 14, 3, 32, 32] op k (augment_list() order) applied to image n
  cutout/params   float64 [N, 3]          size v (fraction of the width), centre x, centre y
  cutout/out      uint8 [N, 3, 32, 32]
  chain/ops       int64 [N, 2]            a whole RandAugment(2, 10) call: op ids,
  chain/magnitude float64 [N, 2]          their magnitudes,
  chain/cutout    float64 [N, 3]          the cutout's size and centre,
  chain/out       uint8 [N, 3, 32, 32]    and its result
Run: ~/.cache/kd/venv/bin/python tests/golden/randaugment.py
"""
import pathlib
import random

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageEnhance, ImageOps
from safetensors.torch import save_file

OUT = pathlib.Path(__file__).resolve().parent / "data" / "randaugment.safetensors"
N = 36
S = 32


# The reference's ops, verbatim in behaviour.
def auto_contrast(img, _):
    return ImageOps.autocontrast(img)


def brightness(img, v):
    return ImageEnhance.Brightness(img).enhance(v)


def color(img, v):
    return ImageEnhance.Color(img).enhance(v)


def contrast(img, v):
    return ImageEnhance.Contrast(img).enhance(v)


def equalize(img, _):
    return ImageOps.equalize(img)


def identity(img, _):
    return img


def posterize(img, v):
    return ImageOps.posterize(img, max(1, int(v)))


def rotate(img, v):
    return img.rotate(v)


def sharpness(img, v):
    return ImageEnhance.Sharpness(img).enhance(v)


def shear_x(img, v):
    return img.transform(img.size, Image.AFFINE, (1, v, 0, 0, 1, 0))


def shear_y(img, v):
    return img.transform(img.size, Image.AFFINE, (1, 0, 0, v, 1, 0))


def solarize(img, v):
    return ImageOps.solarize(img, v)


def translate_x(img, v):
    return img.transform(img.size, Image.AFFINE, (1, 0, v * img.size[0], 0, 1, 0))


def translate_y(img, v):
    return img.transform(img.size, Image.AFFINE, (1, 0, 0, 0, 1, v * img.size[1]))


OPS = [
    (auto_contrast, 0, 1),
    (brightness, 0.05, 0.95),
    (color, 0.05, 0.95),
    (contrast, 0.05, 0.95),
    (equalize, 0, 1),
    (identity, 0, 1),
    (posterize, 4, 8),
    (rotate, -30, 30),
    (sharpness, 0.05, 0.95),
    (shear_x, -0.3, 0.3),
    (shear_y, -0.3, 0.3),
    (solarize, 0, 256),
    (translate_x, -0.3, 0.3),
    (translate_y, -0.3, 0.3),
]


def cutout(img, v, x0, y0):
    """The reference's Cutout + CutoutAbs with the centre (x0, y0), which
    it draws with np.random.uniform(w), given instead."""
    if v <= 0.0:
        return img
    v = v * img.size[0]
    w, h = img.size
    x0 = int(max(0, x0 - v / 2.0))
    y0 = int(max(0, y0 - v / 2.0))
    x1 = min(w, x0 + v)
    y1 = min(h, y0 + v)
    img = img.copy()
    ImageDraw.Draw(img).rectangle((x0, y0, x1, y1), (125, 123, 114))
    return img


def smooth_field(rng, lo, hi):
    """A natural-looking image: coarse noise upsampled, plus fine noise."""
    coarse = rng.uniform(lo, hi, size=(3, 5, 5))
    t = torch.nn.functional.interpolate(
        torch.from_numpy(coarse)[None], size=(S, S), mode="bicubic", align_corners=True
    )[0].numpy()
    t = t + rng.normal(0, (hi - lo) * 0.05, size=t.shape)
    return np.clip(np.rint(t), 0, 255).astype(np.uint8)


def make_images(rng):
    """Edge cases for the histogram ops first, then natural-looking images."""
    ims = []
    ims.append(rng.integers(0, 256, size=(3, S, S), dtype=np.uint8))  # full range noise
    ims.append(np.full((3, S, S), 77, np.uint8))  # constant: autocontrast/equalize do nothing
    c = np.empty((3, S, S), np.uint8)  # a constant per channel
    c[0], c[1], c[2] = 0, 128, 255
    ims.append(c)
    c = rng.integers(0, 256, size=(3, S, S), dtype=np.uint8)  # one constant channel
    c[1] = 200
    ims.append(c)
    ims.append(rng.integers(100, 104, size=(3, S, S), dtype=np.uint8))  # low contrast
    ims.append(rng.integers(250, 256, size=(3, S, S), dtype=np.uint8))  # near white
    ims.append(rng.integers(0, 3, size=(3, S, S), dtype=np.uint8))  # near black
    ims.append((rng.integers(0, 2, size=(3, S, S)) * 255).astype(np.uint8))  # two values
    c = rng.integers(0, 256, size=(3, S, S), dtype=np.uint8)  # one value dominating a channel
    c[2, :30] = 9
    ims.append(c)
    # A few distinct values per channel (equalize's table then exceeds 255).
    ims.append(rng.choice(np.array([3, 40, 41, 180, 250], np.uint8), size=(3, S, S)))
    ims.append(
        rng.choice(np.array([10, 20, 30], np.uint8), size=(3, S, S), p=[0.05, 0.05, 0.9])
    )
    yy, xx = np.mgrid[0:S, 0:S]
    ims.append(np.stack([xx * 8, yy * 8, (xx + yy) * 4]).astype(np.uint8))  # gradients
    while len(ims) < N:
        lo = rng.uniform(0, 120)
        hi = rng.uniform(lo + 10, 255)
        ims.append(smooth_field(rng, lo, hi))
    return np.stack(ims)


def magnitude(rng, k, n):
    """Range ends, zero for the signed ops (PIL's identity shortcut paths),
    values where Solarize's threshold is an integer, else uniform draws."""
    _, lo, hi = OPS[k]
    case = n % 6
    if case == 0:
        return float(lo)
    if case == 1:
        return float(hi)
    if case == 2 and lo < 0:
        return 0.0
    if case == 3 and OPS[k][0] is solarize:
        return float(int(rng.integers(0, 257)))
    return lo + float(hi - lo) * rng.random()


def main():
    rng = np.random.default_rng(20260314)
    images = make_images(rng)
    pil = [Image.fromarray(im.transpose(1, 2, 0)) for im in images]

    def back(img):
        assert img.mode == "RGB" and img.size == (S, S)
        return np.asarray(img).transpose(2, 0, 1)

    mags = np.array([[magnitude(rng, k, n) for k in range(len(OPS))] for n in range(N)])
    op_out = np.stack(
        [[back(OPS[k][0](im, mags[n, k])) for k in range(len(OPS))] for n, im in enumerate(pil)]
    )

    # Cutout: zero size (no-op), the largest size, sub-pixel sizes, centres on
    # and beyond the borders, and uniform draws.
    fixed = [
        (0.0, 16.0, 16.0),
        (0.5, 16.0, 16.0),
        (0.5, 0.0, 0.0),
        (0.5, 32.0, 32.0),
        (0.01, 5.5, 7.25),
        (0.001, 31.99, 0.0),
        (0.25, 1.0, 31.0),
        (0.4999, 8.3, 23.7),
        (0.03125, 15.0, 15.0),
        (0.1, 0.0, 32.0),
    ]
    cut = []
    for n in range(N):
        if n < len(fixed):
            cut.append(fixed[n])
        else:
            cut.append((rng.random() * 0.5, rng.uniform(0, S), rng.uniform(0, S)))
    cut = np.array(cut)
    cut_out = np.stack([back(cutout(im, *cut[n])) for n, im in enumerate(pil)])

    # Whole RandAugment(2, 10) calls, drawn as the reference draws them.
    random.seed(7)
    np.random.seed(7)
    chain_ops, chain_mags, chain_cut, chain_out = [], [], [], []
    for im in pil:
        ids = random.choices(range(len(OPS)), k=2)
        vals = []
        for k in ids:
            op, lo, hi = OPS[k]
            vals.append(lo + float(hi - lo) * random.random())
            im = op(im, vals[-1])
        v = random.random() * 0.5
        # CutoutAbs's np.random.uniform(w) is uniform(low=w, high=1.0): (1, w].
        x0 = np.random.uniform(S)
        y0 = np.random.uniform(S)
        im = cutout(im, v, x0, y0)
        chain_ops.append(ids)
        chain_mags.append(vals)
        chain_cut.append((v, x0, y0))
        chain_out.append(back(im))

    tensors = {
        "images": torch.from_numpy(images),
        "op/magnitude": torch.from_numpy(mags),
        "op/out": torch.from_numpy(op_out),
        "cutout/params": torch.from_numpy(cut),
        "cutout/out": torch.from_numpy(cut_out),
        "chain/ops": torch.tensor(chain_ops, dtype=torch.int64),
        "chain/magnitude": torch.tensor(chain_mags, dtype=torch.float64),
        "chain/cutout": torch.tensor(chain_cut, dtype=torch.float64),
        "chain/out": torch.from_numpy(np.stack(chain_out)),
    }
    OUT.parent.mkdir(exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(OUT))
    print(f"wrote {OUT} ({OUT.stat().st_size} bytes)")


if __name__ == "__main__":
    main()

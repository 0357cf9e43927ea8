"""Golden outputs of torchvision's ImageNet transforms for kd's ImageFolder
pipeline (crates/kd-data/tests/imagefolder.rs): small JPEG and PNG files
written by PIL, each opened as torchvision's ImageFolder opens it
(`Image.open(f).convert('RGB')`), then

  eval/<name>       Resize(36), CenterCrop(32)                  [3, 32, 32]
  eval_pad/<name>   Resize(24), CenterCrop(32) (zero padding)   [3, 32, 32]
  eval_224/<name>   Resize(256), CenterCrop(224), large.jpg only
  train/<name>      F.resized_crop(img, *box, [32, 32]) then hflip if asked,
                    RandomResizedCrop's and RandomHorizontalFlip's work for
                    the draws in box/<name> = [top, left, height, width, flip]

all as PILToTensor gives them (uint8, CHW: ToTensor's values times 255).
The files themselves are stored as file/<name> (uint8, the encoded bytes),
so the Rust test decodes exactly what PIL decoded.

Writes data/imagefolder.safetensors (data/, not fixtures/, which holds
the probes' fixtures). Run: ~/.cache/kd/venv/bin/python tests/golden/imagefolder.py
"""
import io
import json
import pathlib

import numpy as np
import PIL
import torch
import torchvision
from PIL import Image
from safetensors.torch import save_file
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as F
from torchvision.transforms import transforms as T

OUT = pathlib.Path(__file__).resolve().parent / "data" / "imagefolder.safetensors"


def scene(width, height, seed):
    """An RGB picture with edges, gradients and texture: what makes the
    decoders' and resamplers' rounding differences show."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float64)
    r = 127 + 100 * np.sin(x / (3 + seed)) * np.cos(y / 5)
    g = 255 * x / max(width - 1, 1)
    b = 255 * ((x // 7 + y // 7) % 2)
    img = np.stack([r, g, b], axis=-1) + rng.normal(0, 12, (height, width, 3))
    cx, cy = width * 0.6, height * 0.4
    disk = (x - cx) ** 2 + (y - cy) ** 2 < (min(width, height) / 4) ** 2
    img[disk] = [250, 30, 60]
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), "RGB")


def encode(img, fmt, **kw):
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def files():
    rgba = scene(40, 30, 3).convert("RGBA")
    alpha = np.linspace(0, 255, 40 * 30).reshape(30, 40).astype(np.uint8)
    rgba.putalpha(Image.fromarray(alpha, "L"))
    return {
        "rgb_420.jpg": encode(scene(67, 43, 1), "JPEG", quality=90),
        "rgb_444.jpg": encode(scene(50, 80, 2), "JPEG", quality=95, subsampling=0),
        "gray.jpg": encode(scene(45, 60, 4).convert("L"), "JPEG", quality=90),
        "rgba.png": encode(rgba, "PNG"),
        "palette.png": encode(scene(33, 33, 5).convert("P", palette=Image.ADAPTIVE), "PNG"),
        "gray.png": encode(scene(31, 47, 6).convert("L"), "PNG"),
        "la.png": encode(rgba.convert("LA"), "PNG"),
        "large.jpg": encode(scene(300, 200, 7), "JPEG", quality=85),
    }


def chw(img):
    return F.pil_to_tensor(img).contiguous()


def crop_box(w, h, name):
    """A crop that shrinks on one axis and not the other, and for one file
    a small crop that is enlarged."""
    if name == "gray.png":
        return [5, 7, 10, 12, 1]
    return [h // 5, w // 7, h * 3 // 5, w * 2 // 3, int(len(name) % 2)]


def main():
    tensors, names = {}, []
    for name, data in files().items():
        names.append(name)
        img = Image.open(io.BytesIO(data)).convert("RGB")
        tensors[f"file/{name}"] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        tensors[f"eval/{name}"] = chw(T.Compose([T.Resize(36), T.CenterCrop(32)])(img))
        tensors[f"eval_pad/{name}"] = chw(T.Compose([T.Resize(24), T.CenterCrop(32)])(img))
        if name == "large.jpg":
            tensors[f"eval_224/{name}"] = chw(T.Compose([T.Resize(256), T.CenterCrop(224)])(img))
        top, left, h, w, flip = box = crop_box(img.width, img.height, name)
        out = F.resized_crop(img, top, left, h, w, [32, 32], InterpolationMode.BILINEAR, antialias=True)
        if flip:
            out = F.hflip(out)
        tensors[f"train/{name}"] = chw(out)
        tensors[f"box/{name}"] = torch.tensor(box, dtype=torch.int64)
    meta = {
        "fixture": json.dumps({
            "files": names,
            "torchvision": torchvision.__version__,
            "pillow": PIL.__version__,
        })
    }
    OUT.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(OUT), metadata=meta)
    print(f"wrote {OUT} ({OUT.stat().st_size} bytes, {len(names)} files)")


if __name__ == "__main__":
    main()

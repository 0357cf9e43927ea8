"""Golden outputs of the CIFAR training transforms for kd's loader
(crates/kd-data/tests/augment.rs), computed with torch alone, as
torchvision computes them:

  RepDistiller (dataset/cifar100.py): RandomCrop(32, padding=4), RandomHorizontalFlip,
      ToTensor, Normalize((0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761))
  KD-Zoo (train_kd.py): Pad(4, padding_mode='reflect'), RandomCrop(32), RandomHorizontalFlip,
      ToTensor, Normalize((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762))

with the random draws (crop corner, flip) fixed and written alongside.
torchvision pads a PIL image with numpy's 'reflect' (edge not repeated) and
a tensor with torch's, the same; padding bytes before ToTensor's division
by 255 equals padding after it, since padding only copies values.

Writes data/augment.safetensors (apart from fixtures/, which holds the probes' fixtures):
  images      uint8 [N, 3, 32, 32]
  crops       int64 [N, 3]: row and column of the crop's corner in the padded image, flip (0/1)
  zero        float32: crop + flip of the zero-padded image, in [0, 1]
  reflect     float32: the same from the reflect-padded image
  plain/<n>   float32: ToTensor + Normalize, no augmentation, n = kdzoo | repdistiller
  full/<n>    float32: the whole training transform of framework n
Run: ~/.cache/kd/venv/bin/python tests/golden/augment.py
"""
import pathlib

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

OUT = pathlib.Path(__file__).resolve().parent / "data" / "augment.safetensors"
PAD = 4
# Corners at both extremes and in between, flipped and not.
CROPS = [(0, 0, 0), (8, 8, 1), (3, 6, 1), (7, 1, 0), (4, 4, 0), (0, 8, 1)]
STATS = {
    "kdzoo": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "repdistiller": ((0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761)),
}
PADDING = {"kdzoo": "reflect", "repdistiller": "zero"}


def to_tensor(images):
    return images.float().div(255)


def normalize(x, name):
    # torchvision's Normalize: float32 mean and std, subtract then divide.
    mean, std = (torch.as_tensor(v, dtype=torch.float32)[:, None, None] for v in STATS[name])
    return x.sub(mean).div(std)


def crop_flip(x, mode):
    if mode == "reflect":
        padded = F.pad(x, (PAD,) * 4, mode="reflect")
    else:
        padded = F.pad(x, (PAD,) * 4, mode="constant", value=0.0)
    h, w = x.shape[-2:]
    out = []
    for img, (y, x0, flip) in zip(padded, CROPS):
        crop = img[:, y : y + h, x0 : x0 + w]
        out.append(crop.flip(-1) if flip else crop)
    return torch.stack(out)


def main():
    gen = torch.Generator().manual_seed(20260315)
    images = torch.randint(0, 256, (len(CROPS), 3, 32, 32), dtype=torch.uint8, generator=gen)
    x = to_tensor(images)
    tensors = {
        "images": images,
        "crops": torch.tensor(CROPS, dtype=torch.int64),
        "zero": crop_flip(x, "zero"),
        "reflect": crop_flip(x, "reflect"),
    }
    # Reflection mirrors about the edge pixel, which it does not repeat.
    assert torch.equal(tensors["reflect"][0, :, 0, 0], x[0, :, 4, 4])
    for name in STATS:
        tensors[f"plain/{name}"] = normalize(x, name)
        tensors[f"full/{name}"] = normalize(crop_flip(x, PADDING[name]), name)
    OUT.parent.mkdir(exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(OUT))
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()

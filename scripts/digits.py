"""Writes the UCI handwritten digits that scikit-learn ships (1,797 real 8x8
grey images, 10 classes) as a CIFAR-10 binary folder, so kd reads them with
its CIFAR-10 reader (`--data digits`, `digits()` in recipes).

Each image's 17 grey levels (0..16) become 0..255, it is enlarged 4x by
repeating pixels (no interpolation invents strokes) and copied to the three
channels. Every fifth image (index % 5 == 4) is the test set (359 images);
the other 1,438 are split over the five training files in order.

Usage: python scripts/digits.py OUT_DIR
"""
import pathlib
import sys

import numpy as np
from sklearn.datasets import load_digits


def main(out: pathlib.Path) -> None:
    d = load_digits()
    grey = np.rint(d.images * (255.0 / 16.0)).astype(np.uint8)  # [N, 8, 8]
    big = grey.repeat(4, axis=1).repeat(4, axis=2)  # [N, 32, 32]
    rgb = np.repeat(big[:, None], 3, axis=1)  # [N, 3, 32, 32]
    labels = d.target.astype(np.uint8)
    test = np.arange(len(labels)) % 5 == 4

    def records(mask):
        return [bytes([labels[i]]) + rgb[i].tobytes() for i in np.flatnonzero(mask)]

    out.mkdir(parents=True, exist_ok=True)
    train = records(~test)
    for k, part in enumerate(np.array_split(np.arange(len(train)), 5), start=1):
        (out / f"data_batch_{k}.bin").write_bytes(b"".join(train[i] for i in part))
    (out / "test_batch.bin").write_bytes(b"".join(records(test)))
    print(f"digits: {len(train)} training and {int(test.sum())} test images in {out}")


if __name__ == "__main__":
    main(pathlib.Path(sys.argv[1]))

"""Reference for cpu_autocast.rs: a small conv -> BatchNorm (eval) -> ReLU
-> mean-pool -> linear -> MSE forward under PyTorch's
`torch.autocast("cpu", dtype=torch.bfloat16)`, on seeded weights and input.

    python crates/kd-aten/tests/cpu_autocast_ref.py DIR   # writes DIR/ref.safetensors

The file holds the inputs (fp32) and what autocast made of them: `out`
(the linear's output, bf16 under autocast, stored as fp32, which holds it
exactly), `loss` (MSE, which CPU autocast runs in fp32) and `out_fp32` (the
same forward without autocast, so the test can tell the two apart).
"""
import pathlib
import sys

import torch
import torch.nn.functional as F
from safetensors.torch import save_file


def forward(t):
    y = F.conv2d(t["x"], t["conv_w"], t["conv_b"], padding=1)
    y = F.batch_norm(y, t["bn_mean"], t["bn_var"], t["bn_w"], t["bn_b"], training=False, eps=1e-5)
    y = F.relu(y).mean((2, 3))
    out = F.linear(y, t["fc_w"], t["fc_b"])
    return out, F.mse_loss(out, t["target"])


def main(folder):
    torch.manual_seed(0)
    t = {
        "x": torch.randn(4, 3, 8, 8),
        "conv_w": torch.randn(16, 3, 3, 3) * 0.3,
        "conv_b": torch.randn(16) * 0.1,
        "bn_mean": torch.randn(16) * 0.1,
        "bn_var": torch.rand(16) + 0.5,
        "bn_w": torch.rand(16) + 0.5,
        "bn_b": torch.randn(16) * 0.1,
        "fc_w": torch.randn(10, 16) * 0.3,
        "fc_b": torch.randn(10) * 0.1,
        "target": torch.randn(4, 10),
    }
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, loss = forward(t)
    # What the test relies on: autocast did run the linear in bf16 and the
    # MSE in fp32.
    assert out.dtype == torch.bfloat16 and loss.dtype == torch.float32, (out.dtype, loss.dtype)
    out_fp32, _ = forward(t)
    t.update(out=out.float(), loss=loss.reshape(1), out_fp32=out_fp32)
    save_file({k: v.contiguous() for k, v in t.items()}, str(pathlib.Path(folder) / "ref.safetensors"))


if __name__ == "__main__":
    main(sys.argv[1])

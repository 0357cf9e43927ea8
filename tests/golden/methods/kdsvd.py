"""KDSVD, as mdistiller's distillers/KDSVD.py (RepDistiller's distiller_zoo/
KDSVD.py is the same code): torch.svd of each map viewed as [B, C*H, W],
the student's k+3 right singular vectors aligned to the teacher's k, RBF
kernels between consecutive maps matched, summed over pairs, / batch."""
import torch
import torch.nn.functional as F

from gen import fixture

TAPS = ["feat/1", "feat/2", "feat/3"]


def nan_to_zero(x):
    return torch.where(torch.isfinite(x), x, torch.zeros_like(x))


def decompose(feat, n):
    b, c, h, w = feat.shape
    _, s, v = torch.svd(feat.reshape(b, c * h, w).float())
    s, v = nan_to_zero(s), nan_to_zero(v)
    return F.normalize(s[:, :n], dim=1), F.normalize(v[:, :, :n], dim=1)


def aligned(a, b):
    cos = a.transpose(-2, -1) @ b
    top = cos.abs().max(dim=1, keepdim=True).values
    mask = torch.where(top == cos.abs(), torch.sign(cos), torch.zeros_like(cos))
    return a @ mask


def kdsvd(s, t, k):
    total, prev = 0.0, None
    for key in TAPS:
        s_t, v_t = decompose(t[key], k)
        _, v_s = decompose(s[key], k + 3)
        v_s = aligned(v_s, v_t) * s_t.unsqueeze(1)
        v_t = v_t * s_t.unsqueeze(1)
        if prev is not None:
            rbf_s = torch.exp(-(v_s.unsqueeze(2) - prev[0].unsqueeze(1)).pow(2) / 8)
            rbf_t = torch.exp(-(v_t.unsqueeze(2) - prev[1].unsqueeze(1)).pow(2) / 8)
            total = total + nan_to_zero((rbf_s - rbf_t.detach()).pow(2)).sum()
        prev = (v_s, v_t)
    return total / s[TAPS[0]].shape[0]


def spread(batch, channels, side, seed):
    """Maps whose [C*H, W] views have well-separated singular values
    (halving from 8): the SVD's gradient divides by the gaps between them,
    so random maps, whose values crowd together, would compare rounding
    orders rather than implementations."""
    g = torch.Generator().manual_seed(seed)
    rows = channels * side
    q1, _ = torch.linalg.qr(torch.randn(batch, rows, side, generator=g, dtype=torch.float64))
    q2, _ = torch.linalg.qr(torch.randn(batch, side, side, generator=g, dtype=torch.float64))
    sv = 8.0 * 0.5 ** torch.arange(side, dtype=torch.float64)
    x = q1 @ torch.diag_embed(sv.expand(batch, side)) @ q2.transpose(1, 2)
    return x.reshape(batch, channels, side, side).float()


def make():
    s, t = {}, {}
    for k, (key, side) in enumerate(zip(TAPS, (16, 8, 4))):
        s[key] = spread(8, (16, 32, 64)[k], side, 810 + k)
        t[key] = spread(8, (32, 64, 128)[k], side, 820 + k)
    pick = lambda taps: {key: taps[key] for key in TAPS}
    target = torch.arange(8) % 10
    fixture("kdsvd", "kdsvd", {}, pick(s), pick(t), target,
            loss_fn=lambda s, t, *_: kdsvd(s, t, 1))
    fixture("kdsvd_k2", "kdsvd", {"k": 2}, pick(s), pick(t), target,
            loss_fn=lambda s, t, *_: kdsvd(s, t, 2))

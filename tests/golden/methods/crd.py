"""Contrastive representation distillation, following KD-Zoo's kd_losses/crd.py
(from RepDistiller's crd/): linear embeddings with L2 normalisation, two momentum
memory banks, NCE with the normalisers Z fixed from the first batch.

Module keys match the Rust plugin: embed_{s,t}.linear.{weight,bias},
contrast.memory_{s,t} and contrast.Z_{s,t} (a scalar buffer, 0 = not yet set).
The bank update happens inside the call, as in the reference, so the fixture's
state after the call holds the updated banks (the plugin writes them in after_step).
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from gen import fixture, resnet_taps

N_DATA, CLASSES, BATCH = 64, 10, 8


class Embed(nn.Module):
    def __init__(self, d_in, d_out):
        super().__init__()
        self.linear = nn.Linear(d_in, d_out)

    def forward(self, x):
        return F.normalize(self.linear(x.flatten(1)), dim=1)


class Memory(nn.Module):
    def __init__(self, feat_dim, n_data):
        super().__init__()
        bound = 1.0 / math.sqrt(feat_dim / 3.0)
        for side in "st":
            self.register_buffer(f"memory_{side}", torch.empty(n_data, feat_dim).uniform_(-bound, bound))
        for side in "st":
            self.register_buffer(f"Z_{side}", torch.zeros(()))


class Crd(nn.Module):
    def __init__(self, s_dim, t_dim, feat_dim, n_data, nce_t, nce_mom):
        super().__init__()
        self.embed_s = Embed(s_dim, feat_dim)
        self.embed_t = Embed(t_dim, feat_dim)
        self.contrast = Memory(feat_dim, n_data)
        self.nce_t, self.nce_mom, self.n_data = nce_t, nce_mom, n_data

    def scores(self, memory, z, anchor, cidx):
        rows = memory[cidx].detach()                        # [B, K+1, D]
        out = torch.exp(torch.einsum("bkd,bd->bk", rows, anchor) / self.nce_t)
        if z.item() <= 0:                                   # first batch fixes Z
            z.fill_((out.mean() * self.n_data).item())
        return out / z

    def nce(self, p):
        # Eq. (18): noise prob per negative is K / n_data.
        k = p.shape[1] - 1
        c = k / self.n_data
        pos = torch.log(p[:, 0] / (p[:, 0] + c + 1e-7))
        neg = torch.log(c / (p[:, 1:] + c + 1e-7))
        return -(pos.sum() + neg.sum()) / p.shape[0]

    def forward(self, f_s, f_t, idx, cidx):
        e_s, e_t = self.embed_s(f_s), self.embed_t(f_t)
        out_t = self.scores(self.contrast.memory_s, self.contrast.Z_t, e_t, cidx)  # teacher anchors
        out_s = self.scores(self.contrast.memory_t, self.contrast.Z_s, e_s, cidx)  # student anchors
        with torch.no_grad():
            for memory, e in [(self.contrast.memory_t, e_t), (self.contrast.memory_s, e_s)]:
                memory[idx] = F.normalize(memory[idx] * self.nce_mom + e * (1 - self.nce_mom), dim=1)
        return self.nce(out_s) + self.nce(out_t)


def indices(k, seed):
    """KD-Zoo/RepDistiller "exact" sampling: column 0 is the sample itself, then
    k negatives drawn uniformly without replacement from the other classes."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(N_DATA) % CLASSES
    idx = torch.randperm(N_DATA, generator=g)[:BATCH]
    rows = []
    for i in idx.tolist():
        others = (labels != labels[i]).nonzero().flatten()
        rows.append(torch.cat([torch.tensor([i]), others[torch.randperm(len(others), generator=g)[:k]]]))
    return labels[idx], idx, torch.stack(rows)


def make():
    cases = [
        ("crd", {"feat_dim": 32, "nce_n": 16}, None),
        ("crd_z_set", {"feat_dim": 16, "nce_n": 8, "nce_t": 0.07, "nce_mom": 0.9}, (900.0, 1100.0)),
    ]
    for n, (name, params, z) in enumerate(cases):
        full = {"feat_dim": 128, "nce_n": 16384, "nce_t": 0.1, "nce_mom": 0.5, **params}
        s = resnet_taps(BATCH, 21 + n)
        t = resnet_taps(BATCH, 31 + n, channels=(32, 64, 128, 256))
        target, idx, cidx = indices(full["nce_n"], 41 + n)
        torch.manual_seed(51 + n)
        mod = Crd(64, 256, full["feat_dim"], N_DATA, full["nce_t"], full["nce_mom"])
        if z is not None:
            mod.contrast.Z_s.fill_(z[0])
            mod.contrast.Z_t.fill_(z[1])
        fixture(name, "crd", params, {"embed": s["embed"]}, {"embed": t["embed"]}, target,
                index=idx, contrast_index=cidx, module=mod, n_data=N_DATA,
                loss_fn=lambda s, t, y, i, c, m: m(s["embed"], t["embed"], i, c))

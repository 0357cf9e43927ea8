"""FSP: KD-Zoo's kd_losses/fsp.py with train_kd.py's stage pairs (stem→1,
1→2, 2→3, mean), and RepDistiller's distiller_zoo/FSP.py (sum over pairs,
whichever map is larger pooled)."""
import torch
import torch.nn.functional as F

from gen import fixture, resnet_taps

PAIRS = [("feat/0", "feat/1"), ("feat/1", "feat/2"), ("feat/2", "feat/3")]


def kd_zoo_fsp(a, b):
    if a.size(2) > b.size(2):
        a = F.adaptive_avg_pool2d(a, (b.size(2), b.size(3)))
    a = a.flatten(2)
    return torch.bmm(a, b.flatten(2).transpose(1, 2)) / a.size(2)


def repdistiller_fsp(bot, top):
    if bot.shape[2] > top.shape[2]:
        bot = F.adaptive_avg_pool2d(bot, (top.shape[2], top.shape[2]))
    elif bot.shape[2] < top.shape[2]:
        top = F.adaptive_avg_pool2d(top, (bot.shape[2], bot.shape[2]))
    bot = bot.unsqueeze(1).flatten(3)
    top = top.unsqueeze(2).flatten(3)
    return (bot * top).mean(-1)


def make():
    s, t = resnet_taps(8, 61), resnet_taps(8, 62)
    taps = [f"feat/{k}" for k in range(4)]
    pick = lambda x: {k: x[k] for k in taps}

    def kd_zoo(s, t, *_):
        return sum(F.mse_loss(kd_zoo_fsp(s[a], s[b]), kd_zoo_fsp(t[a], t[b])) for a, b in PAIRS) / len(PAIRS)

    fixture("fsp", "fsp", {}, pick(s), pick(t), t["logits"].argmax(1), loss_fn=kd_zoo)

    # A reversed pair makes RepDistiller pool the second map.
    pairs = PAIRS + [("feat/3", "feat/1")]

    def repdistiller(s, t, *_):
        return sum((repdistiller_fsp(s[a], s[b]) - repdistiller_fsp(t[a], t[b])).pow(2).mean() for a, b in pairs)

    fixture("fsp_repdistiller", "fsp", {"variant": "repdistiller", "pairs": [list(p) for p in pairs]},
            pick(s), pick(t), t["logits"].argmax(1), loss_fn=repdistiller)

"""BSS (boundary supporting samples), as KD-Zoo's train_bss.py with
kd_losses/bss.py, at network level: it needs the adversarial view, which
`kd probe loss` cannot feed, so make() writes nothing yet. The functions are
the reference for a later network-level golden test (models from
tests/golden/models.py return taps). `u` are the uniform draws of the
attack-class choice; pass them to make a run deterministic."""
import torch
import torch.nn.functional as F


def factor(epoch, epochs, warmup_epochs=10, active_fraction=0.8, decay=True):
    """KD-Zoo's lambda / lambda_kd with a zero-based epoch; None while inactive."""
    end = active_fraction * epochs
    if epoch < warmup_epochs or epoch >= end:
        return None
    return 1.0 - epoch / end if decay else 1.0


def select(out_s, out_t, target, attack_size=32, u=None):
    """(rows, attack classes), or None when no row is right on both sides."""
    out_s, out_t = out_s.detach(), out_t.detach()
    rows = ((out_s.argmax(1) == target) & (out_t.argmax(1) == target)).nonzero().flatten()
    if rows.numel() == 0:
        return None
    if rows.numel() > attack_size:
        d = (F.softmax(out_t[rows], 1) - F.softmax(out_s[rows], 1)) ** 2
        score = d.sum(1) - d.gather(1, target[rows].view(-1, 1)).squeeze(1)
        rows = rows[score.sort(descending=True)[1][:attack_size]]
    p, order = F.softmax(out_t[rows], 1).sort(1, descending=True)
    p, order = p[:, 1:], order[:, 1:]                    # drop the top (= target) class
    if u is None:
        u = torch.rand(rows.numel(), device=p.device)
    threshold = u * p.sum(1)
    cum = p.cumsum(1)
    classes = order[:, 0].clone()                        # runner-up if no draw lands
    for k in range(rows.numel()):
        hit = (cum[k] >= threshold[k]).nonzero()
        if hit.numel():
            classes[k] = order[k, hit[0, 0]]
    return rows, classes


def attack(teacher, img, target, attack_class, step_alpha=0.3, num_steps=10, eps=1e-4, clamp=(-2.5, 2.5)):
    """Iterative targeted attack on the (eval-mode) teacher."""
    x = img.detach().clone()
    for _ in range(num_steps):
        x.requires_grad_(True)
        out = teacher(x)["logits"]
        p = F.softmax(out, 1)
        p_y = p.gather(1, target.view(-1, 1))
        p_a = p.gather(1, attack_class.view(-1, 1))
        g = torch.autograd.grad((p_a - p_y).sum(), x)[0]
        alpha = step_alpha * (out.argmax(1) == target).float()
        if alpha.sum() == 0:
            break
        gap = (p_y - p_a).detach().view(-1, 1, 1, 1)
        g_norm = g.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
        x = torch.clamp(x.detach() + alpha.view(-1, 1, 1, 1) * (gap + eps) * g / g_norm, *clamp)
    return x.detach()


def bss_kl(attacked_s, attacked_t, T=3.0, t_squared=False):
    """batchmean KL(p_t || p_s) at temperature T, without T² unless asked."""
    log_p_s = F.log_softmax(attacked_s / T, 1)
    log_p_t = F.log_softmax(attacked_t.detach() / T, 1)
    kl = (log_p_t.exp() * (log_p_t - log_p_s)).sum() / attacked_s.shape[0]
    return kl * (T * T if t_squared else 1.0)


def bss_loss(student, teacher, img, target, epoch, epochs, T=3.0, attack_size=32, u=None, **attack_kw):
    """The term before the recipe's weight: student in train mode, teacher in eval."""
    f = factor(epoch, epochs)
    if f is None:
        return torch.zeros(())
    chosen = select(student(img)["logits"], teacher(img)["logits"], target, attack_size, u)
    if chosen is None:
        return torch.zeros(())
    rows, classes = chosen
    x = attack(teacher, img[rows], target[rows], classes, **attack_kw)
    return bss_kl(student(x)["logits"], teacher(x)["logits"], T) * f


def make():
    pass

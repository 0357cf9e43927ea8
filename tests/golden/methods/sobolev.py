"""Sobolev / Jacobian matching, as KD-Zoo's kd_losses/sobolev.py, at network
level: it needs d logit[y] / d image, which `kd probe loss` cannot feed, so
its fixture is a step fixture (`kd probe step`) on zoo networks from models.py."""
import torch
import torch.nn.functional as F

from gen import step_batch, step_fixture, zoo_net


def input_grad(logits, img, target, create_graph):
    # Gradient of sum_i logits[i, y_i]: per sample in eval mode; in train mode
    # BatchNorm couples the rows, which the reference keeps.
    picked = logits.gather(1, target.view(-1, 1)).sum()
    return torch.autograd.grad(picked, img, create_graph=create_graph)[0]


def sobolev_loss(student, teacher, img, target):
    """MSE of the row-wise L2-normalised, flattened input gradients; the
    teacher's gradient is a constant, the student's keeps its graph."""
    img = img.detach().clone().requires_grad_(True)
    g_s = input_grad(student(img)["logits"], img, target, True)
    g_t = input_grad(teacher(img)["logits"], img, target, False)
    n_s = F.normalize(g_s.flatten(1), p=2, dim=1)
    n_t = F.normalize(g_t.flatten(1), p=2, dim=1).detach()
    return ((n_s - n_t) ** 2).mean()


def step(name, teacher_arch, seeds):
    student, teacher = zoo_net("resnet8", seeds[0]), zoo_net(teacher_arch, seeds[1])
    img, target = step_batch(seeds[2])
    step_fixture(name, "sobolev", {}, student, teacher, img, target,
                 loss_fn=sobolev_loss)


def make():
    step("step_sobolev", "resnet8", (11, 12, 13))
    # A teacher deeper than the student, whose input gradient crosses every
    # ReLU of it (seeds 14 to 19 are refused: a ReLU of that step turns
    # with the evaluation order).
    step("step_sobolev_resnet14", "resnet14", (20, 21, 22))

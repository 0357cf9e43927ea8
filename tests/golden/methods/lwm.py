"""LwM's Grad-CAM attention distillation, as KD-Zoo's kd_losses/lwm.py, at
network level: it needs d logit[y] / d feature map, which `kd probe loss`
cannot feed, so its fixture is a step fixture (`kd probe step`) on zoo
networks from models.py."""
import torch
import torch.nn.functional as F

from gen import step_batch, step_fixture, zoo_net


def grad_cam(taps, tap, target, create_graph, cam):
    fm = taps[tap]
    picked = taps["logits"].gather(1, target.view(-1, 1)).sum()
    g = torch.autograd.grad(picked, fm, create_graph=create_graph)[0]
    weights = g.mean(dim=(2, 3), keepdim=True)          # adaptive_avg_pool2d(g, 1)
    # cam="grad": KD-Zoo multiplies the weights with the gradient again;
    # cam="feature": Grad-CAM as in the paper, weights times the feature map.
    base = g if cam == "grad" else fm
    m = F.relu((weights * base).sum(dim=1, keepdim=True)).flatten(1)
    return F.normalize(m, p=2, dim=1)


def lwm_loss(student, teacher, img, target, tap="feat/2", cam="grad"):
    """Mean absolute difference of the normalised CAMs, teacher's detached."""
    cam_s = grad_cam(student(img), tap, target, True, cam)
    cam_t = grad_cam(teacher(img), tap, target, False, cam).detach()
    return (cam_s - cam_t).abs().mean()


def step(name, teacher_arch, seeds):
    student, teacher = zoo_net("resnet8", seeds[0]), zoo_net(teacher_arch, seeds[1])
    img, target = step_batch(seeds[2])
    params = {"tap": "feat/2", "cam": "grad"}
    step_fixture(name, "lwm", params, student, teacher, img, target,
                 loss_fn=lambda s, t, x, y: lwm_loss(s, t, x, y, **params))


def make():
    step("step_lwm", "resnet8", (21, 22, 23))
    # A teacher deeper than the student: its stages have blocks before the
    # last, and the gradient reaching feat/2 crosses more ReLUs.
    step("step_lwm_resnet14", "resnet14", (24, 25, 26))

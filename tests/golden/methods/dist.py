"""DIST, as the authors' dist_kd.py (hunto/image_classification_sota
lib/models/losses/dist_kd.py): tau^2 * (beta * inter + gamma * intra), where
inter = 1 - mean row-wise Pearson correlation of softmax(z / tau) over the
classes and intra the same over the batch (the transposed matrices)."""
import torch

from gen import fixture, resnet_taps


def pearson(a, b, eps=1e-8):
    a = a - a.mean(1, keepdim=True)
    b = b - b.mean(1, keepdim=True)
    return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1) + eps)


def relation(y_s, y_t):
    return 1 - pearson(y_s, y_t).mean()


def make():
    settings = [
        ("dist", dict(beta=1.0, gamma=1.0, tau=1.0), 10),
        ("dist_t4", dict(beta=1.0, gamma=1.0, tau=4.0), 10),
        ("dist_weights_c100", dict(beta=2.0, gamma=0.5, tau=4.0), 100),
    ]
    for k, (name, p, classes) in enumerate(settings):
        s, t = resnet_taps(8, 11 + 2 * k, classes=classes), resnet_taps(8, 12 + 2 * k, classes=classes)
        target = t["logits"].argmax(1)

        def loss(s, t, y, idx, cidx, mod, p=p):
            y_s = (s["logits"] / p["tau"]).softmax(dim=1)
            with torch.no_grad():
                y_t = (t["logits"] / p["tau"]).softmax(dim=1)
            inter = p["tau"] ** 2 * relation(y_s, y_t)
            intra = p["tau"] ** 2 * relation(y_s.transpose(0, 1), y_t.transpose(0, 1))
            return p["beta"] * inter + p["gamma"] * intra

        fixture(name, "dist", p, {"logits": s["logits"]}, {"logits": t["logits"]}, target, loss_fn=loss)

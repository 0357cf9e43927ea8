"""timm's outputs for the transformers of kd's zoo (ViT, DeiT, Swin), for
tests/vit.rs.

For every case, a model built by `timm.create_model` with the same keyword
arguments as kd's model name, moved off its initialisation (every parameter
shifted by noise, so LayerNorm weights are not 1 and the class token is not
~0), evaluated in eval mode on a random batch. Writes, per case `i`:
  i.weights.safetensors  the state_dict kd loads (i.weights.pth for
                         `original:` sources)
  i.input.safetensors    `input`
  i.expect.safetensors   `logits`, `cls`, `tokens/<last>` (and `dist`,
                         `logits_dist` for distilled DeiTs); for Swin
                         `logits`, `embed`, `feat/0..4` and `tokens/<last>`
and cases.txt, a line `i<TAB>kd model name<TAB>weights file` per case.

Resample cases load weights made for 224 px into a model for another
image, patch or window size through timm's own `checkpoint_filter_fn`
(`pos_embed` resampled, the patch kernel pseudo-inverse resized, Swin's
relative position tables re-gridded). A source named `original:NAME` is
saved in Microsoft's Swin layout instead (merging at the end of a stage,
`head.weight`, the index and mask buffers), with `torch.save` under
`model`, as the Swin repository's checkpoints are.
"""
import pathlib
import re
import sys
import warnings

import timm
import torch
from safetensors.torch import save_file
from timm.models import swin_transformer, vision_transformer
from timm.models.swin_transformer import SwinTransformer

OUT = pathlib.Path(sys.argv[1])
# timm's bias-table interpolator trips two PyTorch deprecation notices.
warnings.filterwarnings("ignore", category=UserWarning, module="timm.layers.interpolate")
CLASSES = 10

CASES = [
    # (kd name, image size of the batch, name whose weights are loaded or None)
    ("vit_tiny_patch16_224", 224, None),
    ("deit_tiny_distilled_patch16_224", 224, None),
    ("vit_small_patch16_224(depth=2)", 224, None),
    ("vit_base_patch16_224(depth=2,img_size=64)", 64, None),
    ("deit_tiny_patch16_224(img_size=32,patch_size=4,depth=3)", 32, None),
    ("deit_small_patch16_224(depth=2,img_size=48)", 48, None),
    ("deit_base_patch16_224(depth=1,img_size=32)", 32, None),
    ("deit_small_distilled_patch16_224(depth=2,img_size=32,patch_size=4)", 32, None),
    ("deit_base_distilled_patch16_224(depth=1,img_size=64)", 64, None),
    ("vit_tiny_patch16_224(depth=2,img_size=64)", 64, "vit_tiny_patch16_224(depth=2)"),
    ("deit_tiny_distilled_patch16_224(depth=2,img_size=96)", 96,
     "deit_tiny_distilled_patch16_224(depth=2)"),
    # Swin-T as timm builds it: 56, 28, 14, 7 tokens a side, 7x7 windows.
    ("swin_tiny_patch4_window7_224", 224, None),
    # CIFAR-sized: 16, 8, 4, 2 tokens a side; shifted windows in stages 0-1,
    # whole-map windows (no shift) in stages 2-3.
    ("swin_tiny_patch4_window7_224(img_size=32,patch_size=2,window_size=4)", 32, None),
    ("swin_tiny_patch4_window7_224(img_size=32,window_size=4)", 32, None),
    # Maps the window does not divide (16 and 8 padded to 21 and 14, the
    # shift mask over the padded map) ...
    ("swin_tiny_patch4_window7_224(img_size=32,patch_size=2)", 32, None),
    # ... and an odd map before merging (12, 6, 3 padded to 4, 2).
    ("swin_tiny_patch4_window7_224(img_size=48,embed_dim=48,window_size=7)", 48, None),
    # Swin-S and Swin-B at CIFAR size: their depths, widths and heads.
    ("swin_small_patch4_window7_224(img_size=32,window_size=4)", 32, None),
    ("swin_base_patch4_window7_224(img_size=32,window_size=4)", 32, None),
    # 224-px weights at CIFAR size: the patch kernel 16 -> 4 and pos_embed
    # 14x14 -> 8x8 ...
    ("vit_tiny_patch16_224(depth=2,img_size=32,patch_size=4)", 32, "vit_tiny_patch16_224(depth=2)"),
    ("deit_tiny_distilled_patch16_224(depth=2,img_size=32,patch_size=4)", 32,
     "deit_tiny_distilled_patch16_224(depth=2)"),
    # ... a Swin's patch 4 -> 2 and windows 7 -> 4 (tables 13 -> 7, and
    # 13 -> 3 in the last stage, whose 2x2 map is its window) ...
    ("swin_tiny_patch4_window7_224(img_size=32,patch_size=2,window_size=4)", 32,
     "swin_tiny_patch4_window7_224"),
    # ... a larger window (tables 13 -> 15: the offsets spread out) ...
    ("swin_tiny_patch4_window7_224(img_size=64,window_size=8)", 64, "swin_tiny_patch4_window7_224"),
    # ... and the Swin repository's own checkpoint layout.
    ("swin_tiny_patch4_window7_224(img_size=32,window_size=4)", 32,
     "original:swin_tiny_patch4_window7_224"),
]


def parse(name):
    m = re.fullmatch(r"([\w]+)(?:\((.*)\))?", name)
    kwargs = {}
    for kv in filter(None, (m.group(2) or "").split(",")):
        k, v = kv.split("=")
        kwargs[k] = float(v) if "." in v else int(v)
    return m.group(1), kwargs


def create(name):
    base, kwargs = parse(name)
    return timm.create_model(base, pretrained=False, num_classes=CLASSES, **kwargs)


def off_init(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return model


def vit_expect(model, x):
    """Logits, the class token and the last block's tokens (and the
    distillation token and head's logits for distilled DeiTs)."""
    tokens = model.forward_features(x)
    logits = model(x)
    expect = {"logits": logits, "cls": tokens[:, 0]}
    last = len(model.blocks) - 1
    # Tokens before the final norm: run the blocks by hand.
    t = model._pos_embed(model.patch_embed(x))
    for blk in model.blocks:
        t = blk(t)
    expect[f"tokens/{last}"] = t
    if hasattr(model, "head_dist"):
        expect["dist"] = tokens[:, 1]
        expect["logits_dist"] = model.head_dist(tokens[:, 1])
    return expect


def swin_expect(model, x):
    """Logits, pooled features, stage maps (NCHW) and the last block's tokens."""
    feats = model.patch_embed(x)
    expect = {"feat/0": feats.permute(0, 3, 1, 2)}
    blocks = 0
    for k, stage in enumerate(model.layers):
        feats = stage(feats)
        blocks += len(stage.blocks)
        expect[f"feat/{k + 1}"] = feats.permute(0, 3, 1, 2)
    expect[f"tokens/{blocks - 1}"] = feats.flatten(1, 2).clone()
    features = model.forward_features(x)
    expect["embed"] = model.forward_head(features, pre_logits=True)
    expect["logits"] = model(x)
    return expect


def original_layout(model, state):
    """Microsoft's Swin layout of timm's `state`: patch merging closing
    stage i-1 instead of opening stage i, `head.fc` as `head`, and the
    buffers timm no longer saves."""
    out = {}
    for k, v in state.items():
        m = re.match(r"layers\.(\d+)\.downsample\.(.*)", k)
        if m:
            k = f"layers.{int(m.group(1)) - 1}.downsample.{m.group(2)}"
        out[k.replace("head.fc.", "head.")] = v
    for k, v in model.named_buffers():
        if k.endswith(("relative_position_index", "attn_mask")):
            out[k] = v
    return out


def main():
    OUT.mkdir(parents=True, exist_ok=True)
    lines = []
    for i, (name, size, source) in enumerate(CASES):
        torch.manual_seed(100 + i)
        model = create(name).eval()
        swin = isinstance(model, SwinTransformer)
        weights = OUT / f"{i}.weights.safetensors"
        if source is None:
            off_init(model, i)
            state = model.state_dict()
        else:
            original = source.startswith("original:")
            source_model = off_init(create(source.removeprefix("original:")), i)
            state = source_model.state_dict()
            if original:
                state = original_layout(source_model, state)
                weights = OUT / f"{i}.weights.pth"
            module = swin_transformer if swin else vision_transformer
            model.load_state_dict(module.checkpoint_filter_fn(dict(state), model))
        x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(i))
        with torch.no_grad():
            expect = (swin_expect if swin else vit_expect)(model, x)
        if weights.suffix == ".pth":
            torch.save({"model": state, "epoch": 300}, weights)
        else:
            save_file({k: v.contiguous() for k, v in state.items()}, weights)
        save_file({"input": x}, OUT / f"{i}.input.safetensors")
        save_file({k: v.contiguous() for k, v in expect.items()}, OUT / f"{i}.expect.safetensors")
        lines.append(f"{i}\t{name}\t{weights.name}")
    (OUT / "cases.txt").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()

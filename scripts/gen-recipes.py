"""Writes one recipe per method: the reference setting on CIFAR-100
(Knowledge-Distillation-Zoo's pair resnet110 -> resnet20, its schedule and its
loss weight λ, loss = CE + λ·method) and the same on the embedded synthetic
set, where a small teacher is trained first (DML: both networks start
untrained, as in KD-Zoo's train_dml.py). Run from the repository root:
python3 scripts/gen-recipes.py"""
import pathlib

# method: (λ, config overrides as Rhai map text or "", init stage kind, paper)
METHODS = {
    "logits": (0.1, "", None, "Ba & Caruana 2014, logit regression"),
    "st": (0.1, "#{ T: 4.0 }", None, "Hinton et al. 2015, soft targets"),
    "at": (1000.0, "#{ p: 2.0 }", None, "Zagoruyko & Komodakis 2017, attention transfer"),
    "fitnet": (0.1, "", None, "Romero et al. 2015, hints"),
    "nst": (10.0, "", None, "Huang & Wang 2017, neuron selectivity transfer"),
    "pkt": (10000.0, "", None, "Passalis & Tefas 2018, probabilistic knowledge transfer"),
    "fsp": (1.0, "", "fsp", "Yim et al. 2017, flow of solution procedure"),
    "ft": (200.0, "#{ k: 0.5 }", "ft", "Kim et al. 2018, factor transfer"),
    "rkd": (1.0, "#{ w_dist: 25.0, w_angle: 50.0 }", None, "Park et al. 2019, relational KD"),
    "ab": (10.0, "#{ m: 2.0 }", "ab", "Heo et al. 2019, activation boundaries"),
    "sp": (3000.0, "", None, "Tung & Mori 2019, similarity preserving"),
    "sobolev": (20.0, "", None, "Czarnecki et al. 2017, Sobolev training"),
    "bss": (2.0, "#{ T: 3.0, attack_size: 32 }", None, "Heo et al. 2019, boundary supporting samples"),
    "cc": (100.0, "#{ gamma: 0.4, P_order: 2 }", None, "Peng et al. 2019, correlation congruence"),
    "lwm": (0.4, "", None, "Dhar et al. 2019, learning without memorizing (Grad-CAM)"),
    "irg": (1.0, "#{ w_irg_vert: 0.1, w_irg_edge: 5.0, w_irg_tran: 5.0 }", None, "Liu et al. 2019, instance relationship graph"),
    "vid": (1.0, "#{ init_var: 5.0 }", None, "Ahn et al. 2019, variational information distillation"),
    "ofd": (0.5, "", None, "Heo et al. 2019, overhaul of feature distillation"),
    "afd": (500.0, "#{ att_f: 1.0 }", None, "Wang et al. 2020, attention feature distillation"),
    "crd": (0.8, "#{ feat_dim: 128, nce_n: 16384, nce_t: 0.1, nce_mom: 0.5 }", None, "Tian et al. 2020, contrastive representation distillation"),
    "dml": (1.0, "", None, "Zhang et al. 2018, deep mutual learning"),
}

def method_call(name, cfg, weight):
    inner = f'method("{name}", {cfg})' if cfg else f'method("{name}")'
    return f"{inner}.weight({weight})"

def init_stages(kind, epochs_expr, small):
    """The init stage of FSP/AB (train the student on the method loss alone)
    and FT (train only the paraphraser on the frozen teacher)."""
    if kind in ("fsp", "ab"):
        w = 1.0 if kind == "fsp" else 10.0
        ms = "" if small else ".multistep([30, 40], 0.1)"
        return (f'    // KD-Zoo: {epochs_expr} init epochs on the {kind} loss alone, then λ = 0,\n'
                f'    // one optimiser throughout{" (train_kd.py)" if not small else ""}: the momentum carries over.\n'
                f'    .add(stage("init", {epochs_expr}).train(["network"])\n'
                f'        .sgd(#{{ lr: 0.01, momentum: 0.9, nesterov: true, weight_decay: 1e-4 }}){ms}\n'
                f'        .add(method("{kind}").weight({w})))\n')
    if kind == "ft":
        why = "" if small else ",\n    // for 30 epochs (train_ft.py: `train_para(..., 30)`)"
        return (f'    // KD-Zoo: the paraphraser learns to reconstruct the teacher\'s map first{why}.\n'
                f'    .add(stage("paraphraser", {epochs_expr}).train(["methods"])\n'
                f'        .sgd(#{{ lr: 0.01, momentum: 0.9, nesterov: false, weight_decay: 1e-4 }})\n'
                f'        .add(method("ft", #{{ phase: "paraphraser", k: 0.5 }})))\n')
    return ""

# A stage after an init stage that continues its optimiser (KD-Zoo's AB and
# FSP train both stages with one torch.optim.SGD).
KEEP = {"fsp", "ab"}

def cifar(name, lam, cfg, kind, paper):
    if name == "dml":
        return CIFAR_DML
    main = 'method("ce")' if kind in ("fsp", "ab") else f'method("ce"))\n        .add({method_call(name, cfg, lam)}'
    init = init_stages(kind, f'param("init_epochs", {30 if kind == "ft" else 50})', False)
    keep = ".keep_optimizer()" if kind in KEEP else ""
    return f'''// {name}: {paper}.
// Knowledge-Distillation-Zoo's setting: CIFAR-100, resnet110 -> resnet20,
// 200 epochs, batch 128, Nesterov SGD lr 0.1 x0.1 at 100/150, weight decay
// 1e-4, seed 2; loss = CE + {lam} * {name}. Needs the CIFAR-100 binary files
// and a trained resnet110 teacher:
//
//     kd run {{this file}} --set data=/data/cifar-100-binary --set teacher=runs/.../train.best.safetensors

import "lib/cifar100_schedule" as schedule;

let x = experiment("{name}_resnet20_from_resnet110")
    .seed(param("seed", 2))
    .data(schedule::kdzoo_data(param("data", "data/cifar-100-binary")))
    .teacher("resnet110", param("teacher", "runs/teachers/resnet110_cifar100.safetensors"))
    .student("resnet20")
{init}    .add(schedule::kdzoo(stage("distill", 200)){keep}
        .add({main}));

run(x);
'''

CIFAR_DML = '''// dml: Zhang et al. 2018, deep mutual learning.
// Knowledge-Distillation-Zoo's setting: CIFAR-100, resnet110 and resnet20
// trained together from scratch, 200 epochs, batch 128, Nesterov SGD lr 0.1
// x0.1 at 100/150, weight decay 1e-4, seed 2; loss = CE + 1.0 * dml for each
// network. The peer (the plan's "teacher") starts untrained, as in
// train_dml.py (`--net1_init initial_r110.pth.tar`: initial weights) and the
// paper; a trained one would make this online distillation from a
// pretrained network. Needs the CIFAR-100 binary files:
//
//     kd run {this file} --set data=/data/cifar-100-binary

import "lib/cifar100_schedule" as schedule;

let x = experiment("dml_resnet20_from_resnet110")
    .seed(param("seed", 2))
    .data(schedule::kdzoo_data(param("data", "data/cifar-100-binary")))
    .teacher("resnet110")
    .student("resnet20")
    .add(schedule::kdzoo(stage("distill", 200))
        .add(method("ce"))
        .add(method("dml").weight(1.0)));

run(x);
'''

# On 2500 synthetic samples and a few epochs: fewer negatives than samples,
# and BSS attacks from the second epoch instead of the tenth.
SYNTHETIC_CONFIG = {
    "crd": "#{ feat_dim: 128, nce_n: 1024, nce_t: 0.1, nce_mom: 0.5 }",
    "bss": "#{ T: 3.0, attack_size: 32, warmup_epochs: 1 }",
}

def synthetic(name, lam, cfg, kind, paper):
    if name == "dml":
        return SYNTHETIC_DML
    cfg = SYNTHETIC_CONFIG.get(name, cfg)
    keep = ".keep_optimizer()" if kind in KEEP else ""
    main = 'method("ce")' if kind in ("fsp", "ab") else f'method("ce"))\n        .add({method_call(name, cfg, lam)}'
    init = init_stages(kind, 'param("init_epochs", 2)', True)
    return f'''// {name}: {paper}, on the embedded synthetic set: a resnet20 teacher
// trained first, then distilled into resnet8 with the reference weight
// (loss = CE + {lam} * {name}). A few CPU minutes:
//
//     kd run {{this file}} --set epochs=2

let epochs = param("epochs", 6);

let x = experiment("{name}_resnet8_from_resnet20_synthetic")
    .seed(param("seed", 0))
    .data(synthetic(#{{ train_size: param("train_size", 2500), test_size: 500 }}))
    .teacher("resnet20")
    .student("resnet8")
    .add(teacher_stage("teacher", epochs).add(method("ce")).cosine_lr(0))
{init}    .add(stage("distill", epochs){keep}
        .add({main})
        .cosine_lr(0));

let r = run(x);
print(`{name}: student best top-1 ${{r.best}}, last ${{r.last}}`);
'''

SYNTHETIC_DML = '''// dml: Zhang et al. 2018, deep mutual learning, on the embedded synthetic set:
// resnet20 and resnet8 trained together from scratch, each on
// CE + 1.0 * dml towards the other (the peer starts untrained, as in
// KD-Zoo's train_dml.py and the paper). A few CPU minutes:
//
//     kd run {this file} --set epochs=2

let epochs = param("epochs", 6);

let x = experiment("dml_resnet8_from_resnet20_synthetic")
    .seed(param("seed", 0))
    .data(synthetic(#{ train_size: param("train_size", 2500), test_size: 500 }))
    .teacher("resnet20")
    .student("resnet8")
    .add(stage("distill", epochs)
        .add(method("ce"))
        .add(method("dml").weight(1.0))
        .cosine_lr(0));

let r = run(x);
print(`dml: student best top-1 ${r.best}, last ${r.last}`);
'''

root = pathlib.Path("recipes")
for name, (lam, cfg, kind, paper) in METHODS.items():
    for folder, fn, text in [("cifar100", "resnet20_from_resnet110.rhai", cifar), ("synthetic", "resnet8_from_resnet20.rhai", synthetic)]:
        path = root / folder / name / fn
        path.parent.mkdir(parents=True, exist_ok=True)
        body = text(name, lam, cfg, kind, paper).replace("{this file}", str(path))
        path.write_text(body)
print(f"wrote {2 * len(METHODS)} recipes")

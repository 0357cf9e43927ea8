"""Turns a `python:` model spec into a TorchScript file that kd loads.

    python script_spec.py SPEC OUT

SPEC is `FILE.py:CALL` or `package.module:CALL`, CALL a class or function
name, optionally with literal arguments: `models.py:Net(width=2)`,
`torchvision.models:mobilenet_v3_small(num_classes=10)`. A suffix
`[TAP=NODE,...]` names taps by submodule path, as torchdistill does:
`torchvision.models:resnet18(num_classes=10)[feat/1=layer2,embed=flatten]`;
the module is then wrapped by torchvision's feature extractor (torch.fx),
which returns those nodes' outputs by tap name, and the model's output as
`logits`. The module is built here, compiled with `torch.jit.script` and
saved to OUT. A mistake prints one line on stderr and exits 2.
"""
import ast
import importlib
import importlib.util
import pathlib
import sys


def fail(msg):
    print(msg, file=sys.stderr)
    sys.exit(2)


def resolve(spec):
    target, sep, call = spec.partition(":")
    if not sep or not target or not call:
        fail(f"`{spec}` is not FILE.py:NAME or package.module:NAME (with optional (arguments))")
    try:
        tree = ast.parse(call, mode="eval").body
    except SyntaxError:
        fail(f"`{call}` is not NAME or NAME(literal arguments)")
    args, kwargs = [], {}
    if isinstance(tree, ast.Call):
        try:
            args = [ast.literal_eval(a) for a in tree.args]
            kwargs = {k.arg: ast.literal_eval(k.value) for k in tree.keywords}
        except ValueError:
            fail(f"`{call}`: arguments must be literals (numbers, strings, lists, ...)")
        tree = tree.func
    if not isinstance(tree, ast.Name):
        fail(f"`{call}` is not NAME or NAME(literal arguments)")
    if target.endswith(".py"):
        path = pathlib.Path(target)
        if not path.is_file():
            fail(f"{target}: no such file")
        sys.path.insert(0, str(path.resolve().parent))
        loader = importlib.util.spec_from_file_location(path.stem, path)
        module = importlib.util.module_from_spec(loader)
        try:
            loader.loader.exec_module(module)
        except Exception as e:  # the user's file: its own error, on one line
            fail(f"{target}: {type(e).__name__}: {e}")
    else:
        try:
            module = importlib.import_module(target)
        except ImportError as e:
            fail(f"cannot import `{target}`: {e}")
    if not hasattr(module, tree.id):
        names = sorted(n for n in dir(module) if not n.startswith("_"))
        fail(f"`{target}` has no `{tree.id}`; it has: {', '.join(names[:40])}")
    return getattr(module, tree.id), args, kwargs


def split_taps(spec):
    """`SPEC[TAP=NODE,...]` -> (SPEC, {NODE: TAP}); no suffix -> (SPEC, None)."""
    if not spec.endswith("]") or "[" not in spec:
        return spec, None
    at = spec.rindex("[")
    nodes = {}
    for pair in filter(None, (p.strip() for p in spec[at + 1:-1].split(","))):
        tap, sep, node = pair.partition("=")
        if not sep or not tap or not node:
            fail(f"`{pair}` in `{spec[at:]}` is not TAP=MODULE.PATH (e.g. feat/1=layer2)")
        nodes[node.strip()] = tap.strip()
    return spec[:at], nodes


def tapped(net, nodes, spec):
    """`net` returning a dict: the named nodes' outputs, and its own as `logits`."""
    from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names

    _, eval_nodes = get_graph_node_names(net)
    if "logits" not in nodes.values():
        nodes = dict(nodes, **{eval_nodes[-1]: "logits"})
    try:
        return create_feature_extractor(net, return_nodes=nodes)
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        fail(f"{spec}: cannot tap it: {first}")


def main(spec, out):
    import torch

    spec, nodes = split_taps(spec)
    make, args, kwargs = resolve(spec)
    try:
        net = make(*args, **kwargs)
    except Exception as e:
        fail(f"{spec}: {type(e).__name__}: {e}")
    if not isinstance(net, torch.nn.Module):
        fail(f"{spec} made a {type(net).__name__}, not a torch.nn.Module")
    if nodes is not None:
        net = tapped(net, nodes, spec)
    try:
        scripted = torch.jit.script(net)
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        fail(f"{spec}: torch.jit.script cannot compile it: {first}")
    scripted.save(out)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])

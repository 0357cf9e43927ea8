"""kd's side of the embedded interpreter: builds the user's PyTorch modules
and runs them on kd's tensors, in kd's process.

kd calls `dispatch(func, text, handles)`: `text` is a JSON object of
arguments, `handles` capsules holding the `TensorImpl` addresses of kd's
tensors (wrapped here as the very same tensors, autograd intact). Every
function answers (ok, text, tensors, handles): a JSON text, or a one-line
error when `ok` is false, and the tensors kd takes references to, with
their handles.

A spec is `FILE.py:CALL` or `package.module:CALL`, CALL a class or function
name with optional literal arguments (`models.py:Net(width=2)`,
`torchvision.models:mobilenet_v3_small(num_classes=10)`). A suffix
`[TAP=PATH,...]` names taps by submodule path, read with forward hooks
(the module's output) or, for `TAP=PATH:in`, forward-pre hooks (its input),
as torchdistill does: `torchvision.models:resnet18()[feat/1=layer2]`.
"""
import ast
import importlib
import importlib.util
import json
import pathlib
import sys
import traceback

try:
    import torch
except ImportError as e:
    raise ImportError(
        f"kd's embedded Python ({sys.executable}) cannot import torch: {e}; set VIRTUAL_ENV to the venv kd was built with (source scripts/env.sh)"
    ) from None

_wrap = torch._C._wrap_tensor_impl
_handle = torch._C._tensor_impl_raw_handle

_modules = {}
_next_id = [0]


class SpecError(Exception):
    """A mistake in what the user asked for: reported as is."""


def resolve(spec):
    target, sep, call = spec.partition(":")
    if not sep or not target or not call:
        raise SpecError(f"`{spec}` is not FILE.py:NAME or package.module:NAME (with optional (arguments))")
    try:
        tree = ast.parse(call, mode="eval").body
    except SyntaxError:
        raise SpecError(f"`{call}` is not NAME or NAME(literal arguments)") from None
    args, kwargs = [], {}
    if isinstance(tree, ast.Call):
        try:
            args = [ast.literal_eval(a) for a in tree.args]
            kwargs = {k.arg: ast.literal_eval(k.value) for k in tree.keywords}
        except ValueError:
            raise SpecError(f"`{call}`: arguments must be literals (numbers, strings, lists, ...)") from None
        tree = tree.func
    if not isinstance(tree, ast.Name):
        raise SpecError(f"`{call}` is not NAME or NAME(literal arguments)")
    if target.endswith(".py"):
        path = pathlib.Path(target).resolve()
        if not path.is_file():
            raise SpecError(f"{target}: no such file")
        if str(path.parent) not in sys.path:
            sys.path.insert(0, str(path.parent))
        # A fresh module object per load: a file edited between two runs of
        # one process (a sweep) is read again.
        loader = importlib.util.spec_from_file_location(f"kd_user_{path.stem}", path)
        module = importlib.util.module_from_spec(loader)
        try:
            loader.loader.exec_module(module)
        except Exception as e:
            raise SpecError(f"{target}: {last_line(e)}") from None
    else:
        try:
            module = importlib.import_module(target)
        except ImportError as e:
            raise SpecError(f"cannot import `{target}`: {e}") from None
    if not hasattr(module, tree.id):
        names = sorted(n for n in dir(module) if not n.startswith("_"))
        raise SpecError(f"`{target}` has no `{tree.id}`; it has: {', '.join(names[:40])}")
    return getattr(module, tree.id), args, kwargs


def split_taps(spec):
    """`SPEC[TAP=PATH,...]` -> (SPEC, [(TAP, PATH, is_input)]); no suffix -> (SPEC, [])."""
    if not spec.endswith("]") or "[" not in spec:
        return spec, []
    at = spec.rindex("[")
    taps = []
    for pair in filter(None, (p.strip() for p in spec[at + 1:-1].split(","))):
        tap, sep, path = pair.partition("=")
        if not sep or not tap or not path:
            raise SpecError(f"`{pair}` in `{spec[at:]}` is not TAP=MODULE.PATH (e.g. feat/1=layer2)")
        path, is_input = (path[:-3], True) if path.endswith(":in") else (path, False)
        taps.append((tap.strip(), path.strip(), is_input))
    return spec[:at], taps


def last_line(e):
    """The traceback's last line, and where in the user's code it was raised."""
    line = traceback.format_exception_only(type(e), e)[-1].strip()
    frames = traceback.extract_tb(e.__traceback__)
    if frames:
        f = frames[-1]
        line += f" (at {pathlib.Path(f.filename).name}:{f.lineno})"
    return line


class Loaded:
    def __init__(self, module, taps, device):
        self.module = module
        self.device = device
        self.seen = {}
        names = dict(module.named_modules())
        for tap, path, is_input in taps:
            if path not in names:
                near = [n for n in names if n and n.split(".")[0] == path.split(".")[0]][:8]
                raise SpecError(
                    f"no submodule `{path}` to tap as `{tap}`"
                    + (f"; near it: {', '.join(near)}" if near else f"; top level: {', '.join(n for n in names if n and '.' not in n)}")
                )
            # A module called twice in one forward (a shared ReLU) gives
            # its last call.
            if is_input:
                names[path].register_forward_pre_hook(lambda m, i, tap=tap: self.seen.__setitem__(tap, i[0]))
            else:
                names[path].register_forward_hook(lambda m, i, o, tap=tap: self.seen.__setitem__(tap, o))

    def forward(self, x):
        self.seen = {}
        out = self.module(x)
        if isinstance(out, torch.Tensor):
            out = {"logits": out}
        elif isinstance(out, dict):
            bad = [k for k, v in out.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
            if bad:
                raise SpecError(f"forward returned a dict with the entry {bad[0]!r} that is not str -> Tensor; kd reads Dict[str, Tensor]")
        else:
            raise SpecError(
                f"forward returned a {type(out).__name__}; kd reads the logits (a Tensor) or a Dict[str, Tensor] holding \"logits\""
            )
        out = dict(out, **self.seen)
        self.seen = {}
        for k, v in out.items():
            if not isinstance(v, torch.Tensor):
                raise SpecError(f"tap `{k}` is a {type(v).__name__}, not a Tensor")
            if v.device != self.device:
                raise SpecError(
                    f"forward returned `{k}` on {v.device}, but kd runs this module on {self.device}: something in the module stays on another device"
                )
        return out


def load(args, tensors):
    spec, taps = split_taps(args["spec"])
    make, a, kw = resolve(spec)
    try:
        net = make(*a, **kw)
    except SpecError:
        raise
    except Exception as e:
        raise SpecError(f"{spec}: {last_line(e)}") from None
    if not isinstance(net, torch.nn.Module):
        raise SpecError(f"{spec} made a {type(net).__name__}, not a torch.nn.Module")
    device = torch.device(args["device"])
    net.to(device)
    loaded = Loaded(net, taps, device)
    _next_id[0] += 1
    _modules[_next_id[0]] = loaded
    # Parameters, then the buffers a state_dict holds (not the
    # non-persistent ones), under state_dict names.
    saved = set(net.state_dict().keys())
    params = list(net.named_parameters())
    buffers = [(n, b) for n, b in net.named_buffers() if n in saved]
    names = [n for n, _ in params] + [n for n, _ in buffers]
    return {"id": _next_id[0], "names": names, "parameters": len(params)}, [t for _, t in params + buffers]


def train(args, tensors):
    _modules[args["id"]].module.train(args["on"])
    return {}, []


def forward(args, tensors):
    out = _modules[args["id"]].forward(tensors[0])
    return {"names": list(out)}, list(out.values())


def loss(args, tensors):
    m = _modules[args["id"]]
    ns, nt = args["student"], args["teacher"]
    s = dict(zip(ns, tensors[: len(ns)]))
    t = dict(zip(nt, tensors[len(ns): len(ns) + len(nt)]))
    out = m.module(s, t, tensors[-1])
    if isinstance(out, torch.Tensor):
        out = {"loss": out}
    elif not isinstance(out, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in out.items()):
        raise SpecError(f"the loss returned a {type(out).__name__}; kd reads a scalar Tensor or a Dict[str, Tensor] of terms")
    return {"names": list(out)}, list(out.values())


def drop(args, tensors):
    _modules.pop(args["id"], None)
    return {}, []


_FUNCS = {f.__name__: f for f in (load, train, forward, loss, drop)}


def dispatch(func, text, handles):
    try:
        tensors = [_wrap(h) for h in handles]
        reply, out = _FUNCS[func](json.loads(text), tensors)
        return True, json.dumps(reply), out, [_handle(t) for t in out]
    except SpecError as e:
        return False, str(e), [], []
    except Exception as e:
        return False, last_line(e), [], []

"""Write statecli/_torch_classes.py: the torch classes whose instantiation by a pickle is inert.

    python tests/allowlist/make_allowlist.py          # rewrite the file from the installed torch
    python tests/allowlist/make_allowlist.py --check  # exit 1 if the file differs from what torch gives

A whole pickled model makes each of its modules with NEWOBJ (``cls.__new__(cls)``) and BUILD
(``cls.__setstate__(state)``). For the classes listed, torch's own code for those is plain attribute
setting (``nn.Module.__setstate__``) or tensor maths (quantized modules repack their weights), so
statecli reports them as information, not danger. The list is every ``nn.Module`` subclass (and every
``torch.distributions`` distribution, transform and constraint) defined in torch whose ``__new__``,
``__setstate__``, ``__reduce__``/``__reduce_ex__``, ``__del__`` and container methods (``__setitem__``,
``append``, ``extend``: SETITEMS/APPENDS call them) are ``nn.Module``'s own (or ``object``'s),
plus the overrides reviewed by hand in REVIEWED (they set defaults or repack tensors), plus the
non-module classes in EXTRA (hooks, quantization configs, optimizers, DCP metadata), less EXCLUDED
(``__new__``/``__reduce__`` that run generated code, ``__setstate__`` that reaches a process group, or
methods that run code named by their state when an inert-class gadget calls the object at load).
"""

from __future__ import annotations

import importlib
import inspect
import sys
import warnings
from pathlib import Path

OUT = Path(__file__).resolve().parents[2] / "statecli" / "_torch_classes.py"

MODULES = [
    "torch.nn", "torch.ao.nn.quantized", "torch.ao.nn.quantized.dynamic", "torch.ao.nn.quantized.reference",
    "torch.ao.nn.quantizable", "torch.ao.nn.qat", "torch.ao.nn.qat.dynamic", "torch.ao.nn.intrinsic",
    "torch.ao.nn.intrinsic.qat", "torch.ao.nn.intrinsic.quantized", "torch.ao.nn.intrinsic.quantized.dynamic",
    "torch.ao.nn.sparse", "torch.ao.nn.sparse.quantized", "torch.ao.nn.sparse.quantized.dynamic",
    "torch.ao.quantization", "torch.ao.quantization.observer", "torch.ao.quantization.fake_quantize",
    "torch.ao.quantization.stubs", "torch.nn.utils.parametrize", "torch.nn.utils.parametrizations",
    "torch.nn.utils.spectral_norm", "torch.nn.utils.weight_norm", "torch.nn.quantized", "torch.nn.intrinsic",
    "torch.nn.qat", "torch.optim", "torch.optim.lr_scheduler", "torch.optim.swa_utils",
]  # fmt: skip
# What pickle would call on an instance it makes: anything here other than nn.Module's own needs review.
SPECIAL = ("__new__", "__setstate__", "__reduce__", "__reduce_ex__", "__del__", "__setitem__", "append", "extend")
# Overrides read and found inert: they set attribute defaults after Module.__setstate__, or repack tensors
# (quantized conv/linear call torch.ops.quantized.*_prepack on the state's tensors).
REVIEWED = {
    "__setstate__": ("_ConvNd", "RNNBase", "MultiheadAttention", "Softmax", "Softmin", "LogSoftmax", "AvgPool3d",
                     "Upsample", "TransformerEncoderLayer", "TransformerDecoderLayer", "LinearPackedParams",
                     "Optimizer", "Adam", "AdamW", "SGD", "RMSprop", "Adagrad", "Adadelta", "Adamax", "NAdam",
                     "RAdam", "ASGD", "Rprop", "LBFGS", "SparseAdam", "Adafactor", "Muon"),
    "__setitem__": ("Sequential", "ModuleList", "ModuleDict", "ParameterList", "ParameterDict"),
    "append": ("Sequential", "ModuleList", "ParameterList"),
    "extend": ("Sequential", "ModuleList", "ParameterList"),
}  # fmt: skip
EXCLUDED = {
    "torch.fx.graph_module.GraphModule": "__reduce__ execs generated Python source",
    "torch.fx._lazy_graph_module._LazyGraphModule": "__reduce__ execs generated Python source",
    "torch.fx.experimental.const_fold.FoldedGraphModule": "__reduce__ execs generated Python source",
    "torch.distributed.nn.api.remote_module.RemoteModule": "__new__/__setstate__ reach RPC",
    "torch.distributed.nn.api.remote_module._RemoteModule": "__new__/__setstate__ reach RPC",
    "torch.nn.parallel.distributed.DistributedDataParallel": "__setstate__ joins a process group",
    "torch.nn.parallel.DistributedDataParallelCPU": "__setstate__ joins a process group",
    "torch.nn.modules.container.Container": "deprecated, __new__ of its own",
    "torch.nn.modules.loss.NLLLoss2d": "deprecated, __new__ of its own",
    "torch.fx.graph_module._CodeOnlyModule": "made only by GraphModule's reduce, which execs source",
    # Called by a gadget at load (dict() calls a stored `keys`, pickle's APPEND a stored `append`), these run
    # code their state names: torch.fx.Interpreter resolves the dotted attribute paths of the graph's nodes
    # (`p._flavour.pathmod.os.system` from a stored pathlib class) and calls them. torch cannot pickle
    # any of them (their graphs and C++ modules refuse), so no benign file makes one.
    "torch.distributions.constraints._DependentProperty": "a property, never pickled as an instance",
    "torch.export.unflatten.InterpreterModule": "forward runs a pickled fx graph, whose strings name any attribute",
    "torch.export.unflatten.InterpreterModuleDispatcher": "forward runs pickled fx graphs",
    "torch.export.unflatten.UnflattenedModule": "__init__ and forward run a pickled fx graph",
    "torch.jit._script.RecursiveScriptModule": "a ScriptModule: define() compiles source; torch cannot pickle one",
    "torch.jit._script.ScriptModule": "define() compiles TorchScript source; torch cannot pickle one",
    "torch.jit._trace.TracedModule": "__init__ compiles the module it is given; torch cannot pickle one",
    "torch.jit._trace.TopLevelTracedModule": "a TracedModule; torch cannot pickle one",
    "torch.jit._trace.ONNXTracedModule": "forward traces the module it holds; torch cannot pickle one",
}
# Classes besides modules that whole-model and training pickles make, read and found inert.
EXTRA = [
    "torch.nn.parameter.Parameter", "torch.nn.parameter.Buffer", "torch.nn.parameter.UninitializedParameter",
    "torch.nn.parameter.UninitializedBuffer", "torch.Tensor", "torch.torch_version.TorchVersion",
    # A TorchBind object (quantized packed weights): its __setstate__ is the registered C++ class's, which
    # repacks the tensors in the state. Which class, BUILD's state names: statecli's reader judges that
    # (safepickle.TORCHBIND_CLASSES; aten.OpaqueObject's unpickles a base64 pickle).
    "torch.ScriptObject",
    "torch.nn.modules.module._WrappedHook", "torch.utils.hooks.RemovableHandle",
    "torch.nn.utils.spectral_norm.SpectralNorm", "torch.nn.utils.spectral_norm.SpectralNormStateDictHook",
    "torch.nn.utils.spectral_norm.SpectralNormLoadStateDictPreHook", "torch.nn.utils.weight_norm.WeightNorm",
    "torch.ao.quantization.observer._PartialWrapper", "torch.ao.quantization.qconfig.QConfig",
    "torch.ao.quantization.qconfig.QConfigDynamic",
    "torch.distributed.checkpoint.metadata.Metadata", "torch.distributed.checkpoint.metadata.TensorStorageMetadata",
    "torch.distributed.checkpoint.metadata.BytesStorageMetadata",
    "torch.distributed.checkpoint.metadata.ChunkStorageMetadata",
    "torch.distributed.checkpoint.metadata.TensorProperties", "torch.distributed.checkpoint.metadata.MetadataIndex",
    "torch.distributed.checkpoint.metadata.StorageMeta", "torch.distributed.checkpoint.metadata._MEM_FORMAT_ENCODING",
    "torch.distributed.checkpoint.filesystem._StorageInfo",
    # A NamedTuple of tensors (NEWOBJ with its fields); its __new__ only checks them and inverts a permutation.
    "torch.nn.utils.rnn.PackedSequence",
]  # fmt: skip


def _owner(cls: type, attr: str) -> type | None:
    for k in cls.__mro__:
        if attr in vars(k):
            return k
    return None


def torch_classes() -> tuple[list[str], list[str]]:
    """(inert class names, names that need a review before they can be listed)."""
    warnings.filterwarnings("ignore")
    import torch

    for m in MODULES:
        importlib.import_module(m)
    found: dict[str, type] = {}
    for name, mod in list(sys.modules.items()):
        if mod is None or not (name == "torch" or name.startswith("torch.")):
            continue
        for obj in list(vars(mod).values()):
            if (
                inspect.isclass(obj)
                and issubclass(obj, torch.nn.Module)
                and "<locals>" not in obj.__qualname__
                and obj.__module__.startswith("torch.")
            ):
                found[f"{obj.__module__}.{obj.__qualname__}"] = obj
    # Optimizers and schedulers pickled whole (torch.save(optimizer)): Optimizer.__setstate__ fills in
    # defaults and wraps step() in torch's own profiling hook; schedulers set plain attributes.
    bases = (torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler, torch.optim.lr_scheduler.ReduceLROnPlateau)
    for mod in (torch.optim, torch.optim.lr_scheduler, torch.optim.swa_utils):
        for obj in vars(mod).values():
            if inspect.isclass(obj) and issubclass(obj, bases) and obj.__module__.startswith("torch."):
                found[f"{obj.__module__}.{obj.__qualname__}"] = obj
    # Probability distributions a policy or a training state pickles whole (NEWOBJ and BUILD of a field
    # dict): their transforms and constraints come along. Plain attribute holders, checked like modules.
    import torch.distributions as dist

    families = (dist.Distribution, dist.transforms.Transform, dist.constraints.Constraint)
    for name, mod in list(sys.modules.items()):
        if mod is None or not name.startswith("torch.distributions"):
            continue
        for obj in list(vars(mod).values()):
            if inspect.isclass(obj) and issubclass(obj, families) and obj.__module__.startswith("torch."):
                found[f"{obj.__module__}.{obj.__qualname__}"] = obj
    inert, review = [], []
    for qual, cls in sorted(found.items()):
        if qual in EXCLUDED:
            continue
        odd = []
        for attr in SPECIAL:
            owner = _owner(cls, attr)
            if owner in (None, object, torch.nn.Module):
                continue
            if owner.__name__ in REVIEWED.get(attr, ()) and owner.__module__.startswith("torch."):
                continue
            odd.append(f"{attr} of {owner.__module__}.{owner.__qualname__}")
        (review if odd else inert).append(qual if not odd else f"{qual}: {', '.join(odd)}")
    return sorted(set(inert) | set(EXTRA)), review


def _q(text: str) -> str:
    return '"' + text + '"'  # class and module names hold no quotes or backslashes


def render(names: list[str]) -> str:
    """The module's text, laid out as ``ruff format`` lays it out (the check compares text)."""
    import torch

    by_module: dict[str, list[str]] = {}
    for q in names:
        module, _, name = q.rpartition(".")
        by_module.setdefault(module, []).append(name)
    version = torch.__version__.split("+")[0]
    lines = [
        f'"""Generated by tests/allowlist/make_allowlist.py from torch {version}: do not edit.',
        "",
        "Torch classes a pickle may make (NEWOBJ and BUILD) without running anything but torch's own attribute",
        'setting: module classes, their hooks, quantization configs, optimizers, DCP metadata. See the script."""',
        "",
        "TORCH_CLASSES: dict[str, tuple[str, ...]] = {",
    ]
    for module in sorted(by_module):
        items = [_q(n) for n in sorted(by_module[module])]
        # One item keeps its tuple comma; more would make ruff's "magic trailing comma" split the line.
        line = f"    {_q(module)}: ({', '.join(items)}{',' if len(items) == 1 else ''}),"
        if len(line) <= 120:
            lines.append(line)
            continue
        lines.append(f"    {_q(module)}: (")
        lines.extend(f"        {item}," for item in items)
        lines.append("    ),")
    lines.append("}")
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> int:
    names, review = torch_classes()
    if review:
        print("needs review (add to REVIEWED or EXCLUDED):", *review, sep="\n  ", file=sys.stderr)
        return 1
    text = render(names)
    if "--check" in argv:
        if OUT.read_text() != text:
            print(f"{OUT} differs from what this torch gives: rerun without --check", file=sys.stderr)
            return 1
        return 0
    OUT.write_text(text)
    print(f"wrote {OUT}: {len(names)} classes")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""Regenerate every sample checkpoint in this folder, deterministically.

    python sample_models/make_samples.py        # from any working directory

Running it twice gives byte-identical files (check with ``sha256sum``). See README.md for what each
file is. One of them, ``malicious_os_system.pt``, is a deliberately hostile pickle: never load it with
``torch.load(weights_only=False)`` or ``pickle``.

Determinism
-----------
* Every model, input and optimizer step is seeded with ``torch.manual_seed`` and runs on the CPU in a
  single thread.
* ``torch.save`` writes a ``.data/serialization_id`` record into its zip. In this torch (2.13) it is NOT
  random: ``PyTorchStreamWriter::writeSerializationId()`` (caffe2/serialize/inline_container.cc, called
  from ``write_end_of_file``) builds it from a hash of the record names plus the combined CRC-32 of the
  records' bytes, i.e. purely from the file's content (two runs gave the same id; checked). So nothing
  is monkeypatched; we only pin ``torch.utils.serialization.config.save.compute_crc32 = True`` and the
  64-byte ``storage_alignment`` (both the defaults) so the CRC part of the id and the layout cannot
  change with a caller's config. The zip entries'
  timestamps are fixed too (miniz writes 1980-01-01 00:00), and storages are keyed "0", "1", ... in
  pickling order, so the archive depends only on what is saved and on the file's stem (the zip's top
  folder is the stem, so each file is saved straight to its final name, never to a temporary one).
* Python dicts keep insertion order; the only sets pickled (``_non_persistent_buffers_set``) hold at
  most one name, so ``PYTHONHASHSEED`` does not matter.
* ``safetensors`` sorts its header itself; the shard index is written with ``sort_keys=True``.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import json
import os
import pickletools
import subprocess
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.dont_write_bytecode = True  # leave no __pycache__ beside the samples
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import safetensors.torch  # noqa: E402
import sample_nets  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.utils.serialization import config as serialization_config  # noqa: E402

SIZE_LIMIT = 200 * 1024

# Pin the save options that the serialization id and the layout depend on (see the module docstring).
serialization_config.save.compute_crc32 = True
serialization_config.save.storage_alignment = 64
torch.set_num_threads(1)


def out(name: str) -> Path:
    path = HERE / name
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def save(obj: object, name: str) -> Path:
    path = out(name)
    torch.save(obj, path)
    return path


def save_safetensors(tensors: dict[str, torch.Tensor], name: str) -> Path:
    path = out(name)
    safetensors.torch.save_file(tensors, path, metadata={"format": "pt"})
    path.chmod(0o644)  # save_file creates files with mode 0600
    return path


def trained_cnn(seed: int = 0) -> sample_nets.SmallCNN:
    """A SmallCNN whose BatchNorm running statistics are non-trivial (two train-mode forward passes)."""
    torch.manual_seed(seed)
    model = sample_nets.SmallCNN()
    model.train()
    with torch.no_grad():
        for _ in range(2):
            model(torch.randn(4, 3, 8, 8) * 2 + 0.5)
    model.eval()
    return model


def frozen_net(seed: int) -> sample_nets.FrozenNet:
    """A FrozenNet in eval mode with a scaled frozen parameter and its non-persistent buffer filled."""
    torch.manual_seed(seed)
    model = sample_nets.FrozenNet()
    model.train()
    with torch.no_grad():
        model.scale.mul_(1.5)
        model(torch.randn(3, 8))  # fills the non-persistent `cache` buffer
    model.eval()
    return model


def adam_trained_cnn(seed: int = 1) -> tuple[sample_nets.SmallCNN, torch.optim.Adam]:
    """A SmallCNN after two Adam steps, so the optimizer holds step / exp_avg / exp_avg_sq."""
    torch.manual_seed(seed)
    model = sample_nets.SmallCNN()
    model.train()
    adam = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(2):
        x, y = torch.randn(4, 3, 8, 8), torch.randint(0, 10, (4,))
        adam.zero_grad()
        F.cross_entropy(model(x), y).backward()
        adam.step()
    model.eval()
    return model, adam


# --------------------------------------------------------------------------------------------------
# cuda:0 location tags on a CPU-only machine.
#
# torch.save asks ``torch.serialization.location_tag(storage)`` for each storage's location; it tries
# the taggers of ``torch.serialization._package_registry`` in priority order (cpu is 10, cuda 20) and
# takes the first non-None answer, which goes into the persistent id
# ``('storage', torch.FloatStorage, '<key>', '<location>', numel)``. Registering a tagger with a higher
# priority (a lower number) that answers "cuda:0" for CPU storages makes the pickle exactly what a GPU
# save writes: the tensor-rebuild arguments and the storage bytes do not depend on the device. The
# tagger builds a fresh "cuda:0" string on every call, as torch's own cuda tagger does
# (``backend_name + ":" + str(index)``), so the pickler writes the tag in full for each storage rather
# than memo-referencing one string as a CPU save does with its constant 'cpu'.
# --------------------------------------------------------------------------------------------------


def _cuda0_tag(storage: object) -> str | None:
    if storage.device.type == "cpu":  # type: ignore[attr-defined]
        return "cuda" + ":" + str(0)
    return None


def _no_deserialize(storage: object, location: str) -> None:
    return None  # defer to torch's own deserializers (this entry exists only while saving)


@contextlib.contextmanager
def tag_cpu_storages_as_cuda0() -> Iterator[None]:
    entry = (-1000, _cuda0_tag, _no_deserialize)
    registry = torch.serialization._package_registry
    torch.serialization.register_package(*entry)
    try:
        yield
    finally:
        registry.remove(entry)
    assert all(tagger is not _cuda0_tag for _, tagger, _ in registry)


class Evil:
    """Unpickling this calls os.system. Defined here, not in sample_nets, on purpose."""

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, ("touch statecli_pwned_marker",))


# --------------------------------------------------------------------------------------------------


def make_cnn_files() -> None:
    model = trained_cnn()
    sd = model.state_dict()
    save(sd, "cnn_bn_state_dict.pt")
    save(model, "cnn_bn_module.pt")
    save(model.state_dict(keep_vars=True), "cnn_bn_keep_vars.pt")
    tensors = {k: v.contiguous() for k, v in sd.items()}
    save_safetensors(tensors, "cnn_bn.safetensors")


def make_frozen_file() -> None:
    save(frozen_net(seed=2), "frozen_nonpersistent_module.pt")


def make_tied_lm_file() -> None:
    torch.manual_seed(3)
    model = sample_nets.TinyLM(tie=True)
    model.eval()
    sd = model.state_dict()
    embed, head = sd["embed.weight"], sd["lm_head.weight"]
    assert embed.untyped_storage().data_ptr() == head.untyped_storage().data_ptr()  # tied: one storage
    save(sd, "tied_lm.pt")


def make_training_files() -> None:
    model, adam = adam_trained_cnn()
    sd = model.state_dict()
    save(
        {"model": sd, "optimizer": adam.state_dict(), "epoch": 3, "global_step": 120, "best_metric": 0.91},
        "training_adam.pt",
    )
    lightning = {
        "epoch": 5,
        "global_step": 500,
        "pytorch-lightning_version": "2.4.0",
        "state_dict": {"model." + k: v for k, v in sd.items()},
        "optimizer_states": [adam.state_dict()],
        "lr_schedulers": [{"step_size": 10, "gamma": 0.1, "last_epoch": 5}],
        "callbacks": {
            "ModelCheckpoint{'monitor': 'val_loss'}": {
                "best_model_score": torch.tensor(0.25),
                "best_model_path": "x.ckpt",
            }
        },
        "hyper_parameters": {"lr": 0.001, "width": 8},
    }
    save(lightning, "lightning.ckpt")


def make_sharded_files() -> None:
    torch.manual_seed(4)
    model = sample_nets.TinyLM(tie=False)
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    names = list(sd)
    half = len(names) // 2
    shards = {
        "model-00001-of-00002.safetensors": names[:half],
        "model-00002-of-00002.safetensors": names[half:],
    }
    weight_map: dict[str, str] = {}
    for shard, keys in shards.items():
        shard_tensors = {k: sd[k] for k in keys}
        save_safetensors(shard_tensors, f"sharded/{shard}")
        weight_map.update(dict.fromkeys(keys, shard))
    total_size = sum(t.numel() * t.element_size() for t in sd.values())
    index = {"metadata": {"total_size": total_size}, "weight_map": weight_map}
    out("sharded/model.safetensors.index.json").write_text(
        json.dumps(index, indent=2, sort_keys=True) + "\n", encoding="utf-8"
    )


def make_cuda_tagged_file() -> None:
    model = trained_cnn(seed=5)
    sd = model.state_dict()
    with tag_cpu_storages_as_cuda0():
        path = save(sd, "cuda_tagged.pt")
    # Later saves are unaffected:
    buf = io.BytesIO()
    torch.save({"x": torch.zeros(1)}, buf)
    assert b"cuda:0" not in buf.getvalue() and b"cpu" in buf.getvalue()
    # A CPU-only machine cannot restore cuda:0 storages without map_location ...
    if not torch.cuda.is_available():
        try:
            torch.load(path, weights_only=True)
        except RuntimeError:
            pass
        else:
            raise AssertionError("cuda_tagged.pt loaded without map_location on a CPU-only machine")
    # ... and with map_location="cpu" gets the very same tensors.
    loaded = torch.load(path, map_location="cpu", weights_only=True)
    assert list(loaded) == list(sd)
    assert all(torch.equal(loaded[k], sd[k]) and loaded[k].dtype == sd[k].dtype for k in sd)


def _all_dtype_tensors() -> dict[str, torch.Tensor]:
    torch.manual_seed(6)
    base = torch.randn(2, 3, dtype=torch.float64) * 3

    def cast(dtype: torch.dtype) -> torch.Tensor:
        if dtype.is_complex:
            return torch.complex(base, -base).to(dtype)
        if dtype == torch.bool:
            return base > 0
        if dtype in (torch.uint8, torch.uint16, torch.uint32, torch.uint64):
            return (base.abs() * 10).to(torch.int64).to(dtype)
        if dtype in (torch.int8, torch.int16, torch.int32, torch.int64):
            return (base * 10).to(dtype)
        return base.to(dtype)

    plain = [
        torch.float64, torch.float32, torch.float16, torch.bfloat16,
        torch.float8_e4m3fn, torch.float8_e5m2, torch.float8_e4m3fnuz, torch.float8_e5m2fnuz,
        torch.complex32, torch.complex64, torch.complex128,
        torch.bool,
        torch.int8, torch.int16, torch.int32, torch.int64,
        torch.uint8, torch.uint16, torch.uint32, torch.uint64,
    ]  # fmt: skip
    candidates: dict[str, object] = {}
    for dtype in plain:
        candidates[str(dtype).removeprefix("torch.")] = lambda d=dtype: cast(d)
    # float8_e8m0fnu only holds powers of two; float4_e2m1fn_x2 is a packed bit pattern (no casts).
    candidates["float8_e8m0fnu"] = lambda: torch.tensor([0.25, 1.0, 2.0, 64.0]).to(torch.float8_e8m0fnu)
    candidates["float4_e2m1fn_x2"] = lambda: torch.tensor([0x12, 0x34, 0xF0], dtype=torch.uint8).view(
        torch.float4_e2m1fn_x2
    )
    qsrc = base.to(torch.float32)
    candidates["quint8"] = lambda: torch.quantize_per_tensor(qsrc, 0.05, 128, torch.quint8)
    candidates["qint8"] = lambda: torch.quantize_per_tensor(qsrc, 0.05, 0, torch.qint8)
    candidates["qint32"] = lambda: torch.quantize_per_tensor(qsrc, 0.001, 0, torch.qint32)
    candidates["quint4x2"] = lambda: torch.quantize_per_tensor(torch.rand(2, 4), 0.1, 2, torch.quint4x2)
    candidates["qint8_per_channel"] = lambda: torch.quantize_per_channel(
        qsrc, torch.tensor([0.05, 0.1], dtype=torch.float64), torch.tensor([0, 0]), 0, torch.qint8
    )
    result: dict[str, torch.Tensor] = {}
    for name, make in candidates.items():
        try:
            tensor = make()  # type: ignore[operator]
            torch.save(tensor, io.BytesIO())  # does torch.save accept it on its own?
        except Exception as exc:
            print(f"note: all_dtypes.pt skips {name}: {type(exc).__name__}: {exc}".splitlines()[0])
            continue
        result[name] = tensor
    # Shapes and layouts.
    result["scalar_0dim"] = torch.tensor(3.5)
    result["empty_0x3"] = torch.empty(0, 3)
    result["transposed"] = torch.arange(12, dtype=torch.float32).reshape(3, 4).t()  # strides (1, 4)
    vector = torch.arange(10, dtype=torch.float32)
    result["vector"] = vector
    result["vector_slice"] = vector[4:8]  # shares "vector"'s storage, storage_offset 4
    assert not result["transposed"].is_contiguous()
    return result


def make_all_dtypes_file() -> None:
    with warnings.catch_warnings():
        # "ComplexHalf support is experimental", "quantized tensor creation functions ... are deprecated"
        warnings.simplefilter("ignore", UserWarning)
        tensors = _all_dtype_tensors()
    save(tensors, "all_dtypes.pt")


def make_transformer_buffers_file() -> None:
    torch.manual_seed(7)
    n_pos, dim, vocab = 16, 8, 32
    sd = {
        "embeddings.word_embeddings.weight": torch.randn(vocab, dim) * 0.02,
        "embeddings.position_ids": torch.arange(n_pos, dtype=torch.int64).unsqueeze(0),
        "embeddings.token_type_ids": torch.zeros(1, n_pos, dtype=torch.int64),
        "h.0.attn.bias": torch.tril(torch.ones(n_pos, n_pos, dtype=torch.bool)).view(1, 1, n_pos, n_pos),
        "h.0.attn.masked_bias": torch.tensor(-1e4),
        "h.0.attn.c_attn.weight": torch.randn(dim, 3 * dim) * 0.02,  # GPT-2 Conv1D: (in, out)
        "h.0.attn.c_attn.bias": torch.zeros(3 * dim),
        "h.0.attn.c_proj.weight": torch.randn(dim, dim) * 0.02,
        "h.0.attn.c_proj.bias": torch.zeros(dim),
        "rotary_emb.inv_freq": 1.0 / (10000 ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)),
        "ln_f.weight": torch.ones(dim),
        "ln_f.bias": torch.zeros(dim),
    }
    save_safetensors(sd, "transformer_buffers.safetensors")


def make_qat_file() -> None:
    import torch.ao.quantization as tq

    torch.manual_seed(8)
    model = sample_nets.QatNet()
    model.train()
    model.qconfig = tq.get_default_qat_qconfig("fbgemm")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao.quantization deprecation notices
        tq.prepare_qat(model, inplace=True)
        model(torch.randn(2, 1, 6, 6))
    model.eval()
    save(model.state_dict(), "qat_observers.pt")


def make_malicious_file() -> None:
    path = save({"weight": torch.zeros(2), "payload": Evil()}, "malicious_os_system.pt")
    # Check without unpickling: the pickle must import posix.system (os.system on POSIX).
    import zipfile

    with zipfile.ZipFile(path) as zf:
        (pkl,) = [n for n in zf.namelist() if n.endswith("/data.pkl")]
        text = io.StringIO()
        pickletools.dis(zf.read(pkl), out=text)
    assert "GLOBAL     'posix system'" in text.getvalue() or "GLOBAL     'os system'" in text.getvalue()


def assert_portable(path: Path) -> Path:
    """Fail when a sample names this machine's paths (torch.jit / torch.export embed source paths)."""
    data = path.read_bytes()
    for marker in (str(HERE).encode(), str(Path(torch.__file__).parent).encode()):
        assert marker not in data, f"{path.name} names a local path"
    return path


def generate_in_child(module: str, out_dir: Path) -> None:
    """Run ``module.generate(out_dir)`` in a child with ``PYTHONHASHSEED=0``, importing the module by name,
    so that set order and class names never depend on this process or how it was started."""
    out_dir.mkdir(parents=True, exist_ok=True)
    code = f"import sys; sys.path.insert(0, {str(HERE)!r}); import {module} as m; m.generate(sys.argv[1])"
    env = {**os.environ, "PYTHONHASHSEED": "0", "PYTHONDONTWRITEBYTECODE": "1"}
    subprocess.run([sys.executable, "-c", code, str(out_dir)], env=env, check=True)


def make_all() -> list[Path]:
    make_cnn_files()
    make_frozen_file()
    make_tied_lm_file()
    make_training_files()
    make_sharded_files()
    make_cuda_tagged_file()
    make_all_dtypes_file()
    make_transformer_buffers_file()
    make_qat_file()
    make_malicious_file()
    # Formats beyond torch.save / safetensors, each generated by its own module (see its docstring).
    for module in ("samples_torchscript", "samples_pt2", "samples_dcp", "samples_legacy", "samples_roles"):
        try:
            maker = importlib.import_module(module)
        except ModuleNotFoundError as e:
            if e.name != module:
                raise
            continue
        maker.make(HERE)
    kinds = {".pt", ".pth", ".ckpt", ".safetensors", ".json", ".pt2", ".distcp"}
    files = sorted(p for p in HERE.rglob("*") if p.is_file() and (p.suffix in kinds or p.name == ".metadata"))
    too_big = [p for p in files if p.stat().st_size >= SIZE_LIMIT]
    if too_big:
        raise SystemExit(f"sample files over {SIZE_LIMIT} bytes: {too_big}")
    return files


def main() -> None:
    for path in make_all():
        print(f"{path.stat().st_size:>8}  {path.relative_to(HERE)}")


if __name__ == "__main__":
    main()

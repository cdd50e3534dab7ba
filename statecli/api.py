"""The public Python API: what ``import statecli`` offers, with the commands' own rules.

Nothing in the package imports this module except ``statecli/__init__.py`` and ``cli/``. ``open_checkpoint``
and ``check`` without value rules never import torch; ``convert`` and ``load`` import it when called.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import TYPE_CHECKING

from statecli.formats import read
from statecli.records import Report

if TYPE_CHECKING:
    import torch

    from statecli.checking import CheckResult, Policy
    from statecli.conversion import ConversionReport, Progress

PathLike = str | os.PathLike[str]
Globs = str | Sequence[str]


def open_checkpoint(path: PathLike) -> Report:
    """Read a checkpoint's metadata (never its tensor bytes, never its code) and resolve every role.

    Args:
        path: A ``torch.save`` file (``.pt .pth .bin .ckpt``, zip or legacy), a ``.safetensors`` file, a
            sharded ``*.index.json``, a TorchScript archive, a ``.pt2`` program, a DCP folder, or a folder
            that holds one checkpoint.

    Returns:
        The :class:`~statecli.records.Report`: every tensor with its role and evidence, the findings
        (dangerous pickle globals among them), the container and the totals.

    Raises:
        InputError: The path is missing, unreadable, corrupt or over a limit (exit code 3);
            :class:`LimitExceededError` when reading it would need more memory than the process may use.
        UnsupportedFormatError: No reader knows the format (exit code 3).
        UnsafeError: The file failed in a way that torch.load would have run its code first (exit code 5).
    """
    return read(os.fspath(path))


def convert(
    src: PathLike,
    dst: PathLike,
    *,
    dtype: str | None = None,
    device: str | None = None,
    keep_buffers: bool = False,
    only: Globs = (),
    exclude: Globs = (),
    select: str | None = None,
    strip_prefix: Globs = (),
    add_prefix: str = "",
    allow_overflow: bool = False,
    max_shard_size: int | str | None = None,
    output_format: str | None = None,
    force: bool = False,
    verify: bool = False,
    untie: bool = False,
    keep_optimizer_dtype: bool = False,
    allow_dangerous: bool = False,
    state_dict: bool = False,
    sync: bool = True,
    jobs: int | None = None,
    distributed: bool = False,
    progress: Progress | None = None,
) -> ConversionReport:
    """Convert ``src`` into ``dst`` the way ``nn.Module.to()`` would, as ``statecli convert`` does.

    A ``torch.save`` archive converted to a ``.pt`` keeps its whole object graph (model, optimizer state,
    scheduler, RNG state, every other value, written back as read, only the storages converted); to
    safetensors, or with ``select``, the output is a state dict.

    Args:
        src: The checkpoint to read (any format :func:`open_checkpoint` reads).
        dst: A ``.safetensors`` or ``.pt`` file, or a folder for sharded safetensors output.
        dtype: Target floating dtype (``"bf16"``, ``"fp16"``, ``"float8_e4m3fn"``, ...); integer, bool and
            quantized tensors keep theirs. ``None`` keeps every dtype.
        device: Where a ``.pt`` output's tensors load to (``"cpu"``, ``"cuda:0"``, ``"meta"``).
        keep_buffers: Keep floating buffers (BatchNorm statistics, ...) in their dtype.
        only: Name globs: only these tensors may change dtype.
        exclude: Name globs: these tensors never change dtype.
        select: The sub-dict to convert (``"model"``, ``"state_dict"``, ``"ema"``, ...).
        strip_prefix: Prefixes to remove from the output names.
        add_prefix: A prefix to put before every output name.
        allow_overflow: Write even when values overflow the target dtype (they become ±inf, ±max or NaN).
        max_shard_size: Largest shard for sharded output, in bytes or as ``"2GB"``/``"500MiB"``.
        output_format: ``"safetensors"``, ``"torch"`` or ``"sharded"``; ``None`` decides from ``dst``.
        force: Replace an existing output.
        verify: Read the written values back and compare them with a fresh conversion of the input's.
        untie: For safetensors output, write each name of a tied tensor as its own tensor (every loader
            sees every name) instead of storing it once with the other names in statecli's metadata.
        keep_optimizer_dtype: A whole training checkpoint (``.pt`` to ``.pt``): keep optimizer state in its
            dtype instead of following its parameter's.
        allow_dangerous: A ``.pt`` to ``.pt`` conversion copies the input's pickle; without this, one that
            statecli flags as dangerous is refused with :class:`UnsafeError`. With it, the pickle is copied
            through as it is (nothing of it runs).
        state_dict: Write the model's state dict to a ``.pt``, not the whole checkpoint.
        sync: Flush every output file to disk before it gets its name (``False``: faster on scratch space,
            but a crash soon after can leave a named file empty or partly written).
        jobs: Worker processes for a multi-file (sharded) output, each writing whole files; ``None``: the
            usable cores, capped by the files and by the work. The output's bytes are the same whatever it is.
            torch runs with one intra-op thread during the conversion; the caller's setting is restored.
        distributed: Called on every rank of a ``torchrun`` launch (``torch.distributed`` env set): the
            ranks share a sharded output's files out (gloo; a shared filesystem), rank 0 writes the index.
        progress: Called with (bytes done, tensors done) while writing.

    Returns:
        The :class:`~statecli.conversion.ConversionReport`: the plan, the files written, the cast counts
        (overflow, underflow, NaN/inf) and the findings.

    Raises:
        CheckFailedError: Values would overflow the target dtype (exit code 1); nothing was written.
        UsageError: An option is invalid (exit code 2).
        InputError: The input cannot be read (exit code 3).
        OutputError: The output cannot be written, or does not read back as planned (exit code 4).
        UnsafeError: The input's pickle fails after naming code torch.load would have run first (exit code 5);
            or a whole-checkpoint ``.pt`` output would copy a pickle statecli flags as dangerous, without
            ``allow_dangerous``. A state dict output is written all the same (nothing of it runs).
    """
    # Every keyword but progress is a ConvertOptions field of the same name (test_api checks it).
    fields = {k: v for k, v in locals().items() if k not in ("src", "dst", "progress")}
    from statecli import conversion  # here, not at the top: reading a checkpoint needs none of it

    return conversion.convert(src, dst, progress, conversion.options(**fields))


def load(
    path: PathLike,
    *,
    dtype: str | None = None,
    device: str | None = None,
    select: str | None = None,
    keep_buffers: bool = False,
    only: Globs = (),
    exclude: Globs = (),
    strip_prefix: Globs = (),
    add_prefix: str = "",
    allow_overflow: bool = False,
) -> dict[str, torch.Tensor]:
    """A state dict read from ``path`` with the conversion rules applied. No pickle code runs.

    Args:
        path: The checkpoint (any format :func:`open_checkpoint` reads).
        dtype: Target floating dtype, as for :func:`convert`; ``None`` keeps every dtype.
        device: Where the tensors go (default ``"cpu"``).
        select: The sub-dict to load (``"model"``, ``"ema"``, ...).
        keep_buffers: Keep floating buffers in their dtype.
        only: Name globs: only these tensors may change dtype.
        exclude: Name globs: these tensors never change dtype.
        strip_prefix: Prefixes to remove from the names.
        add_prefix: A prefix to put before every name.
        allow_overflow: Accept values that overflow the target dtype.

    Returns:
        Tensor name to tensor, in the file's order; tensors that share a storage in the file share
        memory in the result. Quantized tensors (``qint8``, ``quint8``, ``qint32``) are torch quantized
        tensors with the file's quantizer (scale and zero point, or per-channel ones and the axis).

    Warns:
        DangerousPickleWarning: The file's pickle names code that torch.load would run (statecli does
            not run it; the weights are read from the file's bytes). Make it an error with
            ``warnings.simplefilter("error", statecli.DangerousPickleWarning)``.

    Raises:
        CheckFailedError: Values would overflow the target dtype (exit code 1).
        UsageError: An option is invalid or the device is not available (exit code 2).
        InputError: The checkpoint cannot be read (exit code 3).
        UnsafeError: The checkpoint's pickle fails after naming code torch.load would have run first (exit
            code 5).
    """
    fields = {k: v for k, v in locals().items() if k != "path"}
    from statecli import conversion  # here, not at the top: reading a checkpoint needs none of it

    return conversion.load(path, conversion.options(output_format="torch", **fields))


def check(path: PathLike, policy: Policy | PathLike | None = None) -> CheckResult:
    """Apply a policy to a checkpoint, as ``statecli check`` does.

    Args:
        path: The checkpoint (any format :func:`open_checkpoint` reads).
        policy: A :class:`~statecli.checking.Policy`, or the path of a policy file (``statecli.toml`` or
            ``pyproject.toml``). ``None``: only the default rule, no pickle global that could run code.

    Returns:
        The :class:`~statecli.checking.CheckResult`: each rule with its verdict and the tensors that failed.

    Raises:
        UsageError: The policy file is invalid (exit code 2).
        InputError: The checkpoint cannot be read (exit code 3).
    """
    from statecli import checking  # here, not at the top: inspect needs none of the rules

    if policy is None:
        policy = checking.Policy()
    elif not isinstance(policy, checking.Policy):
        policy = checking.load_policy(os.fspath(policy))
    return checking.run(open_checkpoint(path), policy)

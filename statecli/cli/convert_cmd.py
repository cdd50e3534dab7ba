"""``statecli convert IN -o OUT``: dtype, device and format conversion, consistent and lossless."""

from __future__ import annotations

import os
import time
from enum import Enum
from typing import Annotated

import typer

from statecli.cli.options import PathArg, complete_dtype
from statecli.output import console, emit

SELECTION = "Selection and names"
DTYPE = "Dtype and device"
SCALE = "Speed and scale"


class OutputFormat(str, Enum):
    safetensors = "safetensors"
    torch = "torch"
    sharded = "sharded"
    dcp = "dcp"


class ConvertFormat(str, Enum):
    table = "table"
    json = "json"


def convert_command(
    path: PathArg,
    output: Annotated[
        str,
        typer.Option(
            "--output",
            "-o",
            metavar="OUT",
            help="Where to write: a .safetensors file, a .pt/.pth/.bin/.ckpt file, or a folder (ending in /) "
            "for HF-style safetensors shards with model.safetensors.index.json.",
            show_default=False,
        ),
    ],
    dtype: Annotated[
        str | None,
        typer.Option(
            "--dtype",
            "-d",
            metavar="NAME",
            help="Cast floating tensors to this dtype (bf16, fp16, fp32, fp64, float8_e4m3fn, float8_e5m2). "
            "Integer and bool tensors never change; complex ones go to the complex dtype of the same width.",
            autocompletion=complete_dtype,
            rich_help_panel=DTYPE,
            show_default=False,
        ),
    ] = None,
    device: Annotated[
        str | None,
        typer.Option(
            "--device",
            metavar="DEV",
            help="Where the tensors of a .pt output load to: cpu, cuda, cuda:N or meta. Rewrites the saved "
            "locations; no GPU needed. safetensors stores no device.",
            rich_help_panel=DTYPE,
            show_default=False,
        ),
    ] = None,
    keep_buffers: Annotated[
        bool,
        typer.Option(
            "--keep-buffers",
            help="Leave buffers (BatchNorm statistics, masks, ...) in their dtype.",
            rich_help_panel=DTYPE,
        ),
    ] = False,
    keep_optimizer_dtype: Annotated[
        bool,
        typer.Option(
            "--keep-optimizer-dtype",
            help="A whole training checkpoint (.pt to .pt): leave optimizer state (exp_avg, momentum, ...) in its "
            "dtype. Without it, it follows its parameter's dtype, as Optimizer.load_state_dict would make it; "
            "step counts never change.",
            rich_help_panel=DTYPE,
        ),
    ] = False,
    only: Annotated[
        list[str] | None,
        typer.Option(
            "--only",
            metavar="GLOB",
            help="Only tensors whose name matches change dtype; repeatable. Each glob must match a tensor "
            "(exit 2 otherwise).",
            rich_help_panel=DTYPE,
            show_default=False,
        ),
    ] = None,
    exclude: Annotated[
        list[str] | None,
        typer.Option(
            "--exclude",
            metavar="GLOB",
            help="Tensors whose name matches keep their dtype; repeatable. A glob that matches nothing is a warning.",
            rich_help_panel=DTYPE,
            show_default=False,
        ),
    ] = None,
    allow_overflow: Annotated[
        bool,
        typer.Option(
            "--allow-overflow",
            help="Write even when values overflow the target dtype (to ±inf; ±448 in float8_e4m3fn; NaN in the "
            "fnuz formats) or an input inf cannot be kept (a warning, not exit 1).",
            rich_help_panel=DTYPE,
        ),
    ] = False,
    select: Annotated[
        str | None,
        typer.Option(
            "--select",
            metavar="KEY",
            help="Convert this sub-dict of the checkpoint instead of the model statecli finds: a top-level key "
            "as inspect's names show it (ema, optimizer, optim, ...), the model's key (model, state_dict) or "
            "one of its sub-modules; KEY. is removed from the names. Optimizer state is left out unless selected.",
            rich_help_panel=SELECTION,
            show_default=False,
        ),
    ] = None,
    state_dict: Annotated[
        bool,
        typer.Option(
            "--state-dict",
            help="Write the model's state dict, not the whole checkpoint, to a .pt (a whole pickled module or a "
            "training checkpoint becomes the state dict inspect shows; torch.load(weights_only=True) reads it).",
            rich_help_panel=SELECTION,
        ),
    ] = False,
    strip_prefix: Annotated[
        list[str] | None,
        typer.Option(
            "--strip-prefix",
            metavar="PREFIX",
            help="Remove this prefix from names (module. from DDP, _orig_mod. from torch.compile, model. from "
            "Lightning); repeatable, the first that matches is removed.",
            rich_help_panel=SELECTION,
            show_default=False,
        ),
    ] = None,
    add_prefix: Annotated[
        str,
        typer.Option(
            "--add-prefix", metavar="PREFIX", help="Put this prefix before every name.", rich_help_panel=SELECTION
        ),
    ] = "",
    output_format: Annotated[
        OutputFormat | None,
        typer.Option(
            "--output-format",
            "-t",
            metavar="KIND",
            help="What to write, where -o's name does not say it: dcp writes a torch.distributed.checkpoint folder "
            "(.distcp files + .metadata) that dcp.load reads into a model's state dict, as torchtitan starts from a "
            "released model; sharded, safetensors and torch as a folder, .safetensors or .pt name would.",
            show_default=False,
        ),
    ] = None,
    max_shard_size: Annotated[
        str | None,
        typer.Option(
            "--max-shard-size",
            metavar="SIZE",
            help="Largest shard for folder output (2GB, 500MB, 1.5GiB); default 5GB.",
            show_default=False,
        ),
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing output.")] = False,
    jobs: Annotated[
        int | None,
        typer.Option(
            "--jobs",
            "-j",
            metavar="N",
            min=1,
            help="Worker processes for a folder output, each writing whole shard files (default: the usable "
            "cores, capped by the files, one per 32 MiB of output). The bytes written are the same for any N.",
            rich_help_panel=SCALE,
            show_default=False,
        ),
    ] = None,
    distributed: Annotated[
        bool,
        typer.Option(
            "--distributed",
            help="Launched by torchrun (torchrun --nproc-per-node M [--nnodes N] -m statecli convert ... "
            "--distributed): the ranks share a folder output's files out over torch.distributed (gloo) on a "
            "shared filesystem; rank 0 writes the index once every rank is done, and reports.",
            rich_help_panel=SCALE,
        ),
    ] = False,
    no_sync: Annotated[
        bool,
        typer.Option(
            "--no-sync",
            help="Do not wait for the output to reach the disk before naming it: faster on scratch space, but a "
            "crash or power loss soon after can leave a named file that is empty or partly written.",
            rich_help_panel=SCALE,
        ),
    ] = False,
    untie: Annotated[
        bool,
        typer.Option(
            "--untie",
            help="safetensors output: write each name of a tied tensor (lm_head.weight = embed.weight) as its "
            "own tensor, so every loader sees every name; without it a tie is stored once and named in "
            "statecli's metadata.",
            rich_help_panel=SELECTION,
        ),
    ] = False,
    allow_dangerous: Annotated[
        bool,
        typer.Option(
            "--allow-dangerous",
            help="A .pt to .pt conversion copies the input's pickle; one that would call code statecli flags as "
            "dangerous is refused (exit 5) unless this is given, which copies it through as it is (statecli "
            "still never runs it). --select or a .safetensors output writes only the tensors instead.",
        ),
    ] = False,
    verify: Annotated[
        bool,
        typer.Option(
            "--verify",
            help="Also check the input's zip CRCs (torch.load never does) and compare every written value with "
            "the input: exact for unchanged tensors, equal to the cast for converted ones. (Names, shapes, "
            "dtypes and roles are always checked.)",
        ),
    ] = False,
    dry_run: Annotated[
        bool,
        typer.Option("--dry-run", "-n", help="Print the plan, tensor by tensor, and write nothing. Needs no torch."),
    ] = False,
    fmt: Annotated[
        ConvertFormat,
        typer.Option(
            "--format",
            "-f",
            metavar="FORMAT",
            help="table: the plan (with --dry-run) as a table, for people; json: statecli.plan/1 or "
            "statecli.conversion/1. Either way messages and the closing line go to stderr.",
        ),
    ] = ConvertFormat.table,
    quiet: Annotated[
        bool,
        typer.Option("--quiet", "-q", help="No progress bar and no closing line; notes and warnings still show."),
    ] = False,
) -> None:
    """Convert a checkpoint's dtype, device or file format the way nn.Module.to() would, losing nothing.

    A .pt or .ckpt converted to a .pt or .ckpt keeps everything: model, optimizer state, scheduler, RNG
    state and every other value, written back as they were read, only the storages converted. To
    safetensors (tensors only), or with --select, the output is a state dict.

    Only floating tensors change dtype (num_batches_tracked stays int64). Values that would overflow the
    target dtype, and infinities it cannot hold (fp8 e4m3fn has none), stop the conversion (exit 1)
    unless --allow-overflow; values that flush to zero are reported. Tied weights stay tied. Output
    appears whole or not at all, and is read back and checked before it gets its name. No pickle code
    runs.

    Examples:

        statecli convert model.pt -o model-bf16.safetensors --dtype bf16
        statecli convert gpu_run.pt -o cpu_run.pt --device cpu
        statecli convert run.ckpt -o w.safetensors --strip-prefix model. --dtype fp16 --keep-buffers
        statecli convert big.pt -o out/ --max-shard-size 2GB
        statecli convert hf_model/ -o dcp_ckpt/ --output-format dcp --dtype bf16
        statecli convert model.pt -o model-fp16.pt --dtype fp16 --dry-run
    """
    from statecli import conversion as conv  # the writers and their checks: loaded by convert alone

    options = {
        "dtype": dtype,
        "device": device,
        "keep_buffers": keep_buffers,
        "only": tuple(only or ()),
        "exclude": tuple(exclude or ()),
        "select": select,
        "strip_prefix": tuple(strip_prefix or ()),
        "add_prefix": add_prefix,
        "allow_overflow": allow_overflow,
        "max_shard_size": max_shard_size,
        "output_format": output_format.value if output_format is not None else None,
        "force": force,
        "verify": verify,
        "untie": untie,
        "keep_optimizer_dtype": keep_optimizer_dtype,
        "allow_dangerous": allow_dangerous,
        "state_dict": state_dict,
        "sync": not no_sync,
        "jobs": jobs,
        "distributed": distributed,
    }
    # Rank 0 reports for every rank of a torchrun launch; the others only say their own errors.
    follower = distributed and os.environ.get("RANK", "0") != "0"
    quiet = quiet or follower
    plan = conv.plan(path, output, **options)
    if not follower:
        console.warn_dangerous(plan.report)  # nothing of it runs; a .pt output copies it only under --allow-dangerous
    if dry_run:
        emit.plan(plan, fmt.value, quiet)
        return

    from statecli.conversion.execute import execute  # here: the conversion modules cost the other commands' start-up

    # torch is imported apart from the conversion, so that the closing line's time is the conversion's
    # own, with the import said beside it (a second or more on a cold start).
    started = time.monotonic()
    import torch  # noqa: F401  # deferred: importing torch takes about a second; --dry-run never needs it

    torch_import = time.monotonic() - started
    started = time.monotonic()
    total = sum(i.nbytes_out for i in plan.items if i.alias_of is None)
    progress_bar = console.progress_bar("converting", total, len(plan.items), quiet)
    try:
        result = execute(plan, progress_bar.update if progress_bar else None)
    finally:
        if progress_bar is not None:
            progress_bar.stop()
    if follower:
        return
    emit.conversion(plan, result, time.monotonic() - started, fmt.value, quiet, torch_import)

"""Tensor values of a torch.distributed.checkpoint folder, rebuilt from its chunks without torch.load.

Each chunk's span in a ``.distcp`` file is a small ``torch.save`` archive of one contiguous block
(see :func:`statecli.formats.dcp.chunk_map`). Its ``data.pkl`` goes through statecli's restricted
reader; the block's bytes come from its ``data/<key>`` member; the block is placed at the chunk's
offsets in the global tensor. The output buffer starts empty (uninitialised memory), so every byte of it
must come from a chunk: :func:`statecli.formats.dcp.chunk_map` refused any tensor whose chunks do not
tile it exactly once, and :meth:`DcpValues.read` checks that again before it allocates, so nothing
nobody saved can reach an output.
"""

from __future__ import annotations

import io
import zipfile
import zlib
from typing import TYPE_CHECKING, Any

from statecli.dtypes import DTYPES, STORAGE_TYPES, contiguous_strides
from statecli.errors import InputError, StatecliError
from statecli.formats.dcp import MAX_CHUNK_PICKLE, chunk_map, tiling_problem
from statecli.records import Report, TensorInfo
from statecli.safepickle import Global, Limits, StorageRef, TensorRef
from statecli.security import loads

if TYPE_CHECKING:
    import torch
# What zipfile raises on a damaged archive: bad records, a span that ends early, a compression method it
# does not know, an encrypted member, a broken deflate stream.
_CORRUPT = (zipfile.BadZipFile, KeyError, OSError, ValueError, EOFError, NotImplementedError, RuntimeError, zlib.error)


class DcpValues:
    """Whole tensors of one DCP folder, by the names :func:`statecli.formats.dcp.read_dcp` gives them."""

    def __init__(self, report: Report) -> None:
        self.report = report
        self.folder = report.path
        self.chunks = chunk_map(report.path)
        model_key = report.container.state_dict_at

        def stored(t: TensorInfo) -> str:
            return f"{model_key}.{t.name}" if t.group == "model" and model_key else t.name

        self.fqn = {t.name: stored(t) for t in report.tensors}

    def read(self, t: TensorInfo, read_span: Any) -> torch.Tensor:
        """``t``'s values as flat uint8 bytes of a contiguous tensor; ``read_span(path, offset, n)`` -> bytes."""
        import torch  # deferred: importing torch takes about a second, and metadata commands never need it

        chunks = self.chunks.get(self.fqn.get(t.name, t.name))
        if chunks is None:
            raise InputError(f"tensor {t.name!r} has no chunks in .metadata", path=self.folder)
        dtype = getattr(torch, t.dtype)
        # torch.empty, not zeros: the chunks are proven to write every element exactly once.
        problem = tiling_problem(t.shape, [(c.offsets, c.sizes) for c in chunks])
        if problem is not None:
            raise InputError(f"tensor {t.name!r}: {problem}; not read", path=self.folder)
        out = torch.empty(t.shape, dtype=dtype)
        for c in chunks:
            block = self._block(t, read_span(c.path, c.offset, c.length), dtype)
            if tuple(block.shape) != tuple(c.sizes):
                raise InputError(f"a chunk of {t.name!r} holds shape {tuple(block.shape)}, .metadata says "
                                 f"{tuple(c.sizes)}", path=self.folder)  # fmt: skip
            if not t.shape:
                out.copy_(block)
            else:
                out[tuple(slice(o, o + s) for o, s in zip(c.offsets, c.sizes, strict=True))].copy_(block)
        return out.reshape(-1).view(torch.uint8) if out.numel() else torch.empty(0, dtype=torch.uint8)

    def _block(self, t: TensorInfo, span: bytes, dtype: torch.dtype) -> torch.Tensor:
        import torch  # deferred: importing torch takes about a second, and metadata commands never need it

        try:
            z = zipfile.ZipFile(io.BytesIO(span))
            pickles = [n for n in z.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
            if len(pickles) != 1:
                raise InputError(f"a chunk of {t.name!r} is not one torch.save archive", path=self.folder)
            root = pickles[0][: -len("/data.pkl")]
            info = z.getinfo(pickles[0])
            if info.file_size > MAX_CHUNK_PICKLE:
                raise InputError(f"a chunk of {t.name!r} has a {info.file_size}-byte pickle", path=self.folder)

            if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
                raise InputError(f"a chunk of {t.name!r} has a data.pkl compressed with method "
                                 f"{info.compress_type}", path=self.folder)  # fmt: skip

            def storage(pid: Any) -> StorageRef:
                if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
                    raise InputError("corrupt chunk: unexpected persistent id", path=self.folder)
                _, stype, key, location, numel = pid
                name = stype.name if isinstance(stype, Global) else None
                kind = STORAGE_TYPES.get(name or "")
                if kind is None or type(key) is not str or type(location) is not str or type(numel) is not int:
                    raise InputError("corrupt chunk: malformed storage record", path=self.folder)
                if numel < 0:
                    raise InputError("corrupt chunk: malformed storage record", path=self.folder)
                nbytes = numel * DTYPES[kind].itemsize
                member = z.getinfo(f"{root}/data/{key}")
                # torch stores tensor bytes uncompressed; anything else could inflate past the span's bound.
                if member.compress_type != zipfile.ZIP_STORED or member.compress_size != member.file_size:
                    raise InputError(f"a chunk of {t.name!r} stores its bytes compressed; torch never does",
                                     path=self.folder)  # fmt: skip
                if member.file_size < nbytes:
                    raise InputError(f"a chunk of {t.name!r} claims more bytes than it holds", path=self.folder)
                return StorageRef(key, kind, location[:64], numel, nbytes)

            ref, _ = loads(z.read(info), storage, Limits())
            if not isinstance(ref, TensorRef) or ref.storage is None or ref.dtype != t.dtype:
                raise InputError(f"a chunk of {t.name!r} is not one {t.dtype} tensor", path=self.folder)
            data = bytearray(z.read(f"{root}/data/{ref.storage.key}"))  # zipfile checks the CRC
        except StatecliError:
            raise
        except _CORRUPT as e:
            raise InputError(f"a chunk of {t.name!r} is corrupt ({e})", path=self.folder) from None
        if len(data) < ref.storage.nbytes:  # the span ended inside the member
            raise InputError(f"a chunk of {t.name!r} is truncated", path=self.folder)
        base = torch.frombuffer(data, dtype=torch.uint8).view(dtype) if data else torch.empty(0, dtype=dtype)
        return base.as_strided(ref.shape, ref.stride or contiguous_strides(ref.shape), ref.offset)

"""The legacy-format sample: what ``torch.save(..., _use_new_zipfile_serialization=False)`` writes.

torch names each storage by its memory address (``str(storage._cdata)``), so a file torch writes is
different every run. This writes the same stream with storage keys ``"0"``, ``"1"``, ... instead:
the layout of ``torch/serialization.py`` ``_legacy_save`` (magic number, protocol version, sys_info,
the object with persistent ids, the sorted keys, then each storage as an int64 count and its bytes).
``torch.load`` reads it like torch's own (tests/test_legacy.py checks).
"""

from __future__ import annotations

import io
import pickle
import sys
from pathlib import Path
from typing import Any

import torch

MAGIC_NUMBER = 0x1950A86A20F9469CFC6C
PROTOCOL_VERSION = 1001


def legacy_bytes(obj: Any) -> bytes:
    """``obj`` (tensors, dicts, lists) in the legacy stream format, with deterministic storage keys."""
    keys: dict[int, str] = {}
    storages: dict[str, torch.storage.TypedStorage] = {}

    class Pickler(pickle.Pickler):
        def persistent_id(self, o: Any) -> Any:
            if isinstance(o, torch.storage.TypedStorage):
                ptr = o._untyped_storage._cdata
                key = keys.setdefault(ptr, str(len(keys)))
                storages[key] = o
                return ("storage", getattr(torch, o._pickle_storage_type()), key, "cpu", o._size(), None)
            return None

    buf = io.BytesIO()
    for head in (MAGIC_NUMBER, PROTOCOL_VERSION):
        pickle.dump(head, buf, protocol=2)
    sys_info = {"protocol_version": PROTOCOL_VERSION, "little_endian": sys.byteorder == "little",
                "type_sizes": {"short": 2, "int": 4, "long": 4}}  # fmt: skip
    pickle.dump(sys_info, buf, protocol=2)
    Pickler(buf, protocol=2).dump(obj)
    ordered = sorted(storages)
    pickle.dump(ordered, buf, protocol=2)
    for key in ordered:
        s = storages[key]
        buf.write(s._size().to_bytes(8, "little", signed=True))
        buf.write(bytes(s._untyped_storage))
    return buf.getvalue()


def make(out_dir: Path) -> list[Path]:
    from make_samples import trained_cnn

    sd = trained_cnn(seed=3).state_dict()
    path = out_dir / "legacy_cnn.pt"
    path.write_bytes(legacy_bytes(sd))
    return [path]

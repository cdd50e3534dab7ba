"""statecli/_torch_classes.py is what tests/allowlist/make_allowlist.py makes from the installed torch."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

SCRIPT = Path(__file__).resolve().parent / "allowlist" / "make_allowlist.py"


@pytest.mark.slow
def test_the_torch_class_list_is_current() -> None:
    from statecli import _torch_classes

    made_from = _torch_classes.__doc__.split("from torch ")[1].split(":")[0]
    if torch.__version__.split("+")[0] != made_from:
        pytest.skip(f"the list was made from torch {made_from}; this is {torch.__version__}")
    proc = subprocess.run([sys.executable, str(SCRIPT), "--check"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr

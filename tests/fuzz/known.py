"""Failures of the fuzz property that are known statecli defects, so the CI fuzz test can tell them apart.

Each defect has a reproducer under tests/fuzz/crashes/ (``make_crashes.CRASHES``, the reason and where
the fix belongs) that tests/test_trust_fuzz.py expects to fail, strictly. The CI fuzz test tolerates a
failure matching one of :data:`KNOWN` (and counts it), so that it looks for new problems; when a fix
lands, its reproducer passes unexpectedly and both its entry there and its pattern here go.

A pattern is matched against ``family|message|frame``: the input's family, the violation's message, and
the innermost statecli function the exception came from (``dcp.py:_short_list``).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

# crash name (in make_crashes.CRASHES) -> pattern of the failures it explains
KNOWN: dict[str, str] = {}


def signature(family: str, e: BaseException) -> str:
    """``family|message|frame`` for a violation (see the module's docstring)."""
    cause = e.__cause__ or e.__context__ or e
    frame = ""
    tb = cause.__traceback__
    while tb is not None:
        f = tb.tb_frame.f_code.co_filename
        if "/statecli/" in f.replace(os.sep, "/"):
            frame = f"{Path(f).name}:{tb.tb_frame.f_code.co_name}"
        tb = tb.tb_next
    message = " ".join(str(e).split())[:400]
    return f"{family}|{message}|{frame}"


def match(family: str, e: BaseException) -> str | None:
    """The known defect a violation is, by name, or None for a new one."""
    sig = signature(family, e)
    return next((name for name, pattern in KNOWN.items() if re.search(pattern, sig)), None)

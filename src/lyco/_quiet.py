"""Silence the chatter of diffusers/transformers/accelerate (warnings, info logs, progress bars) for
batch jobs whose own output is the point (``lyco eval``, the benchmarks)."""

from __future__ import annotations

import logging
import warnings
from typing import Iterable


def quiet_libraries(loggers: Iterable[str] = (), messages: Iterable[str] = ()) -> None:
    """Errors only from diffusers, transformers, accelerate and lyco's trainer (plus ``loggers``); the
    "kept in float32" cast warning and warnings whose text matches a regex of ``messages`` ignored;
    diffusers'/transformers' progress bars off."""
    warnings.filterwarnings("ignore", module="diffusers")
    warnings.filterwarnings("ignore", module="transformers")
    for m in (".*kept in float32.*", *messages):
        warnings.filterwarnings("ignore", message=m)
    for name in ("diffusers", "transformers", "accelerate", "lyco.train", *loggers):
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        from diffusers.utils import logging as dl
        dl.set_verbosity_error()
        dl.disable_progress_bar()
        from transformers.utils import logging as tl
        tl.set_verbosity_error()
        tl.disable_progress_bar()
    except Exception:  # noqa: BLE001 — optional quieting only
        pass

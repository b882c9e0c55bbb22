"""The math: one file per algorithm, pure functions over tensors (see base.py for the contract)."""

from .base import (  # noqa: F401
    Algorithm, LayerSpec, detect, detect_for, get, get_for, layer_kind, layer_op, names, register,
)


def _import_all():
    # Import order is detection order (first claimant wins), as in LyCORIS MODULE_LIST.
    import importlib
    for mod in ("lora", "loha", "ia3", "lokr", "full", "norm", "oft", "glora"):
        try:
            importlib.import_module(f"{__name__}.{mod}")
        except ModuleNotFoundError as e:  # only tolerated while an algorithm file is being written
            if e.name != f"{__name__}.{mod}":
                raise


_import_all()
_load_all = True

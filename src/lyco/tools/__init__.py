"""Thin verbs over the Adapter, each also a ``lyco VERB`` command.

    from lyco import tools
    tools.merge("model.safetensors", ["style.safetensors:0.8", "char.safetensors:1:0.5"], "out.safetensors")
    tools.extract("base.safetensors", "tuned.safetensors", "lora.safetensors", rank=32)
    tools.resize("lora.safetensors", "lora_r8.safetensors", rank=8)
    tools.convert("lora.safetensors", "lora_diffusers.safetensors", to="diffusers")
    tools.combine(["a.safetensors:0.7", "b.safetensors:0.5"], "ab.safetensors")
    tools.inspect("lora.safetensors")
"""

from .combine import combine  # noqa: F401
from .convert import convert  # noqa: F401
from .extract import extract  # noqa: F401
from .inspect import inspect  # noqa: F401
from .merge import merge  # noqa: F401
from .resize import resize  # noqa: F401

__all__ = ["merge", "extract", "resize", "convert", "combine", "inspect"]

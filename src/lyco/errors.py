"""Error types. Every message names the file, the key/module, what was found and what was expected."""

from __future__ import annotations


class LycoError(Exception):
    """Base class of every error lyco raises on purpose. The CLI prints these without a traceback."""


class ConfigError(LycoError, ValueError):
    """An unknown or invalid option, preset key or argument."""


class FormatError(LycoError, ValueError):
    """A file that cannot be read as what it claims to be."""

    def __init__(self, message: str, *, file: str | None = None, key: str | None = None):
        parts = []
        if file:
            parts.append(f"{file}")
        if key:
            parts.append(f"key {key!r}")
        prefix = (": ".join(parts) + ": ") if parts else ""
        super().__init__(prefix + message)
        self.file = file
        self.key = key


class ShapeMismatch(LycoError, ValueError):
    def __init__(self, module: str, found, expected, *, file: str | None = None, key: str | None = None,
                 detail: str = ""):
        where = f"{file}: " if file else ""
        k = f" (key {key!r})" if key else ""
        msg = (f"{where}module {module!r}{k}: shape {tuple(found)} does not fit the target layer; "
               f"expected {tuple(expected)}")
        if detail:
            msg += f" ({detail})"
        super().__init__(msg)
        self.module, self.found, self.expected = module, tuple(found), tuple(expected)


class UnknownKeys(LycoError, KeyError):
    def __init__(self, keys, *, file: str | None = None, what: str = "keys", hint: str = ""):
        keys = list(keys)
        shown = ", ".join(repr(k) for k in keys[:12])
        more = f" … and {len(keys) - 12} more" if len(keys) > 12 else ""
        where = f"{file}: " if file else ""
        msg = f"{where}{len(keys)} unmatched {what}: {shown}{more}"
        if hint:
            msg += f". {hint}"
        super().__init__(msg)
        self.keys = keys

    def __str__(self):  # KeyError would repr() the message
        return self.args[0]


class FamilyMismatch(LycoError, ValueError):
    def __init__(self, found: str, expected: str, *, file: str | None = None):
        where = f"{file}: " if file else ""
        super().__init__(f"{where}this adapter is for model family {found!r}, but the target model is {expected!r}")
        self.found, self.expected = found, expected


class UnsafeFile(LycoError, ValueError):
    """A legacy pickle that would need code execution to load."""

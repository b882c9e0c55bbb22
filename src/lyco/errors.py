"""Error types. Every message names the file, the key/module, what was found and what was expected."""

from __future__ import annotations

import unicodedata

#: the most characters an error message keeps (file names, keys and metadata come from strangers)
MAX_MESSAGE = 4000
#: the most characters of one key/name quoted in a message
MAX_NAME = 300

_UNSAFE_CATEGORIES = {"Cc", "Cf", "Cs", "Co", "Zl", "Zp"}


def _escape(ch: str) -> str:
    o = ord(ch)
    return f"\\x{o:02x}" if o < 0x100 else f"\\u{o:04x}" if o < 0x10000 else f"\\U{o:08x}"


def clean_text(text: str, limit: int = MAX_MESSAGE) -> str:
    """``text`` safe to print on a terminal: control characters, terminal escapes (ESC, CSI), bidi
    overrides and invisible format characters escaped (newlines kept), cut to about ``limit``."""
    if not isinstance(text, str):
        text = str(text)
    if text.isprintable() and len(text) <= limit:
        return text
    out, used = [], 0
    limit = max(1, limit - 40)  # room for the "… (N more characters)" note
    for i, ch in enumerate(text):
        e = ch if ch == "\n" or unicodedata.category(ch) not in _UNSAFE_CATEGORIES else _escape(ch)
        if used + len(e) > limit:
            out.append(f"… ({len(text) - i} more characters)")
            break
        out.append(e)
        used += len(e)
    return "".join(out)


def short_repr(name, limit: int = MAX_NAME) -> str:
    """``repr(name)`` cut to ``limit`` characters (names in files can be megabytes long)."""
    r = repr(name)
    return r if len(r) <= limit else r[: limit - 1] + f"…' ({len(str(name))} characters)"


class LycoError(Exception):
    """Base class of every error lyco raises on purpose. The CLI prints these without a traceback.

    Messages quote file names, keys and metadata from files of unknown origin: every string
    argument is made terminal-safe and length-limited here (:func:`clean_text`), once, for all
    subclasses."""

    def __init__(self, *args):
        super().__init__(*(clean_text(a) if isinstance(a, str) else a for a in args))


class ConfigError(LycoError, ValueError):
    """An unknown or invalid option, preset key or argument."""


class FormatError(LycoError, ValueError):
    """A file that cannot be read as what it claims to be."""

    def __init__(self, message: str, *, file: str | None = None, key: str | None = None):
        parts = []
        if file:
            parts.append(f"{file}")
        if key:
            parts.append(f"key {short_repr(key)}")
        prefix = (": ".join(parts) + ": ") if parts else ""
        super().__init__(prefix + message)
        self.file = file
        self.key = key


class ShapeMismatch(LycoError, ValueError):
    def __init__(self, module: str, found, expected, *, file: str | None = None, key: str | None = None,
                 detail: str = ""):
        where = f"{file}: " if file else ""
        k = f" (key {short_repr(key)})" if key else ""
        msg = (f"{where}module {module!r}{k}: shape {tuple(found)} does not fit the target layer; "
               f"expected {tuple(expected)}")
        if detail:
            msg += f" ({detail})"
        super().__init__(msg)
        self.module, self.found, self.expected = module, tuple(found), tuple(expected)


class UnknownKeys(LycoError, KeyError):
    def __init__(self, keys, *, file: str | None = None, what: str = "keys", hint: str = ""):
        keys = list(keys)
        shown = ", ".join(short_repr(k, 200) for k in keys[:12])
        more = f" … and {len(keys) - 12} more" if len(keys) > 12 else ""
        where = f"{file}: " if file else ""
        msg = f"{where}{len(keys)} unmatched {what}: {shown}{more}"
        if hint:
            msg += f". {hint}"
        super().__init__(msg)
        self.keys = keys

    def __str__(self):  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""


class FamilyMismatch(LycoError, ValueError):
    def __init__(self, found: str, expected: str, *, file: str | None = None):
        where = f"{file}: " if file else ""
        super().__init__(f"{where}this adapter is for model family {found!r}, but the target model is {expected!r}")
        self.found, self.expected = found, expected


class UnsafeFile(LycoError, ValueError):
    """A legacy pickle that would need code execution to load."""


class WriteError(LycoError, OSError):
    """An output could not be written (disk full, read-only file system, no permission…). Raised
    after the partial temporary file was removed; an older file at that path is left untouched.
    Also an :class:`OSError` (``errno`` as reported by the system), so ``except OSError`` still works."""

    def __init__(self, path, err: BaseException | None = None, what: str = "cannot write the output"):
        reason = ""
        if err is not None:
            reason = getattr(err, "strerror", None) or str(err) or type(err).__name__
        LycoError.__init__(self, f"{path}: {what}" + (f" ({reason})" if reason else "")
                           + "; nothing was written there")
        self.errno = getattr(err, "errno", None)
        self.strerror = reason or None
        self.filename = str(path)
        self.path = str(path)

    def __str__(self):  # not OSError's "[Errno N] …" form
        return str(self.args[0]) if self.args else ""

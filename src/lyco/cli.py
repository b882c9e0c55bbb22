"""The ``lyco`` command: one subcommand per verb, each a few lines over ``lyco.tools``.

Verbs register themselves through :data:`COMMANDS` (name → (help, add_arguments, run)).
Every ``LycoError`` is printed as one clear line (no traceback) with exit status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Callable

from .errors import LycoError

COMMANDS: dict[str, tuple[str, str, Callable, Callable]] = {}


def command(name: str, help: str, example: str):
    def deco(fn_pair):
        add, run = fn_pair()
        COMMANDS[name] = (help, example, add, run)
        return fn_pair
    return deco


# --------------------------------------------------------------------------------------
# inspect
# --------------------------------------------------------------------------------------

@command("inspect", "show what an adapter file holds: per-module algorithm, rank, alpha, shapes, metadata",
         "lyco inspect my_lora.safetensors\n  lyco inspect my_lora.safetensors --json > info.json\n"
         "  lyco inspect my_lora.safetensors --plot norms.png")
def _inspect():
    def add(p):
        p.add_argument("file", help="adapter file (.safetensors; legacy .pt/.ckpt read safely)")
        p.add_argument("--json", action="store_true", help="machine-readable output")
        p.add_argument("--plot", metavar="PNG", help="bar chart of ‖ΔW‖ per block")
        p.add_argument("--no-modules", action="store_true", help="totals and metadata only")
        p.add_argument("--no-norms", action="store_true", help="skip computing ‖ΔW‖ (faster)")

    def run(a):
        from . import load
        from .tools.inspect import format_report, inspect_adapter, plot_block_norms
        adapter = load(a.file, check_finite=False)
        info = inspect_adapter(adapter, norms=not a.no_norms)
        if a.plot:
            plot_block_norms(info, a.plot)
        if a.json:
            print(json.dumps(info, indent=1, default=str))
        else:
            print(format_report(info, show_modules=not a.no_modules))
            if a.plot:
                print(f"\nplot written to {a.plot}")
        return 0
    return add, run


def _load_verbs() -> None:
    """Import the modules that register more verbs (tools, train, pipeline) when present."""
    import importlib
    for mod in ("lyco.tools.cli_verbs", "lyco.train.cli_verbs", "lyco.pipeline_cli", "lyco.world.cli_verbs"):
        try:
            importlib.import_module(mod)
        except ModuleNotFoundError as e:
            if e.name != mod:
                raise


def build_parser() -> argparse.ArgumentParser:
    _load_verbs()
    from . import __version__
    p = argparse.ArgumentParser(prog="lyco", description="LyCORIS adapters: create, train, apply, merge, "
                                "extract, resize, convert, inspect.")
    p.add_argument("--version", action="version", version=f"lyco {__version__}")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = p.add_subparsers(dest="verb", metavar="VERB")
    for name, (help_, example, add, _run) in COMMANDS.items():
        sp = sub.add_parser(name, help=help_, description=help_, epilog="example:\n  " + example,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
        add(sp)
    return p


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.verb:
        parser.print_help()
        return 1
    _help, _ex, _add, run = COMMANDS[args.verb]
    try:
        return int(run(args) or 0)
    except LycoError as e:
        if args.debug:
            raise
        print(f"lyco {args.verb}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"lyco {args.verb}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())

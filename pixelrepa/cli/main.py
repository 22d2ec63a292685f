"""`pixelrepa COMMAND ...`: parse -> config -> build -> run, one module per command."""

from __future__ import annotations

import argparse
import sys

from pixelrepa.cli import data, demo, export, import_checkpoint, info, probe, sample, train
from pixelrepa.cli import eval as eval_command
from pixelrepa.cli.common import os_error_message
from pixelrepa.training.runlock import INTERRUPTED_EXIT_CODE


COMMANDS = {"info": info, "train": train, "export": export, "sample": sample, "import": import_checkpoint,
            "data": data, "demo": demo, "eval": eval_command, "probe": probe}


def build_parser() -> argparse.ArgumentParser:
    """The `pixelrepa` parser with every command's subparser (nothing is run)."""
    parser = argparse.ArgumentParser(prog="pixelrepa", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, module in COMMANDS.items():
        module.add_parser(commands.add_parser(name, help=module.__doc__.strip().splitlines()[0],
                                              description=module.__doc__))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command].run(args) or 0
    except (ValueError, OSError, KeyError, ImportError) as err:  # ImportError: an optional extra is missing
        if isinstance(err, OSError):
            message = os_error_message(err)
        else:
            message = err.args[0] if isinstance(err, KeyError) and err.args else err
        print(f"pixelrepa {args.command}: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"pixelrepa {args.command}: interrupted (Ctrl-C): what was written so far stays; run the same command "
              "again to continue", file=sys.stderr)
        return INTERRUPTED_EXIT_CODE


if __name__ == "__main__":
    sys.exit(main())

"""``rcg-augment`` command line: thin wrappers over the Python API.

Each sub-command lives in its own module exposing ``register(subparsers)``; the module's
handler parses nothing itself beyond argparse and calls the library.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from .. import __version__

# Sub-command modules, in the order `--help` lists them.
SUBCOMMANDS = ("build", "train", "finetune")


class OneLineErrorParser(argparse.ArgumentParser):
    """An argparse parser whose usage errors are one line (the problem and where help is), not the
    whole usage block; sub-command parsers are of the same class."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def make_parser() -> argparse.ArgumentParser:
    parser = OneLineErrorParser(
        prog="rcg-augment",
        description="Representation-conditioned generative data augmentation (RCG). "
        "Build augmented datasets, train and fine-tune the generative stack.",
    )
    parser.add_argument("--version", action="version", version=f"rcg-augment {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in SUBCOMMANDS:
        try:
            module = importlib.import_module(f".{name}", __name__)
        except ModuleNotFoundError as err:
            if err.name == f"{__name__}.{name}":
                continue  # sub-command not present in this build
            raise
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = make_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(message)s")
    for noisy in ("PIL", "urllib3", "filelock", "fsspec", "matplotlib"):  # -v is about this package, not theirs
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if not getattr(args, "handler", None):
        parser.print_help()
        return 2
    try:
        return int(args.handler(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError, FileExistsError, PermissionError, RuntimeError) as err:
        print(f"rcg-augment {args.command}: error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

"""What both command lines share about their flags: a parser whose every error is one line (exit status 2),
and flag types that refuse absurd numbers (a zero or negative size, NaN, inf) with the flag's name."""

from __future__ import annotations

import argparse
import math
import sys


class OneLineParser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors are one line, ``PROG: error: MESSAGE (see PROG --help)``, exit 2
    (argparse's own prints the usage first). Sub-commands inherit it.

    ``config_keys``: a function giving the lines of ``--help``'s "config keys" list (:func:`dgpo.config.describe`),
    called only when the help is shown, so that a command line without ``--help`` does not import the configs
    (and torch) to build its parser."""

    def __init__(self, *args, config_keys=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.config_keys = config_keys

    def format_help(self) -> str:
        text = super().format_help()
        if self.config_keys is None:
            return text
        return text + "\nconfig keys (--set KEY=VALUE):\n  " + "\n  ".join(self.config_keys()) + "\n"

    def error(self, message: str):
        print(f"{self.prog}: error: {message} (see {self.prog} --help)", file=sys.stderr)
        raise SystemExit(2)


def at_least(minimum: int):
    """An integer flag type: a whole number ≥ ``minimum``."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value
    parse.__name__ = f"integer ≥ {minimum}"
    return parse


def finite(minimum: float | None = None, maximum: float | None = None):
    """A number flag type: finite, within [minimum, maximum] where given."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
        if minimum is not None and value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum:g}, got {value:g}")
        if maximum is not None and value > maximum:
            raise argparse.ArgumentTypeError(f"must be at most {maximum:g}, got {value:g}")
        return value
    parse.__name__ = "number"
    return parse

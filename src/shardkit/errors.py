"""Exit codes, the error that becomes one line on stderr, and the argument parser that raises it."""

import argparse
import typing

EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_OOM = 3


class UsageError(Exception):
    """Bad input (a flag, a value, a file). Printed as one line, exit code ``EXIT_USAGE``; raised before any
    process group starts."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse would print the usage and the error on two or more lines and exit by itself; here a bad flag
    is a UsageError like any other bad input. Sub-commands' parsers are of the same class."""

    def error(self, message: str) -> typing.NoReturn:
        raise UsageError(message)

"""Exit codes and the error that becomes one line on stderr."""

EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_OOM = 3


class UsageError(Exception):
    """Bad input (a flag, a value, a file). Printed as one line, exit code ``EXIT_USAGE``; raised before any
    process group starts."""

"""Exit statuses of every ``cartrack-relay`` command, and the error that carries one.

2 = configuration or usage error, 3 = the outbox file cannot be used, 1 = anything else
that went wrong at run time, 141 = the reader of our output went away.
"""

from __future__ import annotations

EXIT_RUNTIME = 1
EXIT_CONFIG = 2
EXIT_OUTBOX = 3
EXIT_PIPE = 141  # what a shell reports for a process killed by SIGPIPE


class CliError(Exception):
    def __init__(self, message: str, code: int = EXIT_RUNTIME) -> None:
        super().__init__(message)
        self.code = code

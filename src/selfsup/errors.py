"""What went wrong is the user's input, not selfsup: one exception family for bad values and bad files.

The CLI prints a :class:`UserError` as one line (``selfsup COMMAND: error: MESSAGE``) and exits with
code 2; any other exception is a bug and keeps its traceback, followed by a line saying so. So every
message raised as a ``UserError`` names the value or the file and says what to do instead.

``UserError`` is a ``ValueError``, and :class:`UnknownName` also a ``KeyError``, so callers that
catch the built-in types keep working.

Example::

    raise UserError(f"optim.lr must be a positive number, got {value!r}")
"""

from __future__ import annotations


class UserError(ValueError):
    """A bad value, option, file or folder given by the user; the message names it and the fix."""


class UnknownName(UserError, KeyError):
    """A name that is not registered (a method, backbone, dataset, config key)."""

    def __str__(self) -> str:  # KeyError would quote the whole message
        return str(self.args[0]) if self.args else ""


class Preempted(Exception):  # noqa: N818 - not an error: the run stopped on request and resumes
    """Training stopped on SIGTERM / SIGUSR1 after writing a checkpoint; re-running the command resumes it.

    ``signal`` is the signal's name, ``step`` the step checkpointed, ``checkpoint`` its directory.
    """

    def __init__(self, signal: str, step: int, checkpoint: str, run_dir: str):
        super().__init__(f"stopped by {signal} after step {step}; checkpoint {checkpoint}")
        self.signal, self.step, self.checkpoint, self.run_dir = signal, step, checkpoint, run_dir


# Exit codes of the CLI: 2 = bad input (as argparse), 75 = EX_TEMPFAIL (sysexits.h: "try again later"),
# what a preempted run returns so a job script can tell it from a failure and resubmit.
EXIT_USAGE = 2
EXIT_PREEMPTED = 75

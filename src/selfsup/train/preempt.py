"""Preemption: SIGTERM or SIGUSR1 stop a run after its current step, with a checkpoint, so it resumes exactly.

SLURM signals a job before it kills it (SIGTERM at the time limit or on preemption, then SIGKILL after
``KillWait``), and ``#SBATCH --signal=B:USR1@120`` asks for SIGUSR1 two minutes before the end. Both set a
flag; the loop reads it after each optimiser step, writes a checkpoint atomically and raises
:class:`selfsup.errors.Preempted`, which the CLI turns into exit code 75. With ``train.requeue`` (the
``--requeue`` flag) rank 0 then runs ``scontrol requeue $SLURM_JOB_ID``: SLURM starts the same job script
again, and the same ``selfsup pretrain`` command resumes from the checkpoint.

Example::

    with StopSignals() as stop:
        for step in ...:
            ...
            if stop.requested:
                ...   # checkpoint, then raise Preempted
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import threading

from selfsup.errors import UserError

SIGNALS = ("SIGTERM", "SIGUSR1")


class StopSignals:
    """Catch SIGTERM / SIGUSR1 while training; ``requested`` names the first one received (else None).

    Handlers are installed only from the main thread (Python allows no other) and the previous ones are
    restored on exit, so evaluation after training, or a test harness, keeps its own handling.
    """

    def __init__(self) -> None:
        self.requested: str | None = None
        self._previous: dict[int, object] = {}

    def _handle(self, signum: int, frame: object) -> None:
        self.requested = self.requested or signal.Signals(signum).name

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for name in SIGNALS:
                number = getattr(signal, name)
                self._previous[number] = signal.signal(number, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)
        self._previous.clear()


def check_requeue() -> None:
    """``--requeue`` resubmits through SLURM: refuse it up front where SLURM cannot do that."""
    if not os.environ.get("SLURM_JOB_ID"):
        raise UserError("train.requeue (--requeue) resubmits the job with `scontrol requeue $SLURM_JOB_ID`, but "
                        "SLURM_JOB_ID is not set: run it inside a SLURM job (see the README's SLURM recipe), or "
                        "drop --requeue and re-run the same command yourself to resume")
    if shutil.which("scontrol") is None:
        raise UserError("train.requeue (--requeue) needs SLURM's `scontrol` on PATH, and it is not there; drop "
                        "--requeue or load SLURM's module in the job script")


def requeue() -> str:
    """Ask SLURM to run this job again; returns what was run (for the log line)."""
    command = ["scontrol", "requeue", os.environ["SLURM_JOB_ID"]]
    subprocess.run(command, check=True, capture_output=True)
    return " ".join(command)

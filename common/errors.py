"""The one exception hierarchy of fedshop.

Each class carries the process exit code the CLI maps it to, so that scripts calling
``fedshop`` can tell a bad input from an exhausted budget from a tampered ledger.
"""

from __future__ import annotations

from enum import IntEnum


class ExitCode(IntEnum):
    """Documented exit codes of the ``fedshop`` command (tested in ``tests/test_errors.py``)."""

    OK = 0
    INTERNAL = 1
    USAGE = 2
    CONFIG = 3
    DATA = 4
    BUDGET = 5
    LEDGER = 6
    INTEGRITY = 7
    CHECKPOINT = 8
    DEPLOYMENT = 9
    INTERRUPTED = 130


class FedshopError(Exception):
    """Base class: a failure fedshop understands and can explain in one line."""

    exit_code: ExitCode = ExitCode.INTERNAL
    hint: str = ""

    def one_line(self) -> str:
        message = str(self).strip().replace("\n", " ")
        return f"{message} ({self.hint})" if self.hint else message


class ConfigError(FedshopError):
    """A configuration file, flag or run-config value is unknown, missing or out of range."""

    exit_code = ExitCode.CONFIG
    hint = "fix the named key and run again"


class DataValidationError(FedshopError):
    """Input data does not follow the merchant event schema; nothing was imported."""

    exit_code = ExitCode.DATA
    hint = "see docs/data.md for the event schema"

    def __init__(
        self,
        message: str,
        *,
        file: str | None = None,
        row: int | None = None,
        column: str | None = None,
    ) -> None:
        where = ", ".join(
            part
            for part in (
                f"file {file}" if file is not None else "",
                f"row {row}" if row is not None else "",
                f"column {column!r}" if column is not None else "",
            )
            if part
        )
        super().__init__(f"{where}: {message}" if where else message)
        self.file = file
        self.row = row
        self.column = column


class PrivacyBudgetExceededError(FedshopError):
    """A release would push a merchant past its epsilon cap; no weights were released."""

    exit_code = ExitCode.BUDGET
    hint = "raise the merchant's cap in its own configuration or stop training"


class LedgerError(FedshopError):
    """The privacy ledger could not be read or written; nothing was released."""

    exit_code = ExitCode.LEDGER
    hint = "check the ledger file's path and permissions"


class IntegrityError(FedshopError):
    """A ledger, checkpoint or model file does not verify (hash, chain or signature)."""

    exit_code = ExitCode.INTEGRITY
    hint = "the file was altered or corrupted; restore it from a trusted copy"


class CheckpointError(FedshopError):
    """A checkpoint is missing, unreadable or does not match the run it should resume."""

    exit_code = ExitCode.CHECKPOINT
    hint = "start a new run or point --resume at the right run directory"


class DeploymentError(FedshopError):
    """Certificates, keys or the Flower processes of a deployment are missing or refused."""

    exit_code = ExitCode.DEPLOYMENT
    hint = "see docs/deployment.md"


class StateError(FedshopError):
    """Runtime state does not allow the operation (e.g. a secret or version is missing)."""

    exit_code = ExitCode.CHECKPOINT
    hint = "see the message for the missing piece"

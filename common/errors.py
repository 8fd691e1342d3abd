"""The one exception hierarchy of fedshop.

Each class carries the process exit code the CLI maps it to, so that scripts calling
``fedshop`` can tell a bad input from an exhausted budget, a tampered file from a privacy
violation an audit found. ``ExitCode`` is the documented table: ``fedshop --help`` prints it,
the README shows it, and tests/test_errors_and_config.py checks that every error class reaches
its code through the CLI and that the README's table matches.
"""

from __future__ import annotations

from enum import IntEnum


class ExitCode(IntEnum):
    """Exit codes of the ``fedshop`` command; :attr:`meaning` is the documented text."""

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
    PRIVACY_VIOLATION = 10
    AUDIT_INCONCLUSIVE = 11
    NOT_FOUND = 12
    STATE = 13
    REJECTED_UPDATE = 14
    TRAINING = 15
    INTERRUPTED = 130

    @property
    def meaning(self) -> str:
        return _MEANINGS[self]


_MEANINGS = {
    ExitCode.OK: "success (for audits: the checks passed)",
    ExitCode.INTERNAL: "unexpected internal error (a bug: please report it with the log)",
    ExitCode.USAGE: "the command line is malformed (unknown command or flag)",
    ExitCode.CONFIG: "a configuration file, flag or value is unknown, missing or out of range",
    ExitCode.DATA: "input data does not follow the event schema; nothing was imported",
    ExitCode.BUDGET: "a release would exceed a merchant's epsilon cap; nothing was released",
    ExitCode.LEDGER: "a privacy ledger cannot be read or written, or is the wrong file",
    ExitCode.INTEGRITY: "a ledger entry, checkpoint, model or data file fails verification",
    ExitCode.CHECKPOINT: "a checkpoint is missing or does not match the run to resume",
    ExitCode.DEPLOYMENT: "certificates, keys or the Flower processes of a deployment failed",
    ExitCode.PRIVACY_VIOLATION: "an audit found a privacy violation (verdict, not input error)",
    ExitCode.AUDIT_INCONCLUSIVE: "an audit lacked the power to decide; its result means nothing",
    ExitCode.NOT_FOUND: "the named model version, cohort or other record does not exist",
    ExitCode.STATE: "the request does not fit the current state (e.g. nothing to roll back)",
    ExitCode.REJECTED_UPDATE: "a model update was rejected before aggregation",
    ExitCode.TRAINING: "training produced no usable model (no usable updates, diverged)",
    ExitCode.INTERRUPTED: "interrupted (Ctrl-C)",
}


def exit_code_table() -> str:
    """The exit codes as plain-text lines, for ``fedshop --help``."""
    return "\n".join(f"  {code.value:>3}  {code.meaning}" for code in ExitCode)


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


class PrivacyViolationError(FedshopError):
    """An audit found that a privacy claim does not hold: epsilon under-reported in a ledger,
    or a trained model that leaks more than its claimed epsilon."""

    exit_code = ExitCode.PRIVACY_VIOLATION
    hint = "the privacy guarantee is not delivered; see docs/auditing.md and docs/canary.md"


class AuditInconclusiveError(FedshopError):
    """An audit could not detect even a known violation (its negative control), so its
    result carries no information."""

    exit_code = ExitCode.AUDIT_INCONCLUSIVE
    hint = "give the audit more power (see docs/canary.md)"


class NotFoundError(FedshopError):
    """A record looked up by name or id (model version, cohort) does not exist."""

    exit_code = ExitCode.NOT_FOUND
    hint = "list what exists and use one of those names"


class StateError(FedshopError):
    """The request is valid but does not fit the current state (nothing to roll back to,
    offline rounds not completed)."""

    exit_code = ExitCode.STATE
    hint = "check the current state first (e.g. `fedshop model history`)"


class RejectedUpdateError(FedshopError):
    """A model update that must not enter the aggregate (wrong shape or dtype, not finite,
    too large a change); the reason is logged and counted."""

    exit_code = ExitCode.REJECTED_UPDATE
    hint = "the update was left out of the aggregate; see the merchant's log"


class TrainingError(FedshopError):
    """Training produced no usable model: weights not finite, a mechanism other than the
    planned one, or no round with enough usable merchant updates."""

    exit_code = ExitCode.TRAINING
    hint = "nothing was released or aggregated; see the log for each merchant's reason"

"""``fedshop audit``: offline checks of ledger copies with the merchants' public keys."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from common.atomic import atomic_write_text
from common.audit.budgets import budget_rows
from common.audit.export import ExportFormat, export_entries
from common.audit.verify import AuditResult, audit_ledgers
from common.errors import ConfigError, LedgerError, PrivacyViolationError
from simulations.progress import progress_display


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "audit",
        help="verify ledgers, budgets and epsilon offline",
        description="Check copies of the merchants' privacy ledgers (and the platform's) with "
        "the merchants' public keys, independently of the platform: chains and signatures, "
        "budgets, epsilon recomputed with dp-accounting, a report for people, an export for "
        "other tools, and the empirical canary audit. See docs/auditing.md.",
    )
    sub = parser.add_subparsers(dest="audit_command", metavar="ACTION", required=True)
    verify = sub.add_parser(
        "verify",
        help="check chains, signatures and merchant/server copies",
        description="Check every entry hash, chain link and release field, the signatures, "
        "and that the server's copy agrees with the merchants'. Exit 0 only if all verify.",
    )
    _inputs(verify, unsigned_allowed=False)
    verify.add_argument(
        "--every-signature",
        action="store_true",
        help="check each entry's signature, not only each chain's last",
    )
    verify.set_defaults(handler=_verify)
    budgets = sub.add_parser(
        "budgets",
        help="epsilon spent, cap and remaining per cohort",
        description="Epsilon spent, cap and remaining per merchant and cohort, from verified "
        "ledgers.",
    )
    _inputs(budgets, unsigned_allowed=True)
    budgets.set_defaults(handler=_budgets)
    recompute = sub.add_parser(
        "recompute",
        help="recompute epsilon with dp-accounting",
        description="Recompute every recorded epsilon from its (sigma, q, steps) history with "
        "Google's dp-accounting (RDP and PLD); fails if a ledger under-reports.",
    )
    _inputs(recompute, unsigned_allowed=True)
    recompute.set_defaults(handler=_recompute)
    report = sub.add_parser(
        "report",
        help="write a self-contained HTML report",
        description="One HTML file that opens offline: the verdict, each merchant's epsilon "
        "over its releases against its cap, then the budget and recomputation tables.",
    )
    _inputs(report, unsigned_allowed=False)
    report.add_argument("--html", type=Path, required=True, help="output file")
    report.set_defaults(handler=_report)
    export = sub.add_parser(
        "export",
        help="verified entries as JSON or CSV",
        description="Every verified ledger entry, as JSON (full entries) or CSV (flat rows).",
    )
    _inputs(export, unsigned_allowed=True)
    export.add_argument(
        "--format",
        choices=[f.value for f in ExportFormat],
        default="json",
        help="json: full entries; csv: one flat row per entry (default json)",
    )
    export.add_argument("--out", type=Path, help="output file (default: stdout)")
    export.set_defaults(handler=_export)
    from simulations.commands.canary import register_canary

    register_canary(sub)


def _inputs(parser: argparse.ArgumentParser, *, unsigned_allowed: bool) -> None:
    parser.add_argument(
        "--ledger", type=Path, nargs="+", default=[], metavar="FILE", help="merchant ledgers"
    )
    parser.add_argument("--server-ledger", type=Path, metavar="FILE", help="the server's ledger")
    keys = parser.add_mutually_exclusive_group(required=not unsigned_allowed)
    keys.add_argument(
        "--keys", type=Path, metavar="DIR", help="directory of the merchants' MERCHANT.pub keys"
    )
    if unsigned_allowed:
        keys.add_argument(
            "--no-signatures",
            action="store_true",
            help="read the ledgers without keys: hashes and links are checked, signatures are "
            "NOT (anyone could have written the entries)",
        )


def _load(args: argparse.Namespace) -> AuditResult:
    if args.keys is None and not getattr(args, "no_signatures", False):
        raise ConfigError(
            "give --keys DIR to verify the merchants' signatures, or --no-signatures to read "
            "the ledgers unverified"
        )
    files = len(args.ledger) + (args.server_ledger is not None)
    with progress_display() as display:
        task = display.add_task("ledgers", total=files)
        result = audit_ledgers(
            args.ledger,
            keys_dir=args.keys,
            server_ledger=args.server_ledger,
            every_signature=getattr(args, "every_signature", False),
            on_file=lambda: display.advance(task),
        )
    if not result.signatures_checked:
        print(UNSIGNED, file=sys.stderr)
    return result


UNSIGNED = (
    "NOT VERIFIED: signatures were not checked (--no-signatures); hashes and chain links "
    "only, so anyone with write access could have written these entries"
)


def _verify(args: argparse.Namespace) -> int:
    result = _load(args)
    result.raise_if_bad()
    print(f"VERIFIED: {result.entries} entries, {len(result.chains)} merchants ({result.checked})")
    for merchant_id, count in sorted(result.pending.items()):
        if count and args.server_ledger is not None:
            print(f"  {merchant_id}: {count} entries not on the server (release not delivered)")
    return 0


def _budgets(args: argparse.Namespace) -> int:
    result = _load(args)
    result.raise_if_bad()
    if not result.signatures_checked:
        print(UNSIGNED)
    print(
        f"{'merchant':<16} {'cohort':<20} {'unit':<8} {'spent':>8} {'cap':>8} "
        f"{'remaining':>9} {'releases':>8}  last release (UTC)"
    )
    for row in budget_rows(result.chains):
        print(
            f"{row.merchant_id:<16} {row.cohort:<20} {row.privacy_unit:<8} {row.spent:>8.4f} "
            f"{row.cap:>8.4f} {row.remaining:>9.4f} {row.releases:>8}  {row.last_release_utc}"
        )
    return 0


def _recompute(args: argparse.Namespace) -> int:
    from common.audit.recompute import recompute_all

    result = _load(args)
    result.raise_if_bad()
    if not result.signatures_checked:
        print(UNSIGNED)
    with progress_display() as display:
        task = display.add_task("merchants", total=len(result.chains))
        rows = recompute_all(result.chains, on_merchant=lambda: display.advance(task))
    flagged = [r for r in rows if r.flags]
    for r in rows:
        print(
            f"{r.merchant_id} {r.cohort} seq {r.seq}: recorded {r.accountant.upper()} "
            f"{r.recorded:.4f} / RDP {r.recorded_rdp:.4f}; recomputed PLD {r.pld:.4f} / "
            f"RDP {r.rdp:.4f}: {'; '.join(r.flags) or 'ok'}"
        )
    if flagged:
        raise PrivacyViolationError(
            f"{len(flagged)} entries under-report epsilon (see the list above)"
        )
    return 0


def _write_atomic(path: Path, text: str) -> None:
    try:
        atomic_write_text(path, text)
    except OSError as exc:
        raise LedgerError(f"cannot write {path}: {exc}") from None


def _report(args: argparse.Namespace) -> int:
    from common.audit.recompute import Recomputed, recompute_all
    from common.audit.report import render_report

    result = _load(args)
    rows: list[Recomputed] = []
    if result.ok:
        with progress_display() as display:
            task = display.add_task("merchants", total=len(result.chains))
            rows = recompute_all(result.chains, on_merchant=lambda: display.advance(task))
    text = render_report(result, budget_rows(result.chains), rows, result.chains)
    _write_atomic(args.html, text)
    print(f"report written to {args.html}")
    result.raise_if_bad()
    return 0


def _export(args: argparse.Namespace) -> int:
    result = _load(args)
    result.raise_if_bad()
    text = export_entries(result.chains, ExportFormat(args.format))
    if args.out is None:
        sys.stdout.write(text)
    else:
        _write_atomic(args.out, text)
    return 0

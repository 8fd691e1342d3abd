"""``fedshop audit``: offline checks of ledger copies with the merchants' public keys."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from common.atomic import atomic_write_text
from common.audit.budgets import budget_rows
from common.audit.export import ExportFormat, export_entries
from common.audit.verify import AuditResult, audit_ledgers
from common.errors import LedgerError, PrivacyViolationError


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser("audit", help="verify ledgers, budgets and epsilon offline")
    sub = parser.add_subparsers(dest="audit_command", metavar="ACTION", required=True)
    verify = sub.add_parser("verify", help="check chains, signatures and merchant/server copies")
    _inputs(verify, keys_required=True)
    verify.add_argument(
        "--every-signature",
        action="store_true",
        help="check each entry's signature, not only each chain's last",
    )
    verify.set_defaults(handler=_verify)
    budgets = sub.add_parser("budgets", help="epsilon spent, cap and remaining per cohort")
    _inputs(budgets, keys_required=False)
    budgets.set_defaults(handler=_budgets)
    recompute = sub.add_parser("recompute", help="recompute epsilon with dp-accounting")
    _inputs(recompute, keys_required=False)
    recompute.set_defaults(handler=_recompute)
    report = sub.add_parser("report", help="write a self-contained HTML report")
    _inputs(report, keys_required=True)
    report.add_argument("--html", type=Path, required=True, help="output file")
    report.set_defaults(handler=_report)
    export = sub.add_parser("export", help="verified entries as JSON or CSV")
    _inputs(export, keys_required=False)
    export.add_argument("--format", choices=[f.value for f in ExportFormat], default="json")
    export.add_argument("--out", type=Path, help="output file (default: stdout)")
    export.set_defaults(handler=_export)
    from simulations.commands.canary import register_canary

    register_canary(sub)


def _inputs(parser: argparse.ArgumentParser, *, keys_required: bool) -> None:
    parser.add_argument("--ledger", type=Path, nargs="+", default=[], help="merchant ledgers")
    parser.add_argument("--server-ledger", type=Path, help="the server's ledger")
    parser.add_argument(
        "--keys",
        type=Path,
        required=keys_required,
        help="directory of MERCHANT.pub files" + ("" if keys_required else " (verifies first)"),
    )


def _load(args: argparse.Namespace) -> AuditResult:
    result = audit_ledgers(
        args.ledger,
        keys_dir=args.keys,
        server_ledger=args.server_ledger,
        every_signature=getattr(args, "every_signature", False),
    )
    if not result.signatures_checked:
        print("note: no --keys given: hashes checked, signatures NOT checked", file=sys.stderr)
    return result


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
    rows = recompute_all(result.chains)
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
    from common.audit.recompute import recompute_all
    from common.audit.report import render_report

    result = _load(args)
    rows = recompute_all(result.chains) if result.ok else []
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

"""``fedshop keys``: merchants' Ed25519 ledger-signing keys."""

from __future__ import annotations

import argparse
from pathlib import Path

from common import keys
from simulations.cli import check_output_directory


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "keys",
        help="create and inspect ledger signing keys",
        description="A merchant's Ed25519 key signs every ledger entry; auditors and the "
        "platform verify with its public key.",
    )
    sub = parser.add_subparsers(dest="keys_command", metavar="ACTION", required=True)
    generate = sub.add_parser(
        "generate",
        help="create MERCHANT.key (mode 600) and MERCHANT.pub",
        description="Create a merchant's signing key pair; an existing key is never "
        "overwritten. Keep the .key on the merchant, hand out the .pub.",
    )
    generate.add_argument("--out", type=Path, required=True, help="directory for the key pair")
    generate.add_argument("--name", required=True, help="merchant id")
    generate.set_defaults(handler=_generate)
    show = sub.add_parser(
        "show",
        help="print a public key's fingerprint",
        description="Print the SHA-256 fingerprint of a public key, to compare it with the "
        "merchant's over another channel.",
    )
    show.add_argument("pubfile", type=Path, help="MERCHANT.pub")
    show.set_defaults(handler=_show)


def _generate(args: argparse.Namespace) -> int:
    check_output_directory(args.out, "--out")
    private_path, public_path = keys.generate_keypair(args.out, name=args.name)
    fingerprint = keys.key_fingerprint(keys.load_verify_key(public_path))
    print(f"private key (keep on the merchant, mode 600): {private_path}")
    print(f"public key (give to the operator and auditors): {public_path}")
    print(f"sha256 fingerprint: {fingerprint}")
    return 0


def _show(args: argparse.Namespace) -> int:
    key = keys.load_verify_key(args.pubfile)
    print(f"{args.pubfile}: ed25519 sha256 fingerprint {keys.key_fingerprint(key)}")
    return 0

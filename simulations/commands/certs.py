"""``fedshop certs``: the CA, the SuperLink certificate and merchants' node keys."""

from __future__ import annotations

import argparse
from pathlib import Path

from common import certs
from common.errors import DeploymentError
from simulations.cli import check_output_directory


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "certs",
        help="create TLS certificates and SuperNode keys (see docs/deployment.md)",
        description="The deployment's public-key infrastructure: a certificate authority, "
        "the SuperLink's TLS certificate and each merchant's node key (docs/deployment.md).",
    )
    sub = parser.add_subparsers(dest="certs_command", metavar="ACTION", required=True)

    init = sub.add_parser(
        "init",
        help="create a certificate authority (keep it offline)",
        description="Create ca.crt and ca.key; keep the key offline, give ca.crt to merchants.",
    )
    init.add_argument("--out", type=Path, required=True, help="directory for ca.crt and ca.key")
    init.add_argument(
        "--common-name", default="fedshop CA", help="the CA's name (default %(default)s)"
    )
    init.add_argument("--days", type=int, default=3650, help="validity (default 3650)")
    init.add_argument("--force", action="store_true", help="replace existing files")
    init.set_defaults(handler=_init)

    server = sub.add_parser(
        "issue-server",
        help="issue the SuperLink's TLS certificate",
        description="Issue the SuperLink's TLS certificate, signed by the CA, for the names "
        "and addresses merchants dial.",
    )
    server.add_argument("--ca-dir", type=Path, required=True, help="CA directory from `certs init`")
    server.add_argument(
        "--host",
        action="append",
        required=True,
        help="DNS name or IP that SuperNodes dial (repeat for several); becomes a SAN",
    )
    server.add_argument("--out", type=Path, required=True, help="directory for server.crt/.key")
    server.add_argument("--days", type=int, default=397, help="validity (default 397)")
    server.add_argument("--force", action="store_true", help="replace (certificate rotation)")
    server.set_defaults(handler=_issue_server)

    node = sub.add_parser(
        "issue-node",
        help="create a merchant SuperNode's P-384 key pair",
        description="Create a merchant node's P-384 key pair; the platform allow-lists the "
        "public key, the private key stays with the merchant.",
    )
    node.add_argument("--out", type=Path, required=True, help="directory for NAME.node.key/.pub")
    node.add_argument("--name", required=True, help="merchant / node name")
    node.add_argument("--force", action="store_true", help="replace existing files")
    node.set_defaults(handler=_issue_node)

    verify = sub.add_parser(
        "verify",
        help="check a server certificate against a CA and host",
        description="Check that a server certificate chains to the CA, is valid now and "
        "names the host merchants dial.",
    )
    verify.add_argument("--ca-cert", type=Path, required=True, help="the CA certificate (PEM)")
    verify.add_argument("--cert", type=Path, required=True, help="the server certificate (PEM)")
    verify.add_argument("--host", required=True, help="DNS name or IP merchants dial")
    verify.set_defaults(handler=_verify)


def _init(args: argparse.Namespace) -> int:
    check_output_directory(args.out, "--out", error=DeploymentError)
    files = certs.init_ca(
        args.out, common_name=args.common_name, valid_days=args.days, force=args.force
    )
    print(f"CA certificate: {files.cert}\nCA key (keep offline, mode 600): {files.key}")
    return 0


def _issue_server(args: argparse.Namespace) -> int:
    check_output_directory(args.out, "--out", error=DeploymentError)
    files = certs.issue_server_cert(
        ca_dir=args.ca_dir, hosts=args.host, out=args.out, valid_days=args.days, force=args.force
    )
    print(f"server certificate: {files.cert} (SANs: {', '.join(args.host)})")
    print(f"server key (mode 600): {files.key}\nCA certificate for clients: {files.ca_cert}")
    return 0


def _issue_node(args: argparse.Namespace) -> int:
    check_output_directory(args.out, "--out", error=DeploymentError)
    files = certs.generate_node_key(out=args.out, name=args.name, force=args.force)
    print(f"node private key (stays with the merchant, mode 600): {files.private_key}")
    print(f"node public key (send to the platform): {files.public_key}")
    print(f"fingerprint: {files.fingerprint}")
    return 0


def _verify(args: argparse.Namespace) -> int:
    leaf = certs.verify_server_cert(cert_path=args.cert, ca_cert_path=args.ca_cert, host=args.host)
    sans = ", ".join(certs.subject_alt_names(leaf))
    print(f"OK: {args.cert} chains to {args.ca_cert}, valid for {args.host} (SANs: {sans}),")
    print(f"expires {leaf.not_valid_after_utc:%Y-%m-%d}")
    return 0

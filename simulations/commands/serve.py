"""``fedshop recommend``, ``fedshop serve``, ``fedshop feedback`` and ``fedshop ab report``.

Everything runs at a merchant, from its merchant.toml, on models its mirror holds (verified with
the platform key it pinned) and on its own events (docs/serving.md).
"""

from __future__ import annotations

import argparse
import gc
import ipaddress
import json
import logging
import signal
import socket
import ssl
import sys
from datetime import datetime
from pathlib import Path

from client.merchant import MerchantConfig
from common.errors import ConfigError, NotFoundError
from simulations.cli import tcp_port

log = logging.getLogger(__name__)

SWITCH_INTERVAL_S = 0.0005


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    _register_recommend(subparsers)
    _register_serve(subparsers)
    _register_feedback(subparsers)
    _register_ab(subparsers)


def _config_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, required=True, help="the merchant's merchant.toml")


def _register_recommend(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser(
        "recommend",
        help="top-K products for customers from the served model",
        description="Score the merchant's whole catalogue for one or many customers with the "
        "serving version of its model mirror; every row carries the score and the version.",
    )
    _config_flag(p)
    who = p.add_mutually_exclusive_group(required=True)
    who.add_argument("--customer", help="one customer id")
    who.add_argument(
        "--customers",
        type=Path,
        metavar="FILE",
        help="customer ids: a text file (one per line) or CSV/Parquet with customer_id",
    )
    p.add_argument("-k", type=int, default=10, help="products per customer (default 10)")
    p.add_argument("--out", type=Path, help="write .csv or .parquet instead of printing")
    p.add_argument("--version", type=int, help="a version the mirror holds (default: serving)")
    p.set_defaults(handler=run_recommend)


def _register_serve(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser(
        "serve",
        help="run the merchant's recommendation service (HTTP)",
        description="GET /recommendations, POST /purchases, /healthz, /metrics and /docs at the "
        "merchant; switches to a newly published version without a restart.",
    )
    _config_flag(p)
    p.add_argument("--host", help="address to listen on (default: merchant.serving.host)")
    p.add_argument(
        "--port",
        type=tcp_port("--port"),
        help="0 picks a free port (default: merchant.serving.port)",
    )
    p.add_argument(
        "--allow-plaintext",
        action="store_true",
        help="listen on a non-loopback address without TLS (only behind a TLS proxy)",
    )
    p.set_defaults(handler=run_serve)


def _register_feedback(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser(
        "feedback",
        help="report purchases: join them to responses and feed them to learning",
        description="Validate a purchase file like `fedshop data import`, join each purchase "
        "to the response that showed it, and drop the events into the merchant's inbox.",
    )
    _config_flag(p)
    p.add_argument("--events", type=Path, required=True, help="CSV/Parquet purchase events")
    p.add_argument(
        "--map",
        dest="mapping",
        action="append",
        default=[],
        metavar="SOURCE=FIELD",
        help="rename a source column to a schema field (FIELD '-' drops it)",
    )
    p.set_defaults(handler=run_feedback)


def _register_ab(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "ab",
        help="A/B tests between model versions at the merchant",
        description="Reports on the A/B test the merchant's serving runs between the serving "
        "version and a candidate: per-arm hit rate, NDCG@10 and revenue-weighted hit rate with "
        "95% confidence intervals, from the merchant's own impression and purchase logs.",
    )
    sub = parser.add_subparsers(dest="ab_command", metavar="ACTION", required=True)
    p = sub.add_parser(
        "report",
        help="per-arm hit rate, NDCG@10 and revenue-weighted hit rate with 95%% CIs",
        description="Joins purchases of newly accepted inbox cohorts first. Only the 'evidence' "
        "counts of --json (per-arm sums) may leave the merchant.",
    )
    _config_flag(p)
    p.add_argument("--candidate", type=int, help="the experiment's candidate version")
    p.add_argument("--as-of", help="ISO time up to which purchases are known (default: newest)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(handler=run_ab_report)


def _merchant(args: argparse.Namespace) -> MerchantConfig:
    return MerchantConfig.from_toml(args.config)


def _one_blas_thread() -> None:
    """Scoring one customer is a few small products over the catalogue: intra-op threads only
    contend with the other requests being answered, so torch and BLAS get one thread each."""
    import torch
    from threadpoolctl import threadpool_limits

    torch.set_num_threads(1)
    threadpool_limits(limits=1, user_api="blas")


# -- recommend ----------------------------------------------------------------------------
def run_recommend(args: argparse.Namespace) -> int:
    from client.serving.batch import load_scorer, read_customers, recommend_batch, write_rows

    _one_blas_thread()
    merchant = _merchant(args)
    if args.version is not None:
        _check_held(merchant, args.version)
    if args.customer is not None and not args.customer.strip():
        raise ConfigError("--customer: the customer id is empty")
    customers = [args.customer] if args.customer is not None else read_customers(args.customers)
    result = recommend_batch(load_scorer(merchant, args.version), customers, args.k)
    if args.out is not None:
        write_rows(result.rows, args.out)
        print(f"wrote {len(result.rows)} rows for {result.customers} customers to {args.out}")
    else:
        print(result.rows.to_string(index=False))
    print(
        f"scored {result.customers} customers in {result.scoring_seconds:.3f} s "
        f"({result.customers_per_second:,.0f} customers/s)",
        file=sys.stderr,
    )
    return 0


def _check_held(merchant: MerchantConfig, version: int) -> None:
    """A version the mirror never received is a lookup miss (not found); a version it received
    or the publication names, with a file gone, is damage the mirror reports as an integrity
    error when it loads it."""
    from client.publish import open_mirror

    mirror = open_mirror(merchant)
    publication = mirror.publication()
    if publication is None or version in publication.versions():
        return
    stem = mirror.versions_dir / f"v{version:06d}"
    if not any(stem.with_suffix(ext).exists() for ext in (".manifest.json", ".npz")):
        raise NotFoundError(
            f"model version {version} is not in the mirror {mirror.root} of merchant "
            f"{merchant.id} (it holds the versions published to it)"
        )


# -- serve --------------------------------------------------------------------------------
def _listening_socket(host: str, port: int, *, tls: bool, allow_plaintext: bool) -> socket.socket:
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = host == "localhost"
    if not (loopback or tls or allow_plaintext):
        raise ConfigError(
            f"refusing to serve customers' recommendations on {host} without TLS: set "
            "merchant.serving.tls_cert/tls_key, or --allow-plaintext behind a TLS proxy"
        )
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        sock.listen(2048)  # connections queue until the server accepts them
    except OSError as exc:
        sock.close()
        raise ConfigError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    return sock


def _check_tls(cert: Path | None, key: Path | None) -> None:
    """Load the certificate and key the way the server will, to fail with one clear line."""
    if cert is None or key is None:
        return
    for path in (cert, key):
        if not path.is_file():
            raise ConfigError(f"merchant.serving TLS file {path} does not exist")
    try:
        ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(cert, key)
    except (ssl.SSLError, OSError) as exc:
        raise ConfigError(
            f"merchant.serving.tls_cert {cert} and tls_key {key} do not load as a certificate "
            f"and its private key: {exc}"
        ) from None


def run_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from client.serving.http import create_app
    from client.serving.runtime import ServingRuntime
    from client.serving.store import ServingStore

    _one_blas_thread()
    merchant = _merchant(args)
    serving = merchant.serving
    host = args.host or serving.host
    port = serving.port if args.port is None else args.port
    _check_tls(serving.tls_cert, serving.tls_key)
    sock = _listening_socket(host, port, tls=serving.tls, allow_plaintext=args.allow_plaintext)
    runtime = ServingRuntime(merchant, store=ServingStore(merchant.serving_dir)).start()
    config = uvicorn.Config(
        create_app(runtime),
        log_level="warning",
        access_log=False,
        ssl_certfile=None if serving.tls_cert is None else str(serving.tls_cert),
        ssl_keyfile=None if serving.tls_key is None else str(serving.tls_key),
        timeout_graceful_shutdown=5,
    )
    scheme = "https" if serving.tls else "http"
    state = runtime.state
    version = f"version {state.control.version_id}" if state is not None else "no model yet"
    if state is None and runtime.last_error:
        version += f": {runtime.last_error}"
    print(
        f"serving merchant {merchant.id} on {scheme}://{host}:{sock.getsockname()[1]} "
        f"({version}); docs at /docs",
        flush=True,
    )
    # What start-up loaded (torch, pandas, the app) lives as long as the service: moved out of
    # the collector's generations, a full collection no longer walks it during a request.
    gc.collect()
    gc.freeze()
    # Requests are answered on the event loop; the watcher (hot swap) and the impression writer
    # are other threads. Each time a request's torch or numpy call lets the GIL go, a busy
    # other thread keeps it for up to the switch interval (5 ms by default), a few dozen times
    # per request: during a swap that can add tens of ms to a request. 0.5 ms bounds it.
    sys.setswitchinterval(SWITCH_INTERVAL_S)
    previous = signal.signal(signal.SIGTERM, _stop_requested)
    try:
        uvicorn.Server(config).run(sockets=[sock])
    except _StopRequestedError:
        pass  # uvicorn shut down gracefully and passed SIGTERM on (systemd's stop)
    finally:
        signal.signal(signal.SIGTERM, previous)
        runtime.stop()  # flushes the impressions still queued
        sock.close()
    return 0


class _StopRequestedError(Exception):
    """SIGTERM after uvicorn's graceful shutdown: stop without losing queued impressions."""


def _stop_requested(signum: int, frame: object) -> None:
    raise _StopRequestedError


# -- feedback -----------------------------------------------------------------------------
def run_feedback(args: argparse.Namespace) -> int:
    from client.serving.feedback import check_merchant_rows, record_purchases
    from client.serving.store import ServingStore
    from common.errors import DataValidationError
    from common.events import MERCHANT_ID, read_events
    from simulations.commands.data import parse_mapping

    merchant = _merchant(args)
    mapping = parse_mapping(args.mapping)
    try:  # a shop's own export usually has no merchant_id column: it is this merchant
        events = read_events(args.events, mapping=mapping, merchant_id=merchant.id)
    except DataValidationError as exc:
        if exc.column != MERCHANT_ID:
            raise
        events = read_events(args.events, mapping=mapping)
    check_merchant_rows(events, merchant, str(args.events))  # before the store is created
    result = record_purchases(
        events, merchant, ServingStore(merchant.serving_dir), source=str(args.events)
    )
    counts = result.counts
    print(
        f"{counts.purchases} new purchase(s), {counts.already_known} already reported; "
        f"{counts.joined} joined a response, {counts.shown} of them a response that showed it"
    )
    where = result.inbox_file or "nowhere: merchant.inbox is not set, learning will not see them"
    print(f"fed to learning: {where}")
    return 0


# -- ab report ----------------------------------------------------------------------------
def run_ab_report(args: argparse.Namespace) -> int:
    from client.serving.ab_report import ab_report
    from client.serving.feedback import attribute_new_cohorts, attribution_window
    from client.serving.store import ServingStore

    merchant = _merchant(args)
    store = ServingStore(merchant.serving_dir)
    attribute_new_cohorts(merchant, store)
    as_of = None
    if args.as_of is not None:
        try:
            as_of = datetime.fromisoformat(args.as_of)
        except ValueError:
            raise ConfigError(f"--as-of {args.as_of!r} is not an ISO 8601 time") from None
        if as_of.tzinfo is None:
            raise ConfigError(f"--as-of {args.as_of!r} needs a UTC offset, e.g. +00:00")
    report = ab_report(
        store,
        window=attribution_window(merchant),
        min_customers=merchant.serving.min_customers_per_arm,
        candidate=args.candidate,
        as_of=as_of,
    )
    if args.json:
        print(json.dumps(report.to_dict(), indent=2, allow_nan=True))
        return 0
    print(_report_text(report))
    return 0


def _report_text(report: object) -> str:
    from client.serving.ab_report import METRICS, AbReport

    assert isinstance(report, AbReport)
    lines = [
        f"A/B test of candidate version {report.experiment}, purchases known until "
        f"{report.as_of}, attribution window {report.window_hours:g} h",
    ]
    if report.experiment is not None:
        lines.append(
            f"{'arm':<10} {'versions':<10} {'customers':>9} {'responses':>9} {'hits':>6}  "
            + "  ".join(f"{m:<26}" for m in METRICS)
        )
        for arm in report.arms.values():
            cells = "  ".join(
                f"{e.value:.4f} [{e.low:.4f}, {e.high:.4f}]"
                for e in (arm.metrics[m] for m in METRICS)
            )
            versions = ",".join(f"v{v}" for v in arm.versions) or "-"
            lines.append(
                f"{arm.arm:<10} {versions:<10} {arm.customers:>9} {arm.responses:>9} "
                f"{arm.hits:>6}  {cells}"
            )
        for c in report.comparisons:
            lines.append(
                f"candidate - control {c.metric}: {c.difference:+.4f} "
                f"[{c.low:+.4f}, {c.high:+.4f}], p = {c.p_value:.3g}, "
                f"detectable at 80% power: {c.minimum_detectable:.4f}"
            )
    lines.append(f"verdict: {report.verdict}")
    return "\n".join(lines)

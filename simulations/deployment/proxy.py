"""The merchant-facing port: nginx passes the Fleet API through and nothing else.

Flower 1.41's SuperLink serves its Fleet API (for SuperNodes), its Control API (``flwr run``,
``flwr ls``, node registration) and its Runtime API (the ServerApp's side) on one HTTPS port,
and its only way to authenticate Control API users is an OIDC plugin that the open-source
distribution does not ship. So ``fedshop server`` binds the SuperLink to 127.0.0.1 and puts
Debian's nginx in front of it: the public port terminates TLS with the platform's certificate
and forwards ``/v1/fleet/*`` to the SuperLink; every other path is answered 403 by nginx
itself. The Control and Runtime APIs are reachable only from the platform host.

The loopback hop is TLS as well (Flower authenticates nodes only over TLS), with a
certificate for ``localhost``/``127.0.0.1`` from a private CA that ``fedshop server`` keeps in
its state directory; merchants never see it.
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from common import certs
from common.atomic import atomic_write_text
from common.errors import DeploymentError

FLEET_PREFIX = "/v1/fleet/"
REFUSAL_BODY = "fedshop: this port serves only the Fleet API (SuperNodes)"
LOOPBACK_HOSTS = ("localhost", "127.0.0.1")
NGINX_CANDIDATES = ("/usr/sbin/nginx", "/usr/local/sbin/nginx")
MAX_BODY = "512m"  # one pushed object; Flower splits messages into objects


@dataclass(frozen=True)
class LoopbackTls:
    """The SuperLink's certificate on 127.0.0.1, from a CA private to the platform host."""

    directory: Path

    @property
    def ca_cert(self) -> Path:
        return self.directory / "ca" / certs.CA_CERT

    @property
    def cert(self) -> Path:
        return self.directory / certs.SERVER_CERT

    @property
    def key(self) -> Path:
        return self.directory / certs.SERVER_KEY

    def ensure(self) -> LoopbackTls:
        """Create the CA and certificate once; replace them when missing or unusable."""
        try:
            certs.verify_server_cert(
                cert_path=self.cert, ca_cert_path=self.ca_cert, host=LOOPBACK_HOSTS[1]
            )
            certs.verify_key_matches_cert(key_path=self.key, cert_path=self.cert)
            return self
        except DeploymentError:
            pass
        ca_dir = self.ca_cert.parent
        certs.init_ca(ca_dir, common_name="fedshop loopback CA (platform host only)", force=True)
        certs.issue_server_cert(
            ca_dir=ca_dir, hosts=list(LOOPBACK_HOSTS), out=self.directory, force=True
        )
        return self


@dataclass(frozen=True)
class FleetProxySpec:
    """nginx on the merchant-facing address, forwarding the Fleet API to the SuperLink."""

    listen_host: str
    listen_port: int
    upstream_port: int  # the SuperLink on 127.0.0.1
    upstream_ca: Path | None  # None: the SuperLink speaks plaintext (--insecure-dev)
    certificate: Path | None  # the platform's server.crt; None: plaintext (--insecure-dev)
    private_key: Path | None
    directory: Path  # nginx.conf, pid file and temporary files
    log_dir: Path

    @property
    def conf_path(self) -> Path:
        return self.directory / "nginx.conf"

    @property
    def access_log(self) -> Path:
        return self.log_dir / "proxy-access.log"

    @property
    def error_log(self) -> Path:
        return self.log_dir / "proxy-error.log"


def find_nginx() -> str:
    """Debian's nginx binary, or a clear error saying how to install it."""
    found = shutil.which("nginx") or next((c for c in NGINX_CANDIDATES if Path(c).is_file()), None)
    if found is None:
        raise DeploymentError(
            "nginx is not installed; `fedshop server` puts it in front of the SuperLink so "
            "that merchants reach only the Fleet API (Debian: `apt-get install nginx`, or "
            "`make test-deps` in a checkout)"
        )
    return found


def _listen(host: str, port: int) -> str:
    if ":" in host:
        return f"[{host}]:{port}"
    return f"{host}:{port}"


def _quoted(path: Path) -> str:
    text = str(path)
    if any(ch in text for ch in "\"'\\;{}\n$ \t"):
        raise DeploymentError(f"path {text!r} has characters nginx configuration cannot carry")
    return text


def nginx_conf(spec: FleetProxySpec) -> str:
    """The whole nginx configuration: one server, one forwarded prefix, 403 for the rest."""
    tmp = spec.directory / "tmp"
    tls = spec.certificate is not None and spec.private_key is not None
    listen = _listen(spec.listen_host, spec.listen_port) + (" ssl" if tls else "")
    scheme = "https" if spec.upstream_ca is not None else "http"
    lines = [
        "daemon off;",
        "worker_processes 1;",
        f"pid {_quoted(spec.directory / 'nginx.pid')};",
        f"error_log {_quoted(spec.error_log)} warn;",
        "events { worker_connections 512; }",
        "http {",
        # nginx's combined format up to the byte count, then how long each request took
        # here and at the SuperLink (seconds; "-" when nginx answered it itself)
        '  log_format fleet \'$remote_addr - - [$time_local] "$request" $status '
        "$body_bytes_sent request_s=$request_time superlink_s=$upstream_response_time "
        "at=$msec';",
        f"  access_log {_quoted(spec.access_log)} fleet;",
        f"  client_body_temp_path {_quoted(tmp / 'body')};",
        f"  proxy_temp_path {_quoted(tmp / 'proxy')};",
        f"  fastcgi_temp_path {_quoted(tmp / 'fastcgi')};",
        f"  uwsgi_temp_path {_quoted(tmp / 'uwsgi')};",
        f"  scgi_temp_path {_quoted(tmp / 'scgi')};",
        "  server_tokens off;",
        f"  upstream superlink {{ server 127.0.0.1:{spec.upstream_port}; keepalive 8; }}",
        "  server {",
        f"    listen {listen};",
    ]
    if tls:
        assert spec.certificate is not None and spec.private_key is not None
        lines += [
            f"    ssl_certificate {_quoted(spec.certificate)};",
            f"    ssl_certificate_key {_quoted(spec.private_key)};",
            "    ssl_protocols TLSv1.2 TLSv1.3;",
        ]
    lines += [
        f"    client_max_body_size {MAX_BODY};",
        f"    location {FLEET_PREFIX} {{",
        f"      proxy_pass {scheme}://superlink;",
        "      proxy_http_version 1.1;",
        '      proxy_set_header Connection "";',
        "      proxy_request_buffering off;",
        "      proxy_buffering off;",
        "      proxy_read_timeout 300s;",
        "      proxy_send_timeout 300s;",
    ]
    if spec.upstream_ca is not None:
        lines += [
            "      proxy_ssl_verify on;",
            f"      proxy_ssl_trusted_certificate {_quoted(spec.upstream_ca)};",
            f"      proxy_ssl_name {LOOPBACK_HOSTS[0]};",
            "      proxy_ssl_session_reuse on;",
        ]
    lines += [
        "    }",
        "    location / {",
        "      default_type text/plain;",
        f'      return 403 "{REFUSAL_BODY}\\n";',
        "    }",
        "  }",
        "}",
    ]
    return "\n".join(lines) + "\n"


def write_config(spec: FleetProxySpec) -> Path:
    """Write ``nginx.conf`` and have nginx check it (``nginx -t``) before anything starts."""
    spec.directory.mkdir(parents=True, exist_ok=True)
    spec.log_dir.mkdir(parents=True, exist_ok=True)
    (spec.directory / "tmp").mkdir(exist_ok=True)
    atomic_write_text(spec.conf_path, nginx_conf(spec), mode=certs.PUBLIC_MODE)
    done = subprocess.run(
        [*nginx_argv(spec), "-t", "-q"], capture_output=True, text=True, timeout=30
    )
    if done.returncode != 0:
        detail = (done.stderr or done.stdout).strip().splitlines()
        raise DeploymentError(
            f"nginx refused its configuration {spec.conf_path}: "
            f"{detail[-1] if detail else 'no detail'}"
        )
    return spec.conf_path


def nginx_argv(spec: FleetProxySpec) -> list[str]:
    """``nginx`` with our prefix, configuration and error log (nothing from /etc/nginx)."""
    return [
        find_nginx(),
        "-p",
        str(spec.directory),
        "-c",
        str(spec.conf_path),
        "-e",
        str(spec.error_log),
    ]

"""The merchant's serving commands through the real entry point: output, files, exit codes."""

from __future__ import annotations

import sys
from pathlib import Path

import pandas as pd
import pytest

from common.errors import ExitCode
from simulations.cli import main

sys.path.insert(0, str(Path(__file__).parent / "support"))
from serving_world import World, make_world


@pytest.fixture()
def world(tmp_path: Path) -> World:
    return make_world(tmp_path)


def config(world: World) -> str:
    path = world.root / "merchant.toml"
    path.write_text(world.merchant.to_toml())
    return str(path)


def test_recommend_needs_a_published_model(world: World, capsys: pytest.CaptureFixture) -> None:
    code = main(["recommend", "--config", config(world), "--customer", "c1"])
    assert code == ExitCode.CONFIG
    assert "no model has been published" in capsys.readouterr().err


def test_recommend_prints_or_writes_scores_with_the_version(
    world: World, capsys: pytest.CaptureFixture
) -> None:
    version = world.register(1)
    world.publish(serving=version)
    known = str(world.events["customer_id"].iloc[0])
    assert main(["recommend", "--config", config(world), "--customer", known, "-k", "3"]) == 0
    out = capsys.readouterr()
    lines = out.out.strip().splitlines()
    assert lines[0].split() == [
        "customer_id",
        "rank",
        "product_id",
        "score",
        "model_version",
        "known_customer",
    ]
    assert len(lines) == 4 and all(line.split()[4] == str(version) for line in lines[1:])
    assert "customers/s" in out.err

    ids = world.root / "customers.txt"
    ids.write_text(f"{known}\nnobody-here\n{known}\n")
    target = world.root / "out" / "recs.csv"
    assert (
        main(
            ["recommend", "--config", config(world), "--customers", str(ids), "--out", str(target)]
        )
        == 0
    )
    rows = pd.read_csv(target, dtype={"customer_id": str})
    assert list(rows["customer_id"].unique()) == [known, "nobody-here"]  # each customer once
    assert rows.groupby("customer_id").size().tolist() == [10, 10]
    assert rows.set_index("customer_id")["known_customer"].to_dict() == {
        known: True,
        "nobody-here": False,
    }
    for _, group in rows.groupby("customer_id"):
        assert group["score"].is_monotonic_decreasing and list(group["rank"]) == list(range(1, 11))


def test_recommend_names_bad_input(world: World, capsys: pytest.CaptureFixture) -> None:
    world.publish(serving=world.register(1))
    bad = world.root / "ids.csv"
    bad.write_text("client\n1\n")
    assert main(["recommend", "--config", config(world), "--customers", str(bad)]) == ExitCode.DATA
    assert "no 'customer_id' column" in capsys.readouterr().err
    code = main(
        [
            "recommend",
            "--config",
            config(world),
            "--customer",
            "c",
            "--out",
            str(world.root / "x.txt"),
        ]
    )
    assert code == ExitCode.CONFIG and ".csv or .parquet" in capsys.readouterr().err
    code = main(["recommend", "--config", config(world), "--customer", "c", "--version", "9"])
    assert code == ExitCode.NOT_FOUND and "not in the mirror" in capsys.readouterr().err
    (world.merchant.models_dir / "versions" / "v000001.npz").unlink()  # held, then damaged
    code = main(["recommend", "--config", config(world), "--customer", "c", "--version", "1"])
    assert code == ExitCode.INTEGRITY and "v000001.npz is missing" in capsys.readouterr().err


def test_recommend_refuses_an_empty_customer_list(
    world: World, capsys: pytest.CaptureFixture
) -> None:
    world.publish(serving=world.register(1))
    code = main(["recommend", "--config", config(world), "--customer", " "])
    assert (
        code == ExitCode.CONFIG
        and "--customer: the customer id is empty" in capsys.readouterr().err
    )
    for name, text in [("none.txt", "\n\n"), ("none.csv", "customer_id\n")]:
        path = world.root / name
        path.write_text(text)
        code = main(["recommend", "--config", config(world), "--customers", str(path)])
        err = capsys.readouterr().err
        assert code == ExitCode.DATA and name in err and "lists none" in err


def test_serve_refuses_a_public_address_without_tls(
    world: World, capsys: pytest.CaptureFixture
) -> None:
    code = main(["serve", "--config", config(world), "--host", "0.0.0.0", "--port", "0"])
    assert code == ExitCode.CONFIG and "without TLS" in capsys.readouterr().err


def test_feedback_reads_a_shop_export_and_reports(
    world: World, capsys: pytest.CaptureFixture
) -> None:
    export = world.root / "orders.csv"
    export.write_text(
        "client,sku,when,qty,unit_price,category,department,brand\n"
        "c1,p1,2030-01-01T10:00:00Z,1,2.5,,,\n"
        "c2,p2,2030-01-01T11:00:00Z,2,1.0,,,\n"
    )
    mapping = ["client=customer_id", "sku=product_id", "when=timestamp", "qty=quantity"]
    mapping.append("unit_price=price")
    args = ["feedback", "--config", config(world), "--events", str(export)]
    args += [a for m in mapping for a in ("--map", m)]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "2 new purchase(s), 0 already reported" in out and "inbox" in out
    assert main(args) == 0
    assert "0 new purchase(s), 2 already reported" in capsys.readouterr().out
    broken = world.root / "broken.csv"
    broken.write_text(export.read_text().replace(",1,2.5,", ",-1,2.5,"))
    code = main(["feedback", "--config", config(world), "--events", str(broken), *args[5:]])
    assert code == ExitCode.DATA and "row 1" in capsys.readouterr().err


def test_feedback_with_another_merchants_rows_creates_no_serving_state(
    world: World, capsys: pytest.CaptureFixture
) -> None:
    export = world.root / "orders.csv"
    export.write_text(
        "merchant_id,customer_id,product_id,timestamp,quantity,price\n"
        f"{world.merchant.id},c1,p1,2030-01-01T10:00:00Z,1,2.5\n"
        "someone-else,c2,p2,2030-01-01T11:00:00Z,2,1.0\n"
    )
    code = main(["feedback", "--config", config(world), "--events", str(export)])
    err = capsys.readouterr().err
    assert code == ExitCode.DATA and "orders.csv" in err and "row 2" in err
    assert "'someone-else'" in err
    assert not world.merchant.serving_dir.exists()


def test_ab_report_without_an_experiment_says_so(
    world: World, capsys: pytest.CaptureFixture
) -> None:
    assert main(["ab", "report", "--config", config(world)]) == 0
    assert "verdict: no A/B test" in capsys.readouterr().out
    assert main(["ab", "report", "--config", config(world), "--as-of", "2030-01-01"]) == 3
    assert "needs a UTC offset" in capsys.readouterr().err


def test_serve_speaks_tls_with_the_merchants_certificate(world: World) -> None:
    import http.client
    import json
    import re
    import signal
    import ssl
    import subprocess

    from common.certs import init_ca, issue_server_cert

    ca = init_ca(world.root / "ca")
    tls = issue_server_cert(ca_dir=world.root / "ca", hosts=["127.0.0.1"], out=world.root / "tls")
    world.with_serving(tls_cert=tls.cert, tls_key=tls.key)
    world.publish(serving=world.register(1))
    serve = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "simulations.cli",
            "serve",
            "--config",
            config(world),
            "--port",
            "0",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        line = serve.stdout.readline()  # type: ignore[union-attr]
        assert line.startswith("serving merchant") and "https://127.0.0.1:" in line, line
        port = int(re.search(r":(\d+) ", line).group(1))  # type: ignore[union-attr]
        context = ssl.create_default_context(cafile=str(ca.cert))
        secure = http.client.HTTPSConnection("127.0.0.1", port, context=context, timeout=30)
        secure.request("GET", "/recommendations?customer=anyone&k=2")
        answer = secure.getresponse()
        assert answer.status == 200 and len(json.loads(answer.read())["items"]) == 2
        plain = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        with pytest.raises((http.client.HTTPException, ConnectionError)):
            plain.request("GET", "/healthz")
            plain.getresponse()
        untrusting = ssl.create_default_context()  # the system's CAs do not know this one
        stranger = http.client.HTTPSConnection("127.0.0.1", port, context=untrusting, timeout=30)
        with pytest.raises(ssl.SSLCertVerificationError):
            stranger.request("GET", "/healthz")
    finally:
        serve.send_signal(signal.SIGTERM)
        assert serve.wait(timeout=60) == 0


def test_serve_names_a_certificate_that_does_not_load(
    world: World, capsys: pytest.CaptureFixture
) -> None:
    from common.certs import init_ca

    ca = init_ca(world.root / "ca")
    world.with_serving(tls_cert=ca.cert, tls_key=world.root / "missing.key")
    assert main(["serve", "--config", config(world), "--port", "0"]) == ExitCode.CONFIG
    assert "missing.key does not exist" in capsys.readouterr().err
    other = init_ca(world.root / "other-ca")
    world.with_serving(tls_cert=ca.cert, tls_key=other.key)
    assert main(["serve", "--config", config(world), "--port", "0"]) == ExitCode.CONFIG
    assert "do not load as a certificate and its private key" in capsys.readouterr().err

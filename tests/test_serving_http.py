"""The recommendation service's HTTP contract: answers, cold start, bad input, health, metrics."""

from __future__ import annotations

import re
import sys
import urllib.parse
import warnings
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from client.evaluation import local_state_path
from client.serving.http import create_app
from client.serving.runtime import ServingRuntime
from client.serving.store import ServingStore
from common.events import write_events
from common.metrics_store import MetricsStore, MetricType
from common.nextbasket.local import LocalHead, LocalState

sys.path.insert(0, str(Path(__file__).parent / "support"))
from serving_world import World, make_world

with warnings.catch_warnings():  # Starlette's test client announces a move to httpx2
    warnings.simplefilter("ignore")
    from fastapi.testclient import TestClient


@pytest.fixture()
def world(tmp_path: Path) -> World:
    return make_world(tmp_path)


@pytest.fixture()
def runtime(world: World) -> Iterator[ServingRuntime]:
    rt = ServingRuntime(world.merchant, store=ServingStore(world.merchant.serving_dir))
    yield rt
    rt.stop()


@pytest.fixture()
def client(runtime: ServingRuntime) -> TestClient:
    return TestClient(create_app(runtime))


def customer(world: World) -> str:
    return str(world.events["customer_id"].iloc[0])


def test_no_model_yet_is_503_then_the_published_version_answers(
    world: World, runtime: ServingRuntime, client: TestClient
) -> None:
    runtime.refresh()
    assert client.get("/healthz").status_code == 503
    answer = client.get("/recommendations", params={"customer": customer(world)})
    assert answer.status_code == 503 and "no model version" in answer.json()["error"]

    version = world.register(1)
    world.publish(serving=version)
    assert runtime.refresh()
    health = client.get("/healthz").json()
    assert health["status"] == "ok" and health["serving_version"] == version
    body = client.get("/recommendations", params={"customer": customer(world), "k": 5}).json()
    assert body["model_version"] == version and body["arm"] == "control"
    assert body["known_customer"] is True and body["k"] == 5
    assert [item["rank"] for item in body["items"]] == [1, 2, 3, 4, 5]
    scores = [item["score"] for item in body["items"]]
    assert scores == sorted(scores, reverse=True)
    catalogue = set(world.events["product_id"])
    assert {item["product_id"] for item in body["items"]} <= catalogue
    default = client.get("/recommendations", params={"customer": customer(world)}).json()
    assert len(default["items"]) == world.merchant.serving.default_k


def test_an_unknown_customer_gets_the_non_personal_ranking(
    world: World, runtime: ServingRuntime, client: TestClient
) -> None:
    world.publish(serving=world.register(1))
    runtime.refresh()
    first = client.get("/recommendations", params={"customer": "never-seen"}).json()
    second = client.get("/recommendations", params={"customer": "also-new"}).json()
    assert first["known_customer"] is False
    assert [i["product_id"] for i in first["items"]] == [i["product_id"] for i in second["items"]]
    metrics = client.get("/metrics").text
    assert "fedshop_serving_cold_start_total 2" in metrics


BAD = [
    ("", "customer: Field required"),
    ("?customer=", "customer: String should match"),
    ("?customer=a&k=0", "greater than or equal to 1"),
    ("?customer=a&k=101", "less than or equal to 100"),
    ("?customer=a&k=ten", "valid integer"),
    ("?customer=a&k=1.5", "valid integer"),
    ("?customer=a&kk=3", "unknown query parameter(s) ['kk']"),
    ("?customer=a&customer=b", "given more than once"),
    ("?customer=" + "x" * 129, "customer: String should match"),
    ("?customer=%0A", "customer: String should match"),
]


@pytest.mark.parametrize(("query", "reason"), BAD)
def test_bad_parameters_get_400_with_a_one_line_reason(
    world: World, runtime: ServingRuntime, client: TestClient, query: str, reason: str
) -> None:
    world.publish(serving=world.register(1))
    runtime.refresh()
    answer = client.get("/recommendations" + query)
    assert answer.status_code == 400
    message = answer.json()["error"]
    assert reason in message and "\n" not in message


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    params=st.lists(
        st.tuples(
            st.sampled_from(["customer", "k", "x", "", "customer[]"]),
            st.text(max_size=200) | st.integers(-(10**30), 10**30).map(str),
        ),
        max_size=4,
    )
)
def test_no_client_input_gets_a_500(
    world: World, runtime: ServingRuntime, client: TestClient, params: list[tuple[str, str]]
) -> None:
    if runtime.state is None:
        world.publish(serving=world.register(1))
        runtime.refresh()
    query = urllib.parse.urlencode(params)
    answer = client.get(f"/recommendations?{query}")
    assert answer.status_code in (200, 400), (query, answer.text)
    assert answer.headers["content-type"].startswith("application/json")


def test_purchase_rows_are_validated_by_row_and_field(
    world: World, runtime: ServingRuntime, client: TestClient
) -> None:
    world.publish(serving=world.register(1))
    runtime.refresh()
    good = {
        "customer_id": customer(world),
        "product_id": "p1",
        "timestamp": "2030-01-01T10:00:00Z",
        "quantity": 2,
        "price": 1.5,
    }
    bad_time = {**good, "timestamp": "yesterday"}
    answer = client.post("/purchases", json={"events": [good, bad_time]})
    assert answer.status_code == 400
    assert "row 2" in answer.json()["error"] and "'timestamp'" in answer.json()["error"]
    answer = client.post("/purchases", json={"events": [{**good, "colour": "red"}]})
    assert answer.status_code == 400 and "colour" in answer.json()["error"]
    assert client.post("/purchases", json={"events": []}).status_code == 400
    assert client.post("/purchases", content=b"[1, 2").status_code == 400
    assert world.merchant.inbox is not None
    assert not (world.merchant.inbox / "inbox").exists()  # nothing written for refused input
    answer = client.post("/purchases", json={"events": [good]})
    assert answer.status_code == 200 and answer.json()["fed_to_learning"] is True
    assert client.get("/no-such-page").status_code == 404


def test_metrics_follow_the_prometheus_text_format(
    world: World, runtime: ServingRuntime, client: TestClient
) -> None:
    world.publish(serving=world.register(1))
    runtime.refresh()
    for _ in range(3):
        client.get("/recommendations", params={"customer": customer(world)})
    client.get("/recommendations", params={"customer": customer(world), "k": 0})
    answer = client.get("/metrics")
    assert answer.headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
    text = answer.text
    sample = re.compile(r'^[a-zA-Z_:][a-zA-Z0-9_:]*(\{([a-zA-Z_]+="[^"]*",?)*\})? \S+$')
    for line in text.splitlines():
        assert line.startswith("# ") or sample.match(line), line
    assert 'fedshop_serving_requests_total{endpoint="/recommendations",status="200"} 3' in text
    assert 'fedshop_serving_requests_total{endpoint="/recommendations",status="400"} 1' in text
    assert 'fedshop_serving_errors_total{endpoint="/recommendations",kind="client"} 1' in text
    assert 'fedshop_serving_arm_responses_total{arm="control"} 3' in text
    assert 'fedshop_serving_version{arm="control"} 1' in text
    assert 'fedshop_serving_request_seconds_count{endpoint="/recommendations"} 4' in text
    assert 'fedshop_serving_request_seconds_bucket{endpoint="/recommendations",le="+Inf"} 4' in text
    assert customer(world) not in text  # no customer id ever becomes a label
    assert client.get("/docs").status_code == 200
    assert "/recommendations" in client.get("/openapi.json").json()["paths"]


def test_histogram_buckets_are_cumulative() -> None:
    store = MetricsStore()
    store.declare("t_seconds", MetricType.HISTOGRAM, "t", ("op",), buckets=(0.1, 1.0))
    for value in (0.05, 0.1, 0.5, 3.0):
        store.observe("t_seconds", value, op="a")
    lines = store.render().splitlines()
    assert lines[2:] == [
        't_seconds_bucket{op="a",le="0.1"} 2',
        't_seconds_bucket{op="a",le="1"} 3',
        't_seconds_bucket{op="a",le="+Inf"} 4',
        't_seconds_sum{op="a"} 3.65',
        't_seconds_count{op="a"} 4',
    ]


def test_a_fault_of_the_service_is_a_counted_one_line_500(
    world: World, runtime: ServingRuntime, monkeypatch: pytest.MonkeyPatch
) -> None:
    world.publish(serving=world.register(1))
    runtime.refresh()

    def broken(customer_id: str, k: int) -> None:
        raise RuntimeError("scorer exploded")

    monkeypatch.setattr(runtime, "recommend", broken)
    client = TestClient(create_app(runtime), raise_server_exceptions=False)
    answer = client.get("/recommendations", params={"customer": "c1"})
    assert answer.status_code == 500 and answer.json() == {
        "error": "internal error (see the service log)"
    }
    text = client.get("/metrics").text
    assert 'fedshop_serving_errors_total{endpoint="/recommendations",kind="server"} 1' in text


def test_recommendations_follow_new_purchases_and_the_local_part_without_a_restart(
    world: World, runtime: ServingRuntime
) -> None:
    world.publish(serving=world.register(1))
    assert runtime.refresh()
    assert not runtime.recommend("newbie", 5).known  # cold start
    extra = world.events.head(12).assign(customer_id="newbie")
    write_events(pd.concat([world.events, extra], ignore_index=True), world.merchant.data)
    assert runtime.refresh()  # new events: histories re-indexed
    assert runtime.recommend("newbie", 5).known
    before = runtime.state
    assert before is not None and before.control.head == LocalHead()
    LocalState(world.merchant.id, LocalHead(2.0)).save(local_state_path(world.merchant))
    assert runtime.refresh()  # a new local part: the same version, scored with it
    after = runtime.state
    assert after is not None and after.control.head == LocalHead(2.0)
    assert after.control.version_id == before.control.version_id
    assert not runtime.refresh()  # nothing changed since

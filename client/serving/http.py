"""The merchant's recommendation service over HTTP (FastAPI; run by ``fedshop serve``).

Endpoints: ``GET /recommendations?customer=ID&k=10``, ``POST /purchases`` (the shop reports what
was bought), ``GET /healthz``, ``GET /metrics`` (Prometheus text) and the OpenAPI documentation
at ``/docs``. A client's bad input always gets a 4xx with a one-line ``{"error": ...}``: unknown
or repeated parameters, an empty or over-long customer id, ``k`` outside ``1..max_k``, a purchase
row that breaks the event schema (named by row and column). A 503 means no model has been
published to this merchant yet; a 500 would be a fault of the service itself.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import pandas as pd
from fastapi import Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from client.serving.feedback import record_purchases
from client.serving.metrics import ServingMetrics
from client.serving.runtime import ServingRuntime
from common.errors import DataValidationError, StateError
from common.events import MERCHANT_ID, validate_events
from common.metrics_store import CONTENT_TYPE

log = logging.getLogger(__name__)

CUSTOMER_PATTERN = r"^[^\x00-\x1f\x7f]{1,128}$"  # 1-128 characters, no control characters
ENDPOINTS = ("/recommendations", "/purchases", "/healthz", "/metrics", "/docs", "/openapi.json")
MAX_BODY_BYTES = 16 * 1024 * 1024


class Item(BaseModel):
    rank: int
    product_id: str
    score: float


class RecommendationResponse(BaseModel):
    customer: str
    known_customer: bool = Field(description="false: no history here, non-personal ranking")
    model_version: int
    arm: str = Field(description="A/B arm: control (serving version) or candidate")
    impression_id: str = Field(description="joins later purchases to this response")
    k: int
    items: list[Item]


class PurchaseEvent(BaseModel):
    """One purchase, in the event schema of docs/data.md (merchant_id is this merchant)."""

    model_config = ConfigDict(extra="forbid")
    customer_id: str
    product_id: str
    timestamp: str = Field(description="ISO 8601; without an offset it is UTC")
    quantity: float
    price: float
    category: str = ""
    department: str = ""
    brand: str = ""


class PurchasesRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    events: list[PurchaseEvent]


class PurchasesResponse(BaseModel):
    received: int
    already_known: int = Field(description="reported before (event key): not joined again")
    joined: int
    shown: int = Field(description="joined a response that showed the product")
    fed_to_learning: bool = Field(description="written to the merchant's inbox")


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def _validation_message(exc: RequestValidationError) -> str:
    first = exc.errors()[0]
    where = ".".join(str(part) for part in first.get("loc", ()))
    shown = repr(first.get("input"))[:80]
    return f"{where}: {first.get('msg', 'invalid')} (got {shown})"


def strict_query(*allowed: str) -> Callable[[Request], Awaitable[None]]:
    """A dependency that refuses unknown or repeated query parameters before anything else is
    checked, so that a typo is named as such (not as a missing parameter)."""

    async def check(request: Request) -> None:  # async: no hop to the thread pool
        names = [name for name, _ in request.query_params.multi_items()]
        unknown = sorted(set(names) - set(allowed))
        if unknown:
            raise HTTPException(
                400, f"unknown query parameter(s) {unknown}; this endpoint takes {list(allowed)}"
            )
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise HTTPException(400, f"query parameter(s) {repeated} given more than once")

    return check


class _Measure:
    """Counts and times every request (plain ASGI: cheaper than an HTTP middleware); refuses
    bodies over :data:`MAX_BODY_BYTES` before they are read."""

    def __init__(self, app: ASGIApp, *, metrics: ServingMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        began = time.perf_counter()
        endpoint = scope["path"] if scope["path"] in ENDPOINTS else "other"
        status = 500  # unless a response starts: an exception escaped

        async def send_and_note(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            length = dict(scope["headers"]).get(b"content-length", b"0")
            if not length.isdigit() or int(length) > MAX_BODY_BYTES:
                too_big = _error(413, f"request body over {MAX_BODY_BYTES} bytes")
                await too_big(scope, receive, send_and_note)
            else:
                await self.app(scope, receive, send_and_note)
        finally:
            if status >= 400:
                self.metrics.error(endpoint, "client" if status < 500 else "server")
            self.metrics.request(endpoint, status, time.perf_counter() - began)


def create_app(runtime: ServingRuntime) -> FastAPI:
    """The service around ``runtime`` (whose watcher the caller starts and stops)."""
    serving = runtime.merchant.serving
    metrics = runtime.metrics
    started = time.monotonic()
    app = FastAPI(
        title=f"fedshop recommendations: {runtime.merchant.id}",
        description="Top-K products for the merchant's customers, served at the merchant.",
    )

    app.add_middleware(_Measure, metrics=metrics)

    @app.exception_handler(RequestValidationError)
    async def bad_request(_: Request, exc: RequestValidationError) -> JSONResponse:
        return _error(400, _validation_message(exc))

    @app.exception_handler(HTTPException)
    async def http_error(_: Request, exc: HTTPException) -> JSONResponse:
        return _error(exc.status_code, str(exc.detail))

    @app.exception_handler(Exception)
    async def internal(_: Request, exc: Exception) -> JSONResponse:
        log.exception("serving: internal error")
        return _error(500, "internal error (see the service log)")

    @app.get("/recommendations", response_model=RecommendationResponse)
    async def recommendations(
        _strict: None = Depends(strict_query("customer", "k")),
        customer: str = Query(pattern=CUSTOMER_PATTERN, description="customer id"),
        k: int = Query(default=serving.default_k, ge=1, le=serving.max_k, description="items"),
    ) -> Any:
        # Answered on the event loop, one request after the other: a request is a few ms of
        # CPU under the GIL, so threads would only time-slice concurrent requests (every one
        # of them finishing late) and add two thread hops. The body is built as plain JSON;
        # the response model documents it.
        try:
            rec = runtime.recommend(customer, k)
        except StateError as exc:
            return _error(503, str(exc))
        return JSONResponse(
            {
                "customer": customer,
                "known_customer": rec.known,
                "model_version": rec.version,
                "arm": rec.arm.value,
                "impression_id": rec.impression_id,
                "k": len(rec.products),
                "items": [
                    {"rank": i, "product_id": p, "score": s}
                    for i, (p, s) in enumerate(zip(rec.products, rec.scores, strict=True), start=1)
                ],
            }
        )

    @app.post("/purchases", response_model=PurchasesResponse)
    def purchases(body: PurchasesRequest, _strict: None = Depends(strict_query())) -> Any:
        if not body.events or len(body.events) > serving.max_purchase_rows:
            return _error(400, f"send 1 to {serving.max_purchase_rows} events per request")
        frame = pd.DataFrame([event.model_dump() for event in body.events])
        frame.insert(0, MERCHANT_ID, runtime.merchant.id)
        try:
            events = validate_events(frame, source="POST /purchases")
        except DataValidationError as exc:
            return _error(400, str(exc))
        runtime.writer.flush()  # a purchase right after a response must find it
        result = record_purchases(events, runtime.merchant, runtime.store, source="api")
        counts = result.counts
        metrics.purchases(
            shown=counts.shown,
            not_shown=counts.joined - counts.shown,
            none=counts.purchases - counts.joined,
            repeat=counts.already_known,
        )
        return PurchasesResponse(
            received=len(events),
            already_known=counts.already_known,
            joined=counts.joined,
            shown=counts.shown,
            fed_to_learning=result.inbox_file is not None,
        )

    @app.get("/healthz")
    def healthz() -> JSONResponse:
        state = runtime.state
        body: dict[str, Any] = {
            "status": "ok" if state is not None else "no-model",
            "merchant": runtime.merchant.id,
            "uptime_seconds": round(time.monotonic() - started, 3),
            "last_refusal": runtime.last_error,
        }
        if state is not None:
            body.update(
                serving_version=state.control.version_id,
                candidate_version=None if state.candidate is None else state.candidate.version_id,
                ab_share=runtime.assigner.share if state.candidate is not None else 0.0,
                publication_serial=state.publication.serial,
            )
        return JSONResponse(body, status_code=200 if state is not None else 503)

    @app.get("/metrics", response_class=PlainTextResponse)
    def prometheus() -> PlainTextResponse:
        return PlainTextResponse(metrics.store.render(), media_type=CONTENT_TYPE)

    return app

"""A bounded load loop for the serving tests: worker threads on keep-alive connections."""

from __future__ import annotations

import contextlib
import http.client
import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field


@dataclass
class LoadLoop:
    """Worker threads on keep-alive connections until stopped or ``limit`` requests are sent."""

    port: int
    customers: list[str]
    limit: int = 20_000
    workers: int = 4
    sent: int = 0
    answers: list[tuple[int, int | None]] = field(default_factory=list)  # (status, version)
    errors: list[str] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def _take(self) -> int | None:
        with self.lock:
            if self.stop.is_set() or self.sent >= self.limit:
                return None
            self.sent += 1
            return self.sent

    def _work(self) -> None:
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        while (n := self._take()) is not None:
            customer = self.customers[n % len(self.customers)]
            try:
                connection.request("GET", f"/recommendations?customer={customer}&k=10")
                response = connection.getresponse()
                body = json.loads(response.read())
                answer = (response.status, body.get("model_version"))
            except (OSError, http.client.HTTPException, ValueError) as exc:
                with self.lock:
                    self.errors.append(repr(exc))
                connection.close()
                connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
                continue
            with self.lock:
                self.answers.append(answer)
        connection.close()

    @contextlib.contextmanager
    def running(self) -> Iterator[LoadLoop]:
        threads = [threading.Thread(target=self._work, daemon=True) for _ in range(self.workers)]
        for thread in threads:
            thread.start()
        try:
            yield self
        finally:
            self.stop.set()
            for thread in threads:
                thread.join(timeout=60)

    def wait_for(self, answered: int, timeout_s: float = 60.0) -> None:
        deadline = time.monotonic() + timeout_s
        while len(self.answers) + len(self.errors) < answered and time.monotonic() < deadline:
            time.sleep(0.01)

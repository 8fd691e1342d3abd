"""The serving state at the merchant and its hot swap.

:class:`ServingRuntime` holds one immutable :class:`ServingState` (the publication in force and a
scorer per arm, client/serving/scorer.py). A watcher thread looks at the mirror's publication
file, the merchant's events (data file, accepted inbox cohorts) and its local part
(``nextbasket-local.npz``) every ``reload_interval_s``; when any changed it builds the new state
off the request path (each version's signature and weights hash are checked again as it is
loaded; new events re-index the households' histories and the catalogue) and then
replaces the reference in one assignment. A request reads the reference once, so it is answered
entirely by the old state or entirely by the new one: no request fails during a swap. A
publication or version that fails verification is refused (logged, counted, reported by
``/healthz``) and the old state keeps serving.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

from client.merchant import MerchantConfig
from client.model_mirror import ModelMirror
from client.publish import open_mirror
from client.serving.ab import Arm, ArmAssigner, ensure_assignment_key, experiment_name
from client.serving.feedback import attribute_new_cohorts
from client.serving.history import MerchantEvents, Signature, load_events, signature
from client.serving.metrics import ServingMetrics
from client.serving.scorer import (
    NextBasketScorer,
    ServingEvents,
    load_local_state,
    local_signature,
)
from client.serving.store import Impression, ImpressionWriter, ServingStore
from common.errors import FedshopError, StateError
from common.nextbasket.local import LocalState
from common.nextbasket.spec import ScorerSpec, spec_of
from common.publication import ModelDescriptor, Publication

log = logging.getLogger(__name__)

PRUNE_EVERY_S = 3600.0


@dataclass(frozen=True)
class ServingState:
    publication: Publication
    control: NextBasketScorer
    candidate: (
        NextBasketScorer | None
    )  # set only while an A/B test runs (candidate published, share > 0)
    events: Signature


@dataclass(frozen=True)
class Recommendation:
    impression_id: str
    customer_id: str
    arm: Arm
    version: int
    products: tuple[str, ...]
    scores: tuple[float, ...]
    known: bool


class ServingRuntime:
    """Scorers for the published versions, the A/B split and the impression log."""

    def __init__(
        self,
        merchant: MerchantConfig,
        *,
        store: ServingStore,
        metrics: ServingMetrics | None = None,
        clock_ns: Callable[[], int] = time.time_ns,
    ) -> None:
        self.merchant = merchant
        self.store = store
        self.metrics = metrics or ServingMetrics()
        self.mirror: ModelMirror = open_mirror(merchant)
        self.assigner = ArmAssigner(
            ensure_assignment_key(merchant.serving_dir), share=merchant.serving.ab_share
        )
        self.writer = ImpressionWriter(store, on_drop=self.metrics.impression_dropped)
        self.last_error = ""
        self._clock_ns = clock_ns
        self._state: ServingState | None = None
        # (mirror token, events, local part) last tried
        self._seen: tuple[object, Signature, tuple[int, int] | None] | None = None
        self._events: MerchantEvents | None = None
        self._indexed: dict[ScorerSpec, ServingEvents] = {}
        self._local: tuple[tuple[int, int] | None, LocalState] | None = None
        self._scorers: dict[int, NextBasketScorer] = {}
        self._refresh_lock = threading.Lock()
        self._stop = threading.Event()
        self._watcher: threading.Thread | None = None

    @property
    def state(self) -> ServingState | None:
        return self._state

    # -- hot swap --------------------------------------------------------------------
    def refresh(self) -> bool:
        """Load a new publication or new events if there are any; True if the state changed."""
        with self._refresh_lock:
            try:
                seen = (
                    self.mirror.token(),
                    signature(self.merchant),
                    local_signature(self.merchant),
                )
                if seen == self._seen:
                    return False
                self._seen = seen
                state = self._build()
            except FedshopError as exc:
                self.last_error = exc.one_line()
                self.metrics.refused()
                log.error("serving: refused, the current state keeps serving: %s", self.last_error)
                return False
            self._attribute_cohorts()
            if state is None:
                return False
            self._state = state
            self.last_error = ""
            versions = {Arm.CONTROL.value: state.control.version_id}
            versions[Arm.CANDIDATE.value] = state.candidate.version_id if state.candidate else 0
            self.metrics.swapped(state.publication.serial, versions)
            log.info(
                "serving publication %d: v%d%s",
                state.publication.serial,
                state.control.version_id,
                "" if state.candidate is None else f", A/B candidate v{state.candidate.version_id}",
            )
            return True

    def _attribute_cohorts(self) -> None:
        """Join purchases of newly accepted inbox cohorts; a failure never stops serving."""
        try:
            joined = attribute_new_cohorts(self.merchant, self.store)
        except FedshopError as exc:
            log.error("serving: could not join new inbox cohorts: %s", exc.one_line())
            return
        for cohort, counts in joined.items():
            self.metrics.purchases(
                shown=counts.shown,
                not_shown=counts.joined - counts.shown,
                none=counts.purchases - counts.joined,
                repeat=counts.already_known,
            )
            log.info("serving: joined %s: %s", cohort, counts)

    def _build(self) -> ServingState | None:
        publication = self.mirror.publication()
        if publication is None:
            return None
        current = signature(self.merchant)
        if self._events is None or self._events.signature != current:
            self._events = load_events(self.merchant)
            self._indexed = {}
            self._scorers = {}
        local = local_signature(self.merchant)
        if self._local is None or self._local[0] != local:
            self._local = (local, load_local_state(self.merchant))
            self._scorers = {}
        control = self._scorer(publication.serving, publication.model)
        candidate = None
        if publication.candidate is not None and self.assigner.share > 0:
            candidate = self._scorer(publication.candidate, publication.model)
        keep = set(publication.versions())  # and the versions serving now: a rollback is quick
        if self._state is not None:
            keep |= set(self._state.publication.versions())
        self._scorers = {v: s for v, s in self._scorers.items() if v in keep}
        return ServingState(publication, control, candidate, self._events.signature)

    def _scorer(self, version_id: int, model: ModelDescriptor) -> NextBasketScorer:
        scorer = self._scorers.get(version_id)
        if scorer is None:
            assert self._events is not None and self._local is not None
            spec = spec_of(model, version_id=version_id)
            version = self.mirror.load(version_id)  # signature and weights hash, again
            indexed = self._indexed.get(spec)
            if indexed is None:
                indexed = self._indexed[spec] = ServingEvents.of(self._events.events, spec)
            scorer = NextBasketScorer(version_id, spec, version.arrays, self._local[1], indexed)
            self._scorers[version_id] = scorer
        return scorer

    def prune(self) -> int:
        """Forget responses older than the retention period."""
        days = self.merchant.serving.retention_days
        removed = self.store.prune(self._clock_ns() - int(days * 86400 * 1e9))
        if removed:
            log.info("serving: forgot %d responses older than %g days", removed, days)
        return removed

    def _watch(self, interval: float) -> None:
        next_prune = 0.0
        while not self._stop.wait(interval):
            try:
                self.refresh()
                if time.monotonic() >= next_prune:
                    self.prune()
                    next_prune = time.monotonic() + PRUNE_EVERY_S
            except Exception:  # a watcher that dies would freeze the served version for good
                log.exception("serving: refresh failed; retrying")

    def start(self) -> ServingRuntime:
        self.refresh()
        self._watcher = threading.Thread(
            target=self._watch,
            args=(self.merchant.serving.reload_interval_s,),
            name="serving-watcher",
            daemon=True,
        )
        self._watcher.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._watcher is not None:
            self._watcher.join(timeout=30.0)
        self.writer.close()

    # -- requests --------------------------------------------------------------------
    def recommend(self, customer_id: str, k: int) -> Recommendation:
        """Top ``k`` for one customer from the arm it is assigned to; the response is logged."""
        state = self._state  # read once: the whole answer comes from one state
        if state is None:
            raise StateError(  # no publication has reached this merchant (or none loaded)
                self.last_error or "no model version has been published to this merchant yet"
            )
        arm, scorer = Arm.CONTROL, state.control
        candidate = state.candidate
        if candidate is not None:
            arm = self.assigner.arm(customer_id, experiment_name(candidate.version_id))
            if arm is Arm.CANDIDATE:
                scorer = candidate
        top = scorer.top_k([customer_id], k)
        recommendation = Recommendation(
            impression_id=uuid.uuid4().hex,
            customer_id=customer_id,
            arm=arm,
            version=scorer.version_id,
            products=tuple(str(p) for p in top.products[0]),
            scores=tuple(float(s) for s in top.scores[0]),
            known=bool(top.known[0]),
        )
        self.writer.log(
            Impression(
                id=recommendation.impression_id,
                at_ns=self._clock_ns(),
                customer=customer_id,
                arm=arm.value,
                version=recommendation.version,
                candidate=None if candidate is None else candidate.version_id,
                products=recommendation.products,
                scores=recommendation.scores,
                known=recommendation.known,
            )
        )
        self.metrics.served(arm.value, known=recommendation.known)
        return recommendation

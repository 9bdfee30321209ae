"""Who the caller is (TokenReview) and what they may do (SubjectAccessReview on finetunejobs).

The API key is a Kubernetes bearer token made for this server's audience (``kubectl create token SA
--audience kubetune``): a token for the Kubernetes API itself is refused, so a key handed to kubetune
is no key to the cluster. Answers are cached for a few seconds, keyed by a hash of the token, so a busy
client costs the API server one review per key and action, not one per request; the token itself is
never logged or kept.

Reviews are what an unauthenticated caller can make this server do to the Kubernetes API, so they are
capped: a token bucket of reviews per second. Callers that were answered yes before (a cached user whose
answer expired, a known action) may use the whole bucket; new keys only what lies above a reserve, so a
flood of random keys gets 429 while known clients keep being re-checked.
"""

from __future__ import annotations

import asyncio
import hashlib
import math
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass

from kubetune.openai_errors import RequestError
from kubetune.spec import API_GROUP, PLURAL

CACHE_SECONDS = 10.0
CACHE_ENTRIES = 10_000  # per cache; an entry is a hash and a small answer, so a few MiB at most
SERVICE_ACCOUNT_PREFIX = "system:serviceaccount:"
AUDIENCES = ("kubetune",)


@dataclass(frozen=True)
class Limits:
    reviews_per_second: float = 20.0
    burst: int = 40
    cache_entries: int = CACHE_ENTRIES
    cache_seconds: float = CACHE_SECONDS

    def __post_init__(self):
        if not self.reviews_per_second > 0:
            raise ValueError(f"--review-rate must be above 0, not {self.reviews_per_second}")
        if self.burst < 1:
            raise ValueError(f"--review-burst must be at least 1, not {self.burst}")
        if self.cache_entries < 1:
            raise ValueError(f"cache_entries must be at least 1, not {self.cache_entries}")


@dataclass(frozen=True)
class User:
    name: str
    uid: str
    groups: tuple[str, ...]
    extra: tuple[tuple[str, tuple[str, ...]], ...] = ()

    @property
    def home_namespace(self) -> str | None:
        """A ServiceAccount's own namespace; None for people."""
        if self.name.startswith(SERVICE_ACCOUNT_PREFIX):
            return self.name.removeprefix(SERVICE_ACCOUNT_PREFIX).split(":")[0]
        return None


# --- pure parts: the reviews, the caches, the bucket ------------------------------------------


def audience_names(value: object) -> tuple[str, ...]:
    if isinstance(value, str) or not isinstance(value, (list, tuple)) or not value or \
            not all(isinstance(a, str) and a for a in value):
        raise ValueError(f"audiences must be a list of one or more audience names, e.g. [kubetune], not {value!r}")
    return tuple(value)


def token_review(token: str, audiences: tuple[str, ...]) -> dict:
    return {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview",
            "spec": {"token": token, "audiences": list(audiences)}}


def access_review(user: User, verb: str, namespace: str) -> dict:
    return {"apiVersion": "authorization.k8s.io/v1", "kind": "SubjectAccessReview",
            "spec": {"user": user.name, "uid": user.uid, "groups": list(user.groups),
                     "extra": {k: list(v) for k, v in user.extra},
                     "resourceAttributes": {"namespace": namespace, "verb": verb, "group": API_GROUP,
                                            "resource": PLURAL}}}


WRONG_AUDIENCE, INVALID = "wrong audience", "invalid"


def reviewed_user(status, audiences: tuple[str, ...]) -> User | str:
    """The user a TokenReview's status names, or why the token is refused (WRONG_AUDIENCE, INVALID).

    An audience-aware authenticator refuses a token of another audience (its error says so); one that is
    not returns it authenticated with no audiences, which means valid for the Kubernetes API only."""
    if status is None or not status.authenticated or not status.user:
        return WRONG_AUDIENCE if status is not None and "audiences" in (status.error or "") else INVALID
    if not set(status.audiences or ()) & set(audiences):
        return WRONG_AUDIENCE
    u = status.user
    return User(u.username, u.uid or "", tuple(u.groups or ()),
                tuple(sorted((k, tuple(v)) for k, v in (u.extra or {}).items())))


class TTLCache:
    """At most ``size`` answers, each fresh for ``ttl`` seconds; when full the least recently used goes.
    An expired answer stays until pushed out, so ``get(key, stale=True)`` still tells that it was given."""

    def __init__(self, size: int, ttl: float, clock: Callable[[], float] = time.monotonic):
        self.size, self.ttl, self.clock = size, ttl, clock
        self._items: OrderedDict[Hashable, tuple[float, object]] = OrderedDict()

    def get(self, key: Hashable, stale: bool = False) -> object | None:
        hit = self._items.get(key)
        if hit is None or not (stale or hit[0] > self.clock()):
            return None
        self._items.move_to_end(key)
        return hit[1]

    def put(self, key: Hashable, value: object) -> None:
        self._items[key] = (self.clock() + self.ttl, value)
        self._items.move_to_end(key)
        while len(self._items) > self.size:
            self._items.popitem(last=False)

    def __len__(self) -> int:
        return len(self._items)


class Answers:
    """Yes and no answers in two bounded caches, so that a flood of refused keys pushes out only other
    refusals, never a working client's answer."""

    def __init__(self, limits: Limits, clock: Callable[[], float] = time.monotonic):
        self.good = TTLCache(limits.cache_entries, limits.cache_seconds, clock)
        self.bad = TTLCache(limits.cache_entries, limits.cache_seconds, clock)

    def get(self, key: Hashable) -> object | None:
        hit = self.good.get(key)
        return hit if hit is not None else self.bad.get(key)

    def put(self, key: Hashable, value: object, good: bool) -> None:
        (self.good if good else self.bad).put(key, value)

    def known_good(self, key: Hashable) -> bool:
        return self.good.get(key, stale=True) is not None


class TokenBucket:
    """``rate`` reviews a second on average, ``burst`` at once."""

    def __init__(self, rate: float, burst: int, clock: Callable[[], float] = time.monotonic):
        self.rate, self.burst, self.clock = rate, burst, clock
        self.level, self.at = float(burst), clock()

    def take(self, reserve: float = 0.0) -> float:
        """0 when one review may go now (it is counted), else the seconds until one may; the last
        ``reserve`` reviews of the bucket are kept for callers that take with none."""
        now = self.clock()
        self.level = min(self.burst, self.level + (now - self.at) * self.rate)
        self.at = now
        if self.level - 1 >= reserve:
            self.level -= 1
            return 0.0
        return (reserve + 1 - self.level) / self.rate


def too_many(wait: float, limits: Limits) -> RequestError:
    seconds = max(1, math.ceil(wait))
    return RequestError(429, f"Too many new API keys or actions to check: this server makes at most "
                        f"{limits.reviews_per_second:g} Kubernetes reviews a second; retry in {seconds} s",
                        code="rate_limit_exceeded", kind="requests", headers={"Retry-After": str(seconds)})


def refused(reason: str, audiences: tuple[str, ...]) -> RequestError:
    how = f"kubectl create token SERVICE_ACCOUNT --audience {audiences[0]}"
    if reason == WRONG_AUDIENCE:
        message = (f"This API key is a Kubernetes token for another audience (plain `kubectl create token` makes "
                   f"one for the Kubernetes API); make one for this server: {how}")
    else:
        message = f"Incorrect API key provided: use a Kubernetes token made for this server: {how}"
    return RequestError(401, message, code="invalid_api_key")


# --- the server's side: cached, capped reviews -------------------------------------------------


class Access:
    def __init__(self, kube, audiences: tuple[str, ...] = AUDIENCES, limits: Limits = Limits(),
                 clock: Callable[[], float] = time.monotonic):
        from kubernetes import client

        self.authn = client.AuthenticationV1Api(kube.client)
        self.authz = client.AuthorizationV1Api(kube.client)
        self.audiences, self.limits = audience_names(audiences), limits
        self.users, self.actions = Answers(limits, clock), Answers(limits, clock)
        self.bucket = TokenBucket(limits.reviews_per_second, limits.burst, clock)
        self.reserve = limits.burst // 4
        self._pending: dict[Hashable, asyncio.Task] = {}  # one review per key at a time, shared by its callers

    async def user(self, token: str) -> User:
        """The authenticated user of a bearer token; RequestError 401 if none, 429 over the cap."""
        if not token:
            raise refused(INVALID, self.audiences)
        key = hashlib.sha256(token.encode()).hexdigest()
        answer = await self.answer(self.users, key, lambda: reviewed_user(
            self.authn.create_token_review(token_review(token, self.audiences)).status, self.audiences))
        if not isinstance(answer, User):
            raise refused(answer, self.audiences)
        return answer

    async def allowed(self, user: User, verb: str, namespace: str) -> bool:
        """Whether ``user`` may ``verb`` finetunejobs in ``namespace``; RequestError 429 over the cap."""
        return await self.answer(self.actions, (user, verb, namespace), lambda: bool(
            (s := self.authz.create_subject_access_review(access_review(user, verb, namespace)).status) and s.allowed))

    async def answer(self, answers: Answers, key: Hashable, review: Callable[[], object]) -> object:
        """The cached answer for ``key``, else ``review()``'s (run once however many ask at once), within the cap."""
        hit = answers.get(key)
        if hit is not None:
            return hit
        if key in self._pending:
            return await asyncio.shield(self._pending[key])
        wait = self.bucket.take(0 if answers.known_good(key) else self.reserve)
        if wait:
            raise too_many(wait, self.limits)

        async def run() -> object:
            try:
                value = await asyncio.to_thread(review)
                answers.put(key, value, value is True or isinstance(value, User))
                return value
            finally:
                del self._pending[key]

        task = self._pending[key] = asyncio.create_task(run())
        task.add_done_callback(lambda t: t.cancelled() or t.exception())  # a caller gone away: not "never retrieved"
        return await asyncio.shield(task)

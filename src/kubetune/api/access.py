"""Who the caller is (TokenReview) and what they may do (SubjectAccessReview on finetunejobs).

The API key is a Kubernetes bearer token. Answers are cached for a few seconds, keyed by a hash of
the token, so a busy client costs the API server one review per key and action, not one per request;
the token itself is never logged or kept.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass

from kubetune.spec import API_GROUP, PLURAL

CACHE_SECONDS = 10.0
SERVICE_ACCOUNT_PREFIX = "system:serviceaccount:"


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


def token_review(token: str) -> dict:
    return {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview", "spec": {"token": token}}


def access_review(user: User, verb: str, namespace: str) -> dict:
    return {"apiVersion": "authorization.k8s.io/v1", "kind": "SubjectAccessReview",
            "spec": {"user": user.name, "uid": user.uid, "groups": list(user.groups),
                     "extra": {k: list(v) for k, v in user.extra},
                     "resourceAttributes": {"namespace": namespace, "verb": verb, "group": API_GROUP,
                                            "resource": PLURAL}}}


class Access:
    def __init__(self, kube):
        from kubernetes import client

        self.authn = client.AuthenticationV1Api(kube.client)
        self.authz = client.AuthorizationV1Api(kube.client)
        self._users: dict[str, tuple[float, User | None]] = {}
        self._allowed: dict[tuple, tuple[float, bool]] = {}

    def user(self, token: str) -> User | None:
        """The authenticated user of a bearer token, or None."""
        key = hashlib.sha256(token.encode()).hexdigest()
        hit = self._users.get(key)
        if hit and hit[0] > time.monotonic():
            return hit[1]
        status = self.authn.create_token_review(token_review(token)).status
        user = None
        if status and status.authenticated and status.user:
            u = status.user
            user = User(u.username, u.uid or "", tuple(u.groups or ()),
                        tuple(sorted((k, tuple(v)) for k, v in (u.extra or {}).items())))
        self._users = {k: v for k, v in self._users.items() if v[0] > time.monotonic()}
        self._users[key] = (time.monotonic() + CACHE_SECONDS, user)
        return user

    def allowed(self, user: User, verb: str, namespace: str) -> bool:
        key = (user, verb, namespace)
        hit = self._allowed.get(key)
        if hit and hit[0] > time.monotonic():
            return hit[1]
        status = self.authz.create_subject_access_review(access_review(user, verb, namespace)).status
        ok = bool(status and status.allowed)
        self._allowed = {k: v for k, v in self._allowed.items() if v[0] > time.monotonic()}
        self._allowed[key] = (time.monotonic() + CACHE_SECONDS, ok)
        return ok

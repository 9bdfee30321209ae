"""`kubetune api`'s access checks as logic: the bounded answer caches, the review cap and its reserve for
known clients, and how a TokenReview's answer is read. A fake clock stands in for time; nothing sleeps.
The real reviews against a real API server are in test_openai_api.py."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from types import SimpleNamespace

import pytest
from kubernetes.client import ApiClient, V1TokenReviewStatus, V1UserInfo

from kubetune.api.access import (INVALID, WRONG_AUDIENCE, Access, Answers, Limits, TokenBucket, TTLCache, User,
                                 audience_names, refused, reviewed_user)
from kubetune.openai_errors import RequestError

ALICE = User("system:serviceaccount:team:alice", "u1", ("system:serviceaccounts",))


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_cache_holds_at_most_its_size_and_drops_the_least_recently_used():
    clock = Clock()
    cache = TTLCache(3, 10, clock)
    for key in "abc":
        cache.put(key, key.upper())
    assert cache.get("a") == "A"  # a used: b is now the oldest
    cache.put("d", "D")
    assert len(cache) == 3 and cache.get("b") is None and [cache.get(k) for k in "acd"] == ["A", "C", "D"]
    for n in range(10_000):
        cache.put(n, n)
    assert len(cache) == 3


def test_cache_answers_expire_but_stay_known_until_pushed_out():
    clock = Clock()
    cache = TTLCache(2, 10, clock)
    cache.put("a", "A")
    clock.now += 9.9
    assert cache.get("a") == "A"
    clock.now += 0.2
    assert cache.get("a") is None and cache.get("a", stale=True) == "A"
    cache.put("a", "A2")  # a fresh review: fresh again
    assert cache.get("a") == "A2"


def test_a_flood_of_refusals_never_pushes_out_a_good_answer():
    answers = Answers(Limits(cache_entries=100), Clock())
    answers.put("good", ALICE, good=True)
    for n in range(10_000):
        answers.put(f"random-{n}", INVALID, good=False)
    assert answers.get("good") == ALICE and answers.known_good("good")
    assert len(answers.bad) == 100 and answers.get("random-9999") == INVALID and answers.get("random-0") is None
    assert not answers.known_good("random-9999")


def test_bucket_gives_its_burst_then_its_rate_and_says_how_long_to_wait():
    clock = Clock()
    bucket = TokenBucket(rate=20, burst=40, clock=clock)
    assert [bucket.take() for _ in range(40)] == [0.0] * 40
    assert bucket.take() == pytest.approx(1 / 20)
    clock.now += 0.5  # 10 more
    assert [bucket.take() for _ in range(10)] == [0.0] * 10 and bucket.take() > 0
    clock.now += 3600  # a long quiet spell refills only up to the burst
    assert sum(bucket.take() == 0 for _ in range(100)) == 40


def test_bucket_keeps_its_reserve_for_callers_that_take_without_one():
    clock = Clock()
    bucket = TokenBucket(rate=2, burst=8, clock=clock)
    assert sum(bucket.take(reserve=2) == 0 for _ in range(20)) == 6
    assert bucket.take(reserve=2) == pytest.approx(0.5)  # one more above the reserve: half a second at 2/s
    assert bucket.take() == 0 and bucket.take() == 0 and bucket.take() > 0  # the reserve, then empty


def test_a_token_review_is_read_for_its_audience():
    user = V1UserInfo(username=ALICE.name, uid="u1", groups=list(ALICE.groups), extra={"k": ["v"]})
    ours = reviewed_user(V1TokenReviewStatus(authenticated=True, user=user, audiences=["kubetune"]), ("kubetune",))
    assert ours == User(ALICE.name, "u1", ALICE.groups, (("k", ("v",)),)) and ours.home_namespace == "team"
    # Authenticated by an authenticator that ignores audiences: valid for the Kubernetes API only.
    assert reviewed_user(V1TokenReviewStatus(authenticated=True, user=user), ("kubetune",)) == WRONG_AUDIENCE
    assert reviewed_user(V1TokenReviewStatus(authenticated=True, user=user, audiences=["other"]),
                         ("kubetune", "k2")) == WRONG_AUDIENCE
    assert reviewed_user(V1TokenReviewStatus(error='[invalid bearer token, token audiences ["https://kubernetes.'
                                             'default.svc"] is invalid for the target audiences ["kubetune"]]'),
                         ("kubetune",)) == WRONG_AUDIENCE
    assert reviewed_user(V1TokenReviewStatus(error="invalid bearer token"), ("kubetune",)) == INVALID
    assert reviewed_user(None, ("kubetune",)) == INVALID


def test_refusals_tell_how_to_make_a_key():
    for reason in (WRONG_AUDIENCE, INVALID):
        e = refused(reason, ("kt-prod",))
        assert e.status == 401 and e.code == "invalid_api_key"
        assert "kubectl create token SERVICE_ACCOUNT --audience kt-prod" in str(e)
    assert "another audience" in str(refused(WRONG_AUDIENCE, ("kubetune",)))


def test_settings_errors_name_the_setting():
    with pytest.raises(ValueError, match="--review-rate"):
        Limits(reviews_per_second=0)
    with pytest.raises(ValueError, match="--review-burst"):
        Limits(burst=0)
    for bad in ("kubetune", [], [""], None):  # a bare string would be read as letters
        with pytest.raises(ValueError, match="audiences must be a list"):
            audience_names(bad)
    assert audience_names(["kubetune", "k2"]) == ("kubetune", "k2")


def _access(clock: Clock, **limits) -> Access:
    # The reviews are called by answer() below, never through this client: no API server is needed.
    return Access(SimpleNamespace(client=ApiClient()), limits=Limits(**limits), clock=clock)


def test_new_keys_beyond_the_cap_get_429_while_known_clients_are_reviewed_again():
    async def run():
        clock = Clock()
        access = _access(clock, reviews_per_second=0.1, burst=8, cache_seconds=5)  # reserve: 2
        reviews = []

        def review(value):
            reviews.append(value)
            return value

        assert await access.answer(access.users, "good", lambda: review(ALICE)) == ALICE
        assert await access.answer(access.users, "good", lambda: review(ALICE)) == ALICE  # cached
        assert await access.answer(access.users, "bad", lambda: review(INVALID)) == INVALID
        assert await access.answer(access.users, "bad", lambda: review(INVALID)) == INVALID  # cached no
        assert len(reviews) == 2
        outcomes = []
        for n in range(50):
            try:
                outcomes.append(await access.answer(access.users, f"random-{n}", lambda: review(INVALID)))
            except RequestError as e:
                outcomes.append(e)
        assert outcomes[:4] == [INVALID] * 4  # 8 - 2 used - 2 reserved
        limited = outcomes[4:]
        assert all(e.status == 429 and e.code == "rate_limit_exceeded" for e in limited)
        assert limited[0].headers == {"Retry-After": "10"} and len(reviews) == 6  # one review in 10 s
        clock.now += 5.1  # the good answer expired: it is reviewed again from the reserve, within the flood
        assert await access.answer(access.users, "good", lambda: review(ALICE)) == ALICE and len(reviews) == 7
        with pytest.raises(RequestError) as e:
            await access.answer(access.users, "random-x", lambda: review(INVALID))
        assert e.value.status == 429
        with pytest.raises(RequestError):  # a refused key is no known client: no reserve for it
            await access.answer(access.users, "bad", lambda: review(INVALID))

    asyncio.run(run())


def test_callers_of_one_key_at_once_share_one_review():
    async def run():
        access = _access(Clock())
        reviews = []

        def review():
            reviews.append(1)
            return ALICE

        answers = await asyncio.gather(*(access.answer(access.users, "k", review) for _ in range(30)))
        assert answers == [ALICE] * 30 and len(reviews) == 1

    asyncio.run(run())


def test_the_cli_refuses_half_a_tls_pair_and_unreadable_files(tmp_path):
    base = [sys.executable, "-m", "kubetune.cli", "api", "--files", "s3://b/f/", "--outputs", "s3://b/o/"]
    half = subprocess.run([*base, "--tls-cert", str(tmp_path / "c.pem")], capture_output=True, text=True)
    assert half.returncode == 2 and "--tls-cert and --tls-key go together" in half.stderr
    (tmp_path / "c.pem").write_text("not a certificate")
    (tmp_path / "k.pem").write_text("not a key")
    bad = subprocess.run([*base, "--tls-cert", str(tmp_path / "c.pem"), "--tls-key", str(tmp_path / "k.pem")],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and f"--tls-cert {tmp_path / 'c.pem'}" in bad.stderr and "Traceback" not in bad.stderr
    rate = subprocess.run([*base, "--review-rate", "0"], capture_output=True, text=True)
    assert rate.returncode == 2 and "--review-rate must be above 0" in rate.stderr

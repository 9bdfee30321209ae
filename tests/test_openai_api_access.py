"""Who may call `kubetune api`, against the real API server: tokens bound to kubetune's audience, the cap
on reviews under a flood of unknown keys, and HTTPS from a certificate (as a kubernetes.io/tls Secret
gives it), with the official openai client."""

from __future__ import annotations

import datetime
import http.client
import ipaddress
import json
import secrets
import ssl
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
from openai import OpenAI

from test_openai_api import caller, running_api

pytestmark = pytest.mark.k8s


def test_a_token_for_the_kubernetes_api_is_refused_with_how_to_make_one(control_plane, namespace, s3, s3_server,
                                                                        tmp_path):
    cp = control_plane
    good = caller(cp, namespace, "bot", ["list"])
    plain = cp.kubectl("create", "token", "bot", "-n", namespace, "--duration=1h").stdout.strip()  # the API's audience
    with running_api(cp, namespace, s3[1], s3_server, tmp_path) as base_url:
        assert OpenAI(base_url=base_url, api_key=good).fine_tuning.jobs.list().data == []
        with pytest.raises(openai.AuthenticationError, match="--audience kubetune") as e:
            OpenAI(base_url=base_url, api_key=plain, max_retries=0).fine_tuning.jobs.list()
        assert e.value.code == "invalid_api_key" and "another audience" in e.value.message
        with pytest.raises(openai.AuthenticationError, match="--audience kubetune"):
            OpenAI(base_url=base_url, api_key="not-a-token", max_retries=0).fine_tuning.jobs.list()
    log = (tmp_path / "api.log").read_text()
    assert plain not in log and good not in log


def test_a_flood_of_unknown_keys_gets_429_while_a_known_client_keeps_working(control_plane, namespace, s3, s3_server,
                                                                             tmp_path):
    cp = control_plane
    token = caller(cp, namespace, "bot", ["list"])
    # 8 reviews at once, one more a second; the last 2 are kept for known clients.
    with running_api(cp, namespace, s3[1], s3_server, tmp_path, "--review-rate", "1", "--review-burst", "8") as url:
        good = OpenAI(base_url=url, api_key=token, max_retries=0)
        assert good.fine_tuning.jobs.list().data == []  # a TokenReview and a SubjectAccessReview: 2 of 8

        def unknown(_) -> tuple[int, dict, str | None]:
            request = urllib.request.Request(f"{url}/fine_tuning/jobs",
                                             headers={"Authorization": f"Bearer {secrets.token_urlsafe(24)}"})
            try:
                urllib.request.urlopen(request, timeout=30)
            except urllib.error.HTTPError as e:
                return e.code, json.loads(e.read())["error"], e.headers.get("Retry-After")
            raise AssertionError("a random key was let in")

        with ThreadPoolExecutor(10) as pool:
            flood = pool.map(unknown, range(40))
            during = [good.fine_tuning.jobs.list() for _ in range(5)]  # answered from its cached review
            flood = list(flood)
        statuses = [status for status, _, _ in flood]
        assert set(statuses) == {401, 429} and 1 <= statuses.count(401) <= 10, statuses  # 4 reviews, + 1/s
        limited = next((error, retry) for status, error, retry in flood if status == 429)
        assert limited[0]["code"] == "rate_limit_exceeded" and int(limited[1]) >= 1
        assert all(page.data == [] for page in during)
        with pytest.raises(openai.RateLimitError, match="at most 1 Kubernetes reviews a second"):
            OpenAI(base_url=url, api_key=secrets.token_urlsafe(24), max_retries=0).fine_tuning.jobs.list()
        assert good.fine_tuning.jobs.list().data == []


def _self_signed(folder) -> tuple[str, str]:
    """A certificate for 127.0.0.1 and its key, as a kubernetes.io/tls Secret holds them (tls.crt, tls.key)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "kubetune-api")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(key.public_key()), False)
            .sign(key, hashes.SHA256()))
    crt, pem = folder / "tls.crt", folder / "tls.key"
    crt.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    pem.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                      serialization.NoEncryption()))
    return str(crt), str(pem)


def test_https_from_a_tls_secret_and_no_plain_http(control_plane, namespace, s3, s3_server, tmp_path):
    cp = control_plane
    cert, key = _self_signed(tmp_path)
    token = caller(cp, namespace, "bot", ["list"])
    with running_api(cp, namespace, s3[1], s3_server, tmp_path, "--tls-cert", cert, "--tls-key", key,
                     ca=cert) as base_url:
        assert base_url.startswith("https://127.0.0.1:")
        client = OpenAI(base_url=base_url, api_key=token, http_client=openai.DefaultHttpxClient(
            verify=ssl.create_default_context(cafile=cert)))
        assert client.fine_tuning.jobs.list().data == []
        with pytest.raises(openai.APIConnectionError):  # not trusted without the certificate
            OpenAI(base_url=base_url, api_key=token, max_retries=0).fine_tuning.jobs.list()
        with pytest.raises((OSError, http.client.HTTPException)):  # plain HTTP on the port: no answer
            urllib.request.urlopen(base_url.replace("https://", "http://").removesuffix("/v1") + "/healthz", timeout=10)

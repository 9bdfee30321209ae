"""`kubetune api` when its object storage fails, and its upload limits, through the official openai client.

Real faults: the files bucket deleted in the S3 server, credentials a second S3 server (authentication on)
refuses, an endpoint nobody listens on. These servers run with the control plane's admin kubeconfig
(test_openai_api tests the chart's RBAC); callers are ServiceAccounts, as there.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import openai
import pytest
from openai import OpenAI

from conftest import free_port, start_moto
from k8s_helpers import wait_for
from test_openai_api import CHAT, _aws, api, api_process, caller  # noqa: F401  (api: the chart-deployed server fixture)

pytestmark = pytest.mark.k8s
SECRET = "very-secret-value"


@contextmanager
def api_on(cp, log_path: Path, files_uri: str, endpoint: str, env: dict, patch: str = "") -> Iterator[str]:
    """A `kubetune api` process; its base URL. ``patch``: Python run before it starts (module constants)."""
    code = f"{patch}\nimport sys\nfrom kubetune.cli import main\nsys.exit(main())"
    args = ["-c", code, "api", "--files", files_uri, "--outputs", files_uri.replace("/files/", "/jobs/"),
            "--storage-endpoint", endpoint]
    with api_process(args, {**cp.env(), **env}, log_path, secret=SECRET) as url:
        yield url


def error_of(call) -> openai.APIStatusError:
    with pytest.raises(openai.APIStatusError) as e:
        call()
    e.value.message = e.value.body["message"]  # the server's words, without the client's "Error code: N - "
    return e.value


def test_a_deleted_files_bucket_is_the_servers_configuration_not_a_retry(control_plane, namespace, api, s3):
    (base_url, bucket), (s3_client, _) = api, s3
    client = OpenAI(base_url=base_url, max_retries=0,
                    api_key=caller(control_plane, namespace, "alice", ["get", "list", "create"]))
    kept = client.files.create(file=("chat.jsonl", CHAT), purpose="fine-tune")
    for page in s3_client.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        for o in page.get("Contents", []):
            s3_client.delete_object(Bucket=bucket, Key=o["Key"])
    s3_client.delete_bucket(Bucket=bucket)

    for call in (lambda: client.files.create(file=("chat.jsonl", CHAT), purpose="fine-tune"),
                 client.files.list, lambda: client.files.retrieve(kept.id)):
        e = error_of(call)
        assert e.status_code == 500 and e.type == "server_error" and e.code == "storage_misconfigured"
        assert e.message.startswith("the server's object storage is misconfigured, not a transient error")
        assert f"bucket {bucket} does not exist" in e.message and "retry-after" not in e.response.headers


def test_credentials_the_storage_refuses_are_named_without_the_secret(control_plane, namespace, tmp_path):
    moto, url = start_moto({"INITIAL_NO_AUTH_ACTION_COUNT": "0"})  # refuses keys it does not know
    env = {**_aws(), "AWS_ACCESS_KEY_ID": "AKIAWRONGWRONGWRONG0", "AWS_SECRET_ACCESS_KEY": SECRET}
    try:
        with api_on(control_plane, tmp_path / "api.log", "s3://team-files/files/", url, env) as base_url:
            client = OpenAI(base_url=base_url, max_retries=0,
                            api_key=caller(control_plane, namespace, "alice", ["get", "list", "create"]))
            e = error_of(lambda: client.files.create(file=("chat.jsonl", CHAT), purpose="fine-tune"))
            assert e.status_code == 500 and e.code == "storage_misconfigured"
            assert "access denied to s3://team-files (InvalidAccessKeyId; check AWS_ACCESS_KEY_ID" in e.message
            assert SECRET not in e.response.text
    finally:
        moto.terminate()
        moto.wait(10)


def test_storage_that_stopped_answering_is_a_503_with_retry_after(control_plane, namespace, tmp_path):
    down = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    patch = "import kubetune.storage as s; s._RETRIES = 1"  # the default 8 back off for about a minute
    with api_on(control_plane, tmp_path / "api.log", "s3://files/files/", down, _aws(), patch) as base_url:
        client = OpenAI(base_url=base_url, max_retries=0,
                        api_key=caller(control_plane, namespace, "alice", ["get", "list", "create"]))
        for call in (lambda: client.files.create(file=("chat.jsonl", CHAT), purpose="fine-tune"), client.files.list):
            e = error_of(call)
            assert e.status_code == 503 and e.type == "server_error" and e.code == "storage_unavailable"
            assert e.message.startswith(f"object storage at {down} unavailable after 2 tries (")
            assert e.message.endswith("; retry later")
            assert e.response.headers["retry-after"] == "30"


def test_uploads_over_the_limit_are_refused_and_leave_nothing(control_plane, namespace, s3, s3_server, tmp_path):
    s3_client, bucket = s3
    mib = 1024 * 1024
    patch = "import kubetune.api.server as s; s.MAX_UPLOAD = 1024 * 1024; s.FORM_OVERHEAD = 4 * 1024 * 1024"
    with api_on(control_plane, tmp_path / "api.log", f"s3://{bucket}/files/", s3_server, _aws(), patch) as base_url:
        client = OpenAI(base_url=base_url, max_retries=0,
                        api_key=caller(control_plane, namespace, "alice", ["get", "list", "create"]))
        big = CHAT * (6 * mib // len(CHAT) + 1)
        for size in (3 * mib, 6 * mib):  # 3: refused while it streams in; 6: by its Content-Length, before
            e = error_of(lambda: client.files.create(file=("chat.jsonl", big[:size]), purpose="fine-tune"))
            assert e.status_code == 413 and e.code == "file_too_large" and "larger than 1 MiB" in e.message
        e = error_of(lambda: client.files.create(file=("chat.jsonl", CHAT), purpose="assistants"))
        assert e.status_code == 400 and e.param == "purpose"
        assert client.files.list().data == []
        wait_for(lambda: not s3_client.list_multipart_uploads(Bucket=bucket).get("Uploads"), timeout=10,
                 what="aborted multipart uploads")
        assert s3_client.list_objects_v2(Bucket=bucket).get("KeyCount") == 0
        ok = client.files.create(file=("chat.jsonl", CHAT), purpose="fine-tune")  # under the limit
        assert ok.status == "processed" and client.files.content(ok.id).content == CHAT

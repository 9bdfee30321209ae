"""Storage against a real S3 protocol server (moto, server mode) reached only through boto3."""

import pytest
from boto3.s3.transfer import TransferConfig

from conftest import start_moto
from kubetune.spec import Storage
from kubetune.storage import (CREDENTIALS_DIR_ENV, AccessDenied, BucketMissing, Mirror, NotFound, S3Store, StorageError,
                              Unavailable, download_tree, store_for, upload_tree)


def test_prefix_lists_every_shard_and_a_key_names_one_file(s3, s3_server):
    client, bucket = s3
    for key in ("data/a.jsonl", "data/sub/b.jsonl.gz", "data/c.parquet", "data2/x.jsonl", "data/"):
        client.put_object(Bucket=bucket, Key=key, Body=b"{}\n")
    store = S3Store(Storage(endpoint=s3_server))
    assert store.list(f"s3://{bucket}/data/") == [f"s3://{bucket}/data/a.jsonl", f"s3://{bucket}/data/c.parquet",
                                                  f"s3://{bucket}/data/sub/b.jsonl.gz"]
    assert store.list(f"s3://{bucket}/data") == store.list(f"s3://{bucket}/data/")  # data2/ is not under data/
    assert store.list(f"s3://{bucket}/data/a.jsonl") == [f"s3://{bucket}/data/a.jsonl"]


def test_round_trip_and_multipart(s3, s3_server, tmp_path):
    client, bucket = s3
    store = S3Store(Storage(endpoint=s3_server))
    store.write_bytes(f"s3://{bucket}/x/small.bin", b"hello")
    assert store.read_bytes(f"s3://{bucket}/x/small.bin") == b"hello"
    assert store.exists(f"s3://{bucket}/x/small.bin") and not store.exists(f"s3://{bucket}/x/none")

    mib = 1024 * 1024
    store.transfer = TransferConfig(multipart_threshold=5 * mib, multipart_chunksize=5 * mib)
    big = tmp_path / "big.bin"
    payload = bytes(range(256)) * (11 * mib // 256)
    big.write_bytes(payload)
    store.upload(big, f"s3://{bucket}/x/big.bin")
    etag = client.head_object(Bucket=bucket, Key="x/big.bin")["ETag"]
    assert etag.strip('"').endswith("-3"), f"expected a 3-part multipart upload, ETag {etag}"
    store.download(f"s3://{bucket}/x/big.bin", tmp_path / "back.bin")
    assert (tmp_path / "back.bin").read_bytes() == payload


@pytest.mark.parametrize("size", [0, 100, 20 * 1024 * 1024 + 5])  # empty, one PUT, three parts
def test_streamed_writes_and_reads(s3, s3_server, tmp_path, size):
    client, bucket = s3
    data = bytes(range(256)) * (size // 256) + b"x" * (size % 256)
    for store, uri in ((S3Store(Storage(endpoint=s3_server)), f"s3://{bucket}/s/data.jsonl"),
                       (store_for(str(tmp_path)), str(tmp_path / "s" / "data.jsonl"))):
        writer = store.open_write(uri)
        for at in range(0, size, 3 * 1024 * 1024 + 1):  # chunks that do not line up with the parts
            writer.write(data[at:at + 3 * 1024 * 1024 + 1])
        assert not store.exists(uri)  # nothing to read until it is whole
        writer.close()
        body = store.open_read(uri)
        read = b"".join(iter(lambda: body.read(1024 * 1024), b""))
        body.close()
        assert read == data
        with pytest.raises(NotFound):
            store.open_read(uri + ".none")
    etag = client.head_object(Bucket=bucket, Key="s/data.jsonl")["ETag"]
    assert etag.endswith('-3"') == (size > 16 * 1024 * 1024)  # a multipart object's ETag counts its parts
    assert client.list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []


def test_an_aborted_streamed_write_leaves_nothing(s3, s3_server, tmp_path):
    client, bucket = s3
    for store, uri in ((S3Store(Storage(endpoint=s3_server)), f"s3://{bucket}/s/data.jsonl"),
                       (store_for(str(tmp_path)), str(tmp_path / "s" / "data.jsonl"))):
        writer = store.open_write(uri)
        writer.write(b"x" * (9 * 1024 * 1024))  # a part went up
        writer.abort()
        assert not store.exists(uri)
    assert client.list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []
    assert list((tmp_path / "s").iterdir()) == []


def test_trees_copy_both_ways(s3, s3_server, tmp_path):
    _, bucket = s3
    src = tmp_path / "src"
    (src / "a").mkdir(parents=True)
    (src / "a" / "one.txt").write_text("1")
    (src / "two.txt").write_text("2")
    spec = Storage(endpoint=s3_server)
    upload_tree(src, f"s3://{bucket}/tree/", spec)
    download_tree(f"s3://{bucket}/tree/", tmp_path / "dst", spec)
    assert (tmp_path / "dst" / "a" / "one.txt").read_text() == "1"
    assert (tmp_path / "dst" / "two.txt").read_text() == "2"


def test_clear_one_line_errors(s3, s3_server):
    _, bucket = s3
    store = S3Store(Storage(endpoint=s3_server))
    with pytest.raises(BucketMissing, match="^bucket no-such-bucket does not exist") as e:
        store.list("s3://no-such-bucket/data/")
    assert "\n" not in str(e.value)
    with pytest.raises(StorageError, match="no objects under this prefix"):
        store.list(f"s3://{bucket}/empty/")
    with pytest.raises(NotFound, match="no such object"):
        store.read_bytes(f"s3://{bucket}/missing.jsonl")
    with pytest.raises(Unavailable, match="^object storage at http://127.0.0.1:9 unavailable after 9 tries"):
        S3Store(Storage(endpoint="http://127.0.0.1:9")).list(f"s3://{bucket}/x")


def test_wrong_credentials_are_reported_without_the_secret(monkeypatch):
    # A second moto server with authentication on from the first request: unknown keys are refused.
    proc, url = start_moto({"INITIAL_NO_AUTH_ACTION_COUNT": "0"})
    try:
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAWRONGWRONGWRONG0")
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "very-secret-value")
        with pytest.raises(AccessDenied, match=r"^access denied to s3://bucket \(InvalidAccessKeyId; check AWS_") as e:
            S3Store(Storage(endpoint=url)).list("s3://bucket/data/")
        assert "very-secret-value" not in str(e.value) and "\n" not in str(e.value)
        with pytest.raises(AccessDenied, match=r"check the credentials Secret team-s3\)$"):
            S3Store(Storage(endpoint=url, credentials_secret="team-s3")).list("s3://bucket/data/")
    finally:
        proc.terminate()
        proc.wait(10)


def test_credentials_from_a_mounted_secret_folder(s3, s3_server, tmp_path, monkeypatch):
    _, bucket = s3
    secret = tmp_path / "secret"
    secret.mkdir()
    (secret / "AWS_ACCESS_KEY_ID").write_text("mounted-key\n")
    (secret / "AWS_SECRET_ACCESS_KEY").write_text("mounted-secret\n")
    monkeypatch.setenv(CREDENTIALS_DIR_ENV, str(secret))
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    store = S3Store(Storage(endpoint=s3_server))
    assert store.client._request_signer._credentials.access_key == "mounted-key"
    store.write_bytes(f"s3://{bucket}/k", b"v")
    assert store.read_bytes(f"s3://{bucket}/k") == b"v"


def test_local_paths(tmp_path):
    store = store_for(str(tmp_path))
    store.write_bytes(str(tmp_path / "d" / "f.jsonl"), b"x")
    assert store.list(str(tmp_path / "d")) == [str(tmp_path / "d" / "f.jsonl")]
    with pytest.raises(StorageError, match="no such file or folder"):
        store.list(str(tmp_path / "nope"))


def test_cli_upload_creates_the_bucket_and_copies_a_folder(s3_server, tmp_path):
    import subprocess
    import sys

    import boto3

    (tmp_path / "d" / "sub").mkdir(parents=True)
    (tmp_path / "d" / "a.jsonl").write_text("{}\n")
    (tmp_path / "d" / "sub" / "b.jsonl").write_text("{}\n")
    run = subprocess.run([sys.executable, "-m", "kubetune.cli", "upload", str(tmp_path / "d"), "s3://fresh-bucket/data/",
                          "--endpoint", s3_server, "--create-bucket"], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    keys = [o["Key"] for o in boto3.client("s3", endpoint_url=s3_server).list_objects_v2(Bucket="fresh-bucket")["Contents"]]
    assert sorted(keys) == ["data/a.jsonl", "data/sub/b.jsonl"]


def test_a_local_location_is_its_own_mirror(tmp_path):
    out = Mirror(str(tmp_path / "out"), scratch=tmp_path / "scratch")
    assert out.path == tmp_path / "out" and not out.remote
    (out.path / "model").mkdir(parents=True)
    (out.path / "model" / "w.bin").write_bytes(b"w")
    out.publish()
    out.publish("model")
    assert out.fetch("model") == tmp_path / "out" / "model"
    assert not (tmp_path / "scratch").exists()  # nothing is copied anywhere


def test_an_s3_mirror_fetches_and_publishes_parts(s3, s3_server, tmp_path):
    client, bucket = s3
    spec = Storage(endpoint=s3_server)
    out = Mirror(f"s3://{bucket}/job/", tmp_path / "scratch", spec)
    assert out.path == tmp_path / "scratch" and out.remote
    (out.path / "model" / "sub").mkdir(parents=True)
    (out.path / "model" / "sub" / "w.bin").write_bytes(b"w")
    (out.path / "metrics.csv").write_text("step\n1\n")
    out.publish("model")
    assert [o["Key"] for o in client.list_objects_v2(Bucket=bucket)["Contents"]] == ["job/model/sub/w.bin"]
    out.publish()
    assert sorted(o["Key"] for o in client.list_objects_v2(Bucket=bucket)["Contents"]) == [
        "job/metrics.csv", "job/model/sub/w.bin"]

    fresh = Mirror(f"s3://{bucket}/job", tmp_path / "fresh", spec)  # a new node: an empty scratch
    assert fresh.fetch("model") == tmp_path / "fresh" / "model"
    assert (tmp_path / "fresh" / "model" / "sub" / "w.bin").read_bytes() == b"w"
    assert fresh.fetch("metrics.csv").read_text() == "step\n1\n"  # one object: that file
    assert Mirror(f"s3://{bucket}/job/model", tmp_path / "m", spec).fetch().joinpath("sub", "w.bin").read_bytes() == b"w"
    with pytest.raises(StorageError, match="no objects under this prefix"):
        fresh.fetch("tokenizer")

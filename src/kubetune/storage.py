"""One small interface over ``s3://bucket/key`` and local paths.

S3 goes through boto3 with an optional custom endpoint (MinIO, Ceph, moto), credentials from the
standard AWS chain (environment, ~/.aws) or a mounted Secret folder, standard retries, and managed
(multipart) transfers. Every failure becomes a one-line ``StorageError`` without credentials in it.
"""

from __future__ import annotations

import io
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import BinaryIO, Protocol

from kubetune.errors import EXIT_INVALID, EXIT_STORAGE, EXIT_TRANSIENT, KubetuneError
from kubetune.spec import Storage as StorageSpec

# A Secret mounted as a volume: one file per key (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, ...).
CREDENTIALS_DIR_ENV = "KUBETUNE_CREDENTIALS_DIR"
_MULTIPART_BYTES = 64 * 1024 * 1024
_STREAM_PART_BYTES = 8 * 1024 * 1024  # open_write's parts: S3's minimum is 5 MiB; one is held per writer
_RETRIES = 8  # botocore "standard" mode: retries after the first attempt, backoff with jitter up to 20 s apart


class StorageError(KubetuneError):
    """A storage operation failed; the message is one line and safe to show. Of an unknown kind: retried."""

    exit_code = EXIT_TRANSIENT


class NotFound(StorageError):
    """Nothing at that location (no such folder, no objects under the prefix): not a failure of storage."""

    exit_code = EXIT_INVALID


class BucketMissing(StorageError):
    """The bucket does not exist: permanent, retrying will not create it."""

    exit_code = EXIT_STORAGE


class AccessDenied(StorageError):
    """Denied, or no valid credentials: permanent until someone fixes the credentials Secret."""

    exit_code = EXIT_STORAGE


class Unavailable(StorageError):
    """Unreachable, timing out or answering 5xx after every retry: transient, worth trying again later."""


def is_s3(uri: str) -> bool:
    return uri.startswith("s3://")


def join(base: str, *parts: str) -> str:
    """Join path parts onto a local path or s3:// prefix."""
    out = base
    for part in parts:
        out = out.rstrip("/") + "/" + part.lstrip("/")
    return out


class Store(Protocol):
    def list(self, uri: str) -> list[str]: ...
    def list_etags(self, uri: str) -> dict[str, str]: ...
    def read_bytes(self, uri: str) -> bytes: ...
    def write_bytes(self, uri: str, data: bytes) -> None: ...
    def upload(self, local: Path, uri: str) -> None: ...
    def download(self, uri: str, local: Path) -> None: ...
    def exists(self, uri: str) -> bool: ...
    def delete_prefix(self, uri: str) -> None: ...
    def open_write(self, uri: str) -> "Writer": ...
    def open_read(self, uri: str) -> BinaryIO: ...


class Writer(Protocol):
    """An object written in order, a chunk at a time: ``close`` makes it appear whole, ``abort`` leaves nothing."""

    def write(self, data: bytes) -> None: ...
    def close(self) -> None: ...
    def abort(self) -> None: ...


class LocalStore:
    def list(self, uri: str) -> list[str]:
        path = Path(uri)
        if path.is_file():
            return [str(path)]
        if not path.exists():
            raise NotFound(f"{uri}: no such file or folder")
        files = sorted(str(p) for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
        if not files:
            raise NotFound(f"{uri}: folder has no files")
        return files

    def list_etags(self, uri: str) -> dict[str, str]:
        """Every file under the folder with a version tag (modification time and size): empty when there is none."""
        try:
            files = self.list(uri)
        except NotFound:
            return {}
        return {f: f"{(st := Path(f).stat()).st_mtime_ns}-{st.st_size}" for f in files}

    def read_bytes(self, uri: str) -> bytes:
        try:
            return Path(uri).read_bytes()
        except OSError as e:
            raise StorageError(f"{uri}: {e.strerror}") from None

    def write_bytes(self, uri: str, data: bytes) -> None:
        path = Path(uri)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_bytes(data)
        tmp.replace(path)  # readers never see a half-written file

    def upload(self, local: Path, uri: str) -> None:
        Path(uri).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(local, uri)

    def download(self, uri: str, local: Path) -> None:
        local.parent.mkdir(parents=True, exist_ok=True)
        try:
            shutil.copyfile(uri, local)
        except OSError as e:
            raise StorageError(f"{uri}: {e.strerror}") from None

    def exists(self, uri: str) -> bool:
        return Path(uri).exists()

    def delete_prefix(self, uri: str) -> None:
        shutil.rmtree(uri, ignore_errors=True)

    def open_write(self, uri: str) -> Writer:
        return _LocalWriter(Path(uri))

    def open_read(self, uri: str) -> BinaryIO:
        try:
            return open(uri, "rb")
        except FileNotFoundError:
            raise NotFound(f"{uri}: no such file") from None
        except OSError as e:
            raise StorageError(f"{uri}: {e.strerror}") from None


class _LocalWriter:
    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path, self.tmp = path, path.with_name(path.name + ".tmp")
        self.file = open(self.tmp, "wb")

    def write(self, data: bytes) -> None:
        self.file.write(data)

    def close(self) -> None:
        self.file.close()
        self.tmp.replace(self.path)  # readers never see a half-written file

    def abort(self) -> None:
        self.file.close()
        self.tmp.unlink(missing_ok=True)


def _split(uri: str) -> tuple[str, str]:
    bucket, _, key = uri.removeprefix("s3://").partition("/")
    if not bucket:
        raise StorageError(f"{uri}: no bucket in URI")
    return bucket, key


def _credentials_from_dir() -> dict[str, str]:
    folder = os.environ.get(CREDENTIALS_DIR_ENV)
    if not folder:
        return {}
    names = {"AWS_ACCESS_KEY_ID": "aws_access_key_id", "AWS_SECRET_ACCESS_KEY": "aws_secret_access_key",
             "AWS_SESSION_TOKEN": "aws_session_token"}
    out = {}
    for file_name, arg in names.items():
        path = Path(folder) / file_name
        if path.is_file():
            out[arg] = path.read_text().strip()
    return out


class S3Store:
    def __init__(self, spec: StorageSpec | None = None):
        import boto3
        from boto3.s3.transfer import TransferConfig
        from botocore.config import Config

        spec = spec or StorageSpec()
        self.secret = spec.credentials_secret or os.environ.get("KUBETUNE_CREDENTIALS_SECRET")
        self.endpoint = spec.endpoint or os.environ.get("AWS_ENDPOINT_URL")
        self.client = boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            region_name=spec.region or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1",
            config=Config(retries={"max_attempts": _RETRIES, "mode": "standard"}, connect_timeout=10, read_timeout=120),
            **_credentials_from_dir(),
        )
        self.transfer = TransferConfig(multipart_threshold=_MULTIPART_BYTES, multipart_chunksize=_MULTIPART_BYTES)
        _log_retries(self.client)

    def _error(self, uri: str, exc: Exception) -> StorageError:
        from botocore.exceptions import ClientError, ConnectionError, HTTPClientError, NoCredentialsError

        # boto3's managed transfers wrap the real error (S3UploadFailedError, RetriesExceededError):
        # unwrap it, else "bucket does not exist" would read "S3UploadFailedError".
        while not isinstance(exc, (ClientError, ConnectionError, HTTPClientError, NoCredentialsError)):
            inner = getattr(exc, "last_exception", None) or exc.__cause__ or exc.__context__
            if inner is None:
                break
            exc = inner
        bucket = uri.removeprefix("s3://").partition("/")[0]
        where = self.endpoint or "AWS"
        check = (f"check the credentials Secret {self.secret}" if self.secret else
                 "check AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or set storage.credentialsSecret")
        tries = f"unavailable after {_RETRIES + 1} tries"
        if isinstance(exc, NoCredentialsError):
            return AccessDenied(f"access denied to s3://{bucket}: no S3 credentials ({check})")
        if isinstance(exc, (ConnectionError, HTTPClientError)):  # refused, reset, timed out: retried already
            return Unavailable(f"object storage at {where} {tries} ({type(exc).__name__}; {uri})")
        if isinstance(exc, ClientError):
            code = exc.response.get("Error", {}).get("Code", "")
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if code == "NoSuchBucket":
                return BucketMissing(f"bucket {bucket} does not exist (at {where}; {uri})")
            if code in ("NoSuchKey", "404", "NotFound"):
                return NotFound(f"{uri}: no such object")
            if code in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "InvalidClientTokenId", "403") or status == 403:
                return AccessDenied(f"access denied to s3://{bucket} ({code or status}; {check})")
            if isinstance(status, int) and status >= 500 or code in ("SlowDown", "Throttling", "RequestTimeout"):
                return Unavailable(f"object storage at {where} {tries} (it kept answering {code or status}; {uri})")
            return StorageError(f"{uri}: S3 error {code or status}")
        return StorageError(f"{uri}: {type(exc).__name__}")

    def list(self, uri: str) -> list[str]:
        bucket, key = _split(uri)
        try:
            pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=key)
            keys = [obj["Key"] for page in pages for obj in page.get("Contents", [])]
        except Exception as e:
            raise self._error(uri, e) from None
        if key in keys and not key.endswith("/"):
            return [uri]  # the URI names one object
        prefix = key.rstrip("/") + "/" if key else ""
        files = sorted(f"s3://{bucket}/{k}" for k in keys if k.startswith(prefix) and not k.endswith("/"))
        if not files:
            raise NotFound(f"{uri}: no objects under this prefix")
        return files

    def list_etags(self, uri: str) -> dict[str, str]:
        """Every object under the prefix with its ETag, from one paginated ListObjectsV2 (no request per object);
        empty when there is none."""
        bucket, key = _split(uri)
        try:
            pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=key)
            return {f"s3://{bucket}/{o['Key']}": o.get("ETag", "").strip('"') for page in pages
                    for o in page.get("Contents", []) if not o["Key"].endswith("/")}
        except Exception as e:
            raise self._error(uri, e) from None

    def read_bytes(self, uri: str) -> bytes:
        buf = io.BytesIO()
        bucket, key = _split(uri)
        try:
            self.client.download_fileobj(bucket, key, buf, Config=self.transfer)
        except Exception as e:
            raise self._error(uri, e) from None
        return buf.getvalue()

    def write_bytes(self, uri: str, data: bytes) -> None:
        bucket, key = _split(uri)
        try:
            self.client.upload_fileobj(io.BytesIO(data), bucket, key, Config=self.transfer)
        except Exception as e:
            raise self._error(uri, e) from None

    def upload(self, local: Path, uri: str) -> None:
        bucket, key = _split(uri)
        try:
            self.client.upload_file(str(local), bucket, key, Config=self.transfer)
        except Exception as e:
            raise self._error(uri, e) from None

    def download(self, uri: str, local: Path) -> None:
        bucket, key = _split(uri)
        local.parent.mkdir(parents=True, exist_ok=True)
        try:
            self.client.download_file(bucket, key, str(local), Config=self.transfer)
        except Exception as e:
            raise self._error(uri, e) from None

    def exists(self, uri: str) -> bool:
        from botocore.exceptions import ClientError

        bucket, key = _split(uri)
        try:
            self.client.head_object(Bucket=bucket, Key=key)
            return True
        except ClientError as e:
            if e.response.get("ResponseMetadata", {}).get("HTTPStatusCode") == 404:
                return False
            raise self._error(uri, e) from None
        except Exception as e:
            raise self._error(uri, e) from None

    def delete_prefix(self, uri: str) -> None:
        bucket, key = _split(uri)
        prefix = key.rstrip("/") + "/"
        try:
            pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
            for page in pages:
                objects = [{"Key": o["Key"]} for o in page.get("Contents", [])]
                if objects:
                    self.client.delete_objects(Bucket=bucket, Delete={"Objects": objects})
        except Exception as e:
            raise self._error(uri, e) from None

    def open_write(self, uri: str) -> Writer:
        return _S3Writer(self, uri)

    def open_read(self, uri: str) -> BinaryIO:
        """The object's body as a stream (read(n), close()): the bytes come as they are read."""
        bucket, key = _split(uri)
        try:
            return self.client.get_object(Bucket=bucket, Key=key)["Body"]
        except Exception as e:
            raise self._error(uri, e) from None


class _S3Writer:
    """A multipart upload fed in order: each part goes up as soon as it is full, so memory holds one part
    whatever the object's size; an object smaller than a part is one PUT."""

    def __init__(self, store: S3Store, uri: str):
        self.store, self.uri = store, uri
        self.bucket, self.key = _split(uri)
        self.buffer, self.parts, self.upload_id = bytearray(), [], None

    def _call(self, method: str, **kwargs) -> dict:
        try:
            return getattr(self.store.client, method)(Bucket=self.bucket, Key=self.key, **kwargs)
        except Exception as e:
            raise self.store._error(self.uri, e) from None

    def write(self, data: bytes) -> None:
        self.buffer += data
        if len(self.buffer) >= _STREAM_PART_BYTES:
            self._send_part()

    def _send_part(self) -> None:
        if self.upload_id is None:
            self.upload_id = self._call("create_multipart_upload")["UploadId"]
        number = len(self.parts) + 1
        sent = self._call("upload_part", UploadId=self.upload_id, PartNumber=number, Body=bytes(self.buffer))
        self.parts.append({"ETag": sent["ETag"], "PartNumber": number})
        self.buffer.clear()

    def close(self) -> None:
        if self.upload_id is None:
            self._call("put_object", Body=bytes(self.buffer))
            return
        if self.buffer:
            self._send_part()
        self._call("complete_multipart_upload", UploadId=self.upload_id, MultipartUpload={"Parts": self.parts})

    def abort(self) -> None:
        """Drop the parts sent so far (S3 keeps, and bills, an unfinished upload's parts until aborted)."""
        self.buffer.clear()
        if self.upload_id is not None:
            try:
                self._call("abort_multipart_upload", UploadId=self.upload_id)
            except StorageError:  # storage failing is why we abort: the parts stay until a lifecycle rule
                # (AbortIncompleteMultipartUpload) removes them
                pass


def _log_retries(client) -> None:
    """One line on stderr per retried request, so transient storage trouble shows in the job's log.

    botocore asks ``needs-retry`` handlers after every attempt (we note why it failed) and emits
    ``request-created`` for every attempt, the attempt number in the request context. Operation
    names and error codes only: no URLs, keys or credentials.
    """
    def note(request_dict=None, response=None, caught_exception=None, **_):
        if request_dict is not None:
            why = type(caught_exception).__name__ if caught_exception else None
            if why is None and response is not None:
                meta = response[1].get("ResponseMetadata", {}) if isinstance(response[1], dict) else {}
                why = response[1].get("Error", {}).get("Code") or str(meta.get("HTTPStatusCode", ""))
            request_dict["context"]["kubetune_retry_cause"] = why

    def announce(request=None, operation_name="", **_):
        context = getattr(request, "context", {}) or {}
        attempt = context.get("retries", {}).get("attempt", 1)
        if attempt > 1:
            print(f"[storage] S3 {operation_name}: retry {attempt - 1} of {_RETRIES} after "
                  f"{context.get('kubetune_retry_cause') or 'an error'}", file=sys.stderr, flush=True)

    client.meta.events.register_first("needs-retry.s3", note)
    client.meta.events.register("request-created.s3", announce)


def store_for(uri: str, spec: StorageSpec | None = None) -> Store:
    """The store that serves ``uri``."""
    return S3Store(spec) if is_s3(uri) else LocalStore()


def upload_tree(local_dir: Path, uri: str, spec: StorageSpec | None = None) -> None:
    """Copy every file below ``local_dir`` to the prefix ``uri``."""
    store = store_for(uri, spec)
    for path in sorted(p for p in Path(local_dir).rglob("*") if p.is_file()):
        store.upload(path, join(uri, path.relative_to(local_dir).as_posix()))


def download_tree(uri: str, local_dir: Path, spec: StorageSpec | None = None) -> None:
    """Copy every object under the prefix ``uri`` into ``local_dir`` (a URI naming one object: to ``local_dir``)."""
    store = store_for(uri, spec)
    root = uri.rstrip("/") + "/"
    for file_uri in store.list(uri):
        inside = "" if file_uri == uri else file_uri.removeprefix(root)  # "": the URI names one object
        store.download(file_uri, Path(local_dir) / inside)


class Mirror:
    """A local folder that stands for an output location, so every stage writes files the same way.

    A local location is its own mirror: ``path`` is the folder itself and ``fetch``/``publish`` do
    nothing. For s3:// ``path`` is a scratch folder; ``fetch`` downloads a part of the location into
    it and ``publish`` uploads a part (or all) of it. In a gang, one process per node calls them
    (``kubetune.train.distributed.is_node_leader``): the others share the node's scratch.
    """

    def __init__(self, uri: str, scratch: Path | None = None, spec: StorageSpec | None = None):
        self.uri, self.spec, self.remote = uri, spec, is_s3(uri)
        self.path = Path(scratch or tempfile.mkdtemp(prefix="kubetune-mirror-")) if self.remote else Path(uri)

    def fetch(self, part: str = "") -> Path:
        """The local copy of ``part`` (a sub-folder or one file; default: everything), downloaded when remote."""
        if self.remote:
            download_tree(join(self.uri, part), self.path / part, self.spec)
        return self.path / part

    def publish(self, part: str = "") -> None:
        """Upload the local ``part`` (a sub-folder; default: everything) when remote."""
        if self.remote:
            upload_tree(self.path / part, join(self.uri, part), self.spec)

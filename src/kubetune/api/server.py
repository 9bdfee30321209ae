"""The API server (aiohttp): OpenAI's files and fine-tuning endpoints, and chat by fine-tuned model name.

    POST/GET /v1/files, GET/DELETE /v1/files/{id}, GET /v1/files/{id}/content
    POST/GET /v1/fine_tuning/jobs, GET /v1/fine_tuning/jobs/{id}
    POST /v1/fine_tuning/jobs/{id}/cancel | pause | resume
    GET  /v1/fine_tuning/jobs/{id}/events | checkpoints
    POST /v1/fine_tuning/alpha/graders/run | validate   OpenAI's grader endpoints (graders.py)
    POST /v1/chat/completions   passed on to the serving endpoint of the job named by ``model``
    GET  /v1/models             the project's served fine-tuned models
    GET  /healthz

Every request needs ``Authorization: Bearer TOKEN`` (the OpenAI client's api_key): a Kubernetes token
made for this server's audience (``kubectl create token SA --audience kubetune``), checked with TokenReview.
The namespace is the ``OpenAI-Project`` header (the client's ``project=``), else a ServiceAccount's own
namespace, else the configured default; each action is checked with a SubjectAccessReview on ``finetunejobs``
there. Reviews are cached and capped (access.py).
"""

from __future__ import annotations

import asyncio
import csv
import io
import re
import sys
import time

from aiohttp import ClientConnectorError, ClientResponse, ClientSession, ClientTimeout, web

from kubetune.api import jobs as J
from kubetune.api.access import Access, Limits
from kubetune.api.files import FileStore, public
from kubetune.api.graders import GraderRoutes
from kubetune.openai_errors import RequestError, error_response, middleware
from kubetune.spec import API_GROUP, API_VERSION, PLURAL, Storage
from kubetune.storage import AccessDenied, BucketMissing, NotFound, StorageError, Unavailable, join, store_for

NAMESPACE = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
MAX_UPLOAD = 512 * 1024 * 1024  # OpenAI's limit for one file
FORM_OVERHEAD = 1024 * 1024  # a multipart body is the file plus boundaries, headers and the purpose field
CHUNK = 1024 * 1024  # uploads and downloads pass through a MiB at a time
RETRY_AFTER = 30  # seconds: storage that gave up after its retries (about a minute of backoff) gets a pause
MODEL_START_TIMEOUT = 300  # seconds a chat request waits for a just-served model to come up


@web.middleware
async def kube_and_storage_errors(request: web.Request, handler):
    from kubernetes.client.exceptions import ApiException

    try:
        return await handler(request)
    except ApiException as e:  # the Kubernetes API said no: its status, not its body (it may quote the request)
        print(f"{request.method} {request.path}: Kubernetes API {e.status} {e.reason}", file=sys.stderr, flush=True)
        return error_response(e.status if 400 <= e.status < 500 else 502, f"Kubernetes API: {e.reason}",
                              "invalid_request_error" if e.status < 500 else "server_error")
    except StorageError as e:  # its message is one line without credentials: safe to log and to show
        print(f"{request.method} {request.path}: storage: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
        status, message, code = storage_error(e)
        return error_response(status, message, "invalid_request_error" if status < 500 else "server_error",
                              code=code, headers={"Retry-After": str(RETRY_AFTER)} if status == 503 else None)


def storage_error(e: StorageError) -> tuple[int, str, str | None]:
    """Status, message and code of a storage failure. The buckets are the server's own (filesUri, outputsUri):
    a missing bucket or refused credentials is the server's configuration, which no retry mends (500);
    storage that stopped answering may come back (503 and Retry-After, which the openai client honours)."""
    if isinstance(e, NotFound):
        return 404, f"not found in object storage: {e}", "not_found"
    if isinstance(e, Unavailable):
        return 503, f"{e}; retry later", "storage_unavailable"
    if isinstance(e, (BucketMissing, AccessDenied)):
        return 500, (f"the server's object storage is misconfigured, not a transient error (its administrator must "
                     f"fix it): {e}"), "storage_misconfigured"
    return 502, f"object storage failed: {e}", "storage_error"


class Api:
    def __init__(self, settings: J.ApiSettings, kube, access: Access):
        self.settings, self.kube, self.access = settings, kube, access
        storage = Storage.model_validate({k: v for k, v in settings.storage.items() if k != "credentialsSecret"})
        self.storage = storage
        self.files = FileStore(settings.files_uri, storage)

    # --- who is asking -----------------------------------------------------------------------

    async def caller(self, request: web.Request, verb: str) -> str:
        """The namespace the caller acts in, once they may ``verb`` finetunejobs there."""
        header = request.headers.get("Authorization", "")
        token = header[7:].strip() if header[:7].lower() == "bearer " else ""
        user = await self.access.user(token)  # 401 for a bad or missing key, 429 over the review cap
        namespace = request.headers.get("OpenAI-Project") or user.home_namespace or self.settings.default_namespace
        if not NAMESPACE.match(namespace) or len(namespace) > 63:
            raise RequestError(400, "OpenAI-Project must be a Kubernetes namespace name", "project")
        if not await self.access.allowed(user, verb, namespace):
            raise RequestError(403, f"You may not {verb} fine-tuning jobs in project (namespace) {namespace!r}",
                               code="insufficient_permissions", kind="permission_error")
        return namespace

    # --- Kubernetes calls --------------------------------------------------------------------

    def _ftj(self, namespace: str, name: str) -> dict:
        from kubernetes.client.exceptions import ApiException

        try:
            return self.kube.custom.get_namespaced_custom_object(API_GROUP, API_VERSION, namespace, PLURAL, name)
        except ApiException as e:
            if e.status == 404:
                raise RequestError(404, f"No fine-tuning job found with id {name}", "fine_tuning_job_id",
                                   "not_found") from None
            raise

    def _ftjs(self, namespace: str) -> list[dict]:
        items = self.kube.custom.list_namespaced_custom_object(API_GROUP, API_VERSION, namespace, PLURAL)["items"]
        return sorted(items, key=lambda o: (o["metadata"].get("creationTimestamp", ""), o["metadata"]["name"]),
                      reverse=True)

    def _patch(self, namespace: str, name: str, body: dict) -> dict:
        return self.kube.custom.patch_namespaced_custom_object(API_GROUP, API_VERSION, namespace, PLURAL, name, body)

    def _events(self, namespace: str, name: str) -> list[dict]:
        found = self.kube.core.list_namespaced_event(
            namespace, field_selector=f"involvedObject.kind=FineTuneJob,involvedObject.name={name}")
        return [self.kube._dict(e) for e in found.items]

    def _metric_rows(self, ftj: dict) -> list[dict]:
        output = ftj["spec"].get("output", {}).get("uri")
        if not output:
            return []
        try:
            raw = store_for(output, self.storage).read_bytes(join(output, "metrics.csv"))
        except NotFound:  # not written yet (or gone): no metrics yet; storage failing is an error to report
            return []
        return list(csv.DictReader(io.StringIO(raw.decode())))

    def _file(self, namespace: str, file_id: str) -> dict:
        record = self.files.get(namespace, file_id)
        if record is None:
            raise _no_file(file_id)
        return record

    def _results(self, namespace: str, file_id: str) -> tuple[dict, bytes] | None:
        """A succeeded job's results file (jobs.py says why it is made on the fly): its object and bytes."""
        job = J.results_job(file_id)
        if job is None:
            return None
        ftj = self.kube.get_ftj(namespace, job)
        if ftj is None or J.openai_status(ftj) != "succeeded":
            raise _no_file(file_id)
        content = J.results_csv(self._metric_rows(ftj), ftj["spec"].get("training", {}).get("objective", "sft"))
        return J.results_file(ftj, content), content

    # --- files -------------------------------------------------------------------------------

    async def upload(self, request: web.Request) -> web.Response:
        namespace = await self.caller(request, "create")
        if (request.content_length or 0) > MAX_UPLOAD + FORM_OVERHEAD:
            raise _too_large()
        purpose, record = None, None
        reader = await request.multipart()
        async for part in reader:
            if part.name == "purpose":
                purpose = await part.text()
            elif part.name == "file" and record is None:
                if purpose not in (None, "fine-tune"):  # refused before a byte is stored
                    raise _wrong_purpose()
                record = await self._receive(namespace, part)
        if record is None:
            raise RequestError(400, "file is required (multipart/form-data)", "file")
        if purpose != "fine-tune":  # the purpose came after the file, or not at all
            await asyncio.to_thread(self.files.delete, namespace, record["id"])
            raise _wrong_purpose()
        return web.json_response(public(record))

    async def _receive(self, namespace: str, part) -> dict:
        """The file part, validated and sent to the bucket as it arrives (never whole in memory)."""
        upload = await asyncio.to_thread(self.files.begin, namespace, part.filename or "upload.jsonl", "fine-tune")
        try:
            while chunk := await part.read_chunk(CHUNK):
                if upload.size + len(chunk) > MAX_UPLOAD:
                    raise _too_large()
                await asyncio.to_thread(upload.write, chunk)
            return await asyncio.to_thread(upload.finish)
        except BaseException:  # the caller went away, too large, storage failed: no half file stays
            await asyncio.shield(asyncio.to_thread(upload.abort))
            raise

    async def list_files(self, request: web.Request) -> web.Response:
        namespace = await self.caller(request, "list")
        records = [public(r) for r in await asyncio.to_thread(self.files.list, namespace)
                   if request.query.get("purpose") in (None, r["purpose"])]
        return web.json_response(J.page(records, request.query.get("after"), request.query.get("limit", "100")))

    async def get_file(self, request: web.Request) -> web.Response:
        namespace = await self.caller(request, "get")
        results = await asyncio.to_thread(self._results, namespace, request.match_info["id"])
        if results:
            return web.json_response(results[0])
        return web.json_response(public(await asyncio.to_thread(self._file, namespace, request.match_info["id"])))

    async def file_content(self, request: web.Request) -> web.StreamResponse:
        namespace = await self.caller(request, "get")
        results = await asyncio.to_thread(self._results, namespace, request.match_info["id"])
        if results:
            return web.Response(body=results[1], content_type="text/csv")
        record = await asyncio.to_thread(self._file, namespace, request.match_info["id"])
        body = await asyncio.to_thread(self.files.content, record)
        response = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
        response.content_length = record["bytes"]
        try:
            await response.prepare(request)
            while chunk := await asyncio.to_thread(body.read, CHUNK):
                await response.write(chunk)
            await response.write_eof()
        except Exception as e:  # the status is sent: a cut connection (short of Content-Length) tells the client
            print(f"{request.method} {request.path}: stopped after the headers: {type(e).__name__}", file=sys.stderr,
                  flush=True)
            if request.transport:
                request.transport.close()
        finally:
            body.close()
        return response

    async def delete_file(self, request: web.Request) -> web.Response:
        namespace = await self.caller(request, "delete")
        file_id = request.match_info["id"]
        await asyncio.to_thread(self._file, namespace, file_id)
        await asyncio.to_thread(self.files.delete, namespace, file_id)
        return web.json_response({"id": file_id, "object": "file", "deleted": True})

    # --- jobs --------------------------------------------------------------------------------

    async def create_job(self, request: web.Request) -> web.Response:
        namespace = await self.caller(request, "create")
        body = await _json(request)
        files = {}
        for key in ("training_file", "validation_file"):
            file_id = body.get(key) if isinstance(body, dict) else None
            record = await asyncio.to_thread(self.files.get, namespace, file_id) if isinstance(file_id, str) else None
            if record:
                files[file_id] = record
        doc = J.job_document(body, J.new_id("ftjob"), namespace, files, self.settings)
        created = await asyncio.to_thread(self.kube.custom.create_namespaced_custom_object,
                                          API_GROUP, API_VERSION, namespace, PLURAL, doc)
        return web.json_response(J.job_object(created))

    async def list_jobs(self, request: web.Request) -> web.Response:
        namespace = await self.caller(request, "list")
        items = [J.job_object(o) for o in await asyncio.to_thread(self._ftjs, namespace)]
        return web.json_response(J.page(items, request.query.get("after"), request.query.get("limit")))

    async def get_job(self, request: web.Request) -> web.Response:
        namespace = await self.caller(request, "get")
        return web.json_response(J.job_object(await asyncio.to_thread(self._ftj, namespace, request.match_info["id"])))

    async def job_action(self, request: web.Request) -> web.Response:
        namespace = await self.caller(request, "patch")
        name, action = request.match_info["id"], request.match_info["action"]
        ftj = await asyncio.to_thread(self._ftj, namespace, name)
        state = J.openai_status(ftj)
        if state in ("succeeded", "failed", "cancelled"):
            raise RequestError(400, f"Job {name} has already {'been ' if state == 'cancelled' else ''}{state}",
                               code="invalid_state")
        if action == "resume" and state != "paused":
            raise RequestError(400, f"Job {name} is {state}, not paused", code="invalid_state")
        if action == "pause" and state == "paused":
            raise RequestError(400, f"Job {name} is already paused", code="invalid_state")
        patch: dict = {"spec": {"suspend": action != "resume"}}
        if action == "cancel":
            patch["metadata"] = {"annotations": {J.CANCELLED: time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}}
        return web.json_response(J.job_object(await asyncio.to_thread(self._patch, namespace, name, patch)))

    async def job_events(self, request: web.Request) -> web.Response:
        namespace = await self.caller(request, "get")
        name = request.match_info["id"]
        ftj = await asyncio.to_thread(self._ftj, namespace, name)
        kube_events, rows = await asyncio.gather(asyncio.to_thread(self._events, namespace, name),
                                                 asyncio.to_thread(self._metric_rows, ftj))
        events = J.event_objects(ftj, kube_events, rows)
        return web.json_response(J.page(events, request.query.get("after"), request.query.get("limit")))

    async def job_checkpoints(self, request: web.Request) -> web.Response:
        namespace = await self.caller(request, "get")
        ftj = await asyncio.to_thread(self._ftj, namespace, request.match_info["id"])
        found = J.checkpoint_objects(ftj)
        return web.json_response(J.page(found, request.query.get("after"), request.query.get("limit", 10)))

    # --- inference ---------------------------------------------------------------------------

    async def chat(self, request: web.Request) -> web.StreamResponse:
        namespace = await self.caller(request, "get")
        body = await _json(request)
        model = body.get("model") if isinstance(body, dict) else None
        parsed = J.parse_model(model) if isinstance(model, str) else None
        if not parsed or parsed[0] != namespace:
            raise RequestError(404, f"The model {model!r} does not exist in project {namespace!r}; use a "
                               "fine_tuned_model of a succeeded job", "model", "model_not_found")
        ftj = await asyncio.to_thread(self._ftj, namespace, parsed[1])
        endpoint = (ftj.get("status") or {}).get("endpoint")
        if parsed[2] or not endpoint:
            raise RequestError(404, f"The model {model!r} is not being served"
                               + (" (only the served checkpoint answers: spec.serve.checkpoint)" if parsed[2] else
                                  f" (the job is {J.openai_status(ftj)}; spec.serve.enabled serves it)"),
                               "model", "model_not_found")
        forward = {k: v for k, v in body.items() if k != "model"}
        upstream = await _connect(request.app["session"], f"{endpoint.rstrip('/')}/chat/completions", forward, model)
        async with upstream:
            response = web.StreamResponse(status=upstream.status, headers={
                "Content-Type": upstream.headers.get("Content-Type", "application/json")})
            await response.prepare(request)
            async for chunk in upstream.content.iter_any():
                await response.write(chunk)
            await response.write_eof()
            return response

    async def models(self, request: web.Request) -> web.Response:
        namespace = await self.caller(request, "list")
        data = []
        for o in await asyncio.to_thread(self._ftjs, namespace):
            job = J.job_object(o)
            if job["fine_tuned_model"] and (o.get("status") or {}).get("endpoint"):
                data.append({"id": job["fine_tuned_model"], "object": "model", "created": job["finished_at"] or
                             job["created_at"], "owned_by": namespace})
        return web.json_response({"object": "list", "data": data})


async def _connect(session: ClientSession, url: str, body: dict, model: str) -> ClientResponse:
    """POST to a model's server, waiting while it starts: a job is succeeded (at OpenAI, its model answers at
    once) before its serving pod has loaded the model and passed its readiness probe, and until then the
    Service refuses connections. Like a serverless cold start, the request is held, not failed."""
    deadline = time.monotonic() + MODEL_START_TIMEOUT
    delay = 0.5
    while True:
        try:
            return await session.post(url, json=body)
        except ClientConnectorError:
            if time.monotonic() + delay > deadline:
                raise RequestError(503, f"The model {model!r} is starting and did not answer within "
                                   f"{MODEL_START_TIMEOUT} s; retry later", "model", "model_not_ready",
                                   kind="server_error") from None
            await asyncio.sleep(delay)
            delay = min(2 * delay, 10.0)


def _no_file(file_id: str) -> RequestError:
    return RequestError(404, f"No such File object: {file_id}", "id", "not_found")


def _too_large() -> RequestError:
    return RequestError(413, f"file is larger than {MAX_UPLOAD // 2**20} MiB, the most one upload may be", "file",
                         "file_too_large")


def _wrong_purpose() -> RequestError:
    return RequestError(400, "purpose must be 'fine-tune': this server keeps training files only", "purpose")


async def _json(request: web.Request) -> object:
    try:
        return await request.json()
    except ValueError:
        raise RequestError(400, "the request body is not valid JSON") from None


def make_app(settings: J.ApiSettings, kube=None, access: Access | None = None,
             limits: Limits = Limits()) -> web.Application:
    if kube is None:
        from kubetune.operator.kube import Kube

        kube = Kube()
    api = Api(settings, kube, access or Access(kube, tuple(settings.audiences), limits))
    app = web.Application(middlewares=[middleware("internal error"), kube_and_storage_errors],
                          client_max_size=MAX_UPLOAD)

    async def session(app: web.Application):
        app["session"] = ClientSession(timeout=ClientTimeout(total=None, sock_connect=10, sock_read=600))
        yield
        await app["session"].close()

    async def healthz(_request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    app.cleanup_ctx.append(session)
    jobs, graders = "/v1/fine_tuning/jobs", GraderRoutes(api.caller, api._ftj)
    app.add_routes([
        web.post("/v1/files", api.upload), web.get("/v1/files", api.list_files),
        web.get("/v1/files/{id}", api.get_file), web.delete("/v1/files/{id}", api.delete_file),
        web.get("/v1/files/{id}/content", api.file_content),
        web.post(jobs, api.create_job), web.get(jobs, api.list_jobs), web.get(jobs + "/{id}", api.get_job),
        web.post(jobs + "/{id}/{action:cancel|pause|resume}", api.job_action),
        web.get(jobs + "/{id}/events", api.job_events), web.get(jobs + "/{id}/checkpoints", api.job_checkpoints),
        web.post("/v1/fine_tuning/alpha/graders/run", graders.run),
        web.post("/v1/fine_tuning/alpha/graders/validate", graders.validate),
        web.post("/v1/chat/completions", api.chat), web.get("/v1/models", api.models),
        web.get("/healthz", healthz),
    ])
    return app


def serve_api(settings: J.ApiSettings, host: str, port: int, limits: Limits = Limits(),
              tls: tuple[str, str] | None = None) -> None:
    """Serve until stopped; with ``tls`` (certificate and key files) HTTPS only, no plain HTTP."""
    scheme = "https" if tls else "http"
    print(f"kubetune api on {scheme}://{host}:{port}/v1 (files in {settings.files_uri})", flush=True)
    web.run_app(make_app(settings, limits=limits), host=host, port=port, ssl_context=tls_context(*tls) if tls else None,
                print=None)


def tls_context(cert: str, key: str):
    """A server TLS context from PEM files (a kubernetes.io/tls Secret's tls.crt and tls.key)."""
    import ssl

    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as e:  # ssl's own text names neither file
        raise ValueError(f"--tls-cert {cert} / --tls-key {key}: {e.strerror or e}") from None
    return context

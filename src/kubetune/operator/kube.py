"""Thin calls to the Kubernetes API (the official client). Objects go in and come out as plain dicts."""

from __future__ import annotations

import json
import logging

from kubetune.operator import kueue
from kubetune.schedule_spec import SCHEDULE_PLURAL
from kubetune.spec import API_GROUP, API_VERSION, PLURAL

log = logging.getLogger(__name__)
# Connections kept open to the API server: at least one per thread that calls it at once (Kopf's
# handler threads, rechecks, retries). The client's default, 5 per CPU,
# is 10 on 2 cores: a request beyond it opened a TLS connection of its own and closed it after.
POOL_SIZE = 64


class Rejected(Exception):
    """The API server refused a child object as invalid (400/422): built from the spec, it will be refused
    again, so retrying cannot help (the job fails with this message instead)."""


class Kube:
    def __init__(self, pool_size: int = POOL_SIZE):
        from kubernetes import client, config

        configuration = client.Configuration()
        try:
            config.load_incluster_config(client_configuration=configuration)
        except config.ConfigException:
            config.load_kube_config(client_configuration=configuration)
        configuration.connection_pool_maxsize = pool_size
        if not configuration.verify_ssl:  # said once here, not on every request
            import urllib3

            urllib3.disable_warnings(urllib3.exceptions.InsecureRequestWarning)
            log.warning("the API server's certificate is not verified (insecure-skip-tls-verify)")
        self.client = client.ApiClient(configuration)
        self.core = client.CoreV1Api(self.client)
        self.batch = client.BatchV1Api(self.client)
        self.rbac = client.RbacAuthorizationV1Api(self.client)
        self.custom = client.CustomObjectsApi(self.client)
        self.apps = client.AppsV1Api(self.client)
        self._create = {
            "ConfigMap": self.core.create_namespaced_config_map,
            "ServiceAccount": self.core.create_namespaced_service_account,
            "Service": self.core.create_namespaced_service,
            "Role": self.rbac.create_namespaced_role,
            "RoleBinding": self.rbac.create_namespaced_role_binding,
            "Job": self.batch.create_namespaced_job,
            "Deployment": self.apps.create_namespaced_deployment,
            "FineTuneJob": self._create_ftj,  # a schedule's runs
        }

    def _dict(self, obj) -> dict:
        return self.client.sanitize_for_serialization(obj)

    def get_ftj(self, namespace: str, name: str) -> dict | None:
        return self._absent_is_none(
            lambda: self.custom.get_namespaced_custom_object(API_GROUP, API_VERSION, namespace, PLURAL, name))

    def list_ftjs(self, namespace: str, label_selector: str | None = None) -> list[dict]:
        return self.custom.list_namespaced_custom_object(API_GROUP, API_VERSION, namespace, PLURAL,
                                                         label_selector=label_selector)["items"]

    def _create_ftj(self, namespace: str, body: dict, **kwargs):
        return self.custom.create_namespaced_custom_object(API_GROUP, API_VERSION, namespace, PLURAL, body, **kwargs)

    def label_ftj(self, namespace: str, name: str, labels: dict[str, str]) -> None:
        self._absent_is_none(lambda: self.custom.patch_namespaced_custom_object(
            API_GROUP, API_VERSION, namespace, PLURAL, name, {"metadata": {"labels": labels}}))

    def delete_ftj(self, namespace: str, name: str) -> None:
        # Background: the job goes now, the garbage collector removes its children.
        self._absent_is_none(lambda: self.custom.delete_namespaced_custom_object(
            API_GROUP, API_VERSION, namespace, PLURAL, name, propagation_policy="Background"))

    def get_fts(self, namespace: str, name: str) -> dict | None:
        return self._absent_is_none(
            lambda: self.custom.get_namespaced_custom_object(API_GROUP, API_VERSION, namespace, SCHEDULE_PLURAL, name))

    def patch_fts_status(self, namespace: str, name: str, status: dict) -> None:
        self.custom.patch_namespaced_custom_object_status(API_GROUP, API_VERSION, namespace, SCHEDULE_PLURAL, name,
                                                          {"status": status})

    def patch_ftj_status(self, namespace: str, name: str, status: dict) -> str:
        """Patch the job's status; the resourceVersion it then has."""
        return self.custom.patch_namespaced_custom_object_status(
            API_GROUP, API_VERSION, namespace, PLURAL, name, {"status": status})["metadata"]["resourceVersion"]

    def create(self, obj: dict) -> bool:
        """Create ``obj``; False when it already exists (creation is idempotent by name)."""
        from kubernetes.client.rest import ApiException

        try:
            # the response is not turned into the client's model objects: nothing reads it
            _drain(self._create[obj["kind"]](obj["metadata"]["namespace"], obj, _preload_content=False))
            return True
        except ApiException as e:
            if e.status == 409:
                return False
            raise _rejected(e, obj) from None

    def apply(self, obj: dict) -> None:
        """Create ``obj``, or bring an existing Deployment up to it (spec.serve may change after success)."""
        from kubernetes.client.rest import ApiException

        if not self.create(obj) and obj["kind"] == "Deployment":
            try:
                self.apps.patch_namespaced_deployment(obj["metadata"]["name"], obj["metadata"]["namespace"], obj)
            except ApiException as e:
                raise _rejected(e, obj) from None

    def get_job(self, namespace: str, name: str) -> dict | None:
        # the JSON as the API server sent it (timestamps as RFC 3339 "Z" text), not via the client's models
        return self._absent_is_none(lambda: _json(self.batch.read_namespaced_job(name, namespace, _preload_content=False)))

    def delete_job(self, namespace: str, name: str) -> None:
        # Background: the Job goes now, the garbage collector removes its pods.
        self._absent_is_none(lambda: self.batch.delete_namespaced_job(name, namespace, propagation_policy="Background"))

    def delete_service(self, namespace: str, name: str) -> None:
        self._absent_is_none(lambda: self.core.delete_namespaced_service(name, namespace))

    def delete_deployment(self, namespace: str, name: str) -> None:
        self._absent_is_none(lambda: self.apps.delete_namespaced_deployment(name, namespace))

    def workload(self, namespace: str, job: dict) -> dict | None:
        """Kueue's Workload for a Job; None when there is none yet, or no Kueue (its API is not there)."""
        selector = f"{kueue.JOB_UID_LABEL}={job['metadata'].get('uid', '')}"
        found = self._absent_is_none(lambda: self.custom.list_namespaced_custom_object(
            kueue.GROUP, kueue.VERSION, namespace, "workloads", label_selector=selector))
        return next(iter((found or {}).get("items") or []), None)

    def job_pods(self, namespace: str, job_name: str) -> list[dict]:
        pods = self.core.list_namespaced_pod(namespace, label_selector=f"batch.kubernetes.io/job-name={job_name}")
        return [self._dict(p) for p in pods.items]

    @staticmethod
    def _absent_is_none(call):
        from kubernetes.client.rest import ApiException

        try:
            return call()
        except ApiException as e:
            if e.status == 404:
                return None
            raise


def _drain(response) -> bytes:
    """The body of an unparsed (``_preload_content=False``) response, its connection back in the pool."""
    try:
        return response.data
    finally:
        response.release_conn()


def _json(response) -> dict:
    return json.loads(_drain(response))


def _rejected(e, obj: dict) -> Exception:
    """Rejected for a 400/422 (the object itself is invalid), else the ApiException as it was."""
    if e.status not in (400, 422):
        return e
    try:
        message = json.loads(e.body)["message"]
    except (TypeError, ValueError, KeyError):
        message = e.reason
    return Rejected(f"{obj['kind']} {obj['metadata']['name']}: {message[:1000]}")

"""Thin calls to the Kubernetes API (the official client). Objects go in and come out as plain dicts."""

from __future__ import annotations

import json

from kubetune.spec import API_GROUP, API_VERSION

PLURAL = "finetunejobs"


class Rejected(Exception):
    """The API server refused a child object as invalid (400/422): built from the spec, it will be refused
    again, so retrying cannot help (the job fails with this message instead)."""


class Kube:
    def __init__(self):
        from kubernetes import client, config

        try:
            config.load_incluster_config()
        except config.ConfigException:
            config.load_kube_config()
        self.client = client.ApiClient()
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
        }

    def _dict(self, obj) -> dict:
        return self.client.sanitize_for_serialization(obj)

    def get_ftj(self, namespace: str, name: str) -> dict | None:
        return self._absent_is_none(
            lambda: self.custom.get_namespaced_custom_object(API_GROUP, API_VERSION, namespace, PLURAL, name))

    def list_ftjs(self, namespace: str) -> list[dict]:
        return self.custom.list_namespaced_custom_object(API_GROUP, API_VERSION, namespace, PLURAL)["items"]

    def patch_ftj_status(self, namespace: str, name: str, status: dict) -> None:
        self.custom.patch_namespaced_custom_object_status(
            API_GROUP, API_VERSION, namespace, PLURAL, name, {"status": status})

    def create(self, obj: dict) -> bool:
        """Create ``obj``; False when it already exists (creation is idempotent by name)."""
        from kubernetes.client.rest import ApiException

        try:
            self._create[obj["kind"]](obj["metadata"]["namespace"], obj)
            return True
        except ApiException as e:
            if e.status == 409:
                return False
            if e.status in (400, 422):
                try:
                    message = json.loads(e.body)["message"]
                except (TypeError, ValueError, KeyError):
                    message = e.reason
                raise Rejected(f"{obj['kind']} {obj['metadata']['name']}: {message[:1000]}") from None
            raise

    def get_job(self, namespace: str, name: str) -> dict | None:
        return self._absent_is_none(lambda: self._dict(self.batch.read_namespaced_job(name, namespace)))

    def delete_job(self, namespace: str, name: str) -> None:
        # Background: the Job goes now, the garbage collector removes its pods.
        self._absent_is_none(lambda: self.batch.delete_namespaced_job(name, namespace, propagation_policy="Background"))

    def delete_service(self, namespace: str, name: str) -> None:
        self._absent_is_none(lambda: self.core.delete_namespaced_service(name, namespace))

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

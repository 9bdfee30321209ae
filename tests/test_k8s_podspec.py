"""The pods the operator writes, executed for real: their exact command, args and environment run as
local processes (pod index → node rank, pod 0's hostname → 127.0.0.1, the ConfigMap and scratch
volumes → folders), with the S3 protocol server as storage. No kubelet runs, so this stands in for it."""

import base64
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import EXAMPLES
from k8s_helpers import apply, finish_job, ftj_doc, get, operator, wait_for, wait_phase
from kubetune.operator.children import CONFIG_DIR, RANK_ANNOTATION, SCRATCH

pytestmark = [pytest.mark.k8s, pytest.mark.slow]


def run_pod(cp, namespace: str, job: dict, index: int, work: Path) -> subprocess.Popen:
    pod = job["spec"]["template"]["spec"]
    container = pod["containers"][0]
    config = get(cp, namespace, "configmap", pod["volumes"][0]["configMap"]["name"])["data"]
    config_dir, scratch = work / "config", work / f"scratch-{job['metadata']['name']}-{index}"  # an emptyDir per pod
    config_dir.mkdir(exist_ok=True)
    scratch.mkdir()
    for key, value in config.items():
        (config_dir / key).write_text(value)

    def local_path(value: str) -> str:  # volume mounts → folders
        return value.replace(CONFIG_DIR, str(config_dir)).replace(SCRATCH, str(scratch))

    env = {"PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    for source in container.get("envFrom", []):
        secret = get(cp, namespace, "secret", source["secretRef"]["name"])
        env.update({k: base64.b64decode(v).decode() for k, v in secret["data"].items()})
    for var in container["env"]:
        if "value" in var:
            env[var["name"]] = local_path(var["value"])
        elif var["valueFrom"]["fieldRef"]["fieldPath"] == f"metadata.annotations['{RANK_ANNOTATION}']":
            env[var["name"]] = str(index)
    pod0 = f"{job['metadata']['name']}-0.{pod.get('subdomain')}"
    argv = [re.sub(r"\$\((\w+)\)", lambda m: env[m.group(1)], local_path(a)).replace(pod0, "127.0.0.1")
            for a in container["command"] + container.get("args", [])]
    log = open(work / f"{job['metadata']['name']}-{index}.log", "w")
    return subprocess.Popen(argv, env=env, cwd=scratch, stdout=log, stderr=subprocess.STDOUT)


def test_the_operators_pods_train_a_model(control_plane, namespace, s3, s3_server, tmp_path):
    cp = control_plane
    client, bucket = s3
    for f in (EXAMPLES / "data").glob("*.jsonl"):
        client.upload_file(str(f), bucket, f"raw/{f.name}")
    cp.kubectl("create", "secret", "generic", "s3-creds", "-n", namespace,
               "--from-literal=AWS_ACCESS_KEY_ID=testing", "--from-literal=AWS_SECRET_ACCESS_KEY=testing")
    doc = ftj_doc("podspec", preprocessing={"maxSeqLength": 256, "pii": {"allow": ["no-reply@nimbusnotes.example"]}},
                  training={"method": "full", "epochs": 1, "learningRate": 3e-3, "globalBatchSize": 8,
                            "microBatchSize": 2, "checkpointEvery": 10, "evalEvery": 10},
                  storage={"endpoint": s3_server, "credentialsSecret": "s3-creds"},
                  evaluation={"samples": 3, "maxNewTokens": 8})
    doc["spec"]["dataset"]["train"] = f"s3://{bucket}/raw/"
    doc["spec"]["output"]["uri"] = f"s3://{bucket}/jobs/podspec/"
    with operator(cp, namespace):
        apply(cp, namespace, doc)
        prepare = wait_for(lambda: get(cp, namespace, "job", "podspec-prepare"), what="prepare job")
        assert run_pod(cp, namespace, prepare, 0, tmp_path).wait(300) == 0, (tmp_path / "podspec-prepare-0.log").read_text()
        finish_job(cp, namespace, "podspec-prepare")

        gang = wait_for(lambda: get(cp, namespace, "job", "podspec-train-0"), what="training gang")
        assert gang["spec"]["completions"] == 2
        pods = [run_pod(cp, namespace, gang, i, tmp_path) for i in range(2)]
        codes = [p.wait(600) for p in pods]
        logs = "\n".join((tmp_path / f"podspec-train-0-{i}.log").read_text() for i in range(2))
        assert codes == [0, 0], logs[-4000:]
        assert "2 process(es) on CPU" in logs  # two pods, one process each, one gang
        finish_job(cp, namespace, "podspec-train-0")
        status = wait_phase(cp, namespace, "podspec", "Succeeded")["status"]

    keys = {o["Key"] for o in client.list_objects_v2(Bucket=bucket, Prefix="jobs/podspec/")["Contents"]}
    assert {"jobs/podspec/model/model.safetensors", "jobs/podspec/data_report.json", "jobs/podspec/metrics.csv",
            "jobs/podspec/eval_report.md"} <= keys
    assert any(k.endswith("/COMPLETE") for k in keys)
    assert status["outputModel"] == f"s3://{bucket}/jobs/podspec/model"
    report = json.loads(client.get_object(Bucket=bucket, Key="jobs/podspec/data_report.json")["Body"].read())
    assert report["examples_out"]["train"] > 100

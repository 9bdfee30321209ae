"""What lets the operator keep up with thousands of new jobs, without an API server: which watch events
reuse the body they bring instead of reading the job again, which ones need no handler at all, and the
assumptions those shortcuts rest on. The behaviour end to end is tests/test_k8s_operator.py's; the
figures are benchmarks/bench_operator.py's."""

from __future__ import annotations

import kopf
import pytest
import yaml

from conftest import job_doc
from kubetune.operator import children, handlers
from kubetune.spec import parse_job

KEY = "team/bot"


def body(rv: str = "10", **status) -> dict:
    return {"metadata": {"name": "bot", "namespace": "team", "resourceVersion": rv}, "spec": {},
            **({"status": status} if status else {})}


@pytest.fixture(autouse=True)
def no_writes_yet():
    handlers._written.clear()
    yield
    handlers._written.clear()


def test_a_new_job_is_reconciled_from_its_event_body():
    assert handlers._current(KEY, body())  # never reconciled: what the watch brought is all there is
    assert not handlers._current(KEY, None)  # a retry, a recheck, a child Job's event: read the job


def test_a_body_older_than_the_operator_own_write_is_read_again():
    handlers._written[KEY] = "12"
    assert not handlers._current(KEY, body("10"))  # the ADDED event, after a write of ours: stale
    assert not handlers._current(KEY, body("13", phase="Preparing"))  # someone else wrote since
    assert handlers._current(KEY, body("12", phase="Pending"))  # the echo of that write, nothing since


def test_later_phases_always_read_the_job_again():
    handlers._written[KEY] = "12"
    # the stall watchdog reads progress that the pods write: never from an event's body
    assert not handlers._current(KEY, body("12", phase="Training"))
    assert not handlers._current(KEY, body("12", phase="Succeeded"))


def test_the_echo_of_a_preparing_write_needs_no_handler():
    handlers._written[KEY] = "12"
    kw = {"namespace": "team", "name": "bot"}
    assert not handlers._job_needs_work(type="MODIFIED", body=body("12", phase="Preparing"), **kw)
    # anything else that changed since (a spec edit, a second write) is reconciled
    assert handlers._job_needs_work(type="MODIFIED", body=body("13", phase="Preparing"), **kw)
    assert handlers._job_needs_work(type="MODIFIED", body=body("12", phase="Training"), **kw)
    assert handlers._job_needs_work(type="DELETED", body=body("12", phase="Preparing"), **kw)
    assert not handlers._job_needs_work(type="MODIFIED", body=body("14", phase="Failed"), **kw)


def test_a_running_child_job_needs_no_handler_unless_kueue_decides():
    running = {"metadata": {"labels": {children.JOB_LABEL: "bot"}}, "spec": {}, "status": {}}
    finished = {**running, "status": {"conditions": [{"type": "Complete", "status": "True"}]}}
    queued = {"metadata": {"labels": {children.JOB_LABEL: "bot", children.KUEUE_QUEUE_LABEL: "q"}}, "spec": {}}
    assert not handlers._child_matters(body=running)
    assert handlers._child_matters(body=finished) and handlers._child_matters(body=queued)
    assert not handlers._child_matters(body={"metadata": {"labels": {}}, "status": {}})


def test_no_handler_needs_the_diff_base_that_is_no_longer_built():
    """NoDiffBase is right only while no handler compares an object with its last handled state."""
    registry = kopf.get_default_registry()
    assert not registry._changing.get_all_handlers() and not registry._spawning.get_all_handlers()


def test_the_job_file_is_what_safe_dump_wrote():
    job = parse_job({**job_doc("s3://data/raw/", "s3://models/out/", storage={"endpoint": "http://minio:9000"}),
                     "metadata": {"name": "bot", "namespace": "team"}})
    doc = job.model_dump(mode="json", by_alias=True, exclude_none=True)
    doc["metadata"] = {"name": "bot", "namespace": "team"}
    assert children.job_document(job) == yaml.safe_dump(doc, sort_keys=False)

"""OpenAI's grader endpoints of `kubetune api` with the official openai client (fine_tuning.alpha.graders),
against the real API server and a real control plane for its access checks.

The score model is a fine-tuned model the project serves: a FineTuneJob whose status.endpoint points at
test_graders' ChatServer, a real HTTP server on loopback answering chat completions with the score a test
asks for (no kubelet runs here to serve a model, and an untrained model's scores could not be asserted).
"""

from __future__ import annotations

import openai
import pytest
import yaml
from openai import OpenAI

from conftest import job_doc
from test_graders import ChatServer
from test_openai_api import caller, patch_status, running_api

pytestmark = pytest.mark.k8s

EXACT = {"type": "string_check", "name": "exact", "input": "{{sample.output_json.answer}}",
         "reference": "{{item.answer}}", "operation": "eq"}
SIMILAR = {"type": "text_similarity", "name": "similar", "input": "{{sample.output_json.answer}}",
           "reference": "{{item.answer}}", "evaluation_metric": "fuzzy_match"}
MULTI = {"type": "multi", "name": "both", "graders": {"exact": EXACT, "similar": SIMILAR},
         "calculate_output": "0.5 * exact + 0.5 * similar"}
PYTHON = {"type": "python", "name": "py", "source": "def grade(sample, item):\n    return 1.0\n"}


def test_graders_validate_and_run_with_the_openai_client(control_plane, namespace, s3, s3_server, tmp_path):
    cp = control_plane
    key = caller(cp, namespace, "author", ["create", "get"])
    reader = caller(cp, namespace, "reader", ["get", "list"])
    with running_api(cp, namespace, s3[1], s3_server, tmp_path) as base_url:
        graders = OpenAI(base_url=base_url, api_key=key, max_retries=0).fine_tuning.alpha.graders

        valid = graders.validate(grader=MULTI)
        assert valid.grader.type == "multi" and valid.grader.calculate_output == MULTI["calculate_output"]
        assert graders.validate(grader=PYTHON).grader.source == PYTHON["source"]  # checked here, run in jobs

        run = graders.run(grader=MULTI, model_sample='{"answer": "Pariss"}', item={"answer": "Paris"})
        assert run.sub_rewards == {"exact": 0.0, "similar": pytest.approx(10 / 11)}
        assert run.reward == pytest.approx(5 / 11) and run.metadata.type == "multi" and run.metadata.name == "both"
        assert not any(v for k, v in run.metadata.errors.to_dict().items() if isinstance(v, bool))
        not_json = graders.run(grader=EXACT, model_sample="Paris", item={"answer": "Paris"})
        assert not_json.reward == 0.0 and not_json.metadata.errors.sample_parse_error is True

        with pytest.raises(openai.BadRequestError, match="refers to 'exactt'") as e:
            graders.validate(grader={**MULTI, "calculate_output": "exactt + similar"})
        assert e.value.param == "grader.calculate_output"
        with pytest.raises(openai.BadRequestError, match="not allowed") as e:
            graders.run(grader={**MULTI, "calculate_output": "exact.__class__"}, model_sample="x", item={})
        assert e.value.param == "grader.calculate_output"
        with pytest.raises(openai.BadRequestError, match="unknown operation 'equals'") as e:
            graders.validate(grader={**MULTI, "graders": {"exact": {**EXACT, "operation": "equals"}}})
        assert e.value.param == "grader.graders.exact.operation"
        with pytest.raises(openai.BadRequestError, match="the item has no field 'answer'") as e:
            graders.run(grader=EXACT, model_sample='{"answer": "x"}', item={"question": "?"})
        assert e.value.param == "item"
        with pytest.raises(openai.BadRequestError, match="python graders run only in fine-tuning jobs") as e:
            graders.run(grader={**MULTI, "graders": {"exact": EXACT, "similar": PYTHON}}, model_sample="x", item={})
        assert e.value.code == "unsupported_grader"

        with pytest.raises(openai.PermissionDeniedError):  # may read jobs, not create them
            OpenAI(base_url=base_url, api_key=reader, max_retries=0).fine_tuning.alpha.graders.validate(grader=EXACT)
        with pytest.raises(openai.AuthenticationError):
            OpenAI(base_url=base_url, api_key="not-a-token", max_retries=0).fine_tuning.alpha.graders.run(
                grader=EXACT, model_sample="x", item={"answer": "x"})


def test_a_score_model_grader_uses_a_model_the_project_serves(control_plane, namespace, s3, s3_server, tmp_path):
    cp = control_plane
    key = caller(cp, namespace, "author", ["create", "get"])
    judge_model = f"ft:kubetune-tiny:{namespace}::judge"
    grader = {"type": "score_model", "name": "judge", "model": judge_model, "range": [0, 10],
              "input": [{"role": "user", "content": "Grade {{sample.output_text}} for {{item.q}}. REPLY:{{item.r}}"}]}
    server = ChatServer()
    try:
        doc = job_doc("s3://b/train.jsonl", "s3://b/out/")
        doc["metadata"] = {"name": "judge", "namespace": namespace}
        cp.kubectl("apply", "-f", "-", input=yaml.safe_dump(doc))
        with running_api(cp, namespace, s3[1], s3_server, tmp_path) as base_url:
            graders = OpenAI(base_url=base_url, api_key=key, max_retries=0).fine_tuning.alpha.graders
            with pytest.raises(openai.BadRequestError, match="is not being served") as e:
                graders.run(grader=grader, model_sample="4", item={"q": "2+2", "r": "9"})
            assert e.value.param == "grader.model"
            patch_status(cp, namespace, "judge", {"endpoint": server.url})

            run = graders.run(grader=grader, model_sample="4", item={"q": "2+2", "r": '{"result": 9}'})
            assert run.reward == 9.0 and run.metadata.token_usage == 12
            assert run.model_grader_token_usage_per_model == {judge_model: {
                "prompt_tokens": 10, "completion_tokens": 2, "total_tokens": 12, "cached_tokens": 0}}
            sent = server.requests[-1]["body"]
            assert sent["messages"] == [{"role": "user", "content": 'Grade 4 for 2+2. REPLY:{"result": 9}'}]
            assert "model" not in sent  # as chat forwards to a job's endpoint
            failed = graders.run(grader=grader, model_sample="4", item={"q": "2+2", "r": "STATUS 500"})
            assert failed.reward == 0.0 and failed.metadata.errors.model_grader_server_error is True

            other = {**grader, "model": "ft:kubetune-tiny:elsewhere::judge"}
            with pytest.raises(openai.BadRequestError, match="must be a fine-tuned model this project serves") as e:
                graders.run(grader=other, model_sample="4", item={"q": "2+2", "r": "9"})
            assert e.value.code == "model_not_found"
    finally:
        server.httpd.shutdown()
        server.httpd.server_close()

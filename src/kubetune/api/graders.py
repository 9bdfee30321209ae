"""OpenAI's grader endpoints: POST /v1/fine_tuning/alpha/graders/validate ({grader} → {grader}) and
/run ({grader, model_sample, item} → {reward, metadata, sub_rewards, model_grader_token_usage_per_model}).

Both need a caller who may create fine-tuning jobs in the project: graders are there to make RFT jobs,
and running one costs this server's CPU. A score_model grader's model must be a fine-tuned model the
project serves, and the caller one who may get its job (as for chat): this server sends requests only to
its own jobs' endpoints. Python graders
are validated here but run only in a job's pod, under the job's own ServiceAccount: here they would run
beside this server's credentials (its ServiceAccount token, its storage keys, its TLS key), which no
sandbox without namespaces keeps from them.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from aiohttp import web

from kubetune.api.jobs import parse_model
from kubetune.api.reinforcement import parse_grader_at
from kubetune.graders import (GraderError, GraderUnavailable, ModelEndpoint, grade, score_models,
                              uses_python)
from kubetune.openai_errors import RequestError


class GraderRoutes:
    def __init__(self, caller: Callable[[web.Request, str], Awaitable[str]], get_ftj: Callable[[str, str], dict]):
        self.caller, self.get_ftj = caller, get_ftj

    async def validate(self, request: web.Request) -> web.Response:
        await self.caller(request, "create")
        grader = _grader(await _body(request))
        return web.json_response({"grader": grader.model_dump(mode="json", exclude_none=True)})

    async def run(self, request: web.Request) -> web.Response:
        namespace = await self.caller(request, "create")
        body = await _body(request)
        grader = _grader(body)
        sample, item = body.get("model_sample"), body.get("item", {})
        if not isinstance(sample, str):
            raise RequestError(400, "model_sample is required: the model's output, a string", "model_sample")
        if not isinstance(item, dict):
            raise RequestError(400, "item must be a JSON object: the data line the grader's {{item.*}} read", "item")
        if uses_python(grader):
            raise RequestError(400, "python graders run only in fine-tuning jobs (in the job's pod, under its "
                               "ServiceAccount), not on this API server; /validate checks them", "grader",
                               "unsupported_grader")
        if score_models(grader):  # a model the project serves answers those who may get its job, as for chat
            await self.caller(request, "get")
        endpoints = {m: await asyncio.to_thread(self._endpoint, namespace, m) for m in score_models(grader)}
        try:
            result = await asyncio.to_thread(grade, grader, sample, item, endpoints)
        except GraderError as e:  # a missing item field
            raise RequestError(400, str(e), e.param) from None
        except GraderUnavailable as e:
            raise RequestError(400, str(e), e.param, "unsupported_grader") from None
        return web.json_response(result.as_openai())

    def _endpoint(self, namespace: str, model: str) -> ModelEndpoint:
        """A project's served fine-tuned model, as chat finds it."""
        parsed = parse_model(model)
        if not parsed or parsed[0] != namespace or parsed[2]:
            raise RequestError(400, f"score_model's model {model!r} must be a fine-tuned model this project serves "
                               "(a succeeded job's fine_tuned_model with spec.serve.enabled)", "grader.model",
                               "model_not_found")
        endpoint = (self.get_ftj(namespace, parsed[1]).get("status") or {}).get("endpoint")
        if not endpoint:
            raise RequestError(400, f"score_model's model {model!r} is not being served", "grader.model",
                               "model_not_found")
        return ModelEndpoint(endpoint, model="")  # as chat forwards: the endpoint serves this one model


async def _body(request: web.Request) -> dict:
    try:
        body = await request.json()
    except ValueError:
        raise RequestError(400, "the request body is not valid JSON") from None
    if not isinstance(body, dict) or "grader" not in body:
        raise RequestError(400, "grader is required", "grader")
    return body


def _grader(body: dict):
    return parse_grader_at(body["grader"])

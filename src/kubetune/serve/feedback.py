"""``POST /v1/feedback``: a user's rating of a reply, and optionally a better reply.

    {"completion_id": "chatcmpl-...", "rating": "up" | "down", "correction": "the reply it should have been"}

``id`` is taken for ``completion_id``. The completion must be recent and served by this server (it keeps
recent conversations in memory, bounded; see ``capture.Recent``): else 404. Only a server that captures
(``--capture-uri``) keeps them, so without capture every id is unknown.
"""

from __future__ import annotations

import json

from aiohttp import web

from kubetune.data.formats import is_valid_unicode
from kubetune.openai_errors import RequestError
from kubetune.serve.capture import RATINGS, Recorder

MAX_CORRECTION = 64 * 1024  # characters


def parse_feedback(body: object) -> tuple[str, str, str | None]:
    """(completion id, rating, correction or None); RequestError (400) naming the field otherwise."""
    if not isinstance(body, dict):
        raise RequestError(400, "the request body must be a JSON object")
    ids = {k: body[k] for k in ("completion_id", "id") if body.get(k) is not None}
    for key, value in ids.items():
        if not isinstance(value, str) or not value or not is_valid_unicode(value):
            raise RequestError(400, f"{key} must be the id of a chat completion (chatcmpl-...)", key)
    if not ids:
        raise RequestError(400, "completion_id is required: the id of the chat completion rated", "completion_id")
    if len(set(ids.values())) > 1:
        raise RequestError(400, "completion_id and id differ: give one", "id")
    rating = body.get("rating")
    if rating not in RATINGS:
        raise RequestError(400, "rating must be \"up\" or \"down\"", "rating")
    correction = body.get("correction")
    if correction is not None:
        if not isinstance(correction, str) or not correction.strip() or not is_valid_unicode(correction):
            raise RequestError(400, "correction must be a non-empty string (the reply it should have been)", "correction")
        if len(correction) > MAX_CORRECTION:
            raise RequestError(400, f"correction must be at most {MAX_CORRECTION} characters", "correction")
    return next(iter(ids.values())), rating, correction


def feedback_route(recorder: Recorder | None):
    async def feedback(request: web.Request) -> web.Response:
        try:
            body = json.loads(await request.read())
        except (ValueError, RecursionError):
            raise RequestError(400, "the request body is not valid JSON") from None
        completion_id, rating, correction = parse_feedback(body)
        training = recorder.rate(completion_id, rating, correction) if recorder else None
        if training is None:
            raise RequestError(404, f"no recent completion '{completion_id[:80]}' on this server (unknown, expired, "
                               "or the server does not capture)", "completion_id", "completion_not_found")
        return web.json_response({"object": "chat.completion.feedback", "completion_id": completion_id,
                                  "rating": rating, "training_data": training})

    return web.post("/v1/feedback", feedback)

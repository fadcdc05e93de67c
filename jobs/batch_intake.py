"""A batch's intake: read its file once, judge every line, and turn the good ones into tasks.

Two kinds of bad line, as OpenAI's Batch API has them:

- a line that is not a request at all (not JSON, no or a repeated `custom_id`, another `url`
  or `method`, a `body` that is not an object) fails the whole batch, with `errors.data[]`
  naming each such line (up to ERRORS_SHOWN of them);
- a request that cannot run (an unknown model, too long, a refused parameter) is one line in
  the error file; the other lines run.

The file is read chunk by chunk from PostgreSQL and the tasks are inserted a thousand rows at a
time, all in one transaction that ends with the move to in_progress: a batch that fails (or is
cancelled) during its intake leaves no task behind. The tasks are enqueued after the commit, in
pipelines; if that fails the sweeper enqueues them.
"""

from __future__ import annotations

import json
import logging
import secrets

from flask import current_app
from redis.exceptions import RedisError

from webapp.batch_content import stored_lines
from webapp.batch_models import Batch, BatchStatus
from webapp.catalog import catalog
from webapp.extensions import db
from webapp.lifecycle import batches as lifecycle
from webapp.queues import enqueue_tasks
from webapp.services.tasks import context_problem, job_timeout
from webapp.text import text_problem

log = logging.getLogger(__name__)

ENDPOINT = "/v1/chat/completions"
ERRORS_SHOWN = 1000
CUSTOM_ID_MAX = 512
ROLES = {"system", "developer", "user", "assistant"}
# Parameters sent on to the provider as they are; the others below are read by us.
PASSED_ON = {"top_p", "stop", "seed", "presence_penalty", "frequency_penalty", "user"}
READ = {"model", "messages", "max_tokens", "max_completion_tokens", "temperature", "n", "stream", "store", "metadata"}


class LineError(Exception):
    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


def _fatal(code: str, message: str, line: int, param: str | None = None) -> dict:
    return {"code": code, "message": message, "line": line, "param": param}


def parse_request(raw: bytes, number: int, seen: set[str]) -> tuple[dict | None, dict | None]:
    """Return (the line's request, None) or (None, a whole-file error) for one line of the file."""
    try:
        request = json.loads(raw)
    except ValueError:
        return None, _fatal("invalid_json_line", f"Line {number} is not valid JSON.", number)
    if not isinstance(request, dict):
        return None, _fatal("invalid_json_line", f"Line {number} is not a JSON object.", number)
    custom_id = request.get("custom_id")
    if not isinstance(custom_id, str) or not custom_id.strip():
        return None, _fatal("missing_custom_id", f"Line {number} has no custom_id (a string).", number, "custom_id")
    if len(custom_id) > CUSTOM_ID_MAX or text_problem(custom_id):
        return None, _fatal(
            "invalid_custom_id",
            f"Line {number}'s custom_id must be text of at most {CUSTOM_ID_MAX} characters.",
            number,
            "custom_id",
        )
    if custom_id in seen:
        return None, _fatal(
            "duplicate_custom_id",
            f"Line {number} repeats the custom_id {custom_id!r}; each must be unique.",
            number,
            "custom_id",
        )
    seen.add(custom_id)
    if request.get("method") != "POST":
        return None, _fatal("invalid_method", f"Line {number}: method must be POST.", number, "method")
    if request.get("url") != ENDPOINT:
        return None, _fatal(
            "invalid_url", f"Line {number}: url must be {ENDPOINT}, the batch's endpoint.", number, "url"
        )
    if not isinstance(request.get("body"), dict):
        return None, _fatal("invalid_request", f"Line {number}: body must be a JSON object.", number, "body")
    return request, None


def _text_of(content) -> str:
    """Return a message's text: a string, or the text parts of a content list."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise LineError("unsupported_content", "Only text content is supported (no images, audio or files).")
            parts.append(part["text"])
        return "".join(parts)
    raise LineError("invalid_messages", "Each message's content must be text.")


def _integer(body: dict, name: str, low: int, high: int) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise LineError("invalid_parameter", f"{name} must be a whole number from {low} to {high:,}.")
    return value


def task_of(body: dict, default_model: str | None) -> dict:
    """Return the task (prompt, model, params) of a chat-completions body, or raise LineError."""
    cat = catalog()
    model = body.get("model") or default_model or cat.default
    if not isinstance(model, str) or cat.get(model) is None:
        raise LineError("model_not_found", f"Unknown model {model!r}. Available: {', '.join(cat.names())}.")
    spec = cat.get(model)
    unsupported = sorted(set(body) - READ - PASSED_ON)
    if unsupported:
        raise LineError(
            "unsupported_parameter", f"Not supported here: {', '.join(unsupported)} (docs/batches.md lists what is)."
        )
    if body.get("stream") not in (None, False):
        raise LineError("unsupported_parameter", "stream must be false in a batch.")
    if body.get("n") not in (None, 1):
        raise LineError("unsupported_parameter", "n must be 1: one answer per line.")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise LineError("invalid_messages", "messages must be a non-empty list of chat messages.")
    chat, prompt, chars, texts = [], None, 0, []
    for message in messages:
        if not isinstance(message, dict) or message.get("role") not in ROLES:
            raise LineError("invalid_messages", "Each message needs a role: system, developer, user or assistant.")
        text = _text_of(message.get("content"))
        if problem := text_problem(text):
            raise LineError("invalid_messages", f"A message {problem}.")
        chars += len(text)
        texts.append(text)
        chat.append({"role": message["role"], "content": message["content"]})
        if message["role"] == "user":
            prompt = text
    if prompt is None or not prompt.strip():
        raise LineError("invalid_messages", "messages must include a user message with text.")
    limit = current_app.config["PROMPT_MAX_CHARS"]
    if chars > limit:
        raise LineError("context_length_exceeded", f"The messages have {chars:,} characters; the limit is {limit:,}.")
    params: dict = {}
    max_tokens = _integer(body, "max_completion_tokens", 1, spec.max_tokens)
    if max_tokens is None:
        max_tokens = _integer(body, "max_tokens", 1, spec.max_tokens)
    if max_tokens is not None:
        params["max_tokens"] = max_tokens
    temperature = body.get("temperature")
    if temperature is not None:
        if isinstance(temperature, bool) or not isinstance(temperature, int | float) or not 0 <= temperature <= 2:
            raise LineError("invalid_parameter", "temperature must be a number from 0 to 2.")
        params["temperature"] = temperature
    # Refused only when no model of the chain fits, as a submission's prompt is.
    problems = [context_problem(each, "\n".join(texts), params) for each in cat.chain(model) or [spec]]
    if all(problems):
        raise LineError("context_length_exceeded", problems[0])
    extra = {name: body[name] for name in PASSED_ON if name in body}
    if extra:
        params["extra"] = extra
    if len(chat) > 1:
        params["messages"] = chat  # sent as they are; the prompt shown is the last user message
    return {"prompt": prompt, "model": model, "params": params}


def run_intake(batch_id: str) -> str:
    """Validate a batch's file and create its tasks; return what happened (a word, for the job's result)."""
    batch = db.session.get(Batch, batch_id)
    if batch is None or batch.status != BatchStatus.VALIDATING.value:
        db.session.rollback()
        return "skipped"
    user_id, priority, default_model = batch.user_id, batch.priority, batch.model
    input_file_id = batch.input_file_id
    db.session.rollback()  # the session holds no transaction while the file is read

    intake = _Intake(user_id, batch_id, priority, default_model)
    suffix = secrets.token_hex(4)
    with db.engine.connect() as connection:
        transaction = connection.begin()
        try:
            for number, raw in stored_lines(input_file_id):
                if raw.strip():
                    intake.take(connection, number, raw)
            if intake.lines == 0 and not intake.fatal:
                intake.fatal.append(_fatal("empty_file", "The input file has no requests (was it deleted?).", 0))
            started = False
            if not intake.fatal:
                intake.flush(connection)
                lifecycle.add_line_errors(connection, batch_id, intake.line_errors)
                started = lifecycle.start(connection, batch_id, suffix)
        except BaseException:
            transaction.rollback()
            raise
        if not started:
            transaction.rollback()  # failed or cancelled while it was read: no task of it stays
            if not intake.fatal:
                return "skipped"
            with connection.begin():
                return "failed" if lifecycle.fail_validation(connection, batch_id, intake.fatal) else "skipped"
        transaction.commit()
    _enqueue(intake.ids, suffix, priority, intake.models)
    return "in_progress"


class _Intake:
    """The lines read so far: whole-file errors, line errors, and tasks inserted a thousand at a time."""

    def __init__(self, user_id: int, batch_id: str, priority: int, default_model: str | None):
        self.user_id, self.batch_id, self.priority, self.default_model = user_id, batch_id, priority, default_model
        self.seen: set[str] = set()
        self.fatal: list[dict] = []
        self.line_errors: list[dict] = []
        self.rows: list[dict] = []
        self.ids: list[int] = []
        self.models: set[str] = set()
        self.lines = 0

    def take(self, connection, number: int, raw: bytes) -> None:
        self.lines += 1
        request, error = parse_request(raw, number, self.seen)
        if error is not None:
            if len(self.fatal) < ERRORS_SHOWN:
                self.fatal.append(error)
            self.rows.clear()
            return
        if self.fatal:
            return  # the batch fails anyway: only look for more whole-file errors
        try:
            task = task_of(request["body"], self.default_model)
        except LineError as exc:
            custom_id = request["custom_id"]
            self.line_errors.append({"line": number, "custom_id": custom_id, "code": exc.code, "message": exc.message})
            return
        self.models.add(task["model"])
        self.rows.append({**task, "custom_id": request["custom_id"], "line": number})
        if len(self.rows) >= lifecycle.INSERT_ROWS:
            self.flush(connection)

    def flush(self, connection) -> None:
        if self.rows:
            rows = list(lifecycle.pending_rows(self.user_id, self.batch_id, self.priority, self.rows))
            self.ids.extend(lifecycle.add_tasks(connection, rows))
            self.rows.clear()


def _enqueue(ids: list[int], suffix: str, priority: int, models: set[str]) -> None:
    if not ids:
        return
    # One job timeout for the batch: the longest of its models'.
    timeout = max(job_timeout(model) for model in models)
    try:
        enqueue_tasks([(task_id, f"task-{task_id}-{suffix}") for task_id in ids], priority, timeout)
    except RedisError as exc:
        log.warning("batch tasks committed but not all enqueued (%s); the sweeper will enqueue them", exc)

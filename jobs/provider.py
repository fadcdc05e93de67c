"""The one AI code path: a streamed chat completion from any OpenAI-compatible provider."""

from __future__ import annotations

import email.utils
import json
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass

import httpx2
import openai

from webapp.catalog import ModelSpec

# Statuses worth another attempt; every other 4xx is the request's fault and final.
TRANSIENT_STATUSES = {408, 409, 425, 429}
CONNECT_TIMEOUT = 5.0
PROVIDER_MESSAGE_MAX = 300
# A finish_reason worth keeping: a short word, as every provider sends (anything else is dropped).
FINISH_REASON = re.compile(r"[a-z_]{1,32}")


class ProviderError(Exception):
    """A provider call failed; `transient` says whether another attempt may succeed."""

    def __init__(
        self,
        kind: str,
        message: str,
        transient: bool,
        retry_after: float | None = None,
        http_status: int | None = None,
    ):
        super().__init__(message)
        self.kind = kind
        self.message = message
        self.transient = transient
        self.retry_after = retry_after
        # The HTTP status the provider answered with, if it answered.
        self.http_status = http_status
        # The answer's text received before the failure, if any.
        self.partial = ""

    @property
    def short(self) -> str:
        """A few words for the task's attempt history: "HTTP 500", "timeout", "connection error"."""
        if self.http_status is not None:
            return f"HTTP {self.http_status}"
        return SHORT.get(self.kind, self.kind.replace("_", " "))


# The attempt history's words for failures that carry no HTTP status.
SHORT = {"connection": "connection error", "bad_response": "malformed answer"}
# How providers say a prompt does not fit the model's context: OpenAI's and vLLM's error code,
# llama.cpp's error type, and the words of their messages (Ollama, LM Studio, OpenRouter).
CONTEXT_CODES = {"context_length_exceeded", "exceed_context_size_error", "string_above_max_length"}
CONTEXT_WORDS = re.compile(
    r"context[ _-]?(length|window|size)|maximum context|too many tokens|prompt is too long"
    r"|exceeds? the (available )?context",
    re.IGNORECASE,
)


@dataclass
class Usage:
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    # Why the answer ended: "stop" (the model finished), "length" (cut at max_tokens), or
    # another word the provider uses ("content_filter"); None when it did not say.
    finish_reason: str | None = None


# SDK clients by (base URL, key, read timeout), one per process, shared by all its threads (an
# httpx client is thread-safe). Making one costs ~30 ms of CPU (it builds a TLS context), more
# than a short answer: the worker makes them at start (`warm_clients`). Each holds a connection
# pool as large as the worker's concurrency, so no call waits for a connection.
_clients: dict[tuple[str, str, float], openai.OpenAI] = {}
_pool_size = 100


def _client(spec: ModelSpec) -> openai.OpenAI:
    """Return the SDK client for the model; retries are ours (task attempts), so none here."""
    key = (str(spec.base_url), spec.api_key(), spec.read_timeout)
    client = _clients.get(key)
    if client is None:
        client = _clients[key] = openai.OpenAI(
            base_url=key[0],
            api_key=key[1],
            max_retries=0,
            # `read` bounds the silence between two chunks; the whole answer is bounded by the deadline.
            timeout=openai.Timeout(spec.read_timeout, connect=CONNECT_TIMEOUT),
            http_client=openai.DefaultHttpxClient(
                limits=httpx2.Limits(max_connections=_pool_size, max_keepalive_connections=_pool_size)
            ),
        )
    return client


def warm_clients(specs, pool_size: int) -> None:
    """Make the SDK clients of these models now, each with `pool_size` connections at most."""
    global _pool_size
    _pool_size = max(pool_size, 1)
    for spec in specs:
        _client(spec)


def build_request(spec: ModelSpec, prompt: str, params: dict) -> dict:
    """Return the chat-completions request for a task."""
    # A batch line's chat (system, user and assistant turns) is sent whole, as it came.
    messages = list(params.get("messages") or [])
    if not messages:
        if params.get("system"):
            messages.append({"role": "system", "content": params["system"]})
        messages.append({"role": "user", "content": prompt})
    temperature = params.get("temperature")
    # Parameters a batch line passes on (top_p, stop, seed, ...: jobs/batch_intake.py).
    extra_body = {**(spec.extra_body or {}), **(params.get("extra") or {})}
    return {
        "model": spec.upstream,
        "messages": messages,
        "max_tokens": params.get("max_tokens") or spec.default_max_tokens,
        "temperature": spec.temperature if temperature is None else temperature,
        "stream": True,
        "stream_options": {"include_usage": True},
        "extra_body": extra_body or None,
    }


def stream_answer(spec: ModelSpec, prompt: str, params: dict, usage: Usage) -> Iterator[str]:
    """Yield the answer's text pieces as they arrive; fill `usage` when the provider reports it.

    Raises ProviderError, classified, for every way the call can fail, including running past
    the model's time budget. The SDK makes the call (request, headers, status errors as typed
    exceptions); the stream's events are read as plain JSON rather than an SDK model per chunk,
    which costs several times the CPU, and read to their end so the connection goes back to the
    pool for the next call.
    """
    deadline = time.monotonic() + spec.timeout
    try:
        request = build_request(spec, prompt, params)
        with _client(spec).chat.completions.with_streaming_response.create(**request) as response:
            done = False
            for line in response.iter_lines():
                # Checked on every line, so keep-alive comments alone cannot stretch an answer.
                if time.monotonic() > deadline:
                    raise ProviderError(
                        "timeout", f"The answer took longer than the model's {spec.timeout:g} s limit.", True
                    )
                if done or not line.startswith("data:"):
                    continue  # blank lines between events, comments, `event:` and `id:` fields
                data = line[5:].strip()
                if data.startswith("[DONE]"):
                    done = True  # read on to the end of the body (nothing, normally)
                    continue
                yield from _pieces(json.loads(data), usage)
    except openai.APIStatusError as exc:
        raise classify_status(exc) from None
    except (openai.APITimeoutError, httpx2.TimeoutException):
        raise ProviderError(
            "timeout", f"The provider sent nothing for {spec.read_timeout:g} s (timed out).", True
        ) from None
    except openai.APIConnectionError as exc:
        raise ProviderError("connection", f"Could not reach the provider ({_cause(exc)}).", True) from None
    except httpx2.RequestError as exc:
        raise ProviderError("connection", f"Could not reach the provider ({type(exc).__name__}).", True) from None
    except (openai.APIError, ValueError) as exc:
        # A malformed answer (bad JSON in the stream, wrong shape) is usually a passing fault.
        raise ProviderError(
            "bad_response", f"The provider sent a malformed answer ({type(exc).__name__}).", True
        ) from None


def _pieces(chunk: object, usage: Usage) -> list[str]:
    """Return the text pieces of one `chat.completion.chunk`; note its usage. ValueError if malformed."""
    if not isinstance(chunk, dict):
        raise ValueError("a chunk is not an object")
    if chunk.get("error"):  # an error reported inside the stream
        raise ValueError("the provider reported an error in the stream")
    if isinstance(found := chunk.get("usage"), dict):
        usage.prompt_tokens = found.get("prompt_tokens")
        usage.completion_tokens = found.get("completion_tokens")
    choices = chunk.get("choices") or []
    if not isinstance(choices, list):
        raise ValueError("choices is not a list")
    pieces = []
    for choice in choices:
        reason = choice.get("finish_reason") if isinstance(choice, dict) else None
        if isinstance(reason, str) and FINISH_REASON.fullmatch(reason):
            usage.finish_reason = reason
        delta = choice.get("delta") if isinstance(choice, dict) else None
        piece = delta.get("content") if isinstance(delta, dict) else None
        if piece:
            if not isinstance(piece, str):
                raise ValueError("content is not text")
            pieces.append(piece)
    return pieces


def classify_status(exc: openai.APIStatusError) -> ProviderError:
    """Map an HTTP error from the provider to a ProviderError with a plain message."""
    status = exc.status_code
    detail = _provider_message(exc)
    if status == 429:
        retry_after = retry_after_seconds(exc.response.headers)
        wait = f" It asked to wait {retry_after:g} s." if retry_after is not None else ""
        return ProviderError(
            "rate_limited", f"The provider is rate limiting requests (HTTP 429).{wait}", True, retry_after, status
        )
    if status >= 500 or status in TRANSIENT_STATUSES:
        return ProviderError(
            "provider_error",
            f"The provider failed (HTTP {status}){detail}.",
            True,
            retry_after_seconds(exc.response.headers),
            status,
        )
    if status in (401, 403):
        return ProviderError(
            "auth",
            f"The provider refused our credentials (HTTP {status}){detail}. An operator must fix the model's API key.",
            False,
            http_status=status,
        )
    if status in (400, 413, 422) and _about_context(exc):
        return ProviderError(
            "context_length",
            f"The prompt and max tokens do not fit the model's context (HTTP {status}){detail}. "
            "Shorten the prompt or lower max tokens, and submit it again.",
            False,
        )
    if status == 404:
        return ProviderError(
            "not_found", f"The provider does not know this model (HTTP 404){detail}.", False, http_status=status
        )
    return ProviderError(
        "invalid_request", f"The provider rejected the request (HTTP {status}){detail}.", False, http_status=status
    )


def _about_context(exc: openai.APIStatusError) -> bool:
    """Return whether a refused request says the prompt does not fit the model's context."""
    body = exc.body
    inner = body.get("error", body) if isinstance(body, dict) else body
    if isinstance(inner, dict):
        if inner.get("code") in CONTEXT_CODES or inner.get("type") in CONTEXT_CODES:
            return True
        inner = inner.get("message")
    return isinstance(inner, str) and CONTEXT_WORDS.search(inner) is not None


def retry_after_seconds(headers) -> float | None:
    """Read Retry-After (seconds or an HTTP date) or retry-after-ms; None when absent or bad."""
    try:
        if (ms := headers.get("retry-after-ms")) is not None:
            return max(0.0, float(ms) / 1000)
        value = headers.get("retry-after")
        if value is None:
            return None
        try:
            return max(0.0, float(value))
        except ValueError:
            when = email.utils.parsedate_to_datetime(value)
            return max(0.0, when.timestamp() - time.time())
    except (TypeError, ValueError, OverflowError):
        return None


def _about_context(exc: openai.APIStatusError) -> bool:
    """Whether a refusal is about the context size (OpenAI's context_length_exceeded, llama.cpp's
    exceed_context_size_error, "maximum context length" and the like)."""
    body = exc.body if isinstance(exc.body, dict) else {}
    inner = body.get("error", body)
    words = [inner] if isinstance(inner, str) else []
    if isinstance(inner, dict):
        words += [str(inner.get(key) or "") for key in ("code", "type", "message")]
    return any("context" in word.lower() for word in words)


def _provider_message(exc: openai.APIStatusError) -> str:
    body = exc.body
    message = None
    if isinstance(body, dict):
        inner = body.get("error", body)
        message = inner.get("message") if isinstance(inner, dict) else inner
    if not message or not isinstance(message, str):
        return ""
    # Our sentence ends with its own full stop: "(HTTP 400): Bad value." would end with two.
    message = " ".join(message.split()).rstrip(".")
    if len(message) > PROVIDER_MESSAGE_MAX:
        message = message[: PROVIDER_MESSAGE_MAX - 1] + "…"
    return f": {message}"


def _cause(exc: BaseException) -> str:
    cause = exc.__cause__ or exc.__context__
    return type(cause).__name__ if cause else "connection error"

"""A prompt's tokens, estimated before any model sees it: for budgets and for the context-window check.

Pure functions of the text and the catalog entry, so the web app (submit, budgets) and the
workers (a batch's intake) share them.
"""

from __future__ import annotations

import math

from .catalog import ModelSpec

# Tokens a chat template adds around each message (role markers), counted into the estimate.
MESSAGE_OVERHEAD_TOKENS = 8


def estimate_prompt_tokens(prompt: str, system: str | None = None) -> int:
    """Return a generous estimate of a prompt's tokens: one per 3 bytes of UTF-8, plus the template's.

    Tokenisers give English about 4 characters a token and CJK text about one a character (3
    bytes); a third of the bytes covers both, so a reservation rarely falls short of the cost.
    """
    messages = [text for text in (system, prompt) if text]
    return sum(math.ceil(len(text.encode("utf-8", "surrogatepass")) / 3) for text in messages) + (
        MESSAGE_OVERHEAD_TOKENS * len(messages)
    )


def answer_tokens(spec: ModelSpec, params: dict) -> int:
    """Return the most tokens `spec` may write for a task: its max_tokens, within the model's cap."""
    return min(params.get("max_tokens") or spec.default_max_tokens, spec.max_tokens)


def context_problem(spec: ModelSpec, prompt: str, params: dict) -> str | None:
    """Return why the prompt and its longest answer cannot fit the model's context window, or None.

    The prompt's size is the budgets' generous estimate (a token per 3 bytes): a prompt near the
    edge is refused rather than failing on every attempt with the provider's message.
    """
    window = spec.context_window
    if window is None:
        return None
    prompt_tokens = estimate_prompt_tokens(prompt, params.get("system"))
    answer = answer_tokens(spec, params)
    if prompt_tokens + answer <= window:
        return None
    system = params.get("system")
    # Tokens left for the prompt itself, and the characters (a token per 3 bytes) that makes.
    room = window - answer - MESSAGE_OVERHEAD_TOKENS - (estimate_prompt_tokens(system) if system else 0)
    fix = f"Shorten the prompt to about {room * 3:,} characters, lower max tokens," if room > 0 else "Lower max tokens"
    return (
        f"The prompt is about {prompt_tokens:,} tokens (estimated) and the answer may take {answer:,} "
        f"(max tokens), but model {spec.name} has a context window of {window:,} tokens for both. "
        f"{fix} or pick a model with a larger context."
    )

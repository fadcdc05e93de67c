"""The model catalog: which names users may pick, and which provider serves each."""

from __future__ import annotations

import os
import tomllib
from decimal import Decimal
from pathlib import Path
from typing import Any

from flask import current_app
from pydantic import BaseModel, ConfigDict, Field, HttpUrl, ValidationError

from . import money
from .money import PRICE_PLACES

LOCAL = "local"
# Tokens of context per slot of the built-in model's server (jobs/local_model.py): prompt and
# answer together. A 32,000-character prompt is ~8k tokens, more than this small model handles well.
LOCAL_CONTEXT_WINDOW = 4096
# Dollars per million tokens; a price above this is a typo (the dearest models cost ~$100).
PRICE_MAX = Decimal(100_000)


def _price(description: str):
    return Field(
        default=Decimal(0),
        ge=0,
        le=PRICE_MAX,
        allow_inf_nan=False,
        decimal_places=PRICE_PLACES,
        description=description,
    )


class ModelSpec(BaseModel):
    """One entry of the catalog. Only operators write these; users only pick a name."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._:/-]{0,99}$")
    base_url: HttpUrl
    # The environment variable holding the provider's API key; none for local servers.
    api_key_env: str | None = None
    # The model name sent to the provider.
    upstream: str
    description: str = ""
    max_tokens: int = Field(default=1024, ge=1)
    default_max_tokens: int = Field(default=256, ge=1)
    # Tokens the model reads and writes in one call (prompt + answer); None when unknown, and
    # then nothing is refused for size at submit.
    context_window: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=0.7, ge=0, le=2)
    # Calls to this model in flight at once, and requests and tokens per minute, across all
    # workers (jobs/limits.py); None for no per-minute limit.
    concurrency: int = Field(default=16, ge=1)
    rpm: int | None = Field(default=None, ge=1)
    tpm: int | None = Field(default=None, ge=1)
    # Seconds for the whole answer, and seconds of silence before the stream counts as stalled.
    timeout: float = Field(default=120, gt=0)
    read_timeout: float = Field(default=30, gt=0)
    # Extra fields sent in the request body (e.g. llama.cpp's repeat_penalty).
    extra_body: dict[str, Any] = Field(default_factory=dict)
    # What the provider charges, in US dollars per million tokens; 0 is free (`local`).
    usd_per_million_input_tokens: Decimal = _price("dollars per million prompt tokens")
    usd_per_million_output_tokens: Decimal = _price("dollars per million answer tokens")
    # Models tried next, in order, when this one is unavailable (docs/costs.md).
    fallbacks: tuple[str, ...] = ()

    def cost(self, prompt_tokens: int | None, completion_tokens: int | None) -> Decimal:
        """Return what an answer of this model costs at its current prices."""
        return money.cost(
            prompt_tokens, completion_tokens, self.usd_per_million_input_tokens, self.usd_per_million_output_tokens
        )

    @property
    def is_free(self) -> bool:
        return not (self.usd_per_million_input_tokens or self.usd_per_million_output_tokens)

    def api_key(self) -> str:
        """Return the provider key from the environment; local servers take any string."""
        if self.api_key_env:
            return os.environ.get(self.api_key_env, "")
        return "none"

    def public(self, default: str) -> dict:
        """Return what users may see of this model (never its URL or key)."""
        return {
            "name": self.name,
            "default": self.name == default,
            "description": self.description,
            "max_tokens": self.max_tokens,
            "default_max_tokens": self.default_max_tokens,
            "context_window": self.context_window,
            "temperature": self.temperature,
            "usd_per_million_input_tokens": money.as_json(self.usd_per_million_input_tokens),
            "usd_per_million_output_tokens": money.as_json(self.usd_per_million_output_tokens),
            "fallbacks": list(self.fallbacks),
        }


class Catalog:
    """The configured models by name, and which one is the default."""

    def __init__(self, models: dict[str, ModelSpec], default: str):
        if default not in models:
            raise ValueError(f"DEFAULT_MODEL {default!r} is not in the catalog ({', '.join(models)})")
        self.models = models
        self.default = default
        self.chains = {name: _chain(models, name) for name in models}

    def get(self, name: str) -> ModelSpec | None:
        return self.models.get(name)

    def chain(self, name: str) -> list[ModelSpec]:
        """Return the model and the models it falls back to, in the order they are tried."""
        return self.chains.get(name, [])

    def names(self) -> list[str]:
        return sorted(self.models)

    def __iter__(self):
        return iter(self.models.values())


def _chain(models: dict[str, ModelSpec], name: str) -> list[ModelSpec]:
    """Flatten a model's fallbacks depth first (each fallback's own fallbacks before the next one).

    Raises ValueError naming the key for an unknown name or a cycle.
    """
    order: list[ModelSpec] = []

    def visit(current: str, path: tuple[str, ...]) -> None:
        spec = models[current]
        if spec not in order:
            order.append(spec)
        for nxt in spec.fallbacks:
            if nxt not in models:
                raise ValueError(
                    f"model {current!r} in the catalog: fallbacks names {nxt!r}, which is not in the catalog "
                    f"({', '.join(sorted(models))})"
                )
            if nxt in path:
                cycle = " → ".join((*path[path.index(nxt) :], nxt))
                raise ValueError(f"model {current!r} in the catalog: fallbacks make a cycle ({cycle})")
            visit(nxt, (*path, nxt))

    visit(name, (name,))
    return order


def local_model(base_url: str, parallel: int) -> ModelSpec:
    """Return the built-in SmolLM2-135M entry, served on loopback by `flask local-model`."""
    return ModelSpec(
        name=LOCAL,
        base_url=base_url,
        upstream="smollm2-135m-instruct",
        description="SmolLM2-135M-Instruct, built in and offline: fast, small and often wrong.",
        max_tokens=1024,
        default_max_tokens=256,
        context_window=LOCAL_CONTEXT_WINDOW,
        # A 135M model is only sane at a low temperature with a repeat penalty.
        temperature=0.2,
        extra_body={"repeat_penalty": 1.15},
        concurrency=parallel,
        timeout=300,
        read_timeout=60,
    )


def load_catalog(config: dict) -> Catalog:
    """Build the catalog from MODELS (tests), MODELS_FILE, and the built-in `local` model."""
    models = {LOCAL: local_model(config["LOCAL_MODEL_URL"], config["LOCAL_MODEL_PARALLEL"])}
    entries: dict[str, dict] = {}
    default = config.get("DEFAULT_MODEL") or LOCAL
    if config.get("MODELS_FILE"):
        path = Path(config["MODELS_FILE"])
        try:
            data = tomllib.loads(path.read_text())
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ValueError(f"MODELS_FILE {path}: {exc}") from exc
        entries.update(data.get("models", {}))
    entries.update(config.get("MODELS") or {})
    for name, entry in entries.items():
        try:
            models[name] = ModelSpec(name=name, **entry)
        except ValidationError as exc:
            raise ValueError(f"model {name!r} in the catalog: {_problems(exc)}") from exc
    return Catalog(models, default)


def _problems(exc: ValidationError) -> str:
    """Return pydantic's errors as one line per key: "usd_per_million_input_tokens: must be ... (got -1)"."""
    return "; ".join(
        f"{'.'.join(str(part) for part in error['loc']) or 'entry'}: {error['msg']} (got {error.get('input')!r})"
        for error in exc.errors()
    )


def catalog() -> Catalog:
    """Return the current app's catalog."""
    return current_app.extensions["catalog"]

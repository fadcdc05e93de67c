"""The Flask app factory. Nothing here touches the network, migrates or starts work."""

from __future__ import annotations

from pathlib import Path

from flask import Request, current_app
from flask_openapi3 import Info, OpenAPI, SecurityScheme
from werkzeug.middleware.proxy_fix import ProxyFix

from . import config as cfg
from . import converters, json_depth, queues, ratelimits, security, token_cache
from .bounds import PROMPT_CEILING
from .extensions import csrf, db, login_manager, migrate, ping_after_idle
from .logs import setup_logging
from .schemas import ErrorEnvelope

__version__ = "0.1.0"


class AppRequest(Request):
    """A request whose body limit is the file limit on the views that take a whole file."""

    @property
    def max_content_length(self) -> int | None:
        if self._max_content_length is None and self.endpoint in cfg.UPLOAD_ENDPOINTS and current_app:
            return current_app.config["FILE_MAX_BYTES"] + cfg.UPLOAD_ENVELOPE_BYTES
        return super().max_content_length

    @max_content_length.setter
    def max_content_length(self, value: int | None) -> None:
        self._max_content_length = value


class App(OpenAPI):
    """Flask with an OpenAPI registry; templates and static files live at the top of the repo."""

    request_class = AppRequest


def create_app(overrides: dict | None = None) -> App:
    """Create the app: defaults, then the environment, then `overrides` (tests)."""
    app = App(
        __name__,
        info=Info(title="Async AI Task Runner API", version="1"),
        security_schemes={
            "bearer": SecurityScheme(
                type="http",
                scheme="bearer",
                description="An API token from `flask --app wsgi tokens create` or the Tokens page.",
            )
        },
        doc_ui=False,
        validation_error_callback=_validation_error,
        validation_error_model=ErrorEnvelope,
        template_folder=str(cfg.ROOT / "templates"),
        static_folder=str(cfg.ROOT / "static"),
        instance_path=str(cfg.INSTANCE),
    )
    app.json.sort_keys = False
    app.config.from_object(cfg.Config)
    app.config.update(cfg.from_environment(cfg.Config))
    app.config.update(overrides or {})
    if not 1 <= app.config["PROMPT_MAX_CHARS"] <= PROMPT_CEILING:
        raise ValueError(f"PROMPT_MAX_CHARS must be between 1 and {PROMPT_CEILING:,}")
    from .outbox import parse_delays

    parse_delays(app.config["WEBHOOK_RETRY_DELAYS"])  # a bad value stops the start, not the first retry
    app.config["DEFAULT_MONTHLY_BUDGET_USD"] = cfg.monthly_budget(app.config["DEFAULT_MONTHLY_BUDGET_USD"])
    instance = Path(app.instance_path)
    app.config.setdefault("SQLALCHEMY_DATABASE_URI", cfg.database_uri(app.config["DATABASE_URL"], instance))
    app.config["REDIS_URL"] = cfg.redis_url(app.config["REDIS_URL"], instance)
    app.config["SECRET_KEY"] = cfg.secret_key(app.config["SECRET_KEY"], app.config["APP_ENV"], instance)
    app.config["TRUSTED_HOSTS"] = cfg.trusted_hosts(app.config["TRUSTED_HOSTS"], app.config["APP_ENV"])
    options = app.config["SQLALCHEMY_ENGINE_OPTIONS"] = dict(app.config["SQLALCHEMY_ENGINE_OPTIONS"])
    # A database error's message (which is logged) never carries the statement's values:
    # prompts, password hashes, token digests.
    options["hide_parameters"] = True
    if app.config["SQLALCHEMY_DATABASE_URI"].startswith("postgresql"):
        options.setdefault("connect_args", {"connect_timeout": 5, "application_name": "ai-task-runner"})

    if app.config["TRUSTED_PROXIES"]:
        hops = app.config["TRUSTED_PROXIES"]
        app.wsgi_app = ProxyFix(app.wsgi_app, x_for=hops, x_proto=hops, x_host=hops)

    idle = app.config["DATABASE_PING_AFTER_IDLE"]
    if idle <= 0:
        options["pool_pre_ping"] = True

    converters.init_app(app)  # before any route is added: page routes take <id:...>
    db.init_app(app)
    if idle > 0:
        with app.app_context():
            ping_after_idle(db.engine, idle)
    migrate.init_app(app, db, directory=str(cfg.ROOT / "migrations"))
    login_manager.init_app(app)
    csrf.init_app(app)
    # One client per process (a worker sizes its own to its threads: jobs.worker.make_worker).
    app.extensions["redis"] = queues.connect(app.config["REDIS_URL"])
    ratelimits.init_app(app)
    token_cache.init_app(app)
    security.init_app(app)
    json_depth.init_app(app)

    from .catalog import load_catalog

    app.extensions["catalog"] = load_catalog(app.config)

    from . import auth, batch_models, cli, rq_dashboard  # noqa: F401 (auth registers the session user loader)

    # Importing api_batches, api_events and api_webhooks adds their routes to the API's blueprint.
    from .views import (  # noqa: F401
        account,
        api,
        api_batches,
        api_docs,
        api_events,
        api_webhooks,
        batches,
        errors,
        metrics,
        pages,
        usage,
        webhooks,
    )
    from .views import admin as admin_views

    if not app.config.get("TESTING"):
        setup_logging(app.config["LOG_LEVEL"], app.config["LOG_FORMAT"])
    errors.init_app(app)
    app.register_api(api.bp)
    csrf.exempt(api.bp)  # bearer tokens only: no cookies, so no cross-site forgery
    app.register_blueprint(pages.bp)
    app.register_blueprint(account.bp)
    app.register_blueprint(usage.bp)
    app.register_blueprint(webhooks.bp)
    app.register_blueprint(batches.bp)
    app.register_blueprint(admin_views.bp)
    app.register_blueprint(metrics.bp)
    app.register_blueprint(api_docs.bp)
    rq_dashboard.init_app(app)
    cli.init_app(app)
    return app


def _validation_error(exc):
    """Turn a pydantic ValidationError from request parsing into the API's 422 envelope."""
    from .views.errors import validation_response

    return validation_response(exc)

"""Command line: `flask --app wsgi <command>`."""

from __future__ import annotations

import sys

import click
from flask import Flask, current_app
from flask.cli import AppGroup, with_appcontext

from .errors import AppError
from .extensions import db
from .logs import setup_logging
from .models import User
from .queues import QUEUE_NAMES
from .services import accounts
from .services.outbox import QUEUE as WEBHOOK_QUEUE

users = AppGroup("users", help="Manage users.")
tokens = AppGroup("tokens", help="Manage API tokens.")


def _setup_logging() -> None:
    setup_logging(current_app.config["LOG_LEVEL"], current_app.config["LOG_FORMAT"])


def _fail(exc: AppError):
    raise click.ClickException(exc.message)


def _existing_user(name: str) -> User:
    user = accounts.find_user(name)
    if user is None:
        raise click.ClickException(f"No user named {name!r}. Create one with `flask --app wsgi users create {name}`.")
    return user


def _read_password(from_stdin: bool) -> str:
    if from_stdin:
        return sys.stdin.readline().rstrip("\r\n")
    return click.prompt("Password", hide_input=True, confirmation_prompt=True)


@users.command("create")
@click.argument("name")
@click.option("--admin", is_flag=True, help="Make the user an administrator.")
@click.option("--password-stdin", is_flag=True, help="Read the password from standard input.")
def create_user(name: str, admin: bool, password_stdin: bool) -> None:
    """Create a user (asks for the password unless --password-stdin)."""
    password = _read_password(password_stdin)
    try:
        user = accounts.create_user(name, password, is_admin=admin)
    except AppError as exc:
        _fail(exc)
    click.echo(f"Created {'admin' if user.is_admin else 'user'} {user.username}.")


@users.command("set-password")
@click.argument("name")
@click.option("--password-stdin", is_flag=True, help="Read the password from standard input.")
def set_password(name: str, password_stdin: bool) -> None:
    """Give user NAME a new password (a lost password's way back); every sign-in of theirs ends."""
    user = _existing_user(name)
    try:
        ended = accounts.set_password(user, _read_password(password_stdin))
    except AppError as exc:
        _fail(exc)
    click.echo(f"Password set for {user.username}; {ended} {'sign-in' if ended == 1 else 'sign-ins'} ended.")


# ignore_unknown_options: a negative amount ("-3") is an amount to refuse with a reason, not an option.
@users.command("budget", context_settings={"ignore_unknown_options": True})
@click.argument("name")
@click.argument("usd")
def set_budget(name: str, usd: str) -> None:
    """Set user NAME's monthly budget: dollars (25, 12.50), none for no limit, or default."""
    from .services import budgets

    user = _existing_user(name)
    try:
        budgets.set_budget(user, usd)
    except AppError as exc:
        _fail(exc)
    click.echo(f"{user.username}'s monthly budget is {budgets.describe_budget(user)}.")


@tokens.command("create")
@click.argument("name")
@click.option("--label", default="cli", show_default=True, help="The token's own name, as the Tokens page lists it.")
def create_token(name: str, label: str) -> None:
    """Create an API token for the user named NAME (the token's own name is --label); the token is
    printed alone on the last line."""
    user = _existing_user(name)
    try:
        _, token = accounts.create_token(user, label)
    except AppError as exc:
        _fail(exc)
    click.echo(f"API token for {user.username} (shown once; keep it secret):", err=True)
    click.echo(token)


@click.command("worker")
@click.option("--burst", is_flag=True, help="Exit once the queues are empty.")
@click.option("--name", default=None, help="Worker name (default: random).")
@click.option(
    "--concurrency",
    type=click.IntRange(1, 4096),
    default=None,
    help="Tasks run at once, each in a thread (default: WORKER_CONCURRENCY, 32).",
)
@click.argument("queues", nargs=-1)
@with_appcontext
def worker(burst: bool, name: str | None, concurrency: int | None, queues: tuple[str, ...]) -> None:
    """Run a worker on QUEUES (default: high default low, in that order), or on `webhooks` alone."""
    from jobs.worker import run_worker

    _setup_logging()
    if WEBHOOK_QUEUE in queues:
        # Deliveries get workers of their own, so a slow receiver never holds an AI task's thread.
        if len(queues) > 1:
            raise click.BadParameter(f"run the {WEBHOOK_QUEUE} queue in a worker of its own")
        concurrency = concurrency or current_app.config["WEBHOOK_CONCURRENCY"]
    else:
        unknown = set(queues) - set(QUEUE_NAMES)
        if unknown:
            names = ", ".join((*QUEUE_NAMES, WEBHOOK_QUEUE))
            raise click.BadParameter(f"unknown queue(s) {', '.join(sorted(unknown))}; use {names}")
    run_worker(queues or QUEUE_NAMES, name=name, burst=burst, concurrency=concurrency)


@click.command("sweep")
@with_appcontext
def sweep() -> None:
    """Run one sweeper pass: re-enqueue lost PENDING tasks, take back expired leases."""
    from jobs.sweeper import sweep as run_sweep

    click.echo(str(run_sweep()))


@click.command("cleanup")
@with_appcontext
def cleanup() -> None:
    """Delete finished tasks older than RETENTION_DAYS (one pass)."""
    from .services.retention import cleanup as run_cleanup

    click.echo(
        f"retention: deleted {run_cleanup()} finished tasks older than {current_app.config['RETENTION_DAYS']} days"
    )


@click.command("scheduler")
@with_appcontext
def scheduler() -> None:
    """Run the periodic work until stopped: the sweeper every SWEEP_INTERVAL, the cleanup (old tasks,
    idle sign-ins) every CLEANUP_INTERVAL."""
    from .scheduler import run_scheduler

    _setup_logging()
    run_scheduler()


@click.command("local-model")
@with_appcontext
def local_model() -> None:
    """Serve the built-in `local` model (SmolLM2-135M) at LOCAL_MODEL_URL."""
    from jobs.local_model import serve

    _setup_logging()
    config = current_app.config
    serve(config["LOCAL_MODEL_URL"], config["LOCAL_MODEL_THREADS"], config["LOCAL_MODEL_PARALLEL"])


@click.command("bootstrap")
@with_appcontext
def bootstrap() -> None:
    """Apply migrations; on a first start with no users, create `admin` and print its password."""
    from flask_migrate import upgrade

    upgrade()
    password = accounts.ensure_first_admin()
    if password:
        click.echo("")
        click.echo("  Created the first user: admin")
        click.echo(f"  Password (shown once):  {password}")
        click.echo("  Create an API token with: flask --app wsgi tokens create admin")
        click.echo("")


@click.command("serve")
@with_appcontext
def serve() -> None:
    """Run everything on this machine: Valkey (if REDIS_URL is unset), the local model, web, worker, scheduler."""
    from .supervisor import run_all

    _setup_logging()
    sys.exit(run_all(current_app))


def init_app(app: Flask) -> None:
    for command in (users, tokens, worker, sweep, cleanup, scheduler, local_model, bootstrap, serve):
        app.cli.add_command(command)
    app.shell_context_processor(lambda: {"db": db, "User": User})

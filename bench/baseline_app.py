"""Baselines for benchmarks: minimal Flask endpoints doing only the unavoidable work.

`POST /submit`: one ORM insert and one RQ enqueue (for bench.submit_latency).
`GET /rows/<id>`: one ORM read of a row with the text so far, returned as a small escaped HTML
fragment (for bench.poll_latency).

They have none of the product's work (sessions, auth, validation, the catalog, templates, the
error envelope), so the ratio product/baseline says what that work costs on this machine,
measured in the same run.
"""

from __future__ import annotations

import os
from datetime import UTC, datetime

from flask import Flask, request
from flask_sqlalchemy import SQLAlchemy
from markupsafe import escape
from redis import Redis
from rq import Queue
from rq.serializers import JSONSerializer
from sqlalchemy.orm import Mapped, mapped_column

db = SQLAlchemy()


class Row(db.Model):
    __tablename__ = "baseline_rows"
    id: Mapped[int] = mapped_column(primary_key=True)
    prompt: Mapped[str]
    created_at: Mapped[datetime]


class PollRow(db.Model):
    __tablename__ = "baseline_poll_rows"
    id: Mapped[int] = mapped_column(primary_key=True)
    status: Mapped[str]
    progress: Mapped[int]
    result: Mapped[str]


def create_tables(database_url: str) -> None:
    """Create the baseline's tables before a server with several workers starts (they would race to)."""
    from sqlalchemy import create_engine

    engine = create_engine(database_url.replace("postgresql://", "postgresql+psycopg2://", 1))
    db.metadata.create_all(engine)
    engine.dispose()


def create_app() -> Flask:
    app = Flask(__name__)
    url = os.environ["DATABASE_URL"].replace("postgresql://", "postgresql+psycopg2://", 1)
    app.config["SQLALCHEMY_DATABASE_URI"] = url
    db.init_app(app)
    queue = Queue("baseline", connection=Redis.from_url(os.environ["REDIS_URL"]), serializer=JSONSerializer)
    with app.app_context():
        db.create_all()

    @app.post("/submit")
    def submit():
        row = Row(prompt=request.get_json()["prompt"], created_at=datetime.now(UTC))
        db.session.add(row)
        db.session.commit()
        queue.enqueue("bench.noop", row.id)
        return {"id": row.id, "status": "PENDING"}, 202

    @app.get("/rows/<int:row_id>")
    def poll(row_id: int):
        row = db.session.get(PollRow, row_id)
        if row is None:
            return "not found", 404
        text = escape(row.result)
        return f'<section id="row-{row.id}"><p>{row.status} {row.progress}%</p><div>{text}</div></section>'

    return app


app = create_app() if "DATABASE_URL" in os.environ else None

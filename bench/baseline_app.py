"""The baseline for submit benchmarks: a minimal Flask endpoint doing one ORM insert and one RQ enqueue.

It has none of the product's work (auth, validation, the catalog, the error envelope), so the
ratio product/baseline says what that work costs on this machine, measured in the same run.
"""

from __future__ import annotations

import os
from datetime import UTC, datetime

from flask import Flask, request
from flask_sqlalchemy import SQLAlchemy
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

    return app


app = create_app() if "DATABASE_URL" in os.environ else None

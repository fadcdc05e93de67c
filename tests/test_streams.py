"""GET /api/v1/tasks/<id>/events: real Server-Sent Events over a real HTTP server."""

from __future__ import annotations

import json
import threading

import httpx2
import pytest
from sqlalchemy import update
from werkzeug.serving import make_server

from tests.helpers import api_client, run_in_thread, wait_for
from webapp import streams
from webapp.extensions import db
from webapp.models import Task, utcnow


@pytest.fixture
def server(app):
    """The app on a real threaded HTTP server on loopback; yields its base URL."""
    httpd = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_port}"
    httpd.shutdown()


def set_row(app, task_id: int, **values) -> None:
    """Write a task's row as a worker (tracker, final write) would."""
    with app.app_context():
        db.session.execute(update(Task).where(Task.id == task_id).values(updated_at=utcnow(), **values))
        db.session.commit()


def read_events(response, until=None, limit: int = 200) -> list[dict]:
    """Parse SSE events (and comments) off a streaming response until it ends or `until(events)`."""
    if not hasattr(response, "lines"):
        response.lines = response.iter_lines()  # one iterator for the response's whole life
    events, current = [], {}
    for line in response.lines:
        if line == "":
            if current:
                events.append(current)
                current = {}
                if (until and until(events)) or len(events) >= limit:
                    break
            continue
        if line.startswith(":"):
            events.append({"comment": line[1:].strip()})
            if until and until(events):
                break
            continue
        name, _, value = line.partition(":")
        current[name] = value.removeprefix(" ")
    return events


def stream(base: str, api, task_id: int, **headers):
    return httpx2.stream(
        "GET",
        f"{base}/api/v1/tasks/{task_id}/events",
        headers={"Authorization": f"Bearer {api.token}", "Accept": "text/event-stream", **headers},
        timeout=20,
    )


def texts(events):
    return [e for e in events if e.get("event") == "text"]


def statuses(events):
    return [json.loads(e["data"])["status"] for e in events if e.get("event") == "status"]


def test_a_finished_task_gives_its_whole_text_and_status_at_once(app, api, server):
    task = api.submit("Hi")
    set_row(app, task["id"], status="COMPLETED", result="Hello, world.", progress=100, finished_at=utcnow())
    with stream(server, api, task["id"]) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        assert response.headers["cache-control"] == "no-store"
        events = read_events(response)
    (text,) = texts(events)
    assert text["id"] == "13" and json.loads(text["data"]) == {"delta": "Hello, world.", "progress": 100}
    assert statuses(events) == ["COMPLETED"]
    assert json.loads(events[-1]["data"]) == api.task(task["id"])  # the task object, as the API shows it


def test_a_running_task_streams_deltas_and_every_status_change(app, api, server):
    task = api.submit("Hi")
    with stream(server, api, task["id"]) as response:
        events = read_events(response, until=lambda e: statuses(e) == ["PENDING"])
        set_row(app, task["id"], status="PROCESSING", attempts=1, started_at=utcnow())
        events += read_events(response, until=lambda e: "PROCESSING" in statuses(e))
        for text, progress in (("The", 10), ("The capital", 40), ("The capital is Paris.", 90)):
            set_row(app, task["id"], result=text, progress=progress)
            sent = str(len(text))
            events += read_events(response, until=lambda e, sent=sent: any(x.get("id") == sent for x in e))
        set_row(app, task["id"], status="COMPLETED", progress=100, finished_at=utcnow())
        events += read_events(response)  # ends by itself after the finished status
    deltas = [json.loads(e["data"]) for e in texts(events)]
    assert "".join(d["delta"] for d in deltas) == "The capital is Paris."
    assert [e["id"] for e in texts(events)] == ["3", "11", "21"]
    assert [d["progress"] for d in deltas] == [10, 40, 90]
    assert statuses(events) == ["PENDING", "PROCESSING", "COMPLETED"]


def test_last_event_id_resumes_with_nothing_repeated_or_missed(app, api, server):
    task = api.submit("Hi")
    set_row(app, task["id"], status="COMPLETED", result="Hello, world.", progress=100, finished_at=utcnow())
    with stream(server, api, task["id"], **{"Last-Event-ID": "7"}) as response:
        (text,) = texts(read_events(response))
    assert json.loads(text["data"])["delta"] == "world." and text["id"] == "13"
    with stream(server, api, task["id"], **{"Last-Event-ID": "13"}) as response:
        events = read_events(response)
    assert texts(events) == [] and statuses(events) == ["COMPLETED"]


@pytest.mark.parametrize("bad", ["abc", "-3", "1.5", "", "9" * 40])
def test_a_bad_last_event_id_starts_from_0(app, api, server, bad):
    task = api.submit("Hi")
    set_row(app, task["id"], status="COMPLETED", result="Hello.", progress=100, finished_at=utcnow())
    with stream(server, api, task["id"], **{"Last-Event-ID": bad}) as response:
        deltas = [json.loads(e["data"]) for e in texts(read_events(response))]
    # Past the end of the answer, the client is told to drop what it holds ("reset").
    assert [d for d in deltas if d.get("reset")] == ([] if len(bad) < 20 else [deltas[0]])
    assert "".join(d["delta"] for d in deltas) == "Hello."


def test_a_new_attempt_starts_the_answer_over(app, api, server):
    task = api.submit("Hi")
    set_row(app, task["id"], status="PROCESSING", attempts=1, result="Half an ans", progress=50)
    with stream(server, api, task["id"]) as response:
        events = read_events(response, until=lambda e: len(texts(e)) == 1 and statuses(e))
        set_row(app, task["id"], status="PENDING", result=None, progress=0)
        set_row(app, task["id"], status="PROCESSING", attempts=2, result="A whole answer.", progress=100)
        set_row(app, task["id"], status="COMPLETED", finished_at=utcnow())
        events += read_events(response)
    deltas = [json.loads(e["data"]) for e in texts(events)]
    reset = next(i for i, d in enumerate(deltas) if d.get("reset"))
    assert texts(events)[reset]["id"] == "0"
    assert "".join(d["delta"] for d in deltas[reset:]) == "A whole answer."
    assert statuses(events)[-1] == "COMPLETED"


def test_an_idle_stream_gets_keep_alive_comments(app, api, server):
    app.config["STREAM_KEEPALIVE_SECONDS"] = 0.2
    try:
        task = api.submit("Hi")
        with stream(server, api, task["id"]) as response:
            events = read_events(response, until=lambda e: sum("comment" in x for x in e) >= 2)
    finally:
        app.config["STREAM_KEEPALIVE_SECONDS"] = 15.0
    assert [e["comment"] for e in events if "comment" in e] == ["keep-alive", "keep-alive"]


def test_another_users_task_is_404_and_no_token_401(app, api, server):
    task = api.submit("Hi")
    bob = api_client(app, "bob")
    with stream(server, bob, task["id"]) as response:
        assert response.status_code == 404
        response.read()
        assert response.json()["error"]["code"] == "not_found"
    anonymous = httpx2.get(f"{server}/api/v1/tasks/{task['id']}/events", headers={"Accept": "text/event-stream"})
    assert anonymous.status_code == 401


def test_a_json_only_client_is_told_to_accept_the_stream(app, api, server):
    task = api.submit("Hi")
    with stream(server, api, task["id"], Accept="application/json") as response:
        assert response.status_code == 406
        response.read()
        assert "text/event-stream" in response.json()["error"]["message"]


def test_over_the_process_cap_a_stream_is_503_with_retry_after(app, api, server):
    owner = streams.watcher(app)
    # Other tests' streams may still be counted (a test client that never read its stream never
    # closes it): room for exactly one more.
    before = owner.streams
    saved, owner.cap = owner.cap, before + 1
    # A closed connection is noticed at the next write: the keep-alive comes soon here.
    app.config["STREAM_KEEPALIVE_SECONDS"] = 0.2
    try:
        task = api.submit("Hi")
        with stream(server, api, task["id"]) as first:
            read_events(first, until=lambda e: statuses(e))
            with stream(server, api, task["id"]) as second:
                assert second.status_code == 503 and second.headers["retry-after"] == "5"
        # The first stream closed: its place is free again.
        wait_for(lambda: owner.streams == before, timeout=5)
    finally:
        owner.cap = saved
        app.config["STREAM_KEEPALIVE_SECONDS"] = 15.0


def test_a_real_worker_answer_streams_to_the_end(app, api, server, fake_provider):
    prompt = "Stream me"
    fake_provider.script(prompt, {"chunks": ["The ", "capital ", "is ", "Paris", "."], "delay": 0.15})
    task = api.submit(prompt)
    with stream(server, api, task["id"]) as response:
        worker = run_in_thread(app, task["id"])
        events = read_events(response)
    worker.join(10)
    assert statuses(events)[-1] == "COMPLETED"
    assert "".join(json.loads(e["data"])["delta"] for e in texts(events)) == "The capital is Paris."
    assert int(texts(events)[-1]["id"]) == len("The capital is Paris.")


def test_a_stopping_server_ends_its_streams_at_once(app, api, server):
    task = api.submit("Hi")
    try:
        with stream(server, api, task["id"]) as response:
            read_events(response, until=lambda e: statuses(e))
            streams.stop_all()  # what gunicorn.conf.py does on SIGTERM
            rest = read_events(response)  # ends without waiting for the task
    finally:
        streams.STOPPING.clear()
    assert rest == [{"comment": "the server is restarting; reconnect with Last-Event-ID"}]

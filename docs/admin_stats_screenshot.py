"""Take docs/admin-stats.png: the stats page over a day of seeded tasks, in headless Chromium.

    .venv/bin/python -m docs.admin_stats_screenshot

Uses SCREENSHOT_DATABASE_URL (default: the `atr_screenshot` database on 127.0.0.1, emptied
first) and SCREENSHOT_REDIS_URL (default db 12), serves the app under gunicorn on a free port
with one worker process online, and drives Debian's /usr/bin/chromium through Playwright
(never `playwright install`: its browser download does not work here).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault(
    "BENCH_DATABASE_URL", os.environ.get("SCREENSHOT_DATABASE_URL", "postgresql://root@127.0.0.1:5432/atr_screenshot")
)
os.environ.setdefault("BENCH_REDIS_URL", os.environ.get("SCREENSHOT_REDIS_URL", "redis://127.0.0.1:6379/12"))

import psycopg2  # noqa: E402
from redis import Redis  # noqa: E402

from bench.common import DATABASE_URL, REDIS_URL, ROOT, env, flask, gunicorn, reset_database  # noqa: E402

OUT = Path(__file__).resolve().parent / "admin-stats.png"
CHROMIUM = "/usr/bin/chromium"
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
]

# A day of traffic: busier in the afternoon, a burst of rate limits two hours ago, a few
# tasks waiting and running now.
SEED = """
INSERT INTO users (username, password_hash, is_admin, is_active, created_at)
SELECT name, 'x', false, true, now() - interval '30 days'
FROM unnest(ARRAY['alice', 'bob', 'carol', 'dave', 'erin', 'frank', 'grace', 'heidi', 'ivan', 'judy']) AS name;

INSERT INTO tasks (user_id, prompt, model, priority, params, status, progress, result, error, error_kind,
                   attempts, max_attempts, prompt_tokens, completion_tokens, job_id, created_at,
                   started_at, finished_at, updated_at)
SELECT
  (SELECT id FROM users WHERE username <> 'admin' ORDER BY id OFFSET (g * 7) % 10 LIMIT 1),
  'Seeded prompt ' || g,
  CASE WHEN g % 10 < 6 THEN 'local' WHEN g % 10 < 9 THEN 'gpt-4o-mini' ELSE 'llama3' END,
  5, '{}'::jsonb, s.status,
  CASE WHEN s.status = 'COMPLETED' THEN 100 ELSE 0 END,
  CASE WHEN s.status = 'COMPLETED' THEN 'Seeded answer' END,
  CASE WHEN s.status = 'FAILED' THEN 'Seeded failure.' END,
  s.kind, 1, 3,
  CASE WHEN s.status = 'COMPLETED' THEN 30 + g % 90 END,
  CASE WHEN s.status = 'COMPLETED' THEN 40 + (g * 13) % 400 END,
  'task-' || g || '-seed',
  t.finished - t.run - t.wait, t.finished - t.run, t.finished, t.finished
FROM generate_series(1, 9000) AS g
CROSS JOIN LATERAL (SELECT
  -- More tasks in recent hours and in the afternoon: a skewed spread over the last day.
  now() - interval '24 hours' * power(random(), 1.6) * (0.85 + 0.15 * sin(g)) AS finished,
  interval '1 millisecond' * (200 + 6000 * power(random(), 3)) AS wait,
  interval '1 millisecond' * (800 + 14000 * power(random(), 2)) AS run) AS t
CROSS JOIN LATERAL (SELECT
  CASE WHEN t.finished BETWEEN now() - interval '130 minutes' AND now() - interval '110 minutes' AND g % 3 = 0
         THEN 'FAILED'
       WHEN g % 41 = 0 THEN 'FAILED'
       WHEN g % 53 = 0 THEN 'CANCELLED'
       ELSE 'COMPLETED' END AS status,
  CASE WHEN t.finished BETWEEN now() - interval '130 minutes' AND now() - interval '110 minutes' AND g % 3 = 0
         THEN 'rate_limited'
       WHEN g % 41 = 0 THEN (ARRAY['timeout', 'invalid_request', 'provider'])[1 + g % 3]
       WHEN g % 53 = 0 THEN 'cancelled' END AS kind) AS s;

INSERT INTO tasks (user_id, prompt, model, priority, params, status, progress, attempts, max_attempts,
                   created_at, started_at, updated_at, lease_expires_at)
SELECT (SELECT min(id) FROM users WHERE username <> 'admin'), 'Waiting ' || g, 'local', 5, '{}'::jsonb,
       CASE WHEN g <= 2 THEN 'PROCESSING' ELSE 'PENDING' END, 0, CASE WHEN g <= 2 THEN 1 ELSE 0 END, 3,
       now() - interval '20 seconds', CASE WHEN g <= 2 THEN now() - interval '5 seconds' END, now(),
       CASE WHEN g <= 2 THEN now() + interval '30 seconds' END
FROM generate_series(1, 9) AS g;
"""


def main() -> None:
    from playwright.sync_api import sync_playwright

    reset_database()
    flask("users", "create", "admin", "--admin", "--password-stdin", stdin="screenshot-password\n")
    conn = psycopg2.connect(DATABASE_URL)
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute(SEED)
        cur.execute("VACUUM ANALYZE tasks")
    conn.close()

    worker = subprocess.Popen(
        [sys.executable, "-m", "flask", "--app", "wsgi", "worker"], cwd=ROOT, env=env(), stderr=subprocess.DEVNULL
    )
    try:
        connection = Redis.from_url(REDIS_URL)
        deadline = time.monotonic() + 60
        while not connection.scard("rq:workers") and time.monotonic() < deadline:
            time.sleep(0.2)  # the stats page shows it online once it registers
        with gunicorn("wsgi:app") as port, sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
            page = browser.new_page(viewport={"width": 1280, "height": 900}, device_scale_factor=1)
            base = f"http://127.0.0.1:{port}"
            page.goto(f"{base}/login")
            page.fill("input[name=username]", "admin")
            page.fill("input[name=password]", "screenshot-password")
            page.click("button[type=submit]")
            page.goto(f"{base}/admin")
            page.wait_for_selector("#workers-online")
            page.screenshot(path=str(OUT), full_page=True)
            browser.close()
    finally:
        worker.terminate()
        worker.wait(20)
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()

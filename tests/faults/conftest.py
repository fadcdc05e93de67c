"""Fixtures of the fault suite: one machine room per session, a clean slate per case."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest

from tests.faults.cluster import HEADER, CaseReport, Cluster

REPORTS: list[CaseReport] = []


@pytest.fixture(scope="session")
def cluster():
    logs = Path(tempfile.mkdtemp(prefix="atr-faults-logs-"))
    room = Cluster(logs)
    try:
        room.start()
        yield room
    finally:
        room.stop()


@pytest.fixture
def fresh(cluster):
    """A clean case: no tasks, empty Redis, no workers; the workers are killed afterwards."""
    cluster.reset()
    yield cluster
    cluster.stop_workers()
    if cluster.monitor is not None:
        cluster.monitor.finish()
        cluster.monitor = None


@pytest.fixture
def record():
    """Collect a case's figures for the table printed at the end."""
    return REPORTS.append


def pytest_terminal_summary(terminalreporter):
    if not REPORTS:
        return
    terminalreporter.section("fault suite")
    terminalreporter.write_line(HEADER)
    for report in REPORTS:
        terminalreporter.write_line(report.row())

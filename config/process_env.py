"""Process-wide environment the relay sets for itself (and its workers) before heavy imports.

With ingest workers, Prometheus metrics are collected across processes: prometheus_client's
multiprocess mode needs ``PROMETHEUS_MULTIPROC_DIR`` set before it is first imported, in the
relay process and (inherited) in every worker. Called once by ``skyrelay serve``.
"""

from __future__ import annotations

import os
import shutil

from config.settings import Settings


def metrics_dir(settings: Settings) -> str:
    return str(settings.data_dir / "metrics")


def prepare_process_environment(settings: Settings) -> None:
    if settings.ingest_workers <= 0:
        return
    path = metrics_dir(settings)
    shutil.rmtree(path, ignore_errors=True)  # values of a previous run must not add up with ours
    os.makedirs(path, exist_ok=True)
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = path

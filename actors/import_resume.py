"""After a restart, queue again the backfills of DID-list imports that a crash or a stop cut short.

The repo mirror's backfill queue lives in memory. At start-up this walk reads every import
job not yet verified (``store.imports``), and hands the mirror each of its accounts whose
mirrored head is missing or older than the rev the list named; it is paced on the mirror's
backfill queue like the import itself. A loaded job whose accounts are all current is marked
verified and not walked again.
"""

from __future__ import annotations

import logging
from typing import Any

import gevent

from actors.messages_mirror import RequestResync
from actors.mirror import queued_backfills
from store.imports import JOB_LOADED, JOB_VERIFIED, job_accounts, jobs_to_check, set_job_state

log = logging.getLogger(__name__)


def resume_imports(db: Any, carstore: Any, mirror: Any, max_queue: int) -> None:
    """Walk the unverified import jobs (blocking; run it in its own greenlet)."""
    with db.connection_context():
        jobs = jobs_to_check(db)
    for job in jobs:
        queued, after = 0, ""
        while True:
            with db.connection_context():
                page = job_accounts(db, job.id, after_did=after)
            if not page:
                break
            for did, rev in page:
                head = carstore.head(did)
                if head is None or (rev is not None and head.rev < rev):
                    mirror.tell(RequestResync(did, "import_resume"))
                    queued += 1
            after = page[-1][0]
            while queued_backfills() > max_queue:
                gevent.sleep(0.5)
        if queued == 0 and job.state == JOB_LOADED:
            with db.connection_context():
                set_job_state(db, job.id, JOB_VERIFIED)
        log.info("dids import resumed job=%s backfills_queued=%d", job.name, queued)

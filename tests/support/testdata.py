"""Where the tests' data lives in the repository: the interop vectors and the reference-PDS recording.

``VECTORS`` holds the atproto interop vectors (CC0, see its README). ``REFPDS`` holds one recording
of the reference PDS made by ``scripts/record_refpds.py`` (its ``manifest.json`` names the PDS, its
URL, the accounts and each scenario step with its seqs); the helpers below read it.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

TESTS_DIR = Path(__file__).resolve().parents[1]
VECTORS = TESTS_DIR / "vectors" / "interop"
REFPDS = TESTS_DIR / "fixtures" / "refpds"
REFPDS_FRAMES = REFPDS / "pds-firehose-frames.jsonl"
REFPDS_DID_DOCS = REFPDS / "did-docs.json"
REFPDS_AUDIT_LOGS = REFPDS / "plc-audit-logs.json"


def load_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


def refpds_manifest() -> dict[str, Any]:
    manifest: dict[str, Any] = load_json(REFPDS / "manifest.json")
    return manifest


def refpds_frames() -> list[tuple[dict[str, Any], bytes]]:
    """Every recorded live frame: (its JSONL row, the raw websocket message), in seq order."""
    rows = [json.loads(line) for line in REFPDS_FRAMES.read_text().splitlines() if line.strip()]
    return [(row, base64.b64decode(row["frame_b64"])) for row in rows]


def refpds_replayed_frames() -> list[tuple[dict[str, Any], bytes]]:
    """The same firehose read again from cursor 0 at the end of the recording (a late subscriber)."""
    rows = [json.loads(line) for line in (REFPDS / "pds-firehose-replay.jsonl").read_text().splitlines() if line]
    return [(row, base64.b64decode(row["frame_b64"])) for row in rows]


def refpds_frame_seqs() -> list[int]:
    """The seqs the manifest's steps say the scenario caused, in order (from the manifest, not the frames)."""
    return sorted(seq for step in refpds_manifest()["steps"] for seq in step["seqs"])


def refpds_repo_cars() -> list[Path]:
    """The recorded ``getRepo`` CARs, one per account still there at the end, sorted by name."""
    return sorted(REFPDS.glob("repo-*.car"))


def refpds_did_of(car: Path) -> str:
    """The DID whose repo ``car`` is (``repo-did_plc_x.car`` -> ``did:plc:x``)."""
    return car.stem.removeprefix("repo-").replace("_", ":")


def refpds_endpoint() -> str:
    """The recorded PDS's URL, as its DID documents name it (``http://localhost:PORT``)."""
    url: str = refpds_manifest()["pds_url"]
    return url


def refpds_hostname() -> str:
    """The recorded PDS as a relay names the host (``localhost:PORT``)."""
    return urlsplit(refpds_endpoint()).netloc

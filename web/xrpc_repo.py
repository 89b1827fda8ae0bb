"""The XRPC sync read API: getRepo, getRecord, getLatestCommit, getBlocks, listRepos, getRepoStatus.

Handlers parse and check parameters, call ``actors.relay_reads.SyncReads`` (which runs every
SQL query and file read in the thread pool and holds the API's rules: see its docstring) and
format the answer; a refusal (``ControlError``) becomes the matching XRPC error. Client errors
are ``{"error", "message"}`` with status 400, as the reference PDS answers them.

A full ``getRepo`` is streamed: the reads layer checks the repo and measures the CAR first
(a damaged mirror is a proper 500, and the answer has a Content-Length), then the body is sent
a chunk at a time, each chunk read in the thread pool, so memory does not grow with the repo.
A block found damaged while sending (after the check) cuts the connection short.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from flask import Blueprint, Response, jsonify, request

from actors.control_errors import ControlError
from actors.relay_reads import SyncReads
from protocol.cid import cid_from_str
from protocol.errors import CidError
from protocol.syntax import is_valid_did, is_valid_nsid, is_valid_record_key, is_valid_tid
from web.xrpc_errors import XrpcError, xrpc_error_response
from web.xrpc_params import int_arg, str_arg

CAR_MIMETYPE = "application/vnd.ipld.car"
MAX_GET_BLOCKS = 1000  # CIDs one getBlocks call may ask for (the HTTP server's request line has room for them)
MAX_PARAM_CHARS = 2048  # longest text parameter (a DID may have 2048 characters)


def repo_blueprint(*, reads: SyncReads) -> Blueprint:
    """The sync read endpoints over ``reads``."""
    bp = Blueprint("xrpc_repo", __name__)

    @bp.before_request
    def utf8_query() -> None:
        # werkzeug's request.args raises UnicodeDecodeError (a 500) on raw non-UTF-8 query bytes
        try:
            request.query_string.decode()
        except UnicodeDecodeError:
            raise XrpcError("InvalidRequest", "the query string is not UTF-8") from None

    @bp.errorhandler(ControlError)
    def refused(exc: ControlError) -> Any:
        return xrpc_error_response(exc.status, exc.error, exc.message)

    @bp.get("/xrpc/com.atproto.sync.getRepo")
    def get_repo() -> Any:
        did, since = _did_arg(), _tid_arg("since")
        if since is not None:
            return _car(reads.repo_since(did, since))
        stream = reads.repo_stream(did)

        def body() -> Iterator[bytes]:
            try:
                while chunk := reads.next_chunk(did, stream):
                    yield chunk
            finally:
                stream.close()

        resp = Response(body(), mimetype=CAR_MIMETYPE, headers={"Content-Length": str(stream.length)})
        resp.call_on_close(stream.close)  # also when the body was never started
        return resp

    @bp.get("/xrpc/com.atproto.sync.getRecord")
    def get_record() -> Any:
        did = _did_arg()
        collection, rkey = _required_arg("collection"), _required_arg("rkey")
        if not is_valid_nsid(collection):
            raise XrpcError("InvalidRequest", "collection is not a valid NSID")
        if not is_valid_record_key(rkey):
            raise XrpcError("InvalidRequest", "rkey is not a valid record key")
        return _car(reads.record(did, collection, rkey))

    @bp.get("/xrpc/com.atproto.sync.getBlocks")
    def get_blocks() -> Any:
        did, wanted = _did_arg(), _cids_arg()
        return _car(reads.blocks(did, wanted))

    @bp.get("/xrpc/com.atproto.sync.getLatestCommit")
    def get_latest_commit() -> Any:
        return jsonify(reads.latest_commit(_did_arg()))

    @bp.get("/xrpc/com.atproto.sync.listRepos")
    def list_repos() -> Any:
        limit = int_arg("limit", default=500, low=1, high=1000)
        cursor = str_arg("cursor", max_length=MAX_PARAM_CHARS)
        if cursor and not is_valid_did(cursor):
            raise XrpcError("InvalidRequest", "cursor is not one this relay gave out")
        return jsonify(reads.list_repos(cursor, limit))

    @bp.get("/xrpc/com.atproto.sync.getRepoStatus")
    def get_repo_status() -> Any:
        return jsonify(reads.repo_status(_did_arg()))

    return bp


def _car(data: bytes) -> Response:
    return Response(data, mimetype=CAR_MIMETYPE)


def _required_arg(name: str) -> str:
    return str_arg(name, max_length=MAX_PARAM_CHARS, required=True)


def _did_arg() -> str:
    did = _required_arg("did")
    if not is_valid_did(did):
        raise XrpcError("InvalidRequest", "did is not a valid DID")
    return did


def _tid_arg(name: str) -> str | None:
    value = str_arg(name, max_length=MAX_PARAM_CHARS)
    if not value:
        return None
    if not is_valid_tid(value):
        raise XrpcError("InvalidRequest", f"{name} is not a valid TID (a repo rev)")
    return value


def _cids_arg() -> list[bytes]:
    """The ``cids`` parameters, parsed, without repeats, in the order given."""
    raw = request.args.getlist("cids")
    if not raw:
        raise XrpcError("InvalidRequest", "cids is required")
    if len(raw) > MAX_GET_BLOCKS:
        raise XrpcError("InvalidRequest", f"at most {MAX_GET_BLOCKS} cids per request")
    out: dict[bytes, None] = {}
    for text in raw:
        try:
            out[cid_from_str(text)] = None
        except CidError:
            raise XrpcError("InvalidRequest", f"not a valid CID: {text[:80]!r}") from None
    return list(out)

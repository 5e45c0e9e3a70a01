"""``PUT /studies/{uid}/report`` (text/plain): a RIS attaches or replaces a study's report.

A report may come before its images, so an unknown study is not an error here. The text is PHI: it goes to the
node's reports folder (``attach_report``), the audit trail records only its length and SHA-256.
"""

from __future__ import annotations

import hashlib

from fastapi import APIRouter, HTTPException, Request
from starlette.concurrency import run_in_threadpool

from dicom_node.api.auth import Reporter
from dicom_node.api.models import ReportAccepted
from dicom_node.api.routes_studies import StudyUID
from dicom_node.api.services import Audit, ReportAttacher
from workers.search import QueryError

router = APIRouter(tags=["reports"])

MAX_REPORT_BYTES = 1_000_000


PLAIN_TEXT_BODY = {"requestBody": {"required": True, "content": {"text/plain": {"schema": {"type": "string"}}}}}


@router.put("/studies/{uid}/report", response_model=ReportAccepted, summary="Attach or replace a study's report",
            openapi_extra=PLAIN_TEXT_BODY,
            responses={413: {"description": "over 1 MB"}, 415: {"description": "not text/plain"},
                       422: {"description": "empty, blank or not valid text in its charset"}})
async def put_report(uid: StudyUID, request: Request, principal: Reporter, attach: ReportAttacher,
                     audit: Audit) -> ReportAccepted:
    text = await _plain_text(request)
    parameters = {"study_uid": uid, "characters": len(text),
                  "sha256": hashlib.sha256(text.encode("utf-8")).hexdigest()}
    with audit.record(principal.token_name, principal.client, "report", parameters) as audited:
        try:
            # attach_report encodes the text and writes the index: off the event loop.
            await run_in_threadpool(attach, uid, text, "rest")
        except QueryError as error:
            raise HTTPException(422, detail=str(error)) from None
        audited.results = [uid]
        return ReportAccepted(study_instance_uid=uid, characters=len(text))


async def _plain_text(request: Request) -> str:
    """The body as text: text/plain only, at most 1 MB, decoded with its charset (UTF-8 by default)."""
    media, *params = [p.strip() for p in request.headers.get("content-type", "").split(";")]
    if media.lower() != "text/plain":
        raise HTTPException(415, detail=f"send the report as text/plain, not {media or 'no Content-Type'}")
    charset = "utf-8"
    for param in params:
        key, _, value = param.partition("=")
        if key.strip().lower() == "charset":
            charset = value.strip().strip('"') or charset
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_REPORT_BYTES:
            raise HTTPException(413, detail=f"a report is at most {MAX_REPORT_BYTES} bytes")
    try:
        text = bytes(body).decode(charset)
    except (LookupError, UnicodeDecodeError) as error:
        raise HTTPException(422, detail=f"the body is not valid {charset} text: {error.__class__.__name__}") from None
    if not text.strip():
        raise HTTPException(422, detail="the report is empty")
    return text

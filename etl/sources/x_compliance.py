"""X API v2 batch compliance (tweets): which held posts X says to delete, for the twitter source's re-check.

A job is created (POST /2/compliance/jobs, type=tweets), the post ids go to its signed `upload_url` as plain
text, one a line, X works on it (minutes to hours), then GET /2/compliance/jobs/:id says `complete` and its
signed `download_url` serves one JSON object a line for each post that needs action:
`{"id", "action": "delete", "created_at", "redacted_at", "reason": "deleted" | "suspended" | "protected" | ...}`
(posts that need nothing are not listed). X allows one concurrent job per type, so a run with a job pending
only asks about that job; the job id and its post ids are kept in `recheck_state` until its result is read.
The signed URLs carry credentials of their own: they are never logged or kept.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator, Mapping
from typing import Any
from urllib.parse import urlsplit

from etl.config import Settings
from etl.errors import SourceError
from etl.http import Retriable, RetryPolicy, WaitTooLong, is_retriable_status, retry_after_seconds
from etl.lazy import requests  # imported on first use: a run without HTTP never loads it
from etl.sources.base import Source

log = logging.getLogger(__name__)

JOBS_PATH = "/2/compliance/jobs"
JOB_NAME = "social-archiver re-check"
PENDING = ("created", "in_progress")


class ComplianceClient:
    """The four calls of a tweets compliance job; errors are SourceError naming the step (never a signed URL)."""

    def __init__(self, session: requests.Session, settings: Settings, policy: RetryPolicy):
        self.session, self.policy = session, policy
        self.base = settings.source("twitter").api_base.rstrip("/")
        token = settings.source("twitter").bearer_token.reveal().strip().removeprefix("Bearer ").strip()
        self._auth = {"Authorization": f"Bearer {token}"}  # for api.x.com only, never for the signed URLs
        self.timeout = (settings.connect_timeout, settings.read_timeout)

    def _call(self, method: str, url: str, what: str, *, auth: bool = True, **kwargs: Any) -> requests.Response:
        headers = {**(self._auth if auth else {}), **kwargs.pop("headers", {})}

        def attempt() -> requests.Response:
            response = self.session.request(method, url, headers=headers, timeout=self.timeout, **kwargs)
            if is_retriable_status(response.status_code):
                raise Retriable(f"HTTP {response.status_code}", retry_after=retry_after_seconds(response), response=response)
            return response

        try:
            response = self.policy.call(attempt, describe=f"X API {what}")
        except (Retriable, WaitTooLong) as exc:
            status = exc.response.status_code if exc.response is not None else "?"
            raise SourceError(f"X API {what} still failing (HTTP {status}) after the allowed retries") from None
        except requests.RequestException as exc:
            # The exception's text holds the URL, and a signed URL's query is a credential: the type only.
            raise SourceError(f"X API {what} could not be reached ({type(exc).__name__})") from None
        if response.ok:
            return response
        if response.status_code == 401 and auth:
            raise SourceError(f"X API refused the bearer token on {what} (401): check TWITTER_BEARER_TOKEN")
        detail = _problem(response) if auth else ""
        raise SourceError(f"X API refused {what} (HTTP {response.status_code}){': ' + detail if detail else ''}")

    def _data(self, response: requests.Response, what: str) -> dict[str, Any]:
        try:
            body = response.json()
        except ValueError:
            body = None
        data = body.get("data") if isinstance(body, Mapping) else None
        if not isinstance(data, Mapping) or not isinstance(data.get("id"), str):
            raise SourceError(f"X API {what} answered without a job (no data.id)")
        return dict(data)

    def create(self) -> dict[str, Any]:
        response = self._call("POST", self.base + JOBS_PATH, "POST /2/compliance/jobs", json={"type": "tweets", "name": JOB_NAME})
        return self._data(response, "POST /2/compliance/jobs")

    def upload(self, job: Mapping[str, Any], post_ids: list[str]) -> None:
        url = _signed_url(job, "upload_url")
        body = ("\n".join(post_ids) + "\n").encode()
        self._call("PUT", url, f"upload of job {job['id']}'s post ids", auth=False, data=body,
                   headers={"Content-Type": "text/plain"})  # fmt: skip

    def job(self, job_id: str) -> dict[str, Any]:
        what = f"GET /2/compliance/jobs/{job_id}"
        return self._data(self._call("GET", f"{self.base}{JOBS_PATH}/{job_id}", what), what)

    def results(self, job: Mapping[str, Any]) -> Iterator[dict[str, Any]]:
        """The result lines of a complete job; a line that is not a JSON object is logged and skipped."""
        response = self._call("GET", _signed_url(job, "download_url"), f"download of job {job['id']}'s result", auth=False)
        for n, line in enumerate(response.text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except ValueError:
                item = None
            if isinstance(item, dict):
                yield item
            else:
                log.warning("twitter: compliance job %s result line %d is not a JSON object; skipped", job["id"], n)


def _signed_url(job: Mapping[str, Any], field: str) -> str:
    url = job.get(field)
    if not isinstance(url, str) or urlsplit(url).scheme not in ("https", "http") or not urlsplit(url).hostname:
        raise SourceError(f"X API compliance job {job.get('id')} has no usable {field}")
    return url


def _problem(response: requests.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return ""
    if not isinstance(body, Mapping):
        return ""
    errors = body.get("errors") if isinstance(body.get("errors"), list) else []
    parts = [str(body.get(k)) for k in ("title", "detail") if isinstance(body.get(k), str)]
    parts += [str(e.get("message")) for e in errors if isinstance(e, Mapping) and isinstance(e.get("message"), str)]
    return "; ".join(parts)[:300]


def recheck(source: Source, client: ComplianceClient, post_ids: list[str]) -> Iterator[str]:
    """Ask X about held posts through a compliance job; yields the ids of a job whose result was read.

    With no job pending: create one for `post_ids`, upload them, look at it once. With one pending (from this
    run or an earlier one): look at it; complete -> report the deletes and yield its ids; failed or expired ->
    forget it (its posts are chosen again) and raise; still working -> nothing this run."""
    pending = source.recheck_state.get("job") if isinstance(source.recheck_state.get("job"), Mapping) else None
    if pending is None:
        ids = [p for p in post_ids if p.isdigit()]
        if not ids:
            return
        created = client.create()
        client.upload(created, ids)
        pending = {"id": created["id"], "ids": ids}
        source.recheck_state = {"job": pending}
        log.info("twitter: compliance job %s created for %d held post(s)", pending["id"], len(ids))
    job = client.job(str(pending["id"]))
    status = job.get("status")
    if status in PENDING:
        log.info("twitter: compliance job %s is %s; its result is read by a later run", pending["id"], status)
        return
    if status != "complete":
        source.recheck_state = {}
        raise SourceError(f"X compliance job {pending['id']} is {status!r}; its posts are asked about again next run")
    ids = [str(i) for i in pending.get("ids") or []]
    held = set(ids)
    for item in client.results(job):
        post_id, action = str(item.get("id", "")), item.get("action")
        if action == "delete" and post_id in held:
            source.report_gone(post_id, f"X compliance: {item.get('reason') or 'delete'}")
        elif post_id in held:
            log.info("twitter: X compliance asks %r for %s (reason %s); not a deletion", action, post_id, item.get("reason"))
    source.recheck_state = {}
    yield from ids


__all__ = ["ComplianceClient", "recheck"]

"""The review web app (FastAPI, served by uvicorn): server-rendered pages, one small script for the keys.

Safety: photos are served by their number in the review's photo list only (never a path from the request);
every decision is a POST carrying the session's random token (in the page, so another site cannot forge one);
bound to anything but the loopback address, every request needs the token (the URL printed at start carries it
and sets a cookie). Pages are Jinja2 templates with autoescaping, under a strict Content-Security-Policy.
A decision is answered "saved" only after the decisions file committed it (data/decisions.py).
"""

from __future__ import annotations

import ipaddress
import json
import secrets
import socket
import sys
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, PlainTextResponse, Response

from finegrain.data.decisions import DECISIONS_FILE, DecisionLog
from finegrain.errors import FinegrainError
from finegrain.review.config import ReviewConfig
from finegrain.review.pages import render, script, stylesheet
from finegrain.review.queues import QUEUES, Review, load_review
from finegrain.review.thumbs import SIZES, thumbnail

TOKEN_HEADER = "x-review-token"
TOKEN_COOKIE = "finegrain_review_token"
CSP = ("default-src 'none'; img-src 'self'; script-src 'self'; style-src 'self'; connect-src 'self'; "
       "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")


@dataclass
class Session:
    """One running review: its queues, decisions file, thumbnail folder and token."""

    review: Review
    log: DecisionLog
    folder: Path
    token: str = field(default_factory=lambda: secrets.token_urlsafe(24))
    token_everywhere: bool = False  # bound to a non-loopback address: every request needs the token

    def species(self) -> list[str]:
        """The manifest's species plus the new ones named in decisions still in force, sorted."""
        named = {d.label for d in self.log.in_force() if d.action == "new"}
        return sorted(set(self.review.species) | named)

    def progress(self, queue: str, latest: dict) -> tuple[int, int]:
        """(done, left) of a queue."""
        done = sum(it.id in latest for it in self.review.queues[queue])
        return done, len(self.review.queues[queue]) - done


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def create_app(session: Session) -> FastAPI:
    """The app: pages, photos and the decision API of `session`."""
    app = FastAPI(docs_url=None, redoc_url=None, openapi_url=None)

    @app.middleware("http")
    async def guard(request: Request, call_next):
        refused = _refused(session, request)
        response = refused or await call_next(request)
        response.headers.update({"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff",
                                 "Referrer-Policy": "no-referrer", "X-Frame-Options": "DENY"})
        given = request.query_params.get("token")
        if refused is None and session.token_everywhere and given:
            response.set_cookie(TOKEN_COOKIE, session.token, httponly=True, samesite="strict")
        return response

    _pages(app, session)
    _api(app, session)
    return app


def _refused(session: Session, request: Request) -> Response | None:
    """403 for a POST without the token in its header, and (bound beyond loopback) any request without it."""
    def matches(value) -> bool:
        return bool(value) and secrets.compare_digest(str(value), session.token)

    header = request.headers.get(TOKEN_HEADER)
    if request.method != "GET" and not matches(header):
        return PlainTextResponse("forbidden: a decision needs the review's token", status_code=403)
    if session.token_everywhere and not (matches(header) or matches(request.query_params.get("token"))
                                         or matches(request.cookies.get(TOKEN_COOKIE))):
        return PlainTextResponse("forbidden: open the URL printed by `finegrain review` (it carries the token)",
                                 status_code=403)
    return None


def _pages(app: FastAPI, session: Session) -> None:
    review = session.review

    @app.get("/", response_class=HTMLResponse)
    def index():
        latest = session.log.latest()
        queues = [(q, QUEUES[q][0], *session.progress(q, latest)) for q in review.queues]
        return render("index.html", session=session, title="Queues", queues=queues, decisions=len(latest),
                      folder=str(session.folder), manifest=review.sources["manifest"])

    @app.get("/q/{queue}", response_class=HTMLResponse)
    def queue_page(queue: str, item: str | None = None):
        if queue not in review.queues:
            return PlainTextResponse("no such queue", status_code=404)
        latest = session.log.latest()
        items = review.queues[queue]
        current = review.item(item) if item else None
        if current is None or current.queue != queue:
            current = next((it for it in items if it.id not in latest), None)
        done, left = session.progress(queue, latest)
        if current is None:
            return render("done.html", session=session, queue=queue, title=QUEUES[queue][0], done=done,
                          next_queue=_next_queue(session, queue, latest))
        upcoming = next((it for it in items if it.id not in latest and it.id != current.id), None)
        return render("queue.html", session=session, queue=queue, title=QUEUES[queue][0], ask=QUEUES[queue][1],
                      item=current, decided=latest.get(current.id), done=done, left=left, upcoming=upcoming,
                      species=session.species())

    @app.get("/photo/{number}/{size}")
    def photo(number: int, size: str):
        if size not in SIZES or not 0 <= number < len(review.photos.paths):
            return PlainTextResponse("not found", status_code=404)
        path = thumbnail(review.photos, number, size, session.folder / "thumbs")
        if path is None:
            return PlainTextResponse("unreadable photo", status_code=404)
        return FileResponse(path, media_type="image/jpeg", headers={"Cache-Control": "private, max-age=86400"})

    @app.get("/review.js")
    def review_js():
        return Response(script(), media_type="text/javascript")

    @app.get("/review.css")
    def review_css():
        return Response(stylesheet(), media_type="text/css")


def _next_queue(session: Session, after: str, latest: dict) -> str | None:
    """The next queue (after `after`, then from the start) that still has undecided items."""
    names = list(session.review.queues)
    order = names[names.index(after) + 1:] + names[:names.index(after)]
    return next((q for q in order if session.progress(q, latest)[1]), None)


def _api(app: FastAPI, session: Session) -> None:
    review = session.review

    @app.post("/api/decide")
    async def decide(request: Request):
        try:
            body = json.loads(await request.body())
            item = review.item(str(body["item"]))
            action, label = str(body["action"]), str(body.get("label") or "").strip()
        except (ValueError, KeyError, TypeError):
            return JSONResponse({"error": "expected JSON {item, action, label}"}, status_code=400)
        if item is None:
            return JSONResponse({"error": "no such item"}, status_code=404)
        problem = _label_problem(session, item, action, label)
        if problem:
            return JSONResponse({"error": problem}, status_code=422)
        label = {"suggested": item.suggested, "confirm": item.suggested, "given": item.given}.get(action, label)
        try:
            d = session.log.record(item.id, item.queue, action, item.path, label=label, other_path=item.other_path,
                                   new_row=item.new_row)
        except ValueError as e:
            return JSONResponse({"error": str(e)}, status_code=422)
        done, left = session.progress(item.queue, session.log.latest())
        return {"saved": True, "seq": d.seq, "done": done, "left": left, "next": f"/q/{item.queue}"}

    @app.post("/api/undo")
    def undo():
        d = session.log.undo()
        if d is None:
            return JSONResponse({"error": "nothing to undo"}, status_code=409)
        queue = d.queue if d.queue in review.queues else next(iter(review.queues))
        return {"undone": d.item, "next": f"/q/{queue}?item={d.item}"}


def _label_problem(session: Session, item, action: str, label: str) -> str | None:
    """Why a decision's species is refused, or None."""
    if action in ("other", "label") and label not in session.species():
        return f"unknown species {label!r}: pick one from the list, or press n for a new species"
    if action == "new" and not label:
        return "a new species needs a name"
    if action in ("suggested", "confirm") and not item.suggested:
        return "this photo has no suggested species"
    return None


# --- running ----------------------------------------------------------------------------------------------

def _listen(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise FinegrainError(f"--host {host} --port {port}: cannot listen there ({e.strerror}); pass another "
                             "--port (0: any free one)") from None
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


def log_warning(message: str) -> None:
    import logging

    logging.getLogger("finegrain").warning("review: %s", message)


def serve(config: ReviewConfig) -> None:
    """Load the review, open its decisions file, print the URL, serve until interrupted."""
    import uvicorn

    review = load_review(config.manifest, config.audit, config.suggest, config.predict, config.unsure)
    if not review.queues:
        raise FinegrainError(f"nothing to review in {config.manifest}: no unlabelled photos, and no --audit, --suggest "
                             "or --predict given")
    log = DecisionLog(config.out)
    meta = log.meta()
    before = meta.get("sources", {}).get("manifest_content_hash")
    if before and before != review.sources["manifest_content_hash"] and log.latest():
        log_warning(f"{config.out} holds decisions made while {config.manifest} had other rows; they still count "
                    "(relabel refuses decisions on photos the manifest no longer has)")
    started = datetime.now(timezone.utc).isoformat(timespec="seconds")
    log.set_meta("sources", review.sources)
    log.set_meta("sessions", meta.get("sessions", []) + [{"started": started, "host": config.host}])
    session = Session(review, log, Path(config.out), token_everywhere=not is_loopback(config.host))
    app = create_app(session)
    if not session.token_everywhere:
        from starlette.middleware.trustedhost import TrustedHostMiddleware

        app.add_middleware(TrustedHostMiddleware, allowed_hosts=["127.0.0.1", "localhost", "::1", config.host])
    sock = _listen(config.host, config.port)
    port = sock.getsockname()[1]
    shown = f"[{config.host}]" if ":" in config.host else config.host
    url = f"http://{shown}:{port}/" + (f"?token={session.token}" if session.token_everywhere else "")
    counts = ", ".join(f"{QUEUES[q][0].lower()} {len(v)}" for q, v in review.queues.items())
    print(f"review: {url}\n  {counts}; decisions in {Path(config.out) / DECISIONS_FILE} "
          f"({len(log.latest())} made so far). Ctrl-C stops; run again to go on.", flush=True)
    if session.token_everywhere:
        print(f"  listening beyond this machine: every request needs the token {session.token}", flush=True)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=2,
                                           access_log=False))
    try:
        server.run(sockets=[sock])
    finally:
        log.close()
        sys.stdout.flush()

"""The web UI: login, inputs, feeds, graph and account pages, and their static files.

The pages are HTML shells (``templates/``) whose scripts (``static/``) do the work through
the JSON API, as any client does; this module only logs in and out through forms, sends a
page to its session and serves the files. Every answer carries a Content-Security-Policy
that allows scripts and styles from this origin only (no inline script anywhere); a page
carries its session's CSRF token, which the API asks of every state-changing call made
with the session cookie. The login form goes through the same code, and throttle, as
``user/login``.
"""

from __future__ import annotations

import hashlib
import html
import json
import os
import re
from dataclasses import dataclass
from string import Template
from types import MappingProxyType
from typing import Any, Mapping
from urllib.parse import urlencode

from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.http import CACHED
from twisted.web.server import NOT_DONE_YET, Request

from emond.api.context import NodeContext
from emond.api.http import (
    ANSWERED,
    CROSS_SITE,
    INVALID_CSRF,
    Call,
    Raw,
    cross_site,
    error_answer,
    log_unavailable,
    request_params,
    same_origin,
)
from emond.api.users import user_login, user_register
from emond.meta.auth import COOKIE

HERE = os.path.dirname(__file__)
TEMPLATES = os.path.join(HERE, "templates")
STATIC = os.path.join(HERE, "static")
DYGRAPHS = "/usr/share/javascript/dygraphs"  # Debian's libjs-dygraphs (bin/setup installs it)
LIBRARIES = MappingProxyType({b"dygraphs": (DYGRAPHS, ("dygraph.min.js", "dygraph.min.css", "dygraph.min.js.map", "dygraph.min.css.map"))})

CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
    "object-src 'none'; base-uri 'none'; frame-ancestors 'none'; form-action 'self'"
)
SECURITY_HEADERS: Mapping[bytes, bytes] = MappingProxyType({
    b"Content-Security-Policy": CSP.encode(),
    b"X-Content-Type-Options": b"nosniff",
    b"Referrer-Policy": b"same-origin",
    b"X-Frame-Options": b"DENY",
})
CONTENT_TYPES = MappingProxyType({
    ".js": b"text/javascript; charset=utf-8",
    ".css": b"text/css; charset=utf-8",
    ".svg": b"image/svg+xml",
    ".png": b"image/png",
    ".map": b"application/json",
})
HTML = b"text/html; charset=utf-8"
TEXT = b"text/plain; charset=utf-8"
CURRENT = ' aria-current="page"'
SAME_SITE_AGAIN = b'<!doctype html><meta charset="utf-8"><meta http-equiv="refresh" content="0"><title>emond</title>'
FILE_NAME = re.compile(rb"[A-Za-z0-9_.-]{1,100}")


@dataclass(frozen=True)
class Page:
    """A logged-in page: its path (``/inputs``), title, and what it loads besides its own script."""

    name: str
    title: str
    libraries: tuple[str, ...] = ()  # files under /lib/ (scripts before the page's, stylesheets in <head>)


PAGES = MappingProxyType({
    page.name.encode(): page
    for page in (
        Page("inputs", "Inputs"),
        Page("feeds", "Feeds"),
        Page("graph", "Graph", ("dygraphs/dygraph.min.css", "dygraphs/dygraph.min.js")),
        Page("account", "Account"),
    )
})


@dataclass(frozen=True)
class StaticFile:
    body: bytes
    content_type: bytes
    etag: bytes


def load_files(folder: str, names: tuple[str, ...] | None = None) -> dict[bytes, StaticFile]:
    """The files of ``folder`` (or only ``names``), in memory: a few small files, read once."""
    files: dict[bytes, StaticFile] = {}
    if not os.path.isdir(folder):
        return files
    for name in names if names is not None else sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        kind = CONTENT_TYPES.get(os.path.splitext(name)[1])
        if kind is None or not os.path.isfile(path) or not FILE_NAME.fullmatch(name.encode()):
            continue
        with open(path, "rb") as f:
            body = f.read()
        files[name.encode()] = StaticFile(body, kind, b'"' + hashlib.sha256(body).hexdigest()[:20].encode() + b'"')
    return files


def load_template(name: str) -> Template:
    with open(os.path.join(TEMPLATES, name), encoding="utf-8") as f:
        return Template(f.read())


class PagesResource:
    """Serves the UI's paths for the API's root resource (``ApiResource(pages=...)``)."""

    log = Logger()

    def __init__(self, ctx: NodeContext) -> None:
        """``ctx``: the context whose auth and users the pages use (the default shard's: sessions
        and accounts are central)."""
        self.ctx = ctx
        self.static = load_files(STATIC)
        self.libraries = {name: load_files(folder, files) for name, (folder, files) in LIBRARIES.items()}
        for name, (folder, files) in LIBRARIES.items():
            missing = [f for f in files if f.encode() not in self.libraries[name]]
            if missing:
                self.log.warn("web UI: {files} missing from {folder} (bin/setup installs them): /graph cannot draw",
                              files=", ".join(missing), folder=folder)
        self.layout = load_template("layout.html")
        self.login = load_template("login.html")
        self.fragments = {name: self._fragment(page) for name, page in PAGES.items()}

    def _fragment(self, page: Page) -> Template:
        try:
            return load_template(f"{page.name}.html")
        except FileNotFoundError:
            self.log.error("web UI: templates/{page}.html is missing: /{page} shows an error", page=page.name)
            return Template('<p class="error">This page is missing from this installation.</p>')

    def serves(self, postpath: list[bytes]) -> bool:
        """Whether a path is the UI's: ``/``, a page, ``/logout``, ``/static/<file>``, ``/lib/<library>/<file>``."""
        return route(postpath) is not None

    def render(self, request: Request) -> Any:
        for name, value in SECURITY_HEADERS.items():
            request.setHeader(name, value)
        d = defer.ensureDeferred(self._answer(request))
        d.addErrback(self._failed, request)
        return NOT_DONE_YET

    async def _answer(self, request: Request) -> None:
        found = route(request.postpath)
        assert found is not None  # ApiResource sends only the paths serves() claims
        kind, names = found
        method = request.method
        if kind in ("static", "lib"):
            if method not in (b"GET", b"HEAD"):
                return self._text(request, 405, "Method not allowed", {b"Allow": b"GET, HEAD"})
            files = self.static if kind == "static" else self.libraries.get(names[0], {})
            return self._file(request, files.get(names[-1]))
        allowed = (b"GET", b"HEAD", b"POST") if kind == "login" else (b"POST",) if kind == "logout" else (b"GET", b"HEAD")
        if method not in allowed:
            return self._text(request, 405, "Method not allowed", {b"Allow": b", ".join(allowed)})
        if method == b"POST" and cross_site(request):
            return self._text(request, 403, CROSS_SITE)
        if kind == "logout":
            return await self._logout(request)
        if kind == "page":
            return await self._page(request, PAGES[names[0]])
        if method == b"POST":
            return await self._login_form(request)
        if await self.ctx.auth.session(request) is not None:
            return self._redirect(request, next_page(request_params(request).get("next")))
        return self._login_page(request, "", 200)

    async def _page(self, request: Request, page: Page) -> None:
        session = await self.ctx.auth.session(request)
        if session is None:
            if request.getHeader(b"sec-fetch-site") == b"cross-site" and request.getCookie(COOKIE) is None:
                # A link from another site: the browser held back the SameSite=Strict cookie. The
                # same URL again from this page is a same-site navigation, which sends it.
                return self._finish(request, 200, SAME_SITE_AGAIN, HTML, {b"Cache-Control": b"no-store"})
            # the login leads back here
            return self._redirect(request, b"/?" + urlencode({"next": request.uri.decode("latin-1")}).encode())
        username = await self.ctx.users.username(session.userid)
        csrf = self.ctx.auth.csrf_token(request) or ""
        head = "".join(f'<link rel="stylesheet" href="/lib/{lib}">\n' for lib in page.libraries if lib.endswith(".css"))
        if f"{page.name}.css".encode() in self.static:
            head += f'<link rel="stylesheet" href="/static/{page.name}.css">\n'
        scripts = "".join(f'<script src="/lib/{lib}"></script>\n' for lib in page.libraries if lib.endswith(".js"))
        scripts += f'<script type="module" src="/static/{page.name}.js"></script>\n'
        nav = "\n".join(f'<a href="/{p.name}"{CURRENT if p is page else ""}>{p.title}</a>' for p in PAGES.values())
        body = self.layout.substitute(
            title=html.escape(page.title),
            csrf=html.escape(csrf),
            username=html.escape(username),
            head=head,
            nav=nav,
            page=page.name,
            body=self.fragments[page.name.encode()].safe_substitute(),
            scripts=scripts,
        )
        self._finish(request, 200, body.encode(), HTML, {b"Cache-Control": b"no-store"})

    def _login_page(self, request: Request, message: str, code: int) -> None:
        registration = self.ctx.config.users.registration
        body = self.login.substitute(
            message=f'<p class="error" role="alert">{html.escape(message)}</p>' if message else "",
            register_hidden="" if registration else " hidden",
            next=html.escape(next_page(request_params(request).get("next")).decode()),
        )
        self._finish(request, code, body.encode(), HTML, {b"Cache-Control": b"no-store"})

    async def _login_form(self, request: Request) -> None:
        """``action=login`` (``username``, ``password``, ``rememberme``) or ``action=register``
        (and ``email``; logged in once registered): the API's own handlers, throttles included."""
        params = request_params(request)
        call = Call(request, "user", "login", [], "", params, None)
        try:
            if params.get("action") == "register":
                await user_register(self.ctx, call)
            await user_login(self.ctx, call)
        except ANSWERED as e:
            answer = self._refusal(request, e)
            return self._login_page(request, answer_message(answer), answer.code)
        self._redirect(request, next_page(params.get("next")))

    async def _logout(self, request: Request) -> None:
        """Ends the session. The form carries the page's CSRF token; a page older than the
        session (a password changed in another tab) has a stale one, and is still let out
        when the browser vouches that the request is the node's own."""
        token = request_params(request).get("csrf")
        if await self.ctx.auth.session(request) is not None:
            if not self.ctx.auth.csrf_valid(request, token) and not same_origin(request):
                return self._text(request, 403, INVALID_CSRF)
        await self.ctx.auth.end_session(request)
        self._redirect(request, b"/")

    def _refusal(self, request: Request, error: BaseException) -> Raw:
        """The API's answer to ``error`` (its headers set: ``Retry-After``), logged as the API logs it."""
        log_unavailable(self.log, error)
        answer = error_answer(error)
        for name, value in answer.headers.items():
            request.setHeader(name, value)
        return answer

    def _file(self, request: Request, found: StaticFile | None) -> None:
        if found is None:
            return self._text(request, 404, "Not found")
        if request.setETag(found.etag) == CACHED:
            request.finish()
            return
        self._finish(request, 200, found.body, found.content_type, {b"Cache-Control": b"no-cache"})

    def _redirect(self, request: Request, location: bytes) -> None:
        self._finish(request, 303, b"", HTML, {b"Location": location, b"Cache-Control": b"no-store"})

    def _text(self, request: Request, code: int, message: str, headers: Mapping[bytes, bytes] = {}) -> None:
        self._finish(request, code, message.encode(), TEXT, headers)

    def _finish(self, request: Request, code: int, body: bytes, content_type: bytes, headers: Mapping[bytes, bytes] = {}) -> None:
        if request.finished or request.channel is None:  # answered, or the client has gone
            return
        request.setResponseCode(code)
        request.setHeader(b"Content-Type", content_type)
        for name, value in headers.items():
            request.setHeader(name, value)
        if request.method != b"HEAD":
            request.write(body)
        request.finish()

    def _failed(self, failure: Failure, request: Request) -> None:
        """A page that could not be made (Redis down, a pool full): the API's status and words, as text."""
        if failure.check(*ANSWERED):
            answer = self._refusal(request, failure.value)
            return self._text(request, answer.code, answer_message(answer))
        self.log.failure("web UI failed for {path}", failure, path=request.path)
        self._text(request, 500, "Internal server error")


def route(postpath: list[bytes]) -> tuple[str, tuple[bytes, ...]] | None:
    """What a path is to the UI: ("login", ()), ("logout", ()), ("page", (name,)),
    ("static", (file,)), ("lib", (library, file)); None for any other path (the API's)."""
    parts = postpath[:-1] if len(postpath) > 1 and postpath[-1] == b"" else postpath  # "/inputs/" is "/inputs"
    if not parts or parts == [b""]:
        return "login", ()
    if len(parts) == 1 and parts[0] == b"logout":
        return "logout", ()
    if len(parts) == 1 and parts[0] in PAGES:
        return "page", (parts[0],)
    if len(parts) == 2 and parts[0] == b"static" and parts[1]:
        return "static", (parts[1],)
    if len(parts) == 3 and parts[0] == b"lib" and parts[1] and parts[2]:
        return "lib", (parts[1], parts[2])
    return None


_NEXT = re.compile(r"/(?:%s)(?:\?[\x21-\x7e]*)?" % "|".join(page.name for page in PAGES.values()))


def next_page(wanted: str | None) -> bytes:
    """Where a login leads: ``wanted`` if it is one of the pages (with its query), else /inputs;
    never anywhere else (no open redirect)."""
    if wanted and _NEXT.fullmatch(wanted):
        return wanted.encode()
    return b"/inputs"


def answer_message(answer: Raw) -> str:
    """The words of an API refusal (``{"success": false, "message": ...}``), for a page."""
    try:
        return str(json.loads(answer.body)["message"])
    except (ValueError, KeyError, TypeError):
        return answer.body.decode("utf-8", "replace")

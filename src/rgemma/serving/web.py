"""The chat page of ``rgemma serve``: ``GET /`` and its static files, served from the package.

    add_web_routes(app)

The page (``static/index.html``, ``chat.css``, ``chat.js``: plain files, no build step,
nothing fetched from elsewhere) talks to the server's own API: streamed
``/v1/chat/completions``, ``/v1/models`` and the ``/v1/states`` handles (branching
without re-prefill, sessions saved to and loaded from files). The files hold no data,
so they are served without the API key (``WEB_PATHS`` are among the server's open
paths); the page asks for the key when the API answers 401.
"""

from __future__ import annotations

from importlib import resources

from fastapi import FastAPI
from fastapi.responses import Response

from rgemma.serving.errors import APIError

PAGE = "index.html"
# The files the page loads, with their media types; nothing else is served from static/.
STATIC_FILES = {
    "chat.css": "text/css; charset=utf-8",
    "chat.js": "text/javascript; charset=utf-8",
}
WEB_PATHS = ("/", *(f"/static/{name}" for name in STATIC_FILES))
# Only this server's own files and API: no inline script, no other origin, no framing.
CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
    "img-src 'self' data: blob:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",  # an upgraded rgemma serves its new page at once
}


def _read(name: str) -> bytes:
    """A file of ``static/`` (404 if this installation lacks its package data)."""
    try:
        return resources.files("rgemma.serving").joinpath("static", name).read_bytes()
    except FileNotFoundError:
        raise APIError(
            404,
            f"the chat page's {name} is missing from this rgemma installation (built "
            "without its package data): reinstall rgemma from a complete source tree",
            code="not_found",
        ) from None


def _file(name: str, media_type: str) -> Response:
    return Response(_read(name), media_type=media_type, headers=HEADERS)


def add_web_routes(app: FastAPI) -> None:
    """Adds ``GET /`` (the chat page) and ``GET /static/{name}`` (its CSS and JS)."""

    async def page() -> Response:
        return _file(PAGE, "text/html; charset=utf-8")

    async def static(name: str) -> Response:
        if name not in STATIC_FILES:
            raise APIError(404, f"no static file {name!r}", code="not_found")
        return _file(name, STATIC_FILES[name])

    app.add_api_route("/", page, methods=["GET", "HEAD"], include_in_schema=False)
    app.add_api_route("/static/{name}", static, methods=["GET", "HEAD"], include_in_schema=False)

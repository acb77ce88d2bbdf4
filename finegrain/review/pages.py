"""The review app's pages: Jinja2 templates in review/templates (autoescaped), the report's one stylesheet plus
review.css, and review.js (the keys); all read from the package, nothing from a CDN."""

from __future__ import annotations

import functools
from importlib import resources

import jinja2
from fastapi.responses import HTMLResponse

from finegrain.review.keys import GLOBAL, keys_for


@functools.cache
def environment() -> jinja2.Environment:
    env = jinja2.Environment(loader=jinja2.PackageLoader("finegrain.review", "templates"),
                             autoescape=jinja2.select_autoescape(["html"]), undefined=jinja2.StrictUndefined,
                             trim_blocks=True, lstrip_blocks=True)
    env.globals.update(keys_for=keys_for, global_keys=GLOBAL)
    return env


def render(template: str, **context) -> HTMLResponse:
    """The page `template` filled with `context`, never cached (it shows the progress of the moment)."""
    html = environment().get_template(template).render(**context)
    return HTMLResponse(html, headers={"Cache-Control": "no-store"})


@functools.cache
def stylesheet() -> str:
    """report/templates/style.css (the one stylesheet of finegrain's pages) followed by the review's additions."""
    base = resources.files("finegrain.report").joinpath("templates/style.css").read_text(encoding="utf-8")
    return base + "\n" + resources.files("finegrain.review").joinpath("static/review.css").read_text(encoding="utf-8")


@functools.cache
def script() -> str:
    return resources.files("finegrain.review").joinpath("static/review.js").read_text(encoding="utf-8")

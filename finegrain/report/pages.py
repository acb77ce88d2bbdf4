"""Every HTML page finegrain writes, rendered from the Jinja2 templates in report/templates/.

Autoescaping is on for .html templates: a value a page shows (a species name, a path, a title) is
escaped unless the code marks it as already-safe markup (`markupsafe.Markup`). Each page includes the
one stylesheet, templates/style.css, inline, so a page is a single self-contained file.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from urllib.parse import quote

import jinja2

from finegrain.fsutil import atomic_write_text
from finegrain.report.formats import METRIC_NAMES, format_value, frame_html


@functools.cache
def environment() -> jinja2.Environment:
    """The templates of report/templates/, with the filters `value`, `metric_name`, `frame` and `quote`."""
    env = jinja2.Environment(loader=jinja2.PackageLoader("finegrain.report", "templates"),
                             autoescape=jinja2.select_autoescape(["html"]), undefined=jinja2.StrictUndefined,
                             trim_blocks=True, lstrip_blocks=True)
    env.filters.update(value=format_value, metric_name=lambda k: METRIC_NAMES.get(k, k), frame=frame_html,
                       quote=quote)
    return env


def render(template: str, **context) -> str:
    """The page `template` (a file name in report/templates/) filled with `context`."""
    return environment().get_template(template).render(**context)


def write_page(path: str | os.PathLike, template: str, **context) -> Path:
    """Render `template` with `context` into `path`, atomically; returns the path."""
    path = Path(path)
    atomic_write_text(path, render(template, **context))
    return path

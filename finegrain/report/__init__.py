"""Presentation: metric tables, plots, photo panels and every HTML page, rendered from Jinja2 templates."""

"""`finegrain review`: the local web app where a person decides, one key each, on audit findings, photos to label
and unsure predictions (config.py: options; queues.py: what to decide; server.py: the app; the decisions file is
finegrain.data.decisions, which `manifest relabel --from REVIEW_DIR` reads). Only this room imports the web
framework, and only when the app runs."""

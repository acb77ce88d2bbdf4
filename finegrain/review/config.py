"""`finegrain review`: its checked options (no web framework imported here: the command line imports the server
when the command runs, so `finegrain --help` stays fast)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from finegrain.config import CommandConfig, between, option


@dataclass
class ReviewConfig(CommandConfig):
    """`finegrain review`: a local web app to decide on audit findings, photos to label and unsure predictions."""

    manifest: Path = option(help="The manifest under review (never modified).")
    out: Path = option(help="Review folder: decisions (decisions.sqlite) and cached thumbnails. Start again with the "
                            "same folder to go on where you stopped.", flag="--out")
    audit: Path | None = option(None, "An audit folder (audit.csv) written by `finegrain audit` on this manifest.")
    suggest: Path | None = option(None, "A CSV written by `finegrain suggest`: the photos to label, in its order "
                                        "(default: every unlabelled photo of the manifest).")
    predict: Path | None = option(None, "A CSV written by `finegrain predict`: photos called unknown or below --unsure "
                                        "are queued (photos under the manifest's root only).")
    unsure: float = option(0.5, "Predictions whose best probability is below this are queued.", check=between(0, 1))
    port: int = option(8765, "Port to listen on (0: any free one).", check=between(0, 65535))
    host: str = option("127.0.0.1", "Address to listen on. Any address other than the loopback one needs the random "
                                    "token printed at start on every request.")


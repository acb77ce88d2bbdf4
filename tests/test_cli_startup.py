"""The command line answers at once: help and manifest commands import no torch, timm or albumentations,
and the registries' entries read for help (from source) are the ones their modules register."""

import subprocess
import sys

import pytest

from finegrain.registry import PRETRAIN_METHODS, SAMPLERS, SUPCON_LOSSES, Registry

HEAVY = ("torch", "timm", "albumentations")

_PROBE = """
import sys
from typer.testing import CliRunner
from finegrain.cli import app
result = CliRunner().invoke(app, sys.argv[1:])
assert result.exit_code == 0, result.output
print(result.output)
print("HEAVY:", ",".join(m for m in {heavy!r} if m in sys.modules))
"""


@pytest.mark.parametrize("args", [["--help"], ["pretrain", "--help"], ["supcon", "--help"], ["evaluate", "--help"],
                                  ["audit", "--help"], ["suggest", "--help"], ["predict", "--help"], ["export", "--help"],
                                  ["demo-data", "--help"], ["run", "--help"], ["runs", "--help"],
                                  ["backbones", "--help"], ["manifest", "--help"], ["review", "--help"],
                                  *[["manifest", sub, "--help"] for sub in ("cub", "folder", "csv", "split", "relabel", "import-labels",
                                                                            "shard", "validate")]])
def test_help_imports_no_torch(args):
    done = subprocess.run([sys.executable, "-c", _PROBE.format(heavy=HEAVY), *args], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.rstrip().endswith("HEAVY:"), done.stdout[-300:]
    assert "Usage" in done.stdout


def test_pretrain_help_still_describes_every_method():
    done = subprocess.run([sys.executable, "-c", _PROBE.format(heavy=HEAVY), "pretrain", "--help"],
                          capture_output=True, text=True, timeout=120)
    text = " ".join(done.stdout.split())
    for name in ("simclr", "moco", "byol", "simsiam"):
        assert name in text


@pytest.mark.parametrize("registry", [PRETRAIN_METHODS, SUPCON_LOSSES, SAMPLERS])
def test_help_reads_the_entries_the_modules_register(registry):
    fresh = Registry(registry.kind, registry.home, registry.declared_as)  # not loaded: reads the source
    declared = (fresh.names(), fresh.describe())
    registry.get(declared[0][0])  # imports the home module: every entry registers itself
    live = dict(registry._descriptions)
    assert declared[0] == list(live)
    assert declared[1] == "; ".join(f"{n}: {d}" if d else n for n, d in live.items())

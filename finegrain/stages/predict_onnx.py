"""`finegrain predict --model EXPORTED`: predictions from a model of `finegrain export`, through the torch-free
runner (finegrain/runtime), with the columns of `finegrain predict`. Imports no torch."""

from __future__ import annotations

import logging
from pathlib import Path

import pandas as pd

from finegrain.errors import FinegrainError
from finegrain.fsutil import atomic_write_text
from finegrain.runtime import runner

log = logging.getLogger("finegrain")


def run_predict_onnx(model, inputs, *, top_k: int = 5, out_csv=None, batch_size: int = 32,
                     open_set: bool | None = None) -> pd.DataFrame:
    """`run_predict` with an exported model (`finegrain export`'s folder or .onnx file) and the torch-free runner
    (finegrain/runtime): the same columns; an undecodable photo gets a warning and an error row."""
    try:
        exported = runner.load_model(model)
        rows, cols = runner.predict(exported, runner.collect_photos(inputs), top_k=top_k, open_set=open_set,
                                    batch_size=batch_size, warn=lambda message: log.warning("predict: %s", message))
    except runner.RunnerError as e:
        raise FinegrainError(str(e)) from None
    df = pd.DataFrame(rows).reindex(columns=cols)
    if out_csv:
        atomic_write_text(Path(out_csv), df.to_csv(index=False))
    return df

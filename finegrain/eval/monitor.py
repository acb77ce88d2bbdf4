"""The kNN monitor: kNN accuracy of a training method's embedding on labelled train vs val (or test) rows.

Its cost is bounded twice: it reads a fixed, class-balanced, seeded sample of the photos (at most
MONITOR_GALLERY train photos and MONITOR_QUERIES val/test photos, the same at every reading), and the
engine skips readings that would take it past --knn-monitor-share of the run's time (engine/loop.py).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np
import torch

from finegrain import dist
from finegrain.data.dataset import eval_dataset
from finegrain.data.manifest import Manifest
from finegrain.features.extract import extract_features
from finegrain.eval.knn import knn_scores, topk_accuracy

MONITOR_GALLERY = 1000  # train photos the monitor's kNN searches
MONITOR_QUERIES = 500  # val (or test) photos it classifies


def balanced_sample(rows: Manifest, n: int, seed: int) -> Manifest:
    """At most `n` of `rows`, as even over the labels as they allow (each class's photos taken in a seeded
    random order, one round over the classes at a time); in manifest order. All of them when len <= n."""
    if len(rows) <= n:
        return rows
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(rows))
    labels = rows.table["label"].iloc[order].reset_index(drop=True)
    round_of = labels.groupby(labels).cumcount().to_numpy()  # the k-th photo of its class in the random order
    picked = order[np.lexsort((np.arange(len(order)), round_of))[:n]]  # by round, then by the random order
    table = rows.table.iloc[np.sort(picked)].reset_index(drop=True)
    return dataclasses.replace(rows, table=table)


def knn_monitor(cfg, manifest: Manifest, data_cfg: dict, device: torch.device,
                amp_dtype: torch.dtype | None) -> Callable | None:
    """A callable monitor(method, epoch) -> {"knn_top1_<split>", "knn_top5_<split>", "knn_chance"} (fractions).

    Like solo-learn's online kNN: it only shows whether the representation improves; nothing is
    tuned on it. cfg: a TrainConfig (knn_monitor, image_size, workers, seed, cache options). Returns
    None on ranks other than 0, when disabled, or when the manifest has no labelled train and val/test rows.
    """
    if not cfg.knn_monitor or not dist.is_main():
        return None
    train = manifest.rows("train")
    query_split = "val" if (manifest.table["split"] == "val").any() else "test"
    names = sorted(set(train.table["label"]))
    query = manifest.rows(query_split, names)
    if len(train) == 0 or len(query) == 0:
        return None
    train = balanced_sample(train, MONITOR_GALLERY, cfg.seed)
    query = balanced_sample(query, MONITOR_QUERIES, cfg.seed + 1)
    norm = dict(image_size=cfg.image_size, mean=data_cfg["mean"], std=data_cfg["std"], class_names=names, collective=False)
    train_ds = eval_dataset(cfg, train, **norm)
    query_ds = eval_dataset(cfg, query, **norm)

    def monitor(method, epoch):
        was_training = method.training
        method.eval()
        ftr, ytr = extract_features(method.embed, train_ds, device=device, workers=cfg.workers, amp_dtype=amp_dtype,
                                    progress="kNN monitor: train features")
        fq, yq = extract_features(method.embed, query_ds, device=device, workers=cfg.workers, amp_dtype=amp_dtype,
                                  progress=f"kNN monitor: {query_split} features")
        method.train(was_training)
        acc = topk_accuracy(knn_scores(ftr, ytr, fq, num_classes=len(names)), yq)
        return {f"knn_top1_{query_split}": acc[1], f"knn_top5_{query_split}": acc[5], "knn_chance": 1 / len(names)}

    return monitor

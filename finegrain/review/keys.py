"""The keys of each queue: key -> (action, what the page says). Digits 1-9 pick a best guess (where a queue has
guesses); `a` opens the type-ahead for any known species, `n` for a new one; `u` undoes the last decision."""

from __future__ import annotations

from dataclasses import dataclass

from finegrain.review.queues import Item


@dataclass(frozen=True)
class Key:
    key: str
    action: str
    says: str
    label: str = ""  # the species the action gives ("" = none, or typed)
    typed: str = ""  # "known" or "new": the key opens the species box instead of deciding


GLOBAL = [Key("u", "undo", "undo the last decision"), Key("i", "index", "all queues")]


def keys_for(item: Item) -> list[Key]:
    """The decision keys of `item`, in the order the page lists them."""
    q = item.queue
    if q == "label_error":
        return [Key("s", "suggested", f"suggested is right: {item.suggested}", item.suggested),
                Key("g", "given", f"given is right: {item.given}", item.given),
                Key("a", "other", "another species…", typed="known"),
                Key("x", "exclude", "exclude the photo")]
    if q == "twin":
        return [Key("k", "keep_one", "keep one (leave this copy out)"), Key("b", "keep_both", "keep both"),
                Key("x", "exclude", "exclude both")]
    if q == "outlier":
        return [Key("k", "keep", "keep"), Key("x", "exclude", "exclude the photo")]
    guesses = [Key(str(n), "label", name + (f" ({p:.0%})" if p is not None else ""), name)
               for n, (name, p) in enumerate(item.guesses[:9], start=1)]
    confirm = [Key("c", "confirm", f"confirm: {item.suggested}", item.suggested)] if q == "predict" and item.suggested else []
    drop = Key("x", "not_bird", "not a bird (leave out)") if q == "to_label" else Key("x", "exclude", "exclude the photo")
    return [*confirm, *guesses, Key("a", "label", "any species…", typed="known"),
            Key("n", "new", "new species…", typed="new"), drop, Key("s", "skip", "skip")]

"""gift-merge: streaming, exact model merging and GIFT adapter transfer.

>>> from gift_merge import load_recipe, run_recipe
>>> run_recipe(load_recipe("recipes/quickstart.yaml"), "merged/")  # doctest: +SKIP

The public names are imported on first use, so ``gift-merge --help`` and ``validate`` start fast.
"""

from __future__ import annotations

from gift_merge.lazy import lazy_getattr

__all__ = ["OPERATORS", "GiftMergeError", "MergeOptions", "load_recipe", "plan_recipe", "run_recipe"]
__version__ = "0.1.0"

_HOMES = {
    "OPERATORS": "gift_merge.operators",
    "GiftMergeError": "gift_merge.errors",
    "MergeOptions": "gift_merge.merge",
    "plan_recipe": "gift_merge.merge",
    "run_recipe": "gift_merge.merge",
    "load_recipe": "gift_merge.recipe",
}


__getattr__ = lazy_getattr(__name__, _HOMES)

"""Recipes: mergekit's YAML schema with mergekit's meaning, validated strictly."""

from gift_merge.recipe.loader import load_recipe, parse_recipe
from gift_merge.recipe.schema import InputModel, MergeStage, ModelRef, Recipe, SliceSpec

__all__ = ["InputModel", "MergeStage", "ModelRef", "Recipe", "SliceSpec", "load_recipe", "parse_recipe"]

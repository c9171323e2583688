"""Recipes: the YAML a user writes (with line numbers), its schema, and its validation into a Recipe."""

from mergebench.recipe.schema import MEMORY_PATH, OUTPUT_DTYPES, Node, Output, Recipe, parse_size
from mergebench.recipe.validate import (
    build_recipe,
    convert_mergekit,
    load_recipe,
    primary_model,
    read_recipe_data,
)
from mergebench.recipe.yaml_lines import read_yaml

__all__ = ["MEMORY_PATH", "OUTPUT_DTYPES", "Node", "Output", "Recipe", "build_recipe", "convert_mergekit",
           "load_recipe", "parse_size", "primary_model", "read_recipe_data", "read_yaml"]

"""The memory planner: peak memory per GPU, term by term, before a run starts (docs/planner.md).

``memory_model`` holds the terms and their sources; ``predict`` turns a recipe or configuration into a
prediction and a verdict; ``search`` lists what fits; ``calibration`` holds it against the table;
``render`` prints it for a person."""

from .calibration import calibration, calibration_figure, calibration_markdown
from .predict import (
    DEFAULT_GPU_MEMORY,
    GIB,
    Prediction,
    parse_size,
    predict,
    predict_recipe,
    recipe_workload,
    shape_of,
    workload,
)
from .render import render, render_search
from .search import search

__all__ = ["DEFAULT_GPU_MEMORY", "GIB", "Prediction", "calibration", "calibration_figure", "calibration_markdown",
           "parse_size", "predict", "predict_recipe", "recipe_workload", "render", "render_search", "search",
           "shape_of", "workload"]

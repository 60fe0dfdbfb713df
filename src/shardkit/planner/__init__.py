"""The planner: peak memory per GPU and time per step and per run, term by term, before a run starts
(docs/planner.md).

``memory_model`` and ``time_model`` hold the terms and their sources, ``hardware`` the cards and the host
the time is predicted for; ``predict`` turns a recipe or configuration into a prediction and a verdict;
``search`` ranks what fits by time; ``calibration`` holds both against the table; ``render`` prints them
for a person."""

from .calibration import (
    calibration,
    calibration_figure,
    calibration_markdown,
    time_calibration_figure,
    time_calibration_markdown,
    zero3_lead_markdown,
)
from .hardware import CARDS, LINKS, REFERENCE, Hardware, card_for, hardware_for
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
from .render import render, render_search, render_trace, time_summary
from .search import ranked, search

__all__ = ["CARDS", "card_for", "DEFAULT_GPU_MEMORY", "GIB", "LINKS", "REFERENCE", "Hardware", "Prediction", "calibration",
           "calibration_figure", "calibration_markdown", "hardware_for", "parse_size", "predict", "predict_recipe",
           "ranked", "recipe_workload", "render", "render_search", "render_trace", "search", "shape_of", "time_calibration_figure",
           "time_calibration_markdown", "time_summary", "workload", "zero3_lead_markdown"]

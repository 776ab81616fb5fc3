"""The pipelines, each in order in one place: prepare's passes (``prepare.prepare_graph``, ``prepare_model``) and
calibrate's steps (``calibrate.STEPS``, ``calibrate_model``)."""

from fxquant.pipeline.calibrate import STEPS, calibrate_model, record
from fxquant.pipeline.prepare import prepare_graph, prepare_model

__all__ = ["STEPS", "calibrate_model", "prepare_graph", "prepare_model", "record"]

"""The standalone pipeline: the three loaded parts, the settings of one edit, and the flows that run it."""

from .pipeline import Step1XEditPipeline, load_dit_for
from .settings import EditSettings

__all__ = ["EditSettings", "Step1XEditPipeline", "load_dit_for"]

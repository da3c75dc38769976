"""Batch editing: a manifest of (id, image, instruction) edited into a folder, in one process or on Ray.

``manifest`` reads the items, ``plan`` settles each item's settings, ``worker`` edits with models loaded
once, ``results`` records and resumes, ``runner`` drives a run and ``ray_runner`` spreads it over a Ray
cluster. The command is ``step1x-edit-batch`` (``python -m step1x_core.batch``).
"""

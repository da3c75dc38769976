"""GEdit-Bench: edit its samples through the batch runner into the official layout, then score them
with VIEScore (a judge model's SC and PQ) and tabulate the statistics.

``dataset`` reads the benchmark, ``viescore_prompts`` / ``viescore`` ask and read the judge, ``judges``
are the judge models (local Qwen2.5-VL or an OpenAI-compatible endpoint), ``scoring`` scores resumably and
``stats`` aggregates. The command is ``step1x-edit-gedit`` (``python -m step1x_core.gedit``).
"""

"""Prompt generators shared by calibration (core) and the evaluation suite: a prose haystack
built from the standard library's docstrings and needle-in-a-haystack prompts sized in the
model's own tokens. They live here, not in ``structkv.eval``, so calibration never imports eval.
"""

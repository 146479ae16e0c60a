"""Evaluation: prompt generators (needles, calibration prose) and scoring."""

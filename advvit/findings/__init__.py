"""Findings: the seeds' central claims re-tested at small scale (``python -m advvit.findings``).

One experiment per claim (``configs/findings/*.yaml``): settings trained over seeds, measured by
``advvit.eval`` and ``advvit.analyze``, and tests that give a verdict (holds / does not hold /
cannot tell at this scale). Modules: :mod:`.spec` (the experiment files), :mod:`.plan` (units,
what is done, estimates), :mod:`.runner` (runs them, skip and resume), :mod:`.extract` (numbers
from the reports), :mod:`.verdict` (statistics and verdicts), :mod:`.results` (the
``docs/findings/<id>.json`` files and figures).
"""
from .spec import Experiment, FindingsError, load_experiment, load_experiments

__all__ = ["Experiment", "FindingsError", "load_experiment", "load_experiments"]

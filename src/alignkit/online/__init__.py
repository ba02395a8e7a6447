"""The online layer: ``OnlineRun`` (the one harness of every online method), ``sample_and_score`` and the shared
clipped policy update. See ``online/run.py``."""

"""`ddpm-pipe distill`: progressive distillation of a registered model (Salimans & Ho 2022) on Ray.

``schedule.py``: the rounds, grids and the student's config (checked on the driver); ``worker.py``:
the Ray Train worker running the rounds through train's loop; ``command.py``: the driver.
"""

PREDICTIONS = ("eps", "v", "edm")  # what a teacher predicts, and a student (its teacher's unless --prediction)

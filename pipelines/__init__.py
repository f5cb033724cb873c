"""pipelines: the distributed side of ddpm-pipe (Ray Train/Tune/Data, MLflow, fsspec).

Every Ray and MLflow call of the project lives in this package; the math lives in ``ddpm``.
Nothing is imported or configured at import time.
"""

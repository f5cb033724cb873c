"""`ddpm-pipe tune`: the sweep (`command`), its trials (`trial`), its search space and its live table."""

SCHEDULERS = ("asha", "none")  # --scheduler: asha stops poor trials early on held-out bits/dim
SEARCHES = ("random", "optuna")  # --search: how trials are drawn from the space

"""`ddpm-pipe sample` and `interpolate`: the request and command, the workers and their pool, the output folder."""

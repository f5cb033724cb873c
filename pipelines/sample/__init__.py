"""`ddpm-pipe sample` and `interpolate`: the request and command, the workers and their pool, the output folder."""

FORMATS = ("png", "webdataset", "npz")  # sample's output formats (written by sample/output.py); the CLI's choices

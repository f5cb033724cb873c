"""`ddpm-pipe train`: the driver (`command`), the Ray-agnostic loop, its Ray Train wiring and which worker errors Ray may retry."""

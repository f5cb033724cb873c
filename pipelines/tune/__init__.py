"""`ddpm-pipe tune`: the sweep (`command`), its search space and its live table."""

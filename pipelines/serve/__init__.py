"""`ddpm-pipe serve`: online sampling on Ray Serve (the API, the replica's model holder, the deployment, the command)."""

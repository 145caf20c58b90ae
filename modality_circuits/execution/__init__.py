"""Where and how work runs: remote settings and the dry run, the request loop, checkpoints, atomic result files."""

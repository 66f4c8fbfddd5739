"""Ray Job entrypoints: `python -m jobs.<stage> PIPELINE.yaml` (or `jobs.run` for the whole
run). `rebase-ray submit` sends them to a cluster with the project in the runtime_env."""

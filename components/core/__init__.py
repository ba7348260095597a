"""The project's plumbing: the params schema (config, params_*), errors, paths, credentials,
processes, memory, DVC versioning, MLflow tracking and plots. Imports no other package of
components."""

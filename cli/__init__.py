"""The `lensflow` command: one module per command group (pipeline, registry, serving,
operations), `main` parses and dispatches. It may import flows, components, serving and infra,
always inside a command, so `lensflow --help` loads no heavy library."""

"""`make chaos`: faults under load, then the invariants checked from the database and the API.

    python -m bench.chaos                  # the full run (see --help)
    python -m bench.chaos --jobs 300 --duration-s 40

Modules: `cluster` (Postgres, control replicas, workers, stream proxies),
`traffic` (the client, watchers and observers), `faults` (the seeded fault
plan and its injector), `checks` (the invariants), `run` (one run end to end),
`handlers` (the `chaos.step` job type the workers run). This module stays
import-light: worker slot processes import `bench.chaos.handlers`.
"""

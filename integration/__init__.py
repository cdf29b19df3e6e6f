"""End-to-end tests of fedmount against an emulated Arvados federation on loopback.

`integration.cluster` is the emulator (``python -m integration.cluster up --state DIR``),
`integration.harness` the client library tests, benchmarks and the demo use to start it,
shape it and read its request log, and `integration.conftest` the shared pytest fixtures.
"""

"""A protocol-faithful emulated Arvados federation on loopback (test harness, not product).

``python -m integration.cluster up --state DIR`` runs several clusters, each a TLS
controller and two keepstores, federated with each other; see `emulator` for the
assembly, `controller`/`federation`/`keepstore` for the protocols, `control` for the
fault and shaping API, `seed` for the demo data and DESIGN.md ("The emulated federation")
for the state file contract.
"""

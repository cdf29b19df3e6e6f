"""fedmount-run: run a container step with federated collections mounted, as crunch-run does."""

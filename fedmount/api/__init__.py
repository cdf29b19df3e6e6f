"""The Arvados API side: one cluster's controller client, and routing across the federation."""

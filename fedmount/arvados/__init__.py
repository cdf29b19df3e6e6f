"""The Arvados formats, with no I/O: identifiers, tokens, manifests, Keep routes, settings, errors.

This is the bottom of fedmount. The API side (`fedmount.api`: controller clients, federation
routing) and the Keep side (`fedmount.blocks`: block fetches, the cache, the read path) both
stand on it and never import each other.
"""

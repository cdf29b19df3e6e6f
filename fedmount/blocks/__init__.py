"""Bytes: fetching verified Keep blocks, the host-wide block cache, and prefetch."""

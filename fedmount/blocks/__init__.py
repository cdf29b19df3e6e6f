"""Bytes: fetching verified Keep blocks, the block cache (one per user on a host), and read-ahead."""

"""fedmount: read-only FUSE mounts of Arvados collections from any cluster of a federation."""

__version__ = "0.1.0"

"""The filesystem: a plain async model of the mount and the thin pyfuse3 adapter over it."""

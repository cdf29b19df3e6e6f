"""Directory entry names of Arvados objects, as arv-mount writes them.

arv-mount (``services/fuse/arvados_fuse/fusedir.py`` ``sanitize_filename``): an object
without a name is not listed; ``.`` becomes ``_`` and ``..`` becomes ``__``; ``/`` becomes
the cluster's ``Collections.ForwardSlashNameSubstitution`` when it sets one (fedmount uses
that of the cluster owning the object, arv-mount its home cluster's), and what is left of
``/`` and every NUL becomes ``_``. A lookup by name in a project never listed asks for the
name as given and, if it holds the substitution, for the name with ``/`` put back
(`candidates`); the object found must give back the name looked up.

Collisions: a directory lists its entries in a fixed order (projects and filter groups,
then collections, each by uuid) and the first object to take a name keeps it; a later one
of the same name is not listed (arv-mount's ``merge``). Two objects of one project can
share a name only through the substitution (``a/b`` and ``a_b``) or when one is a
subproject and the other a collection: the subproject wins.
"""

from __future__ import annotations

import re

_DISALLOWED = re.compile(r"[\x00/]")


def entry_name(name: object, substitution: str | None) -> str | None:
    """The entry name of an object called `name` (None: not listed)."""
    if not isinstance(name, str) or not name:
        return None
    if name == ".":
        return "_"
    if name == "..":
        return "__"
    if substitution:
        name = name.replace("/", substitution)
    return _DISALLOWED.sub("_", name)


def candidates(entry: str, substitution: str | None) -> list[str]:
    """The object names a lookup of `entry` asks for: `entry`, and `entry` with the
    substitution turned back into ``/`` if it holds it."""
    if substitution and substitution in entry:
        return [entry, entry.replace(substitution, "/")]
    return [entry]

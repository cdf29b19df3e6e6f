"""What `locate` and `stage` need to know about the federation, behind one small interface.

`LocalityView` is what locality means by a view: the federation as `locate` and `stage`
see it (`federation_view.FederationView` is the real one, tests have fakes). It answers
two questions:

- `resolve(cid)`: the collection as fedmount would read it (the API's `CollectionRecord`:
  manifest and `KeepRoute`), through the same `Federation` a mount uses, in the same mode
  (home-proxied, direct, or auto: home-proxied records whose route carries the mount's
  per-cluster choice, `ways`).
- `copy_at(cluster, pdh)`: the collection as *that* cluster's controller has it, asked
  directly (the home token for the home cluster, the token salted for it elsewhere), with
  block signatures that cluster issued for that token, plus the route to its own keep
  services. A cluster that only knows the collection through federation forwarding
  answers with ``+R`` locators (signed by another cluster): that is not a copy, and
  neither is a 404. Both return None, and the blocks count as absent there.

Failures that stop an answer raise `LookupFailure` with a one-line message (no token),
which the caller reports per collection or per cluster instead of a traceback.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from fedmount.api.federation import CollectionRecord
from fedmount.arvados.ids import CollectionId, Locator
from fedmount.arvados.routes import KeepRoute


class LookupFailure(Exception):
    """One line that says what could not be looked up and why."""


@dataclass(frozen=True)
class ClusterCopy:
    """A cluster's own copy of a collection: locators signed for `route.token`."""

    cluster: str
    uuid: str
    locators: Sequence[Locator]
    route: KeepRoute


class LocalityView(Protocol):
    home_cluster: str
    mode: str  # "auto", "home" or "direct": how `resolve` routes reads

    async def clusters(self) -> list[str]:
        """Every cluster of the federation, home first."""
        ...

    async def resolve(self, cid: CollectionId) -> CollectionRecord: ...

    async def copy_at(self, cluster: str, pdh: str) -> ClusterCopy | None: ...

    async def exported_config(self, cluster: str) -> dict:
        """The cluster's exported configuration (its instance types, its remotes)."""
        ...

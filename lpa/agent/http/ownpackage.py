"""The packages the agent will not change through its own API: itself, and the agent it replaced.

The manager upgrades its agent with ``PUT /api/v1/packages/linux-patch-api`` and then compares
``/health``'s version.  On a host that runs lpa-agent that request must neither upgrade a
leftover ``linux-patch-api`` package nor fail as ``PKG_NOT_FOUND``: it is answered 409
``UNSUPPORTED_ON_LPA`` with the migration step (upgrade the ``lpa-agent`` package with the host's
package manager).  The agent likewise never installs, upgrades or removes ``lpa-agent`` itself
(its maintainer scripts would restart the agent under its own job), nor installs the original.
Removing a leftover ``linux-patch-api`` is an ordinary removal.
"""

from __future__ import annotations

from collections.abc import Iterable

from lpa.errors import UnsupportedOnLpaError
from lpa.events import OP_REMOVE

#: the original agent's package; the manager's self-upgrade is a PUT of it
ORIGINAL_AGENT_PACKAGE = "linux-patch-api"
#: lpa's own package
LPA_AGENT_PACKAGE = "lpa-agent"


def refuse_own_package(operation: str, names: Iterable[str], version: str) -> None:
    """Raise 409 ``UNSUPPORTED_ON_LPA`` if ``operation`` on ``names`` is one the agent refuses."""
    for name in names:
        if name == LPA_AGENT_PACKAGE or (name == ORIGINAL_AGENT_PACKAGE and operation != OP_REMOVE):
            raise UnsupportedOnLpaError(
                f"This host runs lpa-agent {version}, which replaced {ORIGINAL_AGENT_PACKAGE}: "
                f"it will not {operation} {name} through its API. To upgrade the agent (the "
                f"manager's self-upgrade), upgrade the {LPA_AGENT_PACKAGE} package with the "
                f"host's package manager, e.g. apt-get install --only-upgrade {LPA_AGENT_PACKAGE}",
                {
                    "package": name,
                    "operation": operation,
                    "agent_package": LPA_AGENT_PACKAGE,
                    "agent_version": version,
                },
            )

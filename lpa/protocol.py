"""The agent's job-stream protocol as its clients speak it: one definition for relay, CLI and tests.

The WebSocket at ``/api/v1/ws/jobs`` is served only under the subprotocol :data:`SUBPROTOCOL`
(``Sec-WebSocket-Protocol``): a client that does not offer it (the manager's own relay inside
pm-worker, which never subscribes) is refused at the handshake and falls back to REST polling.
"""

from __future__ import annotations

#: the WebSocket subprotocol of the job event stream, version 1
SUBPROTOCOL = "lpa.jobs.v1"

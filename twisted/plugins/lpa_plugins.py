"""twistd dropin for lpa: ServiceMaker objects only, modules named as strings.

Importing this file must stay cheap and must not fail, or ``twistd --help`` silently loses both
tapnames.
"""

from twisted.application.service import ServiceMaker

lpa_agent = ServiceMaker(
    "lpa agent",
    "lpa.agent.tap",
    "Linux patch agent: mTLS REST API and live job event WebSocket",
    "lpa-agent",
)

lpa_relay = ServiceMaker(
    "lpa relay",
    "lpa.relay.tap",
    "Relay live patch-job status from agents into PostgreSQL",
    "lpa-relay",
)

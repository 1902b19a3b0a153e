"""The agent's REST API over HTTP: routes, the admission gate, input parsing, the JSON envelope."""

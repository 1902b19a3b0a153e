"""The operator's ``lpa`` command: one module per subcommand (PKI, agent client, dispatch, demo)."""

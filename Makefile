# The README's commands: `make demo` runs the pipeline, `make check` is what CI (.ci/run) runs:
# `make lint`, then the unit and system suites in one trial run.  `make test` is the unit suite
# alone (tests/test_*.py, parallel, well under a minute); `make test-system` the system suite.
PYTHON ?= python3
VENV ?= .venv

.PHONY: check test test-system lint demo venv clean deb

venv:
	@bash .ci/venv "$(PYTHON)" "$(VENV)"

check: venv
	@bash .ci/check "$(VENV)"

test: venv
	@bash .ci/test "$(VENV)" unit

test-system: venv
	@bash .ci/test "$(VENV)" system

# ruff and mypy read the checkout, not the installed package: an existing .venv is enough
lint: $(VENV)/bin/mypy
	@bash .ci/lint "$(VENV)"

$(VENV)/bin/mypy:
	@bash .ci/venv "$(PYTHON)" "$(VENV)"

demo: venv
	@$(VENV)/bin/lpa demo $(if $(KEEP),--keep,)

# lpa-agent and lpa-relay .debs in dist/ (dpkg-buildpackage + dh-virtualenv; see debian/rules)
deb:
	@/usr/bin/python3 debian/make-deb --out dist

clean:
	rm -rf $(VENV) build dist *.egg-info _trial_temp* .mypy_cache .ruff_cache

# The README's commands.  CI (.ci/run) runs `make lint` then `make test`; `make demo` runs the
# pipeline.
PYTHON ?= python3
VENV ?= .venv

.PHONY: test lint demo venv clean deb

venv:
	@bash .ci/venv "$(PYTHON)" "$(VENV)"

test: venv
	@bash .ci/test "$(VENV)"

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

# The README's commands.  `make test` is what CI runs (.ci/run); `make demo` runs the pipeline.
PYTHON ?= python3
VENV ?= .venv

.PHONY: test demo venv clean

venv:
	@bash .ci/venv "$(PYTHON)" "$(VENV)"

test: venv
	@bash .ci/test "$(VENV)"

demo: venv
	@$(VENV)/bin/lpa demo $(if $(KEEP),--keep,)

clean:
	rm -rf $(VENV) build dist *.egg-info _trial_temp*

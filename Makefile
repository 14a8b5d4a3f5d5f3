# The two set-up commands of the README: `make demo` and `make test`.
# Both create .venv and install what they need on first use.
.PHONY: demo test bench setup clean

setup:
	@scripts/bootstrap.sh

demo: setup
	.venv/bin/echo-stream demo -o out/demo.mp4

test: setup
	@scripts/ensure_chromium.sh
	.venv/bin/python -m pytest -q -ra tests

bench: setup
	.venv/bin/echo-stream bench pipeline

clean:
	rm -rf out .pytest_cache

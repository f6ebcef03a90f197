# The two commands a newcomer needs: `make demo` runs the product, `make test` runs the tests.
# Both prepare the machine first (scripts/bootstrap): packages, virtualenv, Kafka jars.
.PHONY: bootstrap demo test test-unit lint bench clean

bootstrap:
	@scripts/bootstrap

demo: bootstrap
	.venv/bin/metering demo

test: bootstrap
	.venv/bin/python -m pytest

test-unit: bootstrap
	.venv/bin/python -m pytest -m "not integration"

lint: bootstrap
	.venv/bin/ruff check limiter metering streams tests benchmarks
	.venv/bin/mypy limiter metering streams

clean:
	-.venv/bin/metering dev down
	rm -rf var

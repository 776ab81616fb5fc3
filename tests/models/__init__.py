"""Models shared by the tests and benchmarks (the digits CNN itself is the demo's: ``fxquant.cli.demo_model``)."""

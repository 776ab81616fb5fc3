"""The command line: ``main`` (parsing, dispatch), the subcommands (quantize, report), the demo and its model."""

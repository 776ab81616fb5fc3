"""The command-line subcommands (``fxquant quantize``, ``fxquant report``); ``fxquant.cli`` dispatches to them."""

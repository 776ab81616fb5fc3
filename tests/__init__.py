"""The tests mirror the package: tests/<area>/ tests fxquant/<area>/ (calib, passes, ptq, qat, rules, backends,
lower, tools); api/ the entry points end to end (real data, errors, torchvision, untraceable models);
quantizer/ the quantizer and its arithmetic (qmath); zoo/ the torchvision zoo (``-m zoo``); benchmarks/ the
benchmark scripts; files at this level check the whole package. Models that several files use live in
tests/models/, shared fixtures in conftest.py; a model one file uses stays in that file."""

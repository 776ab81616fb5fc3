"""docs/architecture.md is generated from the pipeline itself: the committed page must be current."""

from __future__ import annotations

import importlib.util
from pathlib import Path

DOCS = Path(__file__).resolve().parents[1] / "docs"


def test_architecture_page_is_current():
    spec = importlib.util.spec_from_file_location("make_architecture", DOCS / "make_architecture.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    page = module.render()
    assert page == (DOCS / "architecture.md").read_text(), "regenerate: python docs/make_architecture.py"
    # the walk shows every pass the pipeline ran on the model, in order
    order = [line.removeprefix("### ") for line in page.splitlines() if line.startswith("### ")]
    assert order[:7] == ["capture (`capture.trace`)", "record_bn_stats", "fold_bn", "equalize", "annotate_pass",
                         "insert_quantizers", "the prepare report (`fxquant.report_of(prepared)`)"]

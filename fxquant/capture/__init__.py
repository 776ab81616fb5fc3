"""Capture: torch.fx tracing, torch.export capture for roots that do not trace, traced and eager parts."""

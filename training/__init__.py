"""Simulator, trainer and the committed reference model package."""

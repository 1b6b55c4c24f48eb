"""Benchmarks: raw ONNX Runtime in-process versus the service (``python -m bench``)."""

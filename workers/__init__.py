"""Worker processes, features, ONNX sessions and the model registry (no web framework)."""

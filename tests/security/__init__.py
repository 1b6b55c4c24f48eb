"""Security checks: fuzzing, static scan, control-plane and artifact integrity, pip-audit."""

"""The operator CLI: serve, bootstrap, register, promote, route, shadow, canary, recalibrate."""

"""HTTP layer, service, cache, control plane and CLI of heimdall-inference."""

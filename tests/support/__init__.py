"""Real-process test helpers: a private Redis, a bootstrapped registry, a Granian server."""

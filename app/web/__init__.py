"""The HTTP edge: routes, the RSGI front, body intake and decoding, OIP, OpenAPI, request ids."""

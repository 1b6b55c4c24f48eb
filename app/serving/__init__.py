"""The transport-agnostic serving core.

The inference service, its prediction cache, the served versions and their routing, the request
and answer schemas, and field feedback.
"""

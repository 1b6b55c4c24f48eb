"""``python -m bench.k6run SCRIPT [NAME=value ...]``: one k6 script against a private stack.

Starts the same stack as ``python -m bench`` (temporary sqlite registry, private redis-server,
``heimdall-inference serve`` on a free port), runs ``k6 run k6/SCRIPT`` with the given
environment, prints k6's summary and the service's CPU per request, and exits with k6's code.
Example: ``python -m bench.k6run load.js`` (100 VUs, 30 s).
"""

from __future__ import annotations

import sys

from bench.service import Stack


def main(argv: list[str] | None = None) -> int:
    """Command line."""
    args = sys.argv[1:] if argv is None else argv
    if not args:
        print(__doc__)
        return 2
    script, pairs = args[0], args[1:]
    env = dict(pair.split("=", 1) for pair in pairs)
    with Stack() as stack:
        run = stack.k6(script, **env)
    print(run.summary_text)
    count = run.value("http_reqs", "count")
    if count:
        roles = ", ".join(
            f"{r} {c * 1e3 / count:.3f}" for r, c in sorted(run.cpu_by_role.items()) if c > 0
        )
        print(
            f"service CPU per request: {run.cpu_s * 1e3 / count:.3f} ms ({roles}); "
            f"k6 CPU per request {run.k6_cpu_s * 1e3 / count:.3f} ms"
        )
    print(f"k6 exit code {run.exit_code}")
    return run.exit_code


if __name__ == "__main__":
    raise SystemExit(main())

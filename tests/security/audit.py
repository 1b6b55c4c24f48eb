"""pip-audit of the locked dependencies that fails only on NEW vulnerabilities.

Run as ``python -m tests.security.audit``. Known, reviewed findings are listed (one id per
line, ``#`` comments) in ``tests/security/pip-audit-known.txt`` and documented in
docs/reliability.md. When the vulnerability service (PyPI's JSON API) cannot be reached the
audit prints a warning and exits 0: an outage must not block ``make test``.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
KNOWN = Path(__file__).with_name("pip-audit-known.txt")
LOCK = ROOT / "requirements.lock"
NETWORK_HINTS = (
    "connection",
    "timed out",
    "timeout",
    "name resolution",
    "max retries",
    "temporary failure",
    "network is unreachable",
    "proxyerror",
    "ssl",
)


def known_ids() -> list[str]:
    """Reviewed vulnerability ids."""
    lines = KNOWN.read_text().splitlines() if KNOWN.exists() else []
    return [line.split("#")[0].strip() for line in lines if line.split("#")[0].strip()]


def main() -> int:
    """Run pip-audit; 0 = no new finding or service unreachable, 1 = new finding."""
    command = [
        sys.executable,
        "-m",
        "pip_audit",
        "-r",
        str(LOCK),
        "--no-deps",
        "--disable-pip",
        "--progress-spinner",
        "off",
        "--format",
        "json",
        "--timeout",
        "30",
    ]
    for vuln in known_ids():
        command += ["--ignore-vuln", vuln]
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=600)
    try:
        report = json.loads(done.stdout)
    except json.JSONDecodeError:
        text = done.stderr.lower()
        if any(hint in text for hint in NETWORK_HINTS):
            print(
                "WARNING: pip-audit could not reach the vulnerability service; "
                "dependencies NOT audited this run:\n" + done.stderr[-800:],
                file=sys.stderr,
            )
            return 0
        print(done.stderr[-3000:], file=sys.stderr)
        return done.returncode or 1
    deps = report.get("dependencies", [])
    new = [
        (dep["name"], dep["version"], vuln["id"], vuln.get("fix_versions", []))
        for dep in deps
        for vuln in dep.get("vulns", [])
    ]
    audited = sum("vulns" in dep for dep in deps)
    skipped = [dep["name"] for dep in deps if "skip_reason" in dep]
    if deps and not audited:
        # pip-audit reports every package as "not found on PyPI" when the JSON API it asks
        # (pypi.org/pypi/NAME/VERSION/json) is unreachable, e.g. behind an index-only mirror.
        print(
            f"WARNING: the vulnerability service answered for none of {len(deps)} packages "
            "(PyPI JSON API unreachable?); dependencies NOT audited this run",
            file=sys.stderr,
        )
        return 0
    if skipped:
        print(
            f"WARNING: {len(skipped)} package(s) could not be audited: {', '.join(skipped)}",
            file=sys.stderr,
        )
    if new:
        for name, version, vuln, fixes in new:
            print(f"NEW vulnerability {vuln} in {name} {version} (fixed in {fixes or '?'})")
        print(f"{len(new)} new finding(s); upgrade, or review and add the id to {KNOWN.name}")
        return 1
    print(
        f"pip-audit: {audited} locked packages, no new vulnerabilities "
        f"({len(known_ids())} known, reviewed ids ignored)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

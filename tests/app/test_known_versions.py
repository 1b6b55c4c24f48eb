"""Which version numbers the registry has, asked off the loop and remembered (real sqlite)."""

from __future__ import annotations

import asyncio
import shutil
import time
from pathlib import Path

from app.registry.client import ModelRegistry, RegistrySettings
from app.registry.known import KnownVersions


def registry_at(env: dict[str, str]) -> ModelRegistry:
    return ModelRegistry(
        RegistrySettings(
            tracking_uri=env["MLFLOW_TRACKING_URI"], artifact_cache=env["HEIMDALL_ARTIFACT_CACHE"]
        )
    )


def test_found_is_remembered_missing_for_a_while_and_a_failing_registry_is_unknown(
    registry_env: dict[str, str], tmp_path: Path
) -> None:
    # A copy of the session registry: this test breaks its file.
    db = Path(registry_env["MLFLOW_TRACKING_URI"].removeprefix("sqlite:///"))
    shutil.copy(db, tmp_path / "mlflow.db")
    env = {**registry_env, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    known = KnownVersions(registry_at(env), negative_ttl_s=60)

    async def ask(*versions: str) -> list[bool | None]:
        return [await known.exists(v) for v in versions]

    assert asyncio.run(ask("1", "4242")) == [True, False]
    # The file unreadable: remembered answers stand, a new question has no answer (None),
    # and the route then gives the version the benefit of the doubt.
    (tmp_path / "mlflow.db").write_bytes(b"not a database" * 100)
    assert asyncio.run(ask("1", "4242", "4243")) == [True, False, None]


def test_a_missing_version_is_asked_again_after_its_time(registry_env: dict[str, str]) -> None:
    known = KnownVersions(registry_at(registry_env), negative_ttl_s=0.0)
    asked: list[str] = []
    resolve = known.registry.resolve

    def counting(ref: str) -> object:
        asked.append(ref)
        return resolve(ref)

    known.registry.resolve = counting  # type: ignore[method-assign]

    async def twice() -> list[bool | None]:
        return [await known.exists("4242"), await known.exists("4242")]

    assert asyncio.run(twice()) == [False, False]
    assert asked == ["4242", "4242"]
    known.negative_ttl_s = 60
    asyncio.run(twice())
    assert asked == ["4242", "4242", "4242"], "within its time a missing version is not asked"


def test_missing_versions_remembered_are_bounded(registry_env: dict[str, str]) -> None:
    # A client probing numbers: memory of the missing ones stays bounded, the oldest go first.
    known = KnownVersions(registry_at(registry_env), negative_ttl_s=60)
    known.MAX_NEGATIVE = 50

    async def probe() -> None:
        for i in range(60):
            assert await known.exists(str(10_000 + i)) is False

    asyncio.run(probe())
    assert len(known._missing) == 50
    assert "10000" not in known._missing and "10059" in known._missing


def test_questions_about_one_number_share_a_lookup_and_a_slow_registry_is_unknown(
    registry_env: dict[str, str],
) -> None:
    # A fourth review: twelve GETs for one number made twelve lookups, on as many threads of
    # the pool that also decodes large bodies, and each waited out a locked registry (10 s).
    known = KnownVersions(registry_at(registry_env), negative_ttl_s=60, wait_s=0.3)
    asked: list[str] = []
    resolve = known.registry.resolve

    def slow(ref: str) -> object:
        asked.append(ref)
        time.sleep(0.8)  # a locked registry
        return resolve(ref)

    known.registry.resolve = slow  # type: ignore[method-assign]

    async def many() -> tuple[list[bool | None], float, bool | None]:
        started = time.monotonic()
        answers = await asyncio.gather(*(known.exists("4242") for _ in range(12)))
        waited = time.monotonic() - started
        await asyncio.sleep(1.0)  # the shared lookup finishes and is remembered
        return list(answers), waited, await known.exists("4242")

    answers, waited, later = asyncio.run(many())
    assert answers == [None] * 12 and waited < 0.7, (answers, waited)
    assert asked == ["4242"]
    assert later is False and asked == ["4242"]

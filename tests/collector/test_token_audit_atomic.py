"""Tests that a token change and its audit event commit together or not at all.

Every test runs on a real SQLite file and, where FLEETMEND_TEST_POSTGRES_URL is
set, on a real PostgreSQL database. An audit write is made to fail for real,
by dropping the audit table or by a trigger that rejects every insert.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text

from collector import auth
from collector.auth import Role
from collector.cli import main
from collector.store import AuditEvent, Store, StoreError, TokenNameTakenError
from tests.trust import remember_secret

NOW = datetime(2026, 3, 2, 9, 30, tzinfo=UTC)
ACTOR = "local:root"


def run_sql(database_url: str, *statements: str) -> None:
    """Run statements in one transaction on a connection of its own."""
    engine = create_engine(database_url)
    try:
        with engine.begin() as connection:
            for statement in statements:
                connection.execute(text(statement))
    finally:
        engine.dispose()


def drop_audit_table(database_url: str) -> str:
    run_sql(database_url, "DROP TABLE audit_events")
    return "audit_events"


def reject_audit_inserts(database_url: str) -> str:
    """Add a trigger that aborts every insert into audit_events."""
    if database_url.startswith("sqlite"):
        run_sql(
            database_url,
            "CREATE TRIGGER audit_read_only BEFORE INSERT ON audit_events "
            "BEGIN SELECT RAISE(ABORT, 'audit log is read-only'); END",
        )
    else:
        run_sql(
            database_url,
            "CREATE FUNCTION reject_audit() RETURNS trigger LANGUAGE plpgsql AS "
            "$$ BEGIN RAISE EXCEPTION 'audit log is read-only'; END $$",
            "CREATE TRIGGER audit_read_only BEFORE INSERT ON audit_events "
            "FOR EACH ROW EXECUTE FUNCTION reject_audit()",
        )
    return "audit log is read-only"


@pytest.fixture(
    params=[
        pytest.param(drop_audit_table, id="table-dropped"),
        pytest.param(reject_audit_inserts, id="insert-rejected"),
    ]
)
def break_audit(request: pytest.FixtureRequest) -> Callable[[str], str]:
    """Return a function that makes audit writes fail and returns the cause."""
    breaker: Callable[[str], str] = request.param
    return breaker


def audit_event(action: str, outcome: str = "OK") -> AuditEvent:
    return AuditEvent(
        event_time=NOW,
        actor=ACTOR,
        role=None,
        action=action,
        arguments_json=json.dumps({"name": "alice"}),
        outcome=outcome,
        peer="",
    )


def create_token(
    store: Store, name: str = "alice", *, audit: AuditEvent | None
) -> auth.IssuedCredential:
    token = auth.issue_operator_token()
    store.create_token(
        name,
        Role.OPERATOR,
        token.credential_id,
        token.secret_hash,
        ACTOR,
        NOW,
        audit=audit,
    )
    return token


def token_names(database_url: str) -> list[str]:
    with Store.open(database_url) as store:
        return [token.name for token in store.list_tokens()]


# Store


def test_create_token_stores_audit_event(store: Store) -> None:
    token = create_token(store, audit=audit_event("token create"))

    (stored,) = store.list_tokens()
    (event,) = store.list_audit(10)
    assert stored.token_id == token.credential_id
    assert event.action == "token create"
    assert event.actor == ACTOR
    assert event.outcome == "OK"
    assert event.event_time == NOW
    assert json.loads(event.arguments_json) == {"name": "alice"}


def test_create_token_audit_failure_stores_nothing(
    store: Store, database_url: str, break_audit: Callable[[str], str]
) -> None:
    cause = break_audit(database_url)

    with pytest.raises(StoreError) as caught:
        create_token(store, audit=audit_event("token create"))

    assert "creating operator token 'alice' failed" in str(caught.value)
    assert cause in str(caught.value)
    assert store.list_tokens() == []


def test_create_token_name_taken_no_event(store: Store) -> None:
    create_token(store, audit=audit_event("token create"))

    with pytest.raises(TokenNameTakenError):
        create_token(store, audit=audit_event("token create"))

    assert len(store.list_tokens()) == 1
    assert len(store.list_audit(10)) == 1


def test_revoke_token_stores_audit_event(store: Store) -> None:
    create_token(store, audit=None)

    revoked = store.revoke_token("alice", NOW, audit=audit_event("token revoke"))

    (stored,) = store.list_tokens()
    (event,) = store.list_audit(10)
    assert revoked is True
    assert stored.revoke_time == NOW
    assert event.action == "token revoke"
    assert event.outcome == "OK"


def test_revoke_token_twice_audits_both(store: Store) -> None:
    create_token(store, audit=None)
    store.revoke_token("alice", NOW, audit=audit_event("token revoke"))

    again = store.revoke_token("alice", NOW, audit=audit_event("token revoke"))

    assert again is False
    assert len(store.list_audit(10)) == 2


def test_revoke_token_audit_failure_keeps_token(
    store: Store, database_url: str, break_audit: Callable[[str], str]
) -> None:
    create_token(store, audit=None)
    cause = break_audit(database_url)

    with pytest.raises(StoreError) as caught:
        store.revoke_token("alice", NOW, audit=audit_event("token revoke"))

    (stored,) = store.list_tokens()
    assert cause in str(caught.value)
    assert stored.revoke_time is None


def test_revoke_unknown_token_no_event(store: Store) -> None:
    revoked = store.revoke_token("nobody", NOW, audit=audit_event("token revoke"))

    assert revoked is None
    assert store.list_audit(10) == []


# fleetmend-collector token create and token revoke


def migrate(database_url: str) -> None:
    with Store.open(database_url) as store:
        store.migrate()


def test_cli_create_event_time_is_token_time(
    database_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(
        [
            "token",
            "create",
            "--role",
            "viewer",
            "--name",
            "alice",
            "--database",
            database_url,
        ]
    )

    remember_secret(capsys.readouterr().out.strip())
    with Store.open(database_url) as store:
        (stored,) = store.list_tokens()
        (event,) = store.list_audit(10)
    assert code == 0
    assert event.action == "token create"
    assert event.outcome == "OK"
    assert event.event_time == stored.create_time


def test_cli_create_audit_failure_no_token(
    database_url: str,
    break_audit: Callable[[str], str],
    capsys: pytest.CaptureFixture[str],
) -> None:
    migrate(database_url)
    cause = break_audit(database_url)

    code = main(
        [
            "token",
            "create",
            "--role",
            "admin",
            "--name",
            "alice",
            "--database",
            database_url,
        ]
    )

    captured = capsys.readouterr()
    assert code == 1
    assert captured.out == ""
    assert captured.err.count("\n") == 1
    assert "error: creating token 'alice' in " in captured.err
    assert cause in captured.err
    assert token_names(database_url) == []


def test_cli_create_audit_failure_removes_output(
    database_url: str,
    tmp_path: Path,
    break_audit: Callable[[str], str],
    capsys: pytest.CaptureFixture[str],
) -> None:
    migrate(database_url)
    break_audit(database_url)
    output = tmp_path / "alice.token"

    code = main(
        [
            "token",
            "create",
            "--role",
            "admin",
            "--name",
            "alice",
            "--output",
            str(output),
            "--database",
            database_url,
        ]
    )

    captured = capsys.readouterr()
    assert code == 1
    assert captured.out == ""
    assert not output.exists()
    assert token_names(database_url) == []


def test_cli_revoke_audit_failure_keeps_token(
    database_url: str,
    break_audit: Callable[[str], str],
    capsys: pytest.CaptureFixture[str],
) -> None:
    main(
        [
            "token",
            "create",
            "--role",
            "viewer",
            "--name",
            "alice",
            "--database",
            database_url,
        ]
    )
    remember_secret(capsys.readouterr().out.strip())
    cause = break_audit(database_url)

    code = main(["token", "revoke", "alice", "--database", database_url])

    captured = capsys.readouterr()
    with Store.open(database_url) as store:
        (stored,) = store.list_tokens()
    assert code == 1
    assert captured.out == ""
    assert "error: revoking token 'alice' in " in captured.err
    assert cause in captured.err
    assert stored.revoke_time is None

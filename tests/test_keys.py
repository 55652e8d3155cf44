"""API key store and session tokens: storage never holds a secret, and every bad key fails."""

from __future__ import annotations

import asyncio
import base64
import fcntl
import json
import logging
import os
import stat
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from gateway.auth import Principal
from gateway.auth.keys import (
    KeyStore,
    KeyStoreError,
    add_key,
    file_problems,
    key_id,
    list_keys,
    lock_path_for,
    revoke_key,
    rotate_key,
    state_path_for,
)
from gateway.auth.sessions import SessionSigner, load_or_create_secret

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def keys_file(tmp_path: Path) -> Path:
    return tmp_path / "keys.json"


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# ---------------------------------------------------------------- creating keys


def test_add_prints_nothing_and_returns_a_key_that_verifies(keys_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    record, key = add_key(keys_file, "phone", role="admin", rate_limit="120/minute")
    out, err = capsys.readouterr()
    assert out == "" and err == ""
    assert key.startswith(f"pvsgw_{record.id}_")
    assert key_id(key) == record.id
    store = KeyStore(keys_file)
    found = store.verify(key)
    assert found is not None and found.name == "phone" and found.role == "admin"
    assert store.principal(found) == Principal(
        id=f"key:{record.id}", name="phone", role="admin", method="api_key", rate_limit="120/minute"
    )


def test_key_format(keys_file: Path) -> None:
    record, key = add_key(keys_file, "a")
    prefix, kid, secret = key[:6], key[6:14], key[15:]
    assert prefix == "pvsgw_" and key[14] == "_" and kid == record.id
    assert len(kid) == 8 and set(kid) <= set("abcdefghijklmnopqrstuvwxyz234567")
    assert len(secret) == 43 and "=" not in secret  # 32 bytes, base64url, unpadded
    assert record.hash.startswith("sha256:") and len(record.hash) == len("sha256:") + 64
    # Two keys never share a kid or secret.
    record2, key2 = add_key(keys_file, "b")
    assert record2.id != record.id and key2[15:] != secret


def test_key_file_holds_no_secret_and_is_private(keys_file: Path) -> None:
    _, key = add_key(keys_file, "phone")
    _, key2 = add_key(keys_file, "laptop", expires_days=30)
    text = keys_file.read_text()
    for k in (key, key2):
        assert k not in text
        assert k[15:] not in text  # not even the secret part alone
    assert _mode(keys_file) == 0o600
    data = json.loads(text)
    assert data["version"] == 1
    assert [k["name"] for k in data["keys"]] == ["phone", "laptop"]
    assert set(data["keys"][0]) == {"id", "name", "role", "hash", "created", "expires", "revoked", "rate_limit"}
    assert data["keys"][0]["expires"] is None and data["keys"][1]["expires"].endswith("Z")
    # No temporary files left behind next to it.
    leftovers = {p.name for p in keys_file.parent.iterdir()} - {"keys.json", lock_path_for(keys_file).name}
    assert leftovers == set()


def test_file_is_private_even_under_a_permissive_umask(keys_file: Path) -> None:
    old = os.umask(0)
    try:
        add_key(keys_file, "phone")
    finally:
        os.umask(old)
    assert _mode(keys_file) == 0o600
    assert _mode(lock_path_for(keys_file)) == 0o600


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"name": ""}, "invalid key name"),
        ({"name": "has space"}, "invalid key name"),
        ({"name": "x" * 65}, "invalid key name"),
        ({"name": "ok", "role": "root"}, "invalid role"),
        ({"name": "ok", "expires_days": 0}, "invalid expiry"),
        ({"name": "ok", "rate_limit": "lots"}, "invalid rate limit"),
    ],
)
def test_add_rejects_bad_input(keys_file: Path, kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(KeyStoreError, match=message):
        add_key(keys_file, **kwargs)  # type: ignore[arg-type]
    assert not keys_file.exists()


def test_duplicate_and_unknown_names(keys_file: Path) -> None:
    add_key(keys_file, "phone")
    with pytest.raises(KeyStoreError, match="already exists"):
        add_key(keys_file, "phone", role="admin")
    with pytest.raises(KeyStoreError, match="no key named 'phon'; did you mean 'phone'"):
        revoke_key(keys_file, "phon")
    with pytest.raises(KeyStoreError, match="no key named"):
        rotate_key(keys_file, "tablet")
    assert [k["name"] for k in list_keys(keys_file)] == ["phone"]


def test_corrupt_file_is_never_overwritten_by_the_cli(keys_file: Path) -> None:
    keys_file.write_text("{not json")
    with pytest.raises(KeyStoreError, match="corrupt"):
        add_key(keys_file, "phone")
    with pytest.raises(KeyStoreError, match="corrupt"):
        list_keys(keys_file)
    assert keys_file.read_text() == "{not json"


# ---------------------------------------------------------------- verifying


def test_wrong_and_malformed_keys_fail(keys_file: Path) -> None:
    record, key = add_key(keys_file, "phone")
    store = KeyStore(keys_file)
    last = "A" if key[-1] != "A" else "B"
    other_kid = "a" * 8 if record.id != "a" * 8 else "b" * 8
    bad = [
        key[:-1] + last,  # wrong secret, right kid
        f"pvsgw_{other_kid}_{key[15:]}",  # unknown kid, right secret
        key + "x",
        key[:-1],
        key.upper(),
        " " + key,
        "",
        "pvsgw_",
        "Bearer " + key,
        key.replace("pvsgw_", "pvsgx_"),
        key[:15] + "é" * 43,
    ]
    for candidate in bad:
        assert store.verify(candidate) is None, candidate
    assert store.verify(key) is not None


def test_expired_key_fails(keys_file: Path) -> None:
    record, key = add_key(keys_file, "temp", expires_days=1)
    store = KeyStore(keys_file)
    assert store.verify(key, now=record.created + timedelta(hours=23)) is not None
    assert store.verify(key, now=record.created + timedelta(days=1, seconds=1)) is None
    listed = list_keys(keys_file, now=record.created + timedelta(days=2))
    assert listed[0]["status"] == "expired"


def test_a_key_remembered_as_verified_still_expires(keys_file: Path) -> None:
    record, key = add_key(keys_file, "brief", expires_days=3 / 86400)  # three seconds
    store = KeyStore(keys_file)
    assert store.verify(key) is not None
    assert store.verify(key) is not None  # now from the cache of verified keys
    assert record.expires is not None
    time.sleep(max(0.0, record.expires.timestamp() - time.time()) + 0.1)
    assert store.verify(key) is None


def test_revoked_key_fails_and_sessions_lookup_too(keys_file: Path) -> None:
    record, key = add_key(keys_file, "phone")
    _, other = add_key(keys_file, "laptop")
    revoked = revoke_key(keys_file, "phone")
    assert revoked.revoked is not None
    assert revoke_key(keys_file, "phone").revoked == revoked.revoked  # idempotent
    store = KeyStore(keys_file)
    assert store.verify(key) is None
    assert store.lookup(record.id) is None
    assert store.verify(other) is not None
    statuses = {k["name"]: k["status"] for k in list_keys(keys_file)}
    assert statuses == {"phone": "revoked", "laptop": "active"}


def test_rotate_invalidates_the_old_key(keys_file: Path) -> None:
    old, old_key = add_key(keys_file, "phone", role="admin", expires_days=90, rate_limit="5/second")
    store = KeyStore(keys_file)
    assert store.verify(old_key) is not None
    new, new_key = rotate_key(keys_file, "phone")
    assert new.id != old.id and new_key != old_key
    assert (new.name, new.role, new.rate_limit) == ("phone", "admin", "5/second")
    assert new.expires == old.expires  # a new secret, not a longer life
    assert store.reload_if_changed()
    assert store.verify(old_key) is None
    assert store.verify(new_key) is not None
    assert [k["id"] for k in list_keys(keys_file)] == [new.id]


def test_rotate_keeps_the_expiry_and_extending_is_explicit(keys_file: Path) -> None:
    """issue 20: rotating a guest key used to restart its expiry clock."""
    add_key(keys_file, "guest", expires_days=7)
    expires = next(k["expires"] for k in list_keys(keys_file) if k["name"] == "guest")
    later = datetime.now(UTC) + timedelta(days=6)
    for _ in range(3):
        rotated, _ = rotate_key(keys_file, "guest")
        assert rotated.expires is not None and rotated.expires.strftime("%Y-%m-%dT%H:%M:%SZ") == expires
        assert rotated.status(later) == "active" and rotated.status(later + timedelta(days=2)) == "expired"
    # An explicit new expiry is the only way to extend it, counted from now.
    extended, _ = rotate_key(keys_file, "guest", expires_days=30)
    assert extended.expires is not None and extended.expires - extended.created == timedelta(days=30)
    add_key(keys_file, "never")
    assert rotate_key(keys_file, "never")[0].expires is None


def test_an_expired_key_is_reissued_only_with_a_new_expiry(keys_file: Path) -> None:
    add_key(keys_file, "guest", expires_days=1)
    document = json.loads(keys_file.read_text())
    document["keys"][0]["expires"] = "2020-01-01T00:00:00Z"
    keys_file.write_text(json.dumps(document))
    with pytest.raises(KeyStoreError, match=r"expired at 2020-01-01T00:00:00Z; .*--expires-days"):
        rotate_key(keys_file, "guest")
    assert json.loads(keys_file.read_text()) == document  # refused: nothing written
    with pytest.raises(KeyStoreError, match=r"expired; 'keys rotate --expires-days N' reissues it"):
        add_key(keys_file, "guest")
    record, key = rotate_key(keys_file, "guest", expires_days=2)
    assert record.is_active() and KeyStore(keys_file).verify(key) is not None


def test_missing_file_means_no_keys(keys_file: Path) -> None:
    store = KeyStore(keys_file)
    assert len(store) == 0
    assert store.verify("pvsgw_aaaaaaaa_" + "A" * 43) is None
    assert list_keys(keys_file) == []
    _, key = add_key(keys_file, "phone")
    assert store.reload_if_changed()
    assert store.verify(key) is not None
    keys_file.unlink()
    assert store.reload_if_changed()
    assert store.verify(key) is None


# ---------------------------------------------------------------- reloading


def test_reload_sees_a_revoke_by_another_instance(keys_file: Path) -> None:
    _, key = add_key(keys_file, "phone")
    gateway = KeyStore(keys_file)
    assert gateway.verify(key) is not None
    assert gateway.reload_if_changed() is False  # nothing changed: no re-read
    revoke_key(keys_file, "phone")  # e.g. the CLI, right after the gateway's read
    assert gateway.reload_if_changed() is True
    assert gateway.verify(key) is None


def test_reload_sees_a_revoke_by_another_process(keys_file: Path) -> None:
    _, key = add_key(keys_file, "phone")
    gateway = KeyStore(keys_file)
    assert gateway.verify(key) is not None
    code = "import sys; from pathlib import Path; from gateway.auth.keys import revoke_key; revoke_key(Path(sys.argv[1]), 'phone')"
    subprocess.run([sys.executable, "-c", code, str(keys_file)], check=True, cwd=REPO, timeout=30)
    assert gateway.reload_if_changed()
    assert gateway.verify(key) is None


def test_corrupt_file_keeps_old_keys_and_logs_once(keys_file: Path, caplog: pytest.LogCaptureFixture) -> None:
    _, key = add_key(keys_file, "phone")
    store = KeyStore(keys_file)
    good = keys_file.read_bytes()
    keys_file.write_text('{"version": 1, "keys": [{"id": "broken"}]}')
    with caplog.at_level(logging.ERROR, logger="gateway.keys"):
        assert store.reload_if_changed() is False
        assert store.reload_if_changed() is False
    assert store.verify(key) is not None
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1 and "corrupt" in errors[0].getMessage()
    # Repaired: picked up again.
    keys_file.write_bytes(good)
    os.utime(keys_file, ns=(time.time_ns(), time.time_ns() + 10**9))
    assert store.reload_if_changed() is True
    assert store.verify(key) is not None


def test_corrupt_file_at_start_means_no_keys(keys_file: Path) -> None:
    keys_file.write_text("[]")
    assert len(KeyStore(keys_file)) == 0


def test_reload_never_raises_whatever_the_file_holds(keys_file: Path, caplog: pytest.LogCaptureFixture) -> None:
    _, key = add_key(keys_file, "phone")
    store = KeyStore(keys_file)
    for content in (b"[" * 100_000, b"\xff\xfe", b'{"version": 1, "keys": [1]}', b""):
        keys_file.write_bytes(content)
        caplog.clear()
        with caplog.at_level(logging.ERROR, logger="gateway.keys"):
            assert store.reload_if_changed() is False
        (line,) = [r.getMessage() for r in caplog.records]
        assert str(keys_file) in line and "\n" not in line
        assert store.verify(key) is not None  # the keys loaded before stay


def test_a_key_file_others_can_write_is_refused(keys_file: Path, caplog: pytest.LogCaptureFixture) -> None:
    """As ssh refuses such key files: whoever can write it can add an admin key."""
    _, key = add_key(keys_file, "phone")
    store = KeyStore(keys_file)
    assert file_problems(keys_file) == []
    for mode in (0o620, 0o602, 0o666):
        keys_file.chmod(mode)
        (problem,) = file_problems(keys_file)
        assert problem == f"{keys_file} is writable by group or others, so anyone who can write it can add keys; run: chmod 600 {keys_file}"
    add_key(keys_file, "intruder", role="admin")  # the CLI's own writes are always 0600 ...
    keys_file.chmod(0o666)  # ... so the file is loosened again, as someone else would
    with caplog.at_level(logging.ERROR, logger="gateway.keys"):
        assert store.reload_if_changed() is False
    assert f"chmod 600 {keys_file}" in caplog.text
    assert store.verify(key) is not None and [r.name for r, _ in store._index.values()] == ["phone"]
    assert len(KeyStore(keys_file)) == 0  # a gateway starting on it loads nothing
    keys_file.chmod(0o600)
    assert store.reload_if_changed() is True and len(store) == 2


def test_file_problems_name_the_file_in_one_line(keys_file: Path) -> None:
    assert file_problems(keys_file) == []  # no file yet: no keys, no problem
    keys_file.write_text('{"version": 1, "keys": [{"id": "broken"}]}')
    keys_file.chmod(0o600)
    (problem,) = file_problems(keys_file)
    assert problem.startswith(f"{keys_file} is corrupt (keys[0].id:") and "\n" not in problem
    keys_file.write_text("{not json")
    assert file_problems(keys_file)[0].startswith(f"{keys_file} is corrupt (not valid JSON")


def test_stale_temp_files_of_a_killed_writer_are_cleaned(keys_file: Path) -> None:
    add_key(keys_file, "phone")
    stale = keys_file.parent / ".keys.json.k1ll3d.tmp"
    stale.write_text('{"version": 1, "keys": []}')
    fresh = keys_file.parent / ".keys.json.wr1t1ng.tmp"  # could be a writer at work right now
    fresh.write_text("{")
    other = keys_file.parent / ".keys.state.json.x.tmp"  # not the key file's
    other.write_text("{}")
    hour_ago = time.time() - 3600
    os.utime(stale, (hour_ago, hour_ago))
    os.utime(other, (hour_ago, hour_ago))
    KeyStore(keys_file)  # on load: only what is too old to be a write in progress
    assert not stale.exists() and fresh.exists() and other.exists()
    add_key(keys_file, "laptop")  # on the next write, under the writers' lock: all of them
    assert not fresh.exists() and other.exists()
    assert [k["name"] for k in list_keys(keys_file)] == ["phone", "laptop"]


def test_a_killed_key_add_leaves_the_key_file_whole(keys_file: Path) -> None:
    """SIGKILL in the middle of `keys add` (between its temp file and the rename)."""
    add_key(keys_file, "phone")
    before = keys_file.read_bytes()
    code = (
        "import os, signal, sys\n"
        "from pathlib import Path\n"
        "from gateway import files\n"
        "from gateway.auth import keys\n"
        "def die(*a, **k): os.kill(os.getpid(), signal.SIGKILL)\n"
        "os.replace = die\n"  # killed right before the rename
        "keys.add_key(Path(sys.argv[1]), 'laptop')\n"
    )
    done = subprocess.run([sys.executable, "-c", code, str(keys_file)], cwd=REPO, timeout=30, check=False)
    assert done.returncode == -9
    left = list(keys_file.parent.glob(".keys.json.*.tmp"))
    assert len(left) == 1 and keys_file.read_bytes() == before
    add_key(keys_file, "laptop")
    assert list(keys_file.parent.glob(".keys.json.*.tmp")) == []


def test_concurrent_writers_wait_for_the_lock(keys_file: Path) -> None:
    add_key(keys_file, "first")
    fd = os.open(lock_path_for(keys_file), os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX)  # another CLI run mid-write
    done = threading.Event()
    thread = threading.Thread(target=lambda: (add_key(keys_file, "second"), done.set()))
    thread.start()
    try:
        assert not done.wait(0.3), "add_key wrote while another writer held the lock"
    finally:
        os.close(fd)
    thread.join(5)
    assert done.is_set()
    assert [k["name"] for k in list_keys(keys_file)] == ["first", "second"]


def test_parallel_processes_lose_no_key(keys_file: Path) -> None:
    code = "import sys; from pathlib import Path; from gateway.auth.keys import add_key; add_key(Path(sys.argv[1]), sys.argv[2])"
    procs = [
        subprocess.Popen([sys.executable, "-c", code, str(keys_file), f"k{i}"], cwd=REPO) for i in range(4)
    ]
    assert all(p.wait(30) == 0 for p in procs)
    assert sorted(k["name"] for k in list_keys(keys_file)) == ["k0", "k1", "k2", "k3"]


# ---------------------------------------------------------------- last used


def test_last_used_goes_to_the_state_file_not_keys_json(keys_file: Path) -> None:
    record, key = add_key(keys_file, "phone")
    before = keys_file.read_bytes()
    before_stat = keys_file.stat()
    store = KeyStore(keys_file)
    when = datetime(2025, 6, 1, 12, 0, 0, tzinfo=UTC)
    assert store.verify(key, now=when) is not None
    assert store.flush_usage() is False  # within the 60 s interval: no write
    assert not state_path_for(keys_file).exists()
    assert store.flush_usage(force=True) is True
    assert store.flush_usage(force=True) is False  # nothing new to write
    state = state_path_for(keys_file)
    assert state.name == "keys.state.json"
    assert json.loads(state.read_text()) == {record.id: "2025-06-01T12:00:00Z"}
    assert _mode(state) == 0o600
    assert keys_file.read_bytes() == before and keys_file.stat().st_mtime_ns == before_stat.st_mtime_ns
    assert list_keys(keys_file)[0]["last_used"] == "2025-06-01T12:00:00Z"


def test_failed_verification_is_not_a_use(keys_file: Path) -> None:
    _, key = add_key(keys_file, "phone")
    store = KeyStore(keys_file)
    store.verify(key[:-1] + ("A" if key[-1] != "A" else "B"))
    assert store.flush_usage(force=True) is False
    assert list_keys(keys_file)[0]["last_used"] is None


def test_flush_interval_and_merge(keys_file: Path) -> None:
    a, _ = add_key(keys_file, "a")
    b, _ = add_key(keys_file, "b")
    state_path_for(keys_file).write_text(json.dumps({a.id: "2030-01-01T00:00:00Z", "gonegone": "2020-01-01T00:00:00Z"}))
    store = KeyStore(keys_file, flush_interval=0.0)
    store.record_use(a.id, datetime(2025, 1, 1, tzinfo=UTC))  # older than the file's: file wins
    store.record_use(b.id, datetime(2025, 1, 1, tzinfo=UTC))
    assert store.flush_usage() is True  # interval 0: due at once
    assert json.loads(state_path_for(keys_file).read_text()) == {
        a.id: "2030-01-01T00:00:00Z",
        b.id: "2025-01-01T00:00:00Z",
    }


def test_watch_reloads_and_flushes_on_cancel(keys_file: Path) -> None:
    record, key = add_key(keys_file, "phone")
    store = KeyStore(keys_file)

    async def scenario() -> None:
        task = asyncio.create_task(store.watch(interval=0.01))
        assert store.verify(key) is not None
        revoke_key(keys_file, "phone")
        for _ in range(200):
            await asyncio.sleep(0.01)
            if store.verify(key) is None:
                break
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(scenario())
    assert store.verify(key) is None
    assert record.id in json.loads(state_path_for(keys_file).read_text())


# ---------------------------------------------------------------- sessions


def test_session_issue_and_verify() -> None:
    signer = SessionSigner(b"s" * 32)
    token = signer.issue("k7f3a9qz", lifetime=3600, now=1000.0)
    assert signer.verify(token, now=1001.0) == "k7f3a9qz"
    assert all(c.isalnum() or c in "-_." for c in token)  # cookie- and URL-safe
    assert token.count(".") == 1
    # A random nonce: the same kid at the same instant gives different tokens.
    assert signer.issue("k7f3a9qz", lifetime=3600, now=1000.0) != token


def test_session_expiry() -> None:
    signer = SessionSigner(b"s" * 32)
    token = signer.issue("k7f3a9qz", lifetime=60, now=1000.0)
    assert signer.verify(token, now=1059.9) == "k7f3a9qz"
    assert signer.verify(token, now=1060.0) is None
    assert signer.verify(token, now=5000.0) is None
    with pytest.raises(ValueError):
        signer.issue("k7f3a9qz", lifetime=0)


def test_session_tamper_and_malformed() -> None:
    signer = SessionSigner(b"s" * 32)
    token = signer.issue("k7f3a9qz", lifetime=3600, now=1000.0)
    payload, sig = token.split(".")
    forged = json.dumps({"k": "admin001", "e": 9e9, "n": "x"}).encode()
    forged_payload = base64.urlsafe_b64encode(forged).decode().rstrip("=")
    flipped = sig[:-2] + ("A" if sig[-2] != "A" else "B") + sig[-1]
    for bad in [
        f"{forged_payload}.{sig}",
        f"{payload}.{flipped}",
        f"{payload}.",
        f".{sig}",
        payload,
        token + ".x",
        token + "=",
        "",
        "a" * 5000,
        f"{payload}.{sig}\n",
    ]:
        assert signer.verify(bad, now=1001.0) is None, bad
    # Another secret's token is worthless here.
    assert SessionSigner(b"t" * 32).verify(token, now=1001.0) is None
    assert signer.verify(token, now=1001.0) == "k7f3a9qz"


def test_session_secret_must_be_long_enough() -> None:
    with pytest.raises(ValueError):
        SessionSigner(b"short")


def test_load_or_create_secret(tmp_path: Path) -> None:
    path = tmp_path / "certs" / "session.key"
    first = load_or_create_secret(path)
    assert len(first) == 32 and _mode(path) == 0o600
    assert load_or_create_secret(path) == first  # reused, so sessions survive restarts
    path.chmod(0o644)
    assert load_or_create_secret(path) == first and _mode(path) == 0o600
    path.write_bytes(b"")  # damaged: replaced
    second = load_or_create_secret(path)
    assert len(second) == 32 and second != first and path.read_bytes() == second
    assert {p.name for p in path.parent.iterdir()} == {"session.key"}

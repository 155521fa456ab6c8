"""The parts of remote updates, one rule each: the signed command envelope and the replay store,
the resumable fetcher against a real http server, the content-addressed store and its switch,
the state file's restart decisions, and probation's verdicts."""

from __future__ import annotations

import base64
import json
import os
import socket
import threading
import time

import pytest
from update_helpers import DEMO, Server, demo_file, relabel_onnx, variant

from edge.signing import generate_keypair
from edge.updates_command import CommandError, ReplayStore, make_command, parse_command
from edge.updates_config import ProbationSection
from edge.updates_fetch import FetchError, fetch, fetch_with_retries, join_url
from edge.updates_probation import Baseline, Counters, judge
from edge.updates_state import MAX_RESUMES, StateFile, UpdateRecord, on_start
from edge.updates_store import ModelStore, StoreError

KEY, PUB = generate_keypair()
OTHER, OTHER_PUB = generate_keypair()


# --- signed commands ------------------------------------------------------------------------------

def _cmd(name="update", device="cam-1", **kw):
    return make_command(name, device=device, args={"version": "v2"}, private_pem=KEY, **kw)


def test_a_signed_command_is_accepted_with_its_key_id():
    cmd = parse_command(_cmd(), name="update", device_id="cam-1", public_keys=[PUB])
    assert cmd.args == {"version": "v2"} and len(cmd.key_id) == 16


@pytest.mark.parametrize("payload, why", [
    (b'{"version": "v2"}', "unsigned command refused"),
    (b"not json", "not JSON"),
    (b"[" * 60_000 + b"]" * 60_000, "not JSON"),  # deeper than json's recursion: RecursionError before
])
def test_unsigned_commands_are_refused(payload, why):
    with pytest.raises(CommandError, match=why):
        parse_command(payload, name="update", device_id="cam-1", public_keys=[PUB])


def test_a_command_signed_by_an_unknown_key_is_refused():
    payload = make_command("update", device="cam-1", args={}, private_pem=OTHER)
    with pytest.raises(CommandError, match="bad signature"):
        parse_command(payload, name="update", device_id="cam-1", public_keys=[PUB])


def test_a_tampered_command_is_refused():
    env = json.loads(_cmd())
    env["cmd"] = env["cmd"].replace('"v2"', '"v9"')
    with pytest.raises(CommandError, match="bad signature"):
        parse_command(json.dumps(env).encode(), name="update", device_id="cam-1", public_keys=[PUB])


def test_a_command_for_another_box_or_another_name_is_refused():
    with pytest.raises(CommandError, match="addressed to 'cam-2'"):
        parse_command(_cmd(device="cam-2"), name="update", device_id="cam-1", public_keys=[PUB])
    with pytest.raises(CommandError, match="is for 'update', not 'rollback'"):
        parse_command(_cmd(), name="rollback", device_id="cam-1", public_keys=[PUB])
    assert parse_command(_cmd(device="*"), name="update", device_id="cam-1", public_keys=[PUB]).device == "*"


def test_an_expired_command_is_refused():
    old = _cmd(lifetime_s=60, now=time.time() - 120)
    with pytest.raises(CommandError, match="expired"):
        parse_command(old, name="update", device_id="cam-1", public_keys=[PUB])


def test_a_command_with_an_overlong_life_is_refused():
    env = json.loads(_cmd())
    body = json.loads(env["cmd"])
    body["expires"] = body["issued"] + 10 * 86400
    text = json.dumps(body)
    from edge.signing import sign

    env = {"v": 1, "cmd": text, "sig": base64.b64encode(sign(text.encode(), KEY)).decode()}
    with pytest.raises(CommandError, match="lifetime"):
        parse_command(json.dumps(env).encode(), name="update", device_id="cam-1", public_keys=[PUB])


def test_a_replayed_command_is_refused_even_after_a_restart(tmp_path):
    payload = _cmd()
    cmd = parse_command(payload, name="update", device_id="cam-1", public_keys=[PUB])
    ReplayStore(tmp_path / "nonces.json").claim(cmd)
    again = parse_command(payload, name="update", device_id="cam-1", public_keys=[PUB])
    with pytest.raises(CommandError, match="replayed"):
        ReplayStore(tmp_path / "nonces.json").claim(again)  # a new store object: what a restart reads


def test_an_unreadable_replay_store_refuses_rather_than_forgets(tmp_path):
    (tmp_path / "nonces.json").write_text("{torn")
    cmd = parse_command(_cmd(), name="update", device_id="cam-1", public_keys=[PUB])
    with pytest.raises(CommandError, match="replay store unreadable"):
        ReplayStore(tmp_path / "nonces.json").claim(cmd)


# --- fetch ----------------------------------------------------------------------------------------

@pytest.fixture
def served(tmp_path):
    root = tmp_path / "www"
    root.mkdir()
    blob = os.urandom(300_000)
    (root / "blob").write_bytes(blob)
    with Server(root) as srv:
        yield srv, blob


def test_fetch_verifies_and_counts(served, tmp_path):
    srv, blob = served
    import hashlib

    got = fetch(join_url(srv.url, "blob"), tmp_path / "out", max_bytes=10**6, timeout_s=5,
                sha256=hashlib.sha256(blob).hexdigest())
    assert got.bytes == len(blob) and (tmp_path / "out").read_bytes() == blob


def test_a_truncated_download_resumes_with_a_range_request(served, tmp_path):
    srv, blob = served
    import hashlib

    srv.cut["/blob"] = 100_000
    got = fetch_with_retries(join_url(srv.url, "blob"), tmp_path / "out", max_bytes=10**6, timeout_s=5,
                             sha256=hashlib.sha256(blob).hexdigest(), attempts=3)
    assert (tmp_path / "out").read_bytes() == blob
    assert srv.requests[-1][1] == "bytes=100000-"  # the second request asked only for the rest
    assert got.bytes == len(blob)  # nothing fetched twice
    assert srv.served == len(blob)


def test_a_half_fetched_file_resumes_in_a_later_process(served, tmp_path):
    srv, blob = served
    import hashlib

    srv.cut["/blob"] = 50_000
    with pytest.raises(FetchError, match="resumes on the next attempt"):
        fetch(join_url(srv.url, "blob"), tmp_path / "out", max_bytes=10**6, timeout_s=5)
    assert (tmp_path / "out.part").stat().st_size == 50_000 and not (tmp_path / "out").exists()
    got = fetch(join_url(srv.url, "blob"), tmp_path / "out", max_bytes=10**6, timeout_s=5,
                sha256=hashlib.sha256(blob).hexdigest())
    assert got.resumed_from == 50_000 and got.bytes == len(blob) - 50_000


def test_a_bad_hash_is_refused_and_the_part_removed(served, tmp_path):
    srv, _ = served
    with pytest.raises(FetchError, match="sha256 mismatch") as e:
        fetch(join_url(srv.url, "blob"), tmp_path / "out", max_bytes=10**6, timeout_s=5, sha256="0" * 64)
    assert not e.value.retry
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.part").exists()


def test_an_oversize_download_is_refused_on_its_length_and_nothing_is_written(served, tmp_path):
    srv, _ = served
    with pytest.raises(FetchError, match="more than the 1000-byte cap") as e:
        fetch(join_url(srv.url, "blob"), tmp_path / "out", max_bytes=1000, timeout_s=5)
    assert not e.value.retry
    assert not (tmp_path / "out.part").exists() and not (tmp_path / "out").exists()


@pytest.mark.parametrize("url", ["file:///etc/passwd", "ftp://127.0.0.1/x", "data:,x"])
def test_only_http_urls_are_fetched(url, tmp_path):
    with pytest.raises(ValueError, match="only http"):
        fetch(url, tmp_path / "out", max_bytes=10, timeout_s=1)


def test_join_url_quotes_every_part():
    assert join_url("http://h:1/base/", "manifests", "../x.json") == "http://h:1/base/manifests/..%2Fx.json"


# --- store and switch -----------------------------------------------------------------------------

def test_store_imports_a_bundle_shares_files_and_switches(tmp_path):
    store = ModelStore(tmp_path / "models")
    v1 = variant(DEMO, tmp_path / "v1", version="demo-1", key=KEY)
    b1 = store.import_bundle(v1)
    store.activate(b1)
    g2 = (DEMO / demo_file("group2")).read_bytes()
    v2 = variant(DEMO, tmp_path / "v2", version="demo-2", key=KEY, replace={"group2": relabel_onnx(g2, "v2")})
    man2 = store.manifest_of(b1).model_validate_json((v2 / "manifest.json").read_bytes())
    missing = store.missing(man2)
    assert [rel for rel, _ in missing] == [demo_file("group2")]  # the rest is held already
    b2 = store.import_bundle(v2)
    store.switch(b2)
    assert store.current() == b2 and store.previous() == b1
    assert os.stat(b1 / demo_file("global")).st_ino == os.stat(b2 / demo_file("global")).st_ino  # one copy
    from edge.bundle import load_bundle

    assert load_bundle(tmp_path / "models" / "current", public_keys=[PUB], require_signature=True).version == "demo-2"


def test_prune_keeps_current_and_previous_and_drops_old_engines(tmp_path):
    store = ModelStore(tmp_path / "models")
    g2 = (DEMO / demo_file("group2")).read_bytes()
    paths = []
    for i in (1, 2, 3):
        v = variant(DEMO, tmp_path / f"v{i}", version=f"demo-{i}", key=KEY,
                    replace={"group2": relabel_onnx(g2, f"v{i}")})
        paths.append(store.import_bundle(v))
        store.switch(paths[-1])
    engines = tmp_path / "engines"
    engines.mkdir()
    old_sha = store.manifest_of(paths[0]).experts["group2"].sha256
    new_sha = store.manifest_of(paths[2]).experts["group2"].sha256
    (engines / f"{old_sha[:12]}-fp16-b4-0123456789abcdef.plan").write_bytes(b"x")
    (engines / f"{new_sha[:12]}-fp16-b4-0123456789abcdef.plan").write_bytes(b"x")
    (engines / "timing-trt10-orin-sm8.7.cache").write_bytes(b"x")
    removed = store.prune(engines)
    assert f"bundles/{paths[0].name}" in removed
    assert sorted(k.version for k in store.kept()) == ["demo-2", "demo-3"]
    assert not (engines / f"{old_sha[:12]}-fp16-b4-0123456789abcdef.plan").exists()
    assert (engines / f"{new_sha[:12]}-fp16-b4-0123456789abcdef.plan").exists()
    assert (engines / "timing-trt10-orin-sm8.7.cache").exists()
    assert not store.has(old_sha, "x.onnx") and store.has(new_sha, "x.onnx")


def test_a_bundle_file_path_that_escapes_is_refused(tmp_path):
    from edge.updates_store import bundle_files

    raw = json.loads((DEMO / "manifest.json").read_text())
    raw["samples"][0]["file"] = "samples/./x.jpg"
    from edge.manifest import Manifest

    with pytest.raises(StoreError, match="plain relative path"):
        bundle_files(Manifest.model_validate(raw))


# --- state file: what a restart does ----------------------------------------------------------------

def _rec(state, **kw):
    return UpdateRecord(id="n" * 16, state=state, to_sha="new", from_sha="old", to_version="v2", **kw)


def test_before_the_switch_a_restart_resumes_then_gives_up():
    action, rec = on_start(_rec("fetching"), "old", max_crashes=2)
    assert action == "resume" and rec.resumes == 1
    action, rec = on_start(_rec("building", resumes=MAX_RESUMES), "old", max_crashes=2)
    assert action == "fail" and "interrupted" in rec.reason and rec.state == "failed"


def test_a_switch_that_happened_goes_on_to_probation_and_one_that_did_not_resumes():
    assert on_start(_rec("switching"), "new", max_crashes=2)[0] == "probation"
    assert on_start(_rec("switching"), "old", max_crashes=2)[0] == "resume"


def test_unclean_restarts_during_probation_count_up_to_a_rollback():
    rec = _rec("probation")
    action, rec = on_start(rec, "new", max_crashes=2)
    assert action == "probation" and rec.probation["crashes"] == 1
    action, rec = on_start(rec, "new", max_crashes=2)
    assert action == "rollback" and "crash loop: 2" in rec.reason


def test_a_clean_stop_during_probation_is_not_a_crash():
    action, rec = on_start(_rec("probation", clean_stop=True), "new", max_crashes=1)
    assert action == "probation" and rec.probation["crashes"] == 0


def test_the_state_file_round_trips_and_names_itself_when_broken(tmp_path):
    sf = StateFile(tmp_path / "state.json")
    assert sf.load() is None
    sf.save(_rec("probation", probation={"frames": 3}))
    assert sf.load() == _rec("probation", probation={"frames": 3})
    (tmp_path / "state.json").write_text("{")
    with pytest.raises(ValueError, match=r"state\.json: update state unreadable"):
        sf.load()


# --- probation --------------------------------------------------------------------------------------

P = ProbationSection(frames=100, minutes=10, max_errors=2, max_crashes=2, min_frames=20, max_empty_delta=0.3)
B = Baseline(frames=100, empty_rate=0.6, mean_ms=10.0)


@pytest.mark.parametrize("c, action, words", [
    (Counters(frames=5), "continue", ""),
    (Counters(frames=100, empty=60, ms_total=1000), "commit", "100 frames"),
    (Counters(frames=5, elapsed_s=601), "commit", "10 minutes"),
    (Counters(frames=5, errors=2), "rollback", "2 inference errors"),
    (Counters(frames=5, crashes=2), "rollback", "crash loop"),
    (Counters(frames=20, empty=12, ms_total=20 * 31.0), "rollback", "latency 31.0 ms"),
    (Counters(frames=20, empty=20, ms_total=200), "rollback", "empty-frame rate 1.00"),
    (Counters(frames=19, empty=19, ms_total=19 * 50.0), "continue", ""),  # too few frames for rates
])
def test_probation_verdicts(c, action, words):
    v = judge(c, P, B)
    assert v.action == action and words in v.reason


def test_probation_without_a_baseline_judges_errors_and_time_only():
    v = judge(Counters(frames=50, empty=50, ms_total=50 * 500.0), P, Baseline())
    assert v.action == "continue"
    assert judge(Counters(frames=50, ms_total=50 * 500.0), P.model_copy(update={"max_latency_ms": 100}),
                 Baseline()).action == "rollback"


def test_store_missing_refuses_samples_without_hashes(tmp_path):
    raw = json.loads((DEMO / "manifest.json").read_text())
    raw["samples"][0].pop("sha256")
    from edge.manifest import Manifest

    with pytest.raises(StoreError, match="no sha256"):
        ModelStore(tmp_path).missing(Manifest.model_validate(raw))



def test_an_installed_bundle_folder_is_adopted_even_after_a_crash_midway(tmp_path):
    from edge.updates_daemon import ADOPTING, adopt_installed

    store = ModelStore(tmp_path / "models")
    variant(DEMO, tmp_path / "models" / "current", version="demo-1", key=KEY)
    adopt_installed(store)
    assert (tmp_path / "models" / "current").is_symlink()
    assert store.manifest_of(store.current()).bundle_version == "demo-1"
    assert not (tmp_path / "models" / ADOPTING).exists()
    # a crash after the folder was renamed aside, before the symlink existed
    (tmp_path / "models" / "current").unlink()
    variant(DEMO, tmp_path / "models" / ADOPTING, version="demo-1", key=KEY)
    adopt_installed(store)
    assert store.current() is not None and not (tmp_path / "models" / ADOPTING).exists()


def test_status_says_where_the_last_update_stands(tmp_path):
    from edge.updates import update_line

    assert update_line(tmp_path) == "model update: none yet"
    StateFile(tmp_path / "updates" / "state.json").save(
        _rec("failed", from_version="demo-1", bytes=1234, reason="self-test failed: group2: ..."))
    assert update_line(tmp_path) == ("model update: failed () demo-1 -> v2, 1,234 bytes fetched; "
                                     "self-test failed: group2: ...")


# --- a hostile update server (a raw socket on loopback: it need not speak HTTP) ---------------------

class RawServer:
    """Answers every connection with ``reply`` (bytes), whatever was asked; counts connections."""

    def __init__(self, reply: bytes, *, drip_s: float = 0.0) -> None:
        self.reply, self.hits, self.drip_s = reply, 0, drip_s
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.hits += 1
            threading.Thread(target=self._answer, args=(conn,), daemon=True).start()

    def _answer(self, conn) -> None:  # type: ignore[no-untyped-def]
        with conn:
            try:
                conn.recv(65536)
                conn.sendall(self.reply)
                while self.drip_s:  # then a byte now and then: alive, but going nowhere
                    time.sleep(self.drip_s)
                    conn.sendall(b"x")
            except OSError:
                pass

    def close(self) -> None:
        self.sock.close()


HOSTILE_REPLIES = {
    "not http": b"\x00\xffGARBAGE\r\n\r\n",
    "header line over 64 KiB": b"HTTP/1.1 200 OK\r\nX: " + b"a" * 70_000 + b"\r\n\r\n",
    "over 100 headers": b"HTTP/1.1 200 OK\r\n" + b"X: a\r\n" * 200 + b"\r\n",
    "bad Content-Length": b"HTTP/1.1 200 OK\r\nContent-Length: abc\r\n\r\nhello",
}


@pytest.mark.parametrize("case", sorted(HOSTILE_REPLIES))
def test_a_server_that_answers_garbage_is_a_fetch_error(case, tmp_path):
    """Whatever a server sends back, the fetcher raises FetchError (the update fails with one line),
    never http.client's or int()'s own exceptions (a traceback in the daemon's log)."""
    from edge.updates_fetch import read_small

    srv = RawServer(HOSTILE_REPLIES[case])
    try:
        with pytest.raises(FetchError, match=r"127\.0\.0\.1"):
            fetch(srv.url + "/f", tmp_path / "out", max_bytes=10**6, timeout_s=5)
        if case != "bad Content-Length":  # read_small reads to the end whatever the length says
            with pytest.raises(FetchError, match=r"127\.0\.0\.1"):
                read_small(srv.url + "/m.json", max_bytes=10**6, timeout_s=5)
    finally:
        srv.close()


def test_a_redirect_to_a_non_http_url_is_not_followed(tmp_path):
    """A server (or whoever answers in its place) cannot turn an http URL into ftp: or file:."""
    from edge.updates_fetch import read_small

    target = RawServer(b"220 ftp ready\r\n")
    srv = RawServer(f"HTTP/1.1 302 Found\r\nLocation: ftp://127.0.0.1:{target.url.rsplit(':', 1)[1]}/x\r\n"
                    "Content-Length: 0\r\n\r\n".encode())
    try:
        with pytest.raises(FetchError, match=r"redirect.*only http") as e:
            fetch(srv.url + "/f", tmp_path / "out", max_bytes=10**6, timeout_s=3)
        assert not e.value.retry
        with pytest.raises(FetchError, match=r"redirect.*only http"):
            read_small(srv.url + "/m.json", max_bytes=10**6, timeout_s=3)
        assert target.hits == 0
    finally:
        srv.close()
        target.close()


def test_a_redirect_loop_is_one_line():
    from edge.updates_fetch import read_small

    srv = RawServer(b"")
    srv.reply = f"HTTP/1.1 302 Found\r\nLocation: {srv.url}/again\r\nContent-Length: 0\r\n\r\n".encode()
    try:
        with pytest.raises(FetchError, match="redirect") as e:
            read_small(srv.url + "/m.json", max_bytes=10**6, timeout_s=3)
        assert "\n" not in str(e.value)
    finally:
        srv.close()


def _raised_within(call, seconds: float) -> BaseException | None:  # type: ignore[no-untyped-def]
    """What ``call()`` raised, run in a thread: a hang fails the test instead of stalling it."""
    outcome: list[BaseException | None] = []

    def run() -> None:
        try:
            call()
            outcome.append(None)
        except BaseException as e:
            outcome.append(e)

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    worker.join(seconds)
    assert outcome, f"still running after {seconds} s"
    return outcome[0]


def test_a_server_that_drips_bytes_is_a_stalled_transfer_not_an_endless_one(tmp_path):
    """updates.timeout_s bounded each read only: a server sending a byte every few seconds held
    the update in 'fetching' for days (and refused every later command as 'another update
    running'). Each timeout_s window must now bring at least MIN_BYTES_PER_WINDOW."""
    from edge.updates_fetch import read_small

    head = b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n"
    srv = RawServer(head, drip_s=0.2)
    try:
        for call, then in ((lambda: fetch(srv.url + "/f", tmp_path / "out", max_bytes=10**6, timeout_s=1),
                            "it resumes on the next attempt"),
                           (lambda: read_small(srv.url + "/m.json", max_bytes=10**6, timeout_s=1),
                            "fetched again, whole, by the next update command")):  # a manifest keeps nothing
            err = _raised_within(call, 5)
            assert isinstance(err, FetchError) and "stalled" in str(err) and err.retry, err
            assert str(err).endswith(then), err
        assert (tmp_path / "out.part").exists()  # what came is kept: the next attempt resumes it
    finally:
        srv.close()


def test_a_wall_clock_jump_forward_does_not_forget_nonces_still_valid(tmp_path):
    """A box whose clock runs a day ahead (NTP not yet answered) accepts a 24 h command and
    prunes; pruning by that clock alone forgot the nonces of commands still valid in true time,
    and once the clock came back one of them could be replayed."""
    from edge.updates_command import Command

    store = ReplayStore(tmp_path / "nonces.json")
    t = 1_800_000_000
    hour = Command("update", "cam-1", "a" * 32, issued=t, expires=t + 3600)
    store.claim(hour, now=t)
    day = Command("update", "cam-1", "b" * 32, issued=t + 60, expires=t + 86_400)
    store.claim(day, now=t + 80_000)  # the box's clock is 22 h ahead of the workstation's
    with pytest.raises(CommandError, match="replayed"):
        store.claim(hour, now=t + 120)  # the clock is right again; the hour command has not expired

"""An HTTPS model provider behind a private CA, through nginx: ca_file and
ca_path, per provider too; the pool's TLS set up once (the master makes
the one full handshake at start, every worker resumes its session; with
the provider down at start, the first worker makes it and the others
wait for its session); the bound on full handshakes; a handshake that
times out is not held against the provider.

The provider is the local model serving HTTPS (--tls-cert), its
certificate signed by a CA made here with the openssl command."""

import concurrent.futures
import re
import subprocess
import time
from pathlib import Path

import pytest

import deploy_servers as ds
from helpers import LocalModel, assert_json_error, new_session, post_chat
from pki import make_pki, start_tls_model

REPO = Path(__file__).resolve().parents[2]
WORKERS = 4


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def tls_model(pki, free_ports):
    proc, url = start_tls_model(pki, free_ports(1)[0])
    yield url
    proc.terminate()
    proc.wait(timeout=10)


@pytest.fixture(scope="module")
def tls12_model(pki, tls_model, free_ports, tmp_path_factory):
    """The same model behind nginx with Debian 12's defaults for TLS: it
    speaks TLS 1.2 at most (nginx 1.22) and keeps no session cache, so it
    resumes only a session that carries a ticket."""
    port = free_ports(1)[0]
    site = f"""server {{
    listen 127.0.0.1:{port} ssl;
    ssl_certificate {pki / "server.crt"};
    ssl_certificate_key {pki / "server.key"};
    ssl_protocols TLSv1.2;
    location / {{ proxy_pass {tls_model}; proxy_buffering off; }}
}}
"""
    procs = ds.Procs()
    try:
        ds.start_nginx(procs, tmp_path_factory.mktemp("tls12"), port, site)
        yield f"https://127.0.0.1:{port}"
    finally:
        procs.stop_all()


@pytest.fixture
def model(tls_model, pki):
    session = new_session()
    session.verify = str(pki / "ca.crt")
    m = LocalModel(tls_model, session)
    m.reset()
    yield m
    m.reset()


def tls_stack(stack_factory, tls_model, **env):
    base = {"CHATFCGI_UPSTREAM_URL": f"{tls_model}/v1",
            "CHATFCGI_WORKERS": str(WORKERS)}
    return stack_factory({**base, **{k: str(v) for k, v in env.items()}})


def handshakes(model):
    return model.stats()["tls_handshakes"]


def metric(http, st, name, **labels):
    text = http.get(f"{st.url}/api/metrics", timeout=5).text
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    found = re.search(r"^%s\{%s\} (\d+)$" % (re.escape(name),
                                            re.escape(want)), text, re.M)
    assert found, f"{name}{{{want}}} not in the metrics"
    return int(found.group(1))


@pytest.mark.parametrize("key, value", [("CA_FILE", "ca.crt"),
                                        ("CA_PATH", "ca_dir")])
def test_a_private_ca_is_trusted(http, stack_factory, tls_model, pki,
                                 model, key, value):
    st = tls_stack(stack_factory, tls_model,
                   **{f"CHATFCGI_UPSTREAM_{key}": pki / value})
    r = post_chat(http, st, "hello over TLS")
    assert r.status_code == 200, r.text
    assert model.stats()["requests"] == 1


def test_a_provider_the_cas_do_not_vouch_for_is_refused(
        http, stack_factory, tls_model, pki, model):
    """The system's CAs (no ca_file), or another CA: the certificate is
    not trusted, the turn fails with 502 and the model is never asked."""
    for env in ({}, {"CHATFCGI_UPSTREAM_CA_FILE": pki / "other.crt"}):
        st = tls_stack(stack_factory, tls_model, CHATFCGI_UPSTREAM_RETRIES=0,
                       **env)
        r = post_chat(http, st, "hello?")
        assert_json_error(r, 502, "upstream_error")
        assert model.stats()["requests"] == 0
        log = st.log_path("chatfcgi").read_text()
        assert "certificate" in log, log[-2000:]


def test_a_providers_own_ca_file_replaces_upstreams(
        http, stack_factory, tls_model, pki, model, tmp_path):
    drop_in = tmp_path / "providers.conf"
    drop_in.write_text(f"""
[provider private]
url = {tls_model}/v1
ca_file = {pki / "ca.crt"}
""")
    st = tls_stack(stack_factory, tls_model, CHATFCGI_INCLUDE=drop_in,
                   CHATFCGI_UPSTREAM_CA_FILE=pki / "other.crt")
    r = post_chat(http, st, "hello over TLS")
    assert r.status_code == 200, r.text


@pytest.mark.parametrize("key, file", [("CA_FILE", "not-pem.crt"),
                                       ("CA_FILE", "missing.crt"),
                                       ("CA_PATH", "missing-dir")])
def test_a_ca_that_cannot_be_loaded_is_a_configuration_error(pki, key,
                                                             file):
    env = {"PATH": "/usr/bin:/bin", f"CHATFCGI_UPSTREAM_{key}":
           str(pki / file)}
    res = subprocess.run([str(REPO / "bin/chatfcgi"), "-t", "-c",
                          str(REPO / "conf/chatfcgi.conf")], env=env,
                         capture_output=True, text=True)
    assert res.returncode == 1, res
    assert "cannot load the CA certificates of" in res.stderr
    assert file in res.stderr


@pytest.mark.parametrize("value, ok", [("64", True), ("65", False)])
def test_tls_handshakes_is_bounded_by_the_pools_shared_slots(value, ok):
    """The pool's slots for full handshakes are 64 per provider: a larger
    tls_handshakes is refused, not run past their end (it was taken up to
    1000, and the slots read past the provider's shared memory)."""
    env = {"PATH": "/usr/bin:/bin", "CHATFCGI_UPSTREAM_TLS_HANDSHAKES": value}
    res = subprocess.run([str(REPO / "bin/chatfcgi"), "-t", "-c",
                          str(REPO / "conf/chatfcgi.conf")], env=env,
                         capture_output=True, text=True)
    assert (res.returncode == 0) == ok, res
    if not ok:
        assert "TLS_HANDSHAKES: not an integer from 1 to 64" in res.stderr


def concurrent_turns(http, st, n):
    with concurrent.futures.ThreadPoolExecutor(n) as pool:
        return list(pool.map(lambda i: post_chat(http, st, f"turn {i}",
                                                 timeout=20), range(n)))


def pool_handshakes(http, st):
    """The pool's handshakes with the provider, from its metrics: (full,
    resumed)."""
    return tuple(metric(http, st, "chatfcgi_tls_handshakes_total",
                        provider="upstream1", kind=kind)
                 for kind in ("full", "resumed"))


def cold_burst(http, st, model):
    """4 turns at once on a cold pool of 4, each on its own worker (the
    model answers after 300 ms, so none is free for another). Returns the
    pool's handshakes."""
    model.set(delay_ms=300)
    answers = concurrent_turns(http, st, WORKERS)
    assert [r.status_code for r in answers] == [200] * WORKERS
    return pool_handshakes(http, st)


def one_slot_stack(stack_factory, url, pki, **env):
    return tls_stack(stack_factory, url,
                     CHATFCGI_UPSTREAM_CA_FILE=pki / "ca.crt",
                     CHATFCGI_UPSTREAM_TLS_HANDSHAKES=1, **env)


def started_with_the_provider_down(stack_factory, url, pki, model, **env):
    """A stack whose master could make no handshake at start: the model
    takes 1.5 s to begin each, the connect timeout is 0.5 s. The model is
    itself again when this returns."""
    model.set(handshake_delay_ms=1500)
    st = tls_stack(stack_factory, url,
                   CHATFCGI_UPSTREAM_CA_FILE=pki / "ca.crt",
                   CHATFCGI_UPSTREAM_CONNECT_TIMEOUT_MS=500, **env)
    model.set()
    time.sleep(1.1)  # the model's handshake thread is done sleeping
    log = st.log_path("chatfcgi").read_text()
    assert "no session made with provider upstream1 at start" in log, \
        log[-2000:]
    return st


def test_the_master_makes_the_one_full_handshake_every_worker_resumes(
        http, stack_factory, tls_model, pki, model):
    """The master makes a handshake with the provider at start (and sends
    no request); each of the 4 workers' first calls resumes its session,
    none waits for a slot."""
    st = one_slot_stack(stack_factory, tls_model, pki)
    assert pool_handshakes(http, st) == (1, 0)
    assert handshakes(model) == {"full": 1, "resumed": 0}
    assert model.stats()["requests"] == 0
    assert "session made with provider upstream1 at start" in \
        st.log_path("chatfcgi").read_text()
    assert cold_burst(http, st, model) == (1, WORKERS)
    assert handshakes(model) == {"full": 1, "resumed": WORKERS}


def test_with_the_provider_down_at_start_one_worker_makes_the_handshake(
        http, stack_factory, tls_model, pki, model):
    """No session from the start: with tls_handshakes = 1, one worker
    makes the full handshake; the three others wait for its session and
    resume it."""
    st = started_with_the_provider_down(
        stack_factory, tls_model, pki, model,
        CHATFCGI_UPSTREAM_TLS_HANDSHAKES=1)
    assert pool_handshakes(http, st) == (0, 0)
    assert cold_burst(http, st, model) == (1, WORKERS - 1)


def test_a_tls12_provider_without_a_session_cache_is_resumed_by_ticket(
        http, stack_factory, tls12_model, pki, model):
    """Curl asks for no TLS 1.2 ticket, and a session id alone resumes
    nothing where the provider keeps no cache: the master's handshake
    would serve no one, and each of the 4 workers would make a full
    handshake of its own. With tickets, the master's is the only one."""
    st = one_slot_stack(stack_factory, tls12_model, pki)
    assert cold_burst(http, st, model) == (1, WORKERS)


def test_without_a_bound_workers_still_resume_once_a_session_is_out(
        http, stack_factory, tls_model, pki, model):
    """The default bound (4), with the provider down at start: at most 4
    full handshakes for a pool of 4, and a turn on a fresh worker after
    that resumes."""
    st = started_with_the_provider_down(stack_factory, tls_model, pki,
                                        model)
    full, resumed = cold_burst(http, st, model)
    assert full + resumed == WORKERS
    assert full >= 1


def test_a_handshake_that_times_out_opens_no_cooldown(
        http, stack_factory, tls_model, pki, model):
    """The provider takes 1.5 s to begin each handshake and the connect
    timeout is 0.5 s: the turns fail (504) and are counted as the
    provider's errors, but a handshake cut short is as likely the host's
    lack of CPU as the provider's: the cooldown stays shut and every turn
    asks the provider again."""
    st = tls_stack(stack_factory, tls_model,
                   CHATFCGI_UPSTREAM_CA_FILE=pki / "ca.crt",
                   CHATFCGI_UPSTREAM_CONNECT_TIMEOUT_MS=500,
                   CHATFCGI_UPSTREAM_RETRIES=0,
                   CHATFCGI_UPSTREAM_COOLDOWN_FAILURES=1)
    at_start = model.stats()["connections"]  # the master's handshake
    model.set(handshake_delay_ms=1500)
    for _ in range(3):
        assert_json_error(post_chat(http, st, "are you there?"), 504,
                          "upstream_timeout")
    assert model.stats()["connections"] - at_start == 3
    assert metric(http, st, "chatfcgi_provider_cooling_down",
                  provider="upstream1") == 0
    assert metric(http, st, "chatfcgi_provider_errors_total",
                  provider="upstream1", kind="timeout") == 3
    model.set()
    time.sleep(1.1)  # the model's handshake threads are done sleeping
    assert post_chat(http, st, "and now?").status_code == 200


def test_a_handshake_that_times_out_is_tried_again(
        http, stack_factory, tls_model, pki, model):
    """A handshake cut short sent the provider nothing, and in a burst the
    next one is likely in time: with retries = 1 (the default) the turn
    makes a second connection before it gives up."""
    st = tls_stack(stack_factory, tls_model,
                   CHATFCGI_UPSTREAM_CA_FILE=pki / "ca.crt",
                   CHATFCGI_UPSTREAM_CONNECT_TIMEOUT_MS=500,
                   CHATFCGI_UPSTREAM_RETRY_BASE_MS=50)
    at_start = model.stats()["connections"]  # the master's handshake
    model.set(handshake_delay_ms=1500)
    assert_json_error(post_chat(http, st, "are you there?"), 504,
                      "upstream_timeout")
    assert model.stats()["connections"] - at_start == 2
    assert metric(http, st, "chatfcgi_provider_cooling_down",
                  provider="upstream1") == 0
    model.set()
    time.sleep(1.6)  # the model's handshake threads are done sleeping

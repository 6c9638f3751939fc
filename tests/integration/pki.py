"""A private PKI for tests and benchmarks of HTTPS providers: a CA, a
certificate for 127.0.0.1 that it signed, another CA that signed nothing
here, and the CA in a c_rehash'd directory; made with the openssl
command. And the local model serving HTTPS with that certificate."""

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def openssl(*args, cwd):
    subprocess.run(["openssl", *args], cwd=cwd, check=True,
                   capture_output=True)


def make_ca(d, name):
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
            "-subj", f"/CN={name}", "-keyout", f"{name}.key", "-out",
            f"{name}.crt", cwd=d)


def make_pki(d):
    """In directory d: ca.crt, server.crt/.key (127.0.0.1, signed by ca),
    other.crt (a CA that signed nothing), ca_dir/ (ca.crt as c_rehash
    would name it) and not-pem.crt. Returns d."""
    make_ca(d, "ca")
    make_ca(d, "other")
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=model",
            "-keyout", "server.key", "-out", "server.csr", cwd=d)
    (d / "san.cnf").write_text("subjectAltName=IP:127.0.0.1\n")
    openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey",
            "ca.key", "-CAcreateserial", "-days", "2", "-extfile", "san.cnf",
            "-out", "server.crt", cwd=d)
    subject_hash = subprocess.run(
        ["openssl", "x509", "-hash", "-noout", "-in", d / "ca.crt"],
        check=True, capture_output=True, text=True).stdout.strip()
    (d / "ca_dir").mkdir()
    (d / "ca_dir" / f"{subject_hash}.0").write_bytes(
        (d / "ca.crt").read_bytes())
    (d / "not-pem.crt").write_text("this is no certificate\n")
    return d


def start_tls_model(pki, port):
    """The local model on 127.0.0.1:port, serving HTTPS with pki's
    certificate. Returns (its process, its base URL)."""
    proc = subprocess.Popen(
        [sys.executable, str(REPO / "app/localmodel.py"), "--port",
         str(port), "--tls-cert", str(pki / "server.crt"), "--tls-key",
         str(pki / "server.key")], stdout=subprocess.PIPE, text=True)
    assert "listening on https://" in proc.stdout.readline()
    return proc, f"https://127.0.0.1:{port}"

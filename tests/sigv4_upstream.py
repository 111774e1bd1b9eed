"""An AWS-shaped upstream that checks every SigV4 signature with botocore (code we did not write),
and an STS that answers AssumeRoleWithWebIdentity as AWS does, for tests/sigv4.rs.

    python3 tests/sigv4_upstream.py DIR SITES STS_LIFETIME_S

Makes a CA and a certificate for localhost and 127.0.0.1 (DIR/aws-ca.pem), opens SITES plain HTTP
and SITES TLS listeners on 127.0.0.1, prints {"plain": [...], "tls": [...]} as one line, and serves
until killed:

- POST /sts: AssumeRoleWithWebIdentity. The WebIdentityToken must be what DIR/web-identity.jwt
  holds now and start with "wit-" (else 400 InvalidIdentityToken); the answer's credentials
  (ASIA1, ASIA2, ...) end STS_LIFETIME_S seconds later.
- GET /log: every verdict so far, as JSON.
- Anything else must be signed (AWS4-HMAC-SHA256) by the static key AKIDSTATIC or by a live STS
  session: botocore recomputes the signature from the request as received, the payload hash is
  checked against the body (UNSIGNED-PAYLOAD only for s3), the date must be within five minutes
  and a session's token must match. 200 with a JSON summary, or 403 with the reason.
"""

import datetime
import hashlib
import ipaddress
import json
import os
import re
import ssl
import sys
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from botocore.auth import S3SigV4Auth, SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

DIR, SITES, LIFETIME = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
LOG = []
LOCK = threading.Lock()
STATIC = {"AKIDSTATIC": ("static-secret-Kq7/EXAMPLE", "static-session-token-EXAMPLE")}
SESSIONS = {}  # access key id -> (secret, session token, expires at)
ROLE = "arn:aws:iam::123456789012:role/app"
AUTH = re.compile(
    r"^AWS4-HMAC-SHA256 Credential=([^/]+)/(\d{8})/([^/]+)/([^/]+)/aws4_request, "
    r"SignedHeaders=([a-z0-9;.-]+), Signature=([0-9a-f]{64})$"
)


def record(entry):
    with LOCK:
        LOG.append(entry)


def make_tls():
    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "sigv4 test CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    names = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    leaf = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    with open(os.path.join(DIR, "aws-ca.pem"), "wb") as f:
        f.write(ca.public_bytes(serialization.Encoding.PEM))
    chain = os.path.join(DIR, "aws-leaf.pem")
    with open(chain, "wb") as f:
        f.write(leaf.public_bytes(serialization.Encoding.PEM))
        f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()))
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(chain)
    return context


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def body(self):
        length = int(self.headers.get("content-length") or 0)
        return self.rfile.read(length) if length else b""

    def answer(self, status, value, content_type="application/json"):
        data = value if isinstance(value, bytes) else json.dumps(value).encode()
        self.send_response(status)
        self.send_header("content-type", content_type)
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        if self.path == "/log":
            with LOCK:
                return self.answer(200, LOG)
        self.signed()

    def do_POST(self):
        if self.path == "/sts":
            return self.sts()
        self.signed()

    def do_PUT(self):
        self.signed()

    do_DELETE = do_PATCH = do_PUT

    def sts(self):
        form = dict(urllib.parse.parse_qsl(self.body().decode()))
        with open(os.path.join(DIR, "web-identity.jwt")) as f:
            current = f.read().strip()
        token = form.get("WebIdentityToken", "")
        problem = None
        if form.get("Action") != "AssumeRoleWithWebIdentity" or form.get("Version") != "2011-06-15":
            problem = "InvalidAction"
        elif form.get("RoleArn") != ROLE or not form.get("RoleSessionName"):
            problem = "ValidationError"
        elif token != current or not token.startswith("wit-") or not form.get("DurationSeconds", "").isdigit():
            problem = "InvalidIdentityToken"
        if problem:
            record({"kind": "sts", "token": token, "verdict": problem})
            error = (f"<ErrorResponse><Error><Type>Sender</Type><Code>{problem}</Code>"
                     f"<Message>refused by the test STS</Message></Error></ErrorResponse>")
            return self.answer(400, error.encode(), "text/xml")
        with LOCK:
            n = len(SESSIONS) + 1
            key = f"ASIA{n}"
            expires = time.time() + LIFETIME
            SESSIONS[key] = (f"session-secret-{n}", f"session-token-{n}", expires)
        expiration = datetime.datetime.fromtimestamp(expires, datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        record({"kind": "sts", "token": token, "verdict": "ok", "key": key,
                "duration": form["DurationSeconds"], "session_name": form["RoleSessionName"]})
        xml = f"""<AssumeRoleWithWebIdentityResponse xmlns="https://sts.amazonaws.com/doc/2011-06-15/">
  <AssumeRoleWithWebIdentityResult>
    <AssumedRoleUser><Arn>{ROLE}/x</Arn><AssumedRoleId>AROA:x</AssumedRoleId></AssumedRoleUser>
    <Credentials>
      <SessionToken>session-token-{n}</SessionToken>
      <SecretAccessKey>session-secret-{n}</SecretAccessKey>
      <Expiration>{expiration}</Expiration>
      <AccessKeyId>{key}</AccessKeyId>
    </Credentials>
  </AssumeRoleWithWebIdentityResult>
</AssumeRoleWithWebIdentityResponse>"""
        self.answer(200, xml.encode(), "text/xml")

    def signed(self):
        body = self.body()
        verdict, details = self.verify(body)
        entry = {"kind": "api", "method": self.command, "path": self.path, "verdict": verdict,
                 "body_len": len(body), **details}
        record(entry)
        if verdict != "ok":
            return self.answer(403, {"error": verdict})
        if self.headers.get("x-amz-target") == "DynamoDB_20120810.ListTables":
            return self.answer(200, {"TableNames": ["signed-by-tokenproxy"]}, "application/x-amz-json-1.0")
        self.answer(200, entry)

    def verify(self, body):
        authorization = self.headers.get("authorization", "")
        if len(self.headers.get_all("authorization") or []) != 1:
            return "not exactly one Authorization header", {}
        m = AUTH.match(authorization)
        if not m:
            return "not a SigV4 Authorization header", {}
        key, day, region, service, signed_headers, signature = m.groups()
        details = {"key": key, "region": region, "service": service}
        if key in STATIC:
            secret, token = STATIC[key]
        elif key in SESSIONS:
            secret, token, expires = SESSIONS[key]
            if time.time() >= expires:
                return "ExpiredToken", details
        else:
            return "InvalidClientTokenId", details
        if self.headers.get("x-amz-security-token") != token:
            return "session token does not match", details
        amz_date = self.headers.get("x-amz-date", "")
        try:
            when = datetime.datetime.strptime(amz_date, "%Y%m%dT%H%M%SZ").replace(tzinfo=datetime.timezone.utc)
        except ValueError:
            return "no X-Amz-Date", details
        if abs((datetime.datetime.now(datetime.timezone.utc) - when).total_seconds()) > 300 or day != amz_date[:8]:
            return "RequestTimeTooSkewed", details
        payload = self.headers.get("x-amz-content-sha256", "")
        details["payload"] = payload
        if payload == "UNSIGNED-PAYLOAD":
            if service != "s3":
                return "UNSIGNED-PAYLOAD for a service other than s3", details
        elif payload != hashlib.sha256(body).hexdigest():
            return "XAmzContentSHA256Mismatch", details
        # botocore recomputes the signature over exactly the headers the request says it signed.
        names = signed_headers.split(";")
        headers = {name: self.headers.get(name, "") for name in names}
        scheme = "https" if isinstance(self.connection, ssl.SSLSocket) else "http"
        request = AWSRequest(method=self.command, url=f"{scheme}://{self.headers['host']}{self.path}",
                             data=body, headers=headers)
        request.context["timestamp"] = amz_date
        auth_class = S3SigV4Auth if service == "s3" else SigV4Auth
        auth = auth_class(Credentials(key, secret, token), service, region)
        if auth.signed_headers(auth.headers_to_sign(request)) != signed_headers:
            return "SignedHeaders differ from botocore's", details
        expected = auth.signature(auth.string_to_sign(request, auth.canonical_request(request)), request)
        if expected != signature:
            return "SignatureDoesNotMatch", details
        return "ok", details


def serve(server):
    server.serve_forever()


context = make_tls()
plain, tls = [], []
for _ in range(SITES):
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    plain.append(server.server_address[1])
    threading.Thread(target=serve, args=(server,), daemon=True).start()
    secure = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    secure.socket = context.wrap_socket(secure.socket, server_side=True)
    tls.append(secure.server_address[1])
    threading.Thread(target=serve, args=(secure,), daemon=True).start()
print(json.dumps({"plain": plain, "tls": tls}), flush=True)
threading.Event().wait()

"""A token endpoint that checks what tokenproxy signs with code we did not write (pyjwt and
cryptography), for tests/grants.rs.

    python3 tests/grants_endpoint.py DIR

Makes keys in DIR (RSA PKCS#1 and PKCS#8, EC SEC1 and PKCS#8, a key nobody trusts), a Google-shaped
service account key and the "projected" tokens a cluster would mount, starts on 127.0.0.1 on a
free port, prints the port, and serves until killed:

- POST /token: jwt-bearer assertions (RFC 7523 2.1), client assertions (private_key_jwt, RFC 7523
  2.2, and the projected token of client_assertion_file), token exchange (RFC 8693), and a client
  secret for the discovery test. Anything it cannot verify is refused with 400 invalid_grant (or
  401 invalid_client).
- POST /app/installations/ID/access_tokens: a GitHub App's JWT (RS256, iss the app id, at most
  ten minutes of life), answered with a token and expires_at.
- GET /.well-known/oauth-authorization-server/rfc8414 and /oidc/.well-known/openid-configuration:
  issuer metadata.
- GET /log: every request's verdict, as JSON lines.
"""

import base64
import json
import os
import sys
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

DIR = sys.argv[1]
LOG = []
LOCK = threading.Lock()
SEEN_JTI = set()
COUNT = {}  # tokens issued so far, per client: a test can tell which one comes next


def write(name, data, mode=0o600):
    path = os.path.join(DIR, name)
    with open(path, "wb") as f:
        f.write(data)
    os.chmod(path, mode)


def pem(key, fmt):
    return key.private_bytes(serialization.Encoding.PEM, fmt, serialization.NoEncryption())


PKCS1 = serialization.PrivateFormat.TraditionalOpenSSL  # RSA PRIVATE KEY / EC PRIVATE KEY (SEC1)
PKCS8 = serialization.PrivateFormat.PKCS8

rsa1 = rsa.generate_private_key(public_exponent=65537, key_size=2048)
rsa8 = rsa.generate_private_key(public_exponent=65537, key_size=2048)
ec1 = ec.generate_private_key(ec.SECP256R1())
ec8 = ec.generate_private_key(ec.SECP256R1())
stranger = rsa.generate_private_key(public_exponent=65537, key_size=2048)
google = rsa.generate_private_key(public_exponent=65537, key_size=2048)
cluster = ec.generate_private_key(ec.SECP256R1())  # signs the "projected" service-account tokens

write("rsa_pkcs1.pem", pem(rsa1, PKCS1))
write("rsa_pkcs8.pem", pem(rsa8, PKCS8))
write("ec_sec1.pem", pem(ec1, PKCS1))
write("ec_pkcs8.pem", pem(ec8, PKCS8))
write("stranger.pem", pem(stranger, PKCS8))

# Who may sign what: client id (the assertion's iss) -> (public key, algorithm, kid or None).
TRUSTED = {
    "svc-rsa1": (rsa1.public_key(), "RS256", "k-rsa1"),
    "svc-ec1": (ec1.public_key(), "ES256", None),
    "svc-ec8": (ec8.public_key(), "ES256", None),
    "client-pk": (rsa8.public_key(), "RS256", None),
    "svc-stranger": (rsa1.public_key(), "RS256", None),  # trusts rsa1; the config signs with stranger
    "sa@proj.iam.gserviceaccount.com": (google.public_key(), "RS256", "google-kid-1"),
}
APPS = {"4242": rsa1.public_key()}
SUBJECT_TOKEN_TYPE = "urn:ietf:params:oauth:token-type:jwt"


def projected(subject, audience, n):
    now = int(time.time())
    claims = {"iss": "https://cluster.local", "sub": subject, "aud": audience, "iat": now, "exp": now + 3600, "n": n}
    return jwt.encode(claims, cluster, algorithm="ES256")


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def answer(self, status, body):
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def record(self, **entry):
        with LOCK:
            LOG.append(entry)

    def token_url(self):
        return f"http://127.0.0.1:{self.server.server_port}/token"

    def refuse(self, kind, why, status=400, **extra):
        self.record(path=self.path, ok=False, why=why, **extra)
        self.answer(status, {"error": kind, "error_description": why})

    def issue(self, who, **extra):
        with LOCK:
            COUNT[who] = n = COUNT.get(who, 0) + 1
        token = f"at-{who}-{n}"
        self.record(path=self.path, ok=True, token=token, **extra)
        self.answer(200, {"access_token": token, "token_type": "Bearer", "expires_in": 3600})

    def do_GET(self):
        port = self.server.server_port
        if self.path == "/log":
            with LOCK:
                return self.answer(200, LOG)
        if self.path == "/.well-known/oauth-authorization-server/rfc8414":
            return self.answer(200, {"issuer": f"http://127.0.0.1:{port}/rfc8414", "token_endpoint": f"http://127.0.0.1:{port}/token"})
        if self.path == "/oidc/.well-known/openid-configuration":
            return self.answer(200, {
                "issuer": f"http://127.0.0.1:{port}/oidc",
                "token_endpoint": f"http://127.0.0.1:{port}/token",
                "authorization_endpoint": f"http://127.0.0.1:{port}/authorize",
            })
        if self.path == "/.well-known/oauth-authorization-server/impostor":
            return self.answer(200, {"issuer": "https://someone-else.example", "token_endpoint": "http://127.0.0.1:9/token"})
        self.answer(404, {"error": "not_found"})

    def do_POST(self):
        length = int(self.headers.get("content-length", "0"))
        body = self.rfile.read(length).decode()
        if self.path.startswith("/app/installations/"):
            return self.github(self.path.split("/")[3])
        if self.path != "/token":
            return self.answer(404, {"error": "not_found"})
        form = {k: v[0] for k, v in urllib.parse.parse_qs(body, keep_blank_values=True).items()}
        grant = form.get("grant_type")
        if grant == "urn:ietf:params:oauth:grant-type:jwt-bearer":
            return self.jwt_bearer(form)
        if grant == "urn:ietf:params:oauth:grant-type:token-exchange":
            return self.token_exchange(form)
        if grant == "client_credentials":
            return self.client_credentials(form)
        self.refuse("unsupported_grant_type", f"grant_type {grant!r}")

    def verify(self, token, key, alg, audience, max_life):
        claims = jwt.decode(token, key, algorithms=[alg], audience=audience, options={"require": ["iss", "exp", "iat"]})
        if claims["exp"] - claims["iat"] > max_life:
            raise jwt.InvalidTokenError(f"lives {claims['exp'] - claims['iat']} s, more than {max_life}")
        return claims

    def jwt_bearer(self, form):
        assertion = form.get("assertion", "")
        try:
            iss = jwt.decode(assertion, options={"verify_signature": False})["iss"]
            key, alg, kid = TRUSTED[iss]
            header = jwt.get_unverified_header(assertion)
            if kid is not None and header.get("kid") != kid:
                raise jwt.InvalidTokenError(f"kid {header.get('kid')!r}, not {kid!r}")
            claims = self.verify(assertion, key, alg, self.token_url(), 3600)
        except Exception as e:
            return self.refuse("invalid_grant", f"assertion refused: {e}", grant="jwt_bearer")
        extra = {k: form[k] for k in form if k not in ("grant_type", "assertion")}
        self.issue(claims["iss"], grant="jwt_bearer", iss=claims["iss"], sub=claims["sub"], alg=header["alg"],
                   kid=header.get("kid"), scope=claims.get("scope"), claims=claims, form=extra)

    def client_assertion(self, form):
        """The client a client assertion proves, and the claims, or raises."""
        if form.get("client_assertion_type") != "urn:ietf:params:oauth:client-assertion-type:jwt-bearer":
            raise jwt.InvalidTokenError(f"client_assertion_type {form.get('client_assertion_type')!r}")
        assertion = form.get("client_assertion", "")
        unverified = jwt.decode(assertion, options={"verify_signature": False})
        if unverified.get("iss") == "https://cluster.local":
            # A projected service-account token: signed by the cluster, for this audience.
            claims = jwt.decode(assertion, cluster.public_key(), algorithms=["ES256"], audience="api://AzureADTokenExchange")
            if form.get("client_id") != "azure-client":
                raise jwt.InvalidTokenError(f"client_id {form.get('client_id')!r}")
            return "azure-client", claims
        key, alg, _ = TRUSTED[unverified["iss"]]
        claims = self.verify(assertion, key, alg, self.token_url(), 300)
        if claims["sub"] != claims["iss"]:
            raise jwt.InvalidTokenError("sub is not iss")
        if form.get("client_id", claims["iss"]) != claims["iss"]:
            raise jwt.InvalidTokenError("client_id is not the assertion's iss")
        with LOCK:
            if claims["jti"] in SEEN_JTI:
                raise jwt.InvalidTokenError("jti used before")
            SEEN_JTI.add(claims["jti"])
        return claims["iss"], claims

    def client_credentials(self, form):
        auth = self.headers.get("authorization", "")
        if auth.startswith("Basic "):
            user, _, secret = base64.b64decode(auth[6:]).decode().partition(":")
            if (user, secret) == ("disc-client", "disc-secret"):
                return self.issue(user, grant="client_credentials")
            return self.refuse("invalid_client", "wrong client secret", status=401)
        try:
            client, claims = self.client_assertion(form)
        except Exception as e:
            return self.refuse("invalid_client", f"client assertion refused: {e}", status=401, grant="client_credentials")
        self.issue(client, grant="client_credentials", client=client, claims=claims)

    def token_exchange(self, form):
        try:
            if form.get("subject_token_type") != SUBJECT_TOKEN_TYPE:
                raise ValueError(f"subject_token_type {form.get('subject_token_type')!r}")
            claims = jwt.decode(form.get("subject_token", ""), cluster.public_key(), algorithms=["ES256"], audience="sts.example")
        except Exception as e:
            return self.refuse("invalid_grant", f"subject token refused: {e}", grant="token_exchange")
        fields = {k: form.get(k) for k in ("audience", "resource", "requested_token_type", "scope", "client_id")}
        self.issue("sts", grant="token_exchange", subject=claims["sub"], n=claims.get("n"), form=fields)

    def github(self, installation):
        auth = self.headers.get("authorization", "")
        try:
            if not auth.startswith("Bearer "):
                raise jwt.InvalidTokenError("no Bearer app JWT")
            token = auth[7:]
            app = jwt.decode(token, options={"verify_signature": False})["iss"]
            claims = self.verify(token, APPS[str(app)], "RS256", None, 600)
            if claims["exp"] > time.time() + 600:
                raise jwt.InvalidTokenError("expires more than ten minutes ahead")
            if self.headers.get("accept") != "application/vnd.github+json":
                raise ValueError(f"accept {self.headers.get('accept')!r}")
        except Exception as e:
            self.record(path=self.path, ok=False, why=str(e))
            return self.answer(401, {"message": "A JSON web token could not be decoded"})
        if installation == "404":
            self.record(path=self.path, ok=False, why="no such installation")
            return self.answer(404, {"message": "Not Found"})
        with LOCK:
            COUNT[installation] = n = COUNT.get(installation, 0) + 1
        token = f"ghs_{installation}_{n}"
        expires = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + 3600))
        self.record(path=self.path, ok=True, token=token, app=claims["iss"], life=claims["exp"] - claims["iat"])
        self.answer(201, {"token": token, "expires_at": expires, "permissions": {"contents": "read"}})


server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
port = server.server_port
write("service_account.json", json.dumps({
    "type": "service_account",
    "project_id": "proj",
    "private_key_id": "google-kid-1",
    "private_key": pem(google, PKCS8).decode(),
    "client_email": "sa@proj.iam.gserviceaccount.com",
    "client_id": "1234567890",
    "token_uri": f"http://127.0.0.1:{port}/token",
}).encode())
write("projected.jwt", projected("system:serviceaccount:shop:api", "api://AzureADTokenExchange", 1).encode(), 0o644)
write("subject.jwt", projected("system:serviceaccount:shop:etl", "sts.example", 1).encode(), 0o644)
# For the test to rewrite the projected tokens: the next ones, ready to be renamed into place.
write("projected-2.jwt", projected("system:serviceaccount:shop:api", "api://AzureADTokenExchange", 2).encode(), 0o644)
write("subject-2.jwt", projected("system:serviceaccount:shop:etl", "sts.example", 2).encode(), 0o644)
print(port, flush=True)
server.serve_forever()

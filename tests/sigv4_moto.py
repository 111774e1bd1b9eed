"""moto (an AWS implementation we did not write) as STS and S3 for tests/sigv4.rs, with its IAM
authentication on: every S3 request must carry a SigV4 signature moto recomputes, from session
credentials its STS issued, for a role whose policy allows it.

    python3 tests/sigv4_moto.py

Creates the role `tokenproxy` (trusting web identities, allowed s3:*) and the bucket
`tokenproxy-test` while authentication is still off, then prints {"port": N, "role_arn": "..."}
as one line and serves on 127.0.0.1:N until killed.
"""

import json
import os
import sys
import logging
import threading

# The first SETUP_ACTIONS calls (made below) go unauthenticated; every later one is checked.
SETUP_ACTIONS = 3
os.environ["INITIAL_NO_AUTH_ACTION_COUNT"] = str(SETUP_ACTIONS)

import boto3  # noqa: E402
import moto.sts.responses as sts_responses  # noqa: E402
from moto.server import ThreadedMotoServer  # noqa: E402

# AWS takes AssumeRoleWithWebIdentity unsigned: the web identity token is the proof. moto's
# server would ask it for a signature once authentication is on, so that one action is let
# through as AWS lets it through; every other action stays checked.
_checked = sts_responses.TokenResponse._authenticate_and_authorize_normal_action


def _as_aws_does(self, resource="*"):
    if self._get_action() == "AssumeRoleWithWebIdentity":
        return None
    return _checked(self, resource)


sts_responses.TokenResponse._authenticate_and_authorize_normal_action = _as_aws_does

logging.getLogger("werkzeug").setLevel(logging.ERROR)
server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
server.start()
host, port = server.get_host_and_port()
setup = dict(
    endpoint_url=f"http://{host}:{port}",
    region_name="us-east-1",
    aws_access_key_id="setup",
    aws_secret_access_key="setup",
)
iam = boto3.client("iam", **setup)
trust = {
    "Version": "2012-10-17",
    "Statement": [{"Effect": "Allow", "Principal": {"Federated": "oidc"}, "Action": "sts:AssumeRoleWithWebIdentity"}],
}
role = iam.create_role(RoleName="tokenproxy", AssumeRolePolicyDocument=json.dumps(trust))["Role"]["Arn"]
allow_s3 = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}
iam.put_role_policy(RoleName="tokenproxy", PolicyName="s3", PolicyDocument=json.dumps(allow_s3))
boto3.client("s3", **setup).create_bucket(Bucket="tokenproxy-test")

print(json.dumps({"port": port, "role_arn": role}), flush=True)
threading.Event().wait()

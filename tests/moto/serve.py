"""A moto server (STS, IAM, ECR) for one test, with IAM enforcement on.

Usage: serve.py SPEC.json

Starts moto on 127.0.0.1 with a free port, creates the state that SPEC.json describes (with
enforcement still off, so setting up needs no credentials), then turns enforcement on and prints
one JSON line on stdout: the endpoint, the account, the region, the roles' ARNs, the users'
access keys and the repositories' URIs. It then serves until its stdin reaches EOF (the test
closes it, or the test process dies and the kernel closes it) or it gets SIGTERM, so that no
server outlives its test. tests/common/moto.rs is the Rust side and describes the spec format
and what moto enforces.
"""

import base64
import json
import os
import signal
import sys
import urllib.request

# The moto release whose internals this file relies on (as pinned in scripts/requirements-test.txt).
MOTO_VERSION = "5.2.1"
# moto's default account; a spec may name another.
DEFAULT_ACCOUNT = "123456789012"
DEFAULT_REGION = "us-east-1"
# The issuer of the tokens the EKS pod identity webhook projects (moto checks no token; see
# allow_web_identity for what this server checks).
OIDC_ISSUER = "https://oidc.eks.{region}.amazonaws.com/id/BOBTESTCLUSTER"
# The audience the webhook's projected tokens carry.
OIDC_CLIENT_ID = "sts.amazonaws.com"


def fail(message):
    print(f"serve.py: {message}", file=sys.stderr, flush=True)
    sys.exit(2)


def load_spec(path):
    with open(path, encoding="utf-8") as f:
        spec = json.load(f)
    account = spec.get("account", DEFAULT_ACCOUNT)
    if not (isinstance(account, str) and len(account) == 12 and account.isdigit()):
        fail(f"account must be 12 digits, got {account!r}")
    known = {"account", "region", "repositories", "roles", "users"}
    unknown = set(spec) - known
    if unknown:
        # A misspelt key would otherwise set up less than the test thinks.
        fail(f"unknown spec keys {sorted(unknown)}; known: {sorted(known)}")
    return spec, account


def policy(actions, resources):
    return json.dumps(
        {
            "Version": "2012-10-17",
            "Statement": [{"Effect": "Allow", "Action": actions, "Resource": resources}],
        }
    )


def trust_policy(trust, oidc_arn):
    if trust == "web-identity":
        # What eksctl writes for an IRSA role, without its `sub`/`aud` conditions (which neither
        # moto nor allow_web_identity evaluates).
        statement = {
            "Effect": "Allow",
            "Principal": {"Federated": oidc_arn},
            "Action": "sts:AssumeRoleWithWebIdentity",
        }
    elif trust == "account":
        # Real AWS reads `arn:aws:iam::<account>:root` as "any principal of the account whose own
        # policy allows sts:AssumeRole". moto compares the caller's ARN (an assumed role's session
        # ARN) with the principal as a string instead, so under that principal, or a role ARN, it
        # denies every caller (checked by hand with moto 5.2.1). `*` is the only principal under
        # which moto leaves the decision to the caller's identity policy, which is what the tests
        # exercise; so the statement is the wildcard.
        statement = {"Effect": "Allow", "Principal": {"AWS": "*"}, "Action": "sts:AssumeRole"}
    else:
        fail(f"trust must be 'web-identity' or 'account', got {trust!r}")
    return json.dumps({"Version": "2012-10-17", "Statement": [statement]})


def set_up(endpoint, spec, account):
    import boto3

    region = spec.get("region", DEFAULT_REGION)
    session = boto3.Session(
        # Enforcement is off while setting up: any key is accepted. MOTO_ACCOUNT_ID (set before
        # the server started) puts everything in the spec's account.
        aws_access_key_id="setup",
        aws_secret_access_key="setup",
        region_name=region,
    )
    iam = session.client("iam", endpoint_url=endpoint)
    ecr = session.client("ecr", endpoint_url=endpoint)

    oidc_url = OIDC_ISSUER.format(region=region)
    oidc_arn = iam.create_open_id_connect_provider(
        Url=oidc_url, ClientIDList=[OIDC_CLIENT_ID], ThumbprintList=["0" * 40]
    )["OpenIDConnectProviderArn"]

    roles = {}
    for role in spec.get("roles", []):
        name = role["name"]
        arn = iam.create_role(
            RoleName=name,
            AssumeRolePolicyDocument=trust_policy(role.get("trust", "account"), oidc_arn),
        )["Role"]["Arn"]
        if role.get("actions"):
            iam.put_role_policy(
                RoleName=name,
                PolicyName=f"{name}-inline",
                PolicyDocument=policy(role["actions"], role.get("resources", "*")),
            )
        roles[name] = arn

    users = {}
    for user in spec.get("users", []):
        name = user["name"]
        arn = iam.create_user(UserName=name)["User"]["Arn"]
        if user.get("actions"):
            iam.put_user_policy(
                UserName=name,
                PolicyName=f"{name}-inline",
                PolicyDocument=policy(user["actions"], user.get("resources", "*")),
            )
        key = iam.create_access_key(UserName=name)["AccessKey"]
        users[name] = {
            "arn": arn,
            "access_key_id": key["AccessKeyId"],
            "secret_access_key": key["SecretAccessKey"],
        }

    repositories = {}
    for name in spec.get("repositories", []):
        repositories[name] = ecr.create_repository(repositoryName=name)["repository"][
            "repositoryUri"
        ]

    return {
        "account": account,
        "region": region,
        "oidc_provider": oidc_arn,
        "oidc_issuer": oidc_url,
        "oidc_audience": OIDC_CLIENT_ID,
        "roles": roles,
        "users": users,
        "repositories": repositories,
    }


def enforce(endpoint):
    # moto checks IAM once it has served INITIAL_NO_AUTH_ACTION_COUNT requests since the last
    # reset (the default, infinity, means never); this sets the count to 0 and resets the
    # counter, so every request from now on is authenticated and authorized.
    # A form content type (urllib's default) would make the server parse the body as a form and
    # see no data, so the count goes as an opaque body.
    request = urllib.request.Request(
        f"{endpoint}/moto-api/reset-auth",
        data=b"0",
        method="POST",
        headers={"Content-Type": "application/octet-stream"},
    )
    with urllib.request.urlopen(request) as response:
        body = json.load(response)
    if body.get("status") != "ok":
        fail(f"reset-auth answered {body}")


def b64url_json(part):
    return json.loads(base64.urlsafe_b64decode(part + "=" * (-len(part) % 4)))


def allow_web_identity(oidc_url, oidc_arn, client_id):
    """Lets sts:AssumeRoleWithWebIdentity through enforcement, with the checks moto lacks.

    The call is unsigned (the token is the credential), but moto's enforcement reads the
    Authorization header of every request and answers 500 without one. Past that, moto checks
    nothing: not the token, not the role's trust policy, not even that the role exists. So the
    unsigned call is let through here after what STS itself would check, short of the token's
    signature and expiry: the token is a JWT whose `iss` is the cluster's OIDC provider and whose
    `aud` holds its client id (else InvalidIdentityToken), and the role exists and trusts that
    provider for sts:AssumeRoleWithWebIdentity (else AccessDenied). Conditions on `sub` are not
    evaluated.
    """
    from moto.core.exceptions import _RESTError
    from moto.iam.exceptions import NotFoundException
    from moto.iam.models import iam_backends
    from moto.sts.responses import TokenResponse

    class StsError(_RESTError):
        def __init__(self, status, code, message):
            super().__init__(code, message)
            self.code = status

    original = TokenResponse._authenticate_and_authorize_normal_action

    def check_web_identity(self):
        token = (self.querystring.get("WebIdentityToken") or [""])[0]
        role_arn = (self.querystring.get("RoleArn") or [""])[0]
        try:
            claims = b64url_json(token.split(".")[1])
        except (IndexError, ValueError):
            raise StsError(400, "InvalidIdentityToken", "The token is not a JWT") from None
        if claims.get("iss") != oidc_url:
            raise StsError(
                400,
                "InvalidIdentityToken",
                f"No OpenIDConnect provider found in your account for {claims.get('iss')}",
            )
        audiences = claims.get("aud")
        audiences = audiences if isinstance(audiences, list) else [audiences]
        if client_id not in audiences:
            raise StsError(400, "InvalidIdentityToken", "Incorrect token audience")
        denied = StsError(
            403, "AccessDenied", "Not authorized to perform sts:AssumeRoleWithWebIdentity"
        )
        iam = iam_backends[self.current_account][self.partition]
        try:
            role = iam.get_role_by_arn(role_arn)
        except NotFoundException:
            raise denied from None
        statements = json.loads(role.assume_role_policy_document)["Statement"]
        statements = statements if isinstance(statements, list) else [statements]
        for st in statements:
            actions = st.get("Action")
            actions = actions if isinstance(actions, list) else [actions]
            if (
                st.get("Effect") == "Allow"
                and "sts:AssumeRoleWithWebIdentity" in actions
                and (st.get("Principal") or {}).get("Federated") == oidc_arn
            ):
                return
        raise denied

    def authorize(self, resource="*"):
        unsigned = "Authorization" not in self.headers
        if self._get_action() == "AssumeRoleWithWebIdentity" and unsigned:
            check_web_identity(self)
            return
        original(self, resource)

    TokenResponse._authenticate_and_authorize_normal_action = authorize


def main():
    if len(sys.argv) != 2:
        fail("usage: serve.py SPEC.json")
    spec, account = load_spec(sys.argv[1])
    # Every request is answered in this account, whatever key signs it (moto reads this per
    # request); it must be set before any moto code runs.
    os.environ["MOTO_ACCOUNT_ID"] = account

    import moto
    from moto.server import ThreadedMotoServer

    # allow_web_identity and the reset-auth call lean on moto's internals; another version may
    # change them silently. The pin lives in scripts/requirements-test.txt.
    if moto.__version__ != MOTO_VERSION:
        fail(
            f"moto {moto.__version__} is installed, these tests need {MOTO_VERSION}: "
            "run `python3 -m venv .venv && .venv/bin/pip install -r scripts/requirements-test.txt`"
        )

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)

    def stop(*_):
        # The server thread is a daemon: exiting the process ends it; nothing is worth flushing.
        os._exit(0)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    state = set_up(endpoint, spec, account)
    allow_web_identity(state["oidc_issuer"], state["oidc_provider"], OIDC_CLIENT_ID)
    enforce(endpoint)
    print(json.dumps({"endpoint": endpoint, **state}), flush=True)
    # Serve until the test closes our stdin (or dies, which closes it too).
    while sys.stdin.buffer.read(65536):
        pass
    stop()


if __name__ == "__main__":
    main()

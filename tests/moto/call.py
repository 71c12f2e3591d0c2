"""One AWS API call with boto3, for tests that have no AWS SDK in Rust.

Usage: call.py [--assume ROLE_ARN]... SERVICE OPERATION [PARAMS_JSON]

Credentials, endpoint and region come from the environment only, as they would in a pod
(tests/common/moto.rs builds that environment: IRSA's web identity variables or static keys).
Each --assume first calls sts:AssumeRole on ROLE_ARN with the credentials so far and continues
with the role's, as the controller does before it reads a registry as the builder role.

Prints one JSON line and exits 0 whether AWS said yes or no, so the test asserts on the answer:
  {"result": <the operation's response, without ResponseMetadata>}
  {"error": {"code": "AccessDenied", "http_status": 403, "message": "...", "body_code": null,
             "step": "..."}}
`code` is the error code as boto3 parsed it. moto answers a denial by IAM enforcement with an
XML ErrorResponse even on JSON-protocol services (ECR), which boto3 cannot parse: it reports the
HTTP status as the code and the whole body as the message. `body_code` is then the <Code> of that
XML body (else null). `step` names the call that failed: an --assume, or the operation (which is
also where credentials from a web identity token are fetched, on first use). Anything else (bad
usage, no endpoint) exits non-zero with a message on stderr.
"""

import json
import os
import sys
import xml.etree.ElementTree as ET

import boto3
import botocore.exceptions


def main():
    args = sys.argv[1:]
    assumes = []
    while args[:1] == ["--assume"] and len(args) >= 2:
        assumes.append(args[1])
        args = args[2:]
    if len(args) not in (2, 3):
        print(__doc__, file=sys.stderr)
        sys.exit(2)
    service, operation = args[0], args[1]
    params = json.loads(args[2]) if len(args) == 3 else {}
    if not os.environ.get("AWS_ENDPOINT_URL"):
        # Without it boto3 would talk to real AWS.
        print("call.py: AWS_ENDPOINT_URL is not set", file=sys.stderr)
        sys.exit(2)

    session = boto3.Session()
    step = None
    try:
        for n, role_arn in enumerate(assumes):
            step = f"sts:AssumeRole {role_arn}"
            creds = session.client("sts").assume_role(
                RoleArn=role_arn, RoleSessionName=f"call-{n}"
            )["Credentials"]
            session = boto3.Session(
                aws_access_key_id=creds["AccessKeyId"],
                aws_secret_access_key=creds["SecretAccessKey"],
                aws_session_token=creds["SessionToken"],
                region_name=session.region_name,
            )
        step = f"{service}:{operation}"
        client = session.client(service)
        result = getattr(client, operation)(**params)
    except botocore.exceptions.ClientError as e:
        error = e.response.get("Error", {})
        body_code = None
        if (error.get("Message") or "").startswith("<?xml"):
            body_code = ET.fromstring(error["Message"]).findtext("./Errors/Error/Code")
        print(
            json.dumps(
                {
                    "error": {
                        "code": error.get("Code"),
                        "http_status": e.response.get("ResponseMetadata", {}).get(
                            "HTTPStatusCode"
                        ),
                        "message": error.get("Message"),
                        "body_code": body_code,
                        "step": step,
                    }
                }
            )
        )
        return
    result.pop("ResponseMetadata", None)
    print(json.dumps({"result": result}, default=str))


if __name__ == "__main__":
    main()

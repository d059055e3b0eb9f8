"""Create the S3 bucket of the stack if it is missing (the compose one-shot job).

Reads S3_BUCKET, AWS_ENDPOINT_URL (unset: AWS itself) and the usual AWS_* credentials.
Idempotent; waits for the endpoint while it starts; exits non-zero with the reason
(never a credential) when the bucket cannot be made or used.
"""

from __future__ import annotations

import os
import sys
import time

import boto3
from botocore.exceptions import BotoCoreError, ClientError, EndpointConnectionError

WAIT_S = float(os.environ.get("CREATE_BUCKET_WAIT_S", "60"))


def create_bucket(bucket: str) -> str:
    s3 = boto3.client("s3", endpoint_url=os.environ.get("AWS_ENDPOINT_URL") or None)
    deadline = time.monotonic() + WAIT_S
    while True:
        try:
            s3.head_bucket(Bucket=bucket)
            return "exists"
        except EndpointConnectionError:
            if time.monotonic() > deadline:
                raise
            time.sleep(2)
        except ClientError as err:
            if err.response.get("Error", {}).get("Code") not in ("404", "NoSuchBucket", "NotFound"):
                raise
            region = os.environ.get("AWS_DEFAULT_REGION", "us-east-1")
            extra = {}
            if region != "us-east-1" and not os.environ.get("AWS_ENDPOINT_URL"):
                extra["CreateBucketConfiguration"] = {"LocationConstraint": region}
            s3.create_bucket(Bucket=bucket, **extra)
            return "created"


def main() -> int:
    bucket = os.environ.get("S3_BUCKET", "")
    if not bucket:
        print("create-bucket: S3_BUCKET is not set (see .env.example)", file=sys.stderr)
        return 2
    endpoint = os.environ.get("AWS_ENDPOINT_URL") or "AWS S3"
    try:
        outcome = create_bucket(bucket)
    except (BotoCoreError, ClientError) as err:
        print(f"create-bucket: bucket {bucket!r} at {endpoint}: {err}", file=sys.stderr)
        return 1
    print(f"create-bucket: bucket {bucket!r} at {endpoint}: {outcome}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

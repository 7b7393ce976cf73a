#!/usr/bin/env python3
"""Make moto (server mode, at argv[1]) check signatures: create an IAM user allowed s3:*,
give it an access key, then switch IAM authentication on (moto-api/reset-auth 0). Prints
"ACCESS_KEY_ID SECRET_KEY"."""
import json
import os
import ssl
import sys
import urllib.request

import boto3

url = sys.argv[1]
iam = boto3.client("iam", endpoint_url=url, region_name="us-east-1",
                   aws_access_key_id="setup", aws_secret_access_key="setup")
iam.create_user(UserName="importer")
iam.put_user_policy(UserName="importer", PolicyName="s3", PolicyDocument=json.dumps({
    "Version": "2012-10-17",
    "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}],
}))
key = iam.create_access_key(UserName="importer")["AccessKey"]
req = urllib.request.Request(url + "/moto-api/reset-auth", data=b"0", method="POST",
                             headers={"Content-Type": "text/plain"})
ctx = ssl.create_default_context(cafile=os.environ.get("AWS_CA_BUNDLE"))
with urllib.request.urlopen(req, context=ctx) as r:
    assert r.status == 200, r.status
# Authentication is on: an unknown key must now be refused.
s3 = boto3.client("s3", endpoint_url=url, region_name="us-east-1",
                  aws_access_key_id="nobody", aws_secret_access_key="nothing")
try:
    s3.list_buckets()
except Exception:
    pass
else:
    sys.exit("moto accepted an unknown key after reset-auth: signatures are not checked")
print(key["AccessKeyId"], key["SecretAccessKey"])

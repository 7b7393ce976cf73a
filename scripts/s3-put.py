#!/usr/bin/env python3
"""Upload a file to S3 (moto) with boto3: s3-put.py ENDPOINT BUCKET KEY FILE [ACL], keys from
AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY. Creates the bucket when missing; ACL is a canned
ACL such as public-read."""
import sys

import boto3

url, bucket, key, path = sys.argv[1:5]
s3 = boto3.client("s3", endpoint_url=url, region_name="us-east-1")
try:
    s3.head_bucket(Bucket=bucket)
except Exception:
    s3.create_bucket(Bucket=bucket)
extra = {"ACL": sys.argv[5]} if len(sys.argv) > 5 else None
s3.upload_file(path, bucket, key, ExtraArgs=extra)

"""Create the example bucket and upload the quickstart's data objects to it.

Usage: python3 upload.py ENDPOINT   (credentials from S3_ACCESS_KEY_ID and
S3_SECRET_ACCESS_KEY; boto3 comes with moto).
"""
import os
import pathlib
import sys

import boto3

endpoint = sys.argv[1]
s3 = boto3.client(
    "s3",
    endpoint_url=endpoint,
    region_name="us-east-1",
    aws_access_key_id=os.environ["S3_ACCESS_KEY_ID"],
    aws_secret_access_key=os.environ["S3_SECRET_ACCESS_KEY"],
)
bucket = "sandpipe-example"
if bucket not in [b["Name"] for b in s3.list_buckets().get("Buckets", [])]:
    s3.create_bucket(Bucket=bucket)
data = pathlib.Path(__file__).resolve().parent.parent / "quickstart" / "data"
for path in sorted(data.rglob("*")):
    if path.is_file():
        key = path.relative_to(data).as_posix()
        s3.upload_file(str(path), bucket, key)
        print(f"uploaded s3://{bucket}/{key}")

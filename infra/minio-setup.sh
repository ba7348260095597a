#!/bin/sh
# Run once by docker-compose.yml (service minio-setup, the only holder of MinIO's root keys):
# the buckets, one MinIO user per service, and each user's policy: its own bucket, nothing
# else. `lensflow serve` gets no MinIO user (its models come through MLflow).
set -eu
mc alias set lensflow http://minio:9000 "$MINIO_ROOT_USER" "$MINIO_ROOT_PASSWORD"
mc mb --ignore-existing "lensflow/$MLFLOW_BUCKET" "lensflow/$DVC_BUCKET"

bucket_policy() { # NAME BUCKET: list, read, write and delete in BUCKET only
  cat >"/tmp/$1.json" <<JSON
{"Version": "2012-10-17", "Statement": [
  {"Effect": "Allow", "Action": ["s3:GetBucketLocation", "s3:ListBucket",
     "s3:ListBucketMultipartUploads"], "Resource": ["arn:aws:s3:::$2"]},
  {"Effect": "Allow", "Action": ["s3:GetObject", "s3:PutObject", "s3:DeleteObject",
     "s3:AbortMultipartUpload", "s3:ListMultipartUploadParts"], "Resource": ["arn:aws:s3:::$2/*"]}
]}
JSON
  mc admin policy create lensflow "$1" "/tmp/$1.json"
}

bucket_policy lensflow-mlflow "$MLFLOW_BUCKET" # the MLflow server's artifacts
bucket_policy lensflow-dvc "$DVC_BUCKET"       # the DVC remote: worker and team machines
mc admin user add lensflow "$MINIO_MLFLOW_USER" "$MINIO_MLFLOW_PASSWORD"
mc admin user add lensflow "$MINIO_DVC_USER" "$MINIO_DVC_PASSWORD"
# attach fails when the policy is attached already (a second run of this job)
mc admin policy attach lensflow lensflow-mlflow --user "$MINIO_MLFLOW_USER" || true
mc admin policy attach lensflow lensflow-dvc --user "$MINIO_DVC_USER" || true

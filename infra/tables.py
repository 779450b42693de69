"""The DynamoDB tables of the local stack, created from infra/tables.json — the file
tests/infra/test_template.py checks against template.yaml, so local and deployed
tables have the same keys, indexes and TTL."""

from __future__ import annotations

import json
from pathlib import Path

from . import INFRA
from .aws_env import DEFAULT_REGION, local_aws

TABLES_JSON = INFRA / "tables.json"


def load_tables(path: Path | str = TABLES_JSON) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return json.load(f)["tables"]


def create_tables(endpoint: str, region: str = DEFAULT_REGION, tables_json: Path | str = TABLES_JSON) -> list[str]:
    """Create the tables of tables.json at a DynamoDB endpoint (idempotent). Returns names."""
    with local_aws(region):
        import boto3

        ddb = boto3.client("dynamodb", endpoint_url=endpoint, region_name=region)
        existing = set(ddb.list_tables().get("TableNames", []))
        names = []
        for t in load_tables(tables_json):
            names.append(t["local_name"])
            if t["local_name"] not in existing:
                _create(ddb, t)
        return names


def create_bucket(endpoint: str, name: str, region: str = DEFAULT_REGION) -> None:
    """Create the outputs bucket at an S3 endpoint (idempotent); moto stores objects in memory."""
    with local_aws(region):
        import boto3

        s3 = boto3.client("s3", endpoint_url=endpoint, region_name=region)
        if name not in {b["Name"] for b in s3.list_buckets().get("Buckets", [])}:
            s3.create_bucket(Bucket=name)


def create_schedule_group(endpoint: str, name: str, region: str = DEFAULT_REGION) -> None:
    """Create an EventBridge Scheduler schedule group (idempotent)."""
    with local_aws(region):
        import boto3

        scheduler = boto3.client("scheduler", endpoint_url=endpoint, region_name=region)
        if name not in {g["Name"] for g in scheduler.list_schedule_groups().get("ScheduleGroups", [])}:
            scheduler.create_schedule_group(Name=name)


def _create(ddb, t: dict) -> None:
    name = t["local_name"]
    kwargs = dict(
        TableName=name,
        AttributeDefinitions=[{"AttributeName": a, "AttributeType": ty} for a, ty in t["attributes"].items()],
        KeySchema=_key_schema(t["key"]["hash"], t["key"].get("range")),
        BillingMode="PAY_PER_REQUEST",
    )
    gsis = [{"IndexName": g["name"], "KeySchema": _key_schema(g["hash"], g.get("range")),
             "Projection": {"ProjectionType": g.get("projection", "ALL")}}
            for g in t.get("gsis") or []]
    if gsis:
        kwargs["GlobalSecondaryIndexes"] = gsis
    ddb.create_table(**kwargs)
    if t.get("ttl"):
        ddb.update_time_to_live(TableName=name, TimeToLiveSpecification={"Enabled": True, "AttributeName": t["ttl"]})


def _key_schema(hash_key: str, range_key: str | None) -> list[dict]:
    key = [{"AttributeName": hash_key, "KeyType": "HASH"}]
    if range_key:
        key.append({"AttributeName": range_key, "KeyType": "RANGE"})
    return key

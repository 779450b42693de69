"""Tests of infra/tables.py: the local tables are what tables.json says (which
test_template.py checks against template.yaml)."""

from __future__ import annotations

import pytest

from infra.tables import create_tables, load_tables


@pytest.fixture
def moto_endpoint():
    from moto.server import ThreadedMotoServer

    srv = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    srv.start()
    host, port = srv.get_host_and_port()
    yield f"http://{host}:{port}"
    srv.stop()


def test_tables_are_created_as_tables_json_says(moto_endpoint):
    import boto3

    spec = load_tables()
    names = create_tables(moto_endpoint, "us-east-1")
    assert names == [t["local_name"] for t in spec]
    assert create_tables(moto_endpoint, "us-east-1") == names  # idempotent

    ddb = boto3.client("dynamodb", endpoint_url=moto_endpoint, region_name="us-east-1",
                       aws_access_key_id="test", aws_secret_access_key="test")
    assert sorted(ddb.list_tables()["TableNames"]) == sorted(names)
    for t in spec:
        d = ddb.describe_table(TableName=t["local_name"])["Table"]
        assert {a["AttributeName"]: a["AttributeType"] for a in d["AttributeDefinitions"]} == t["attributes"]
        key = {k["KeyType"]: k["AttributeName"] for k in d["KeySchema"]}
        assert key == {"HASH": t["key"]["hash"], "RANGE": t["key"]["range"]}
        assert d["BillingModeSummary"]["BillingMode"] == "PAY_PER_REQUEST"
        gsis = {g["IndexName"]: g for g in d.get("GlobalSecondaryIndexes", [])}
        assert set(gsis) == {g["name"] for g in t["gsis"]}
        for g in t["gsis"]:
            gk = {k["KeyType"]: k["AttributeName"] for k in gsis[g["name"]]["KeySchema"]}
            assert gk == {"HASH": g["hash"], "RANGE": g["range"]}
            assert gsis[g["name"]]["Projection"]["ProjectionType"] == g.get("projection", "ALL")
        ttl = ddb.describe_time_to_live(TableName=t["local_name"])["TimeToLiveDescription"]
        if t["ttl"]:
            assert ttl["TimeToLiveStatus"] == "ENABLED" and ttl["AttributeName"] == t["ttl"]
        else:
            assert ttl["TimeToLiveStatus"] == "DISABLED"

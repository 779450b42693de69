"""Proves the SAM template (template.yaml) deploys what the rest of chainrun expects.

* The DynamoDB tables match infra/tables.json (the definitions the local stack is built
  from), so code tested locally meets the same keys, indexes and TTL when deployed.
* The functions are wired as DESIGN.md §6 says: Rust on provided.al2023 built by cargo
  lambda, arm64 by default, JWT-authorized HTTP API, least-privilege IAM, and a runner
  whose asynchronous invokes retry a bounded number of times and then land in an SQS queue.
* `sam validate --lint` and `cfn-lint` both pass (infra/check_template.sh).

Run: .venv/bin/python -m pytest tests/infra/test_template.py -q
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tomllib
from typing import Any

import pytest
import yaml

from infra import INFRA, ROOT
from infra.tables import TABLES_JSON

TEMPLATE = ROOT / "template.yaml"
SAMCONFIG = ROOT / "samconfig.toml"
CHECK_SCRIPT = INFRA / "check_template.sh"
SAM_PYTHON = ROOT / ".venv-sam" / "bin" / "python"

DEFAULT_MODEL_IDS = ["amazon.nova-micro-v1:0", "amazon.nova-lite-v1:0"]
ACCOUNT = "123456789012"
REGION = "us-east-1"
STACK = "chainrun"
# The two pages a browser opens by following a link (so without a token): GET only.
PAGES = {("GET", "/runs/{id}/view"), ("GET", "/analytics/view")}
# What describes the API (its OpenAPI document, the workflow language's schema) is read by
# tools before they hold a token: GET only, no authorizer.
DOCUMENTS = {("GET", "/openapi.json"), ("GET", "/schemas/workflow.json")}
OPEN = PAGES | DOCUMENTS


# --------------------------------------------------------------------------- loading


class _CfnLoader(yaml.SafeLoader):
    """SafeLoader that turns CloudFormation short-form tags into their long form."""


def _construct_cfn_tag(loader: yaml.Loader, tag_suffix: str, node: yaml.Node) -> Any:
    if isinstance(node, yaml.ScalarNode):
        value: Any = loader.construct_scalar(node)
    elif isinstance(node, yaml.SequenceNode):
        value = loader.construct_sequence(node, deep=True)
    else:
        value = loader.construct_mapping(node, deep=True)
    if tag_suffix == "Ref":
        return {"Ref": value}
    if tag_suffix == "GetAtt" and isinstance(value, str):
        value = value.split(".", 1)
    if tag_suffix == "Condition":
        return {"Condition": value}
    return {f"Fn::{tag_suffix}": value}


_CfnLoader.add_multi_constructor("!", _construct_cfn_tag)


def load_template() -> dict[str, Any]:
    return yaml.load(TEMPLATE.read_text(), Loader=_CfnLoader)  # noqa: S506 - SafeLoader subclass


@pytest.fixture(scope="module")
def template() -> dict[str, Any]:
    return load_template()


@pytest.fixture(scope="module")
def resources(template: dict[str, Any]) -> dict[str, Any]:
    return template["Resources"]


TABLES: list[dict[str, Any]] = json.loads(TABLES_JSON.read_text())["tables"]


# --------------------------------------------------------------------------- helpers


class Resolver:
    """Evaluates the intrinsic functions the template uses, for given parameter values.

    Resources resolve to readable placeholders: `Ref X` -> "<X>", `GetAtt X.Arn` -> "<X.Arn>",
    except where a resource's physical name is fixed in the template (FunctionName), in
    which case `Ref` gives that name.
    """

    def __init__(self, template: dict[str, Any], partition: str = "aws", **params: Any):
        self.template = template
        self.values: dict[str, Any] = {
            "AWS::Partition": partition,
            "AWS::Region": REGION,
            "AWS::AccountId": ACCOUNT,
            "AWS::StackName": STACK,
            "AWS::URLSuffix": "amazonaws.com",
        }
        for name, spec in template.get("Parameters", {}).items():
            value = params.get(name, spec.get("Default"))
            if spec["Type"] == "CommaDelimitedList" and isinstance(value, str):
                value = value.split(",")
            self.values[name] = value

    def condition(self, name: str) -> bool:
        return bool(self.resolve(self.template["Conditions"][name]))

    def resolve(self, node: Any) -> Any:
        if isinstance(node, list):
            return [self.resolve(item) for item in node]
        if not isinstance(node, dict):
            return node
        if len(node) != 1:
            return {k: self.resolve(v) for k, v in node.items()}
        (key, arg), = node.items()
        if key == "Ref":
            return self._ref(arg)
        if key == "Fn::GetAtt":
            return f"<{arg[0]}.{arg[1]}>"
        if key == "Fn::Sub":
            text, variables = (arg, {}) if isinstance(arg, str) else arg
            variables = {k: self.resolve(v) for k, v in variables.items()}

            def substitute(match: re.Match[str]) -> str:
                name = match.group(1)
                if name in variables:
                    return str(variables[name])
                if "." in name and not name.startswith("AWS::"):
                    res, attr = name.split(".", 1)
                    return f"<{res}.{attr}>"
                return str(self._ref(name))

            return re.sub(r"\$\{([^!}][^}]*)\}", substitute, text)
        if key == "Fn::Join":
            delimiter, items = arg
            assert isinstance(delimiter, str), "Fn::Join delimiters must be literal strings"
            items = self.resolve(items)
            return delimiter.join(str(i) for i in items)
        if key == "Fn::Split":
            delimiter, text = arg
            return self.resolve(text).split(delimiter)
        if key == "Fn::Select":
            index, items = arg
            return self.resolve(items)[int(self.resolve(index))]
        if key == "Fn::If":
            name, when_true, when_false = arg
            return self.resolve(when_true if self.condition(name) else when_false)
        if key == "Fn::Equals":
            left, right = self.resolve(arg)
            return left == right
        if key == "Fn::Not":
            (value,) = self.resolve(arg)
            return not value
        if key == "Condition":
            return self.condition(arg)
        return {key: self.resolve(arg)}

    def _ref(self, name: str) -> Any:
        if name == "AWS::NoValue":
            return {"Ref": name}  # the property is left out
        if name in self.values:
            return self.values[name]
        resource = self.template["Resources"].get(name)
        assert resource is not None, f"Ref to unknown name {name!r}"
        fixed_name = resource.get("Properties", {}).get("FunctionName")
        if fixed_name is not None:
            return self.resolve(fixed_name)
        return f"<{name}>"


def functions(resources: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {k: v for k, v in resources.items() if v["Type"] == "AWS::Serverless::Function"}


def effective_function_props(template: dict[str, Any], logical_id: str) -> dict[str, Any]:
    """Function properties with Globals.Function merged in the way SAM merges them."""

    def merge(global_value: Any, local_value: Any) -> Any:
        if isinstance(global_value, dict) and isinstance(local_value, dict):
            if any(k == "Ref" or k.startswith("Fn::") for k in (*global_value, *local_value)):
                return local_value
            merged = dict(global_value)
            for k, v in local_value.items():
                merged[k] = merge(merged[k], v) if k in merged else v
            return merged
        if isinstance(global_value, list) and isinstance(local_value, list):
            return global_value + local_value
        return local_value

    globals_ = template.get("Globals", {}).get("Function", {})
    return merge(globals_, template["Resources"][logical_id]["Properties"])


def as_list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else [value]


def inline_statements(props: dict[str, Any]) -> list[dict[str, Any]]:
    statements = []
    for policy in props.get("Policies", []):
        if isinstance(policy, dict) and "Statement" in policy:
            statements.extend(as_list(policy["Statement"]))
    return statements


def policy_templates(props: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    out = []
    for policy in props.get("Policies", []):
        if isinstance(policy, dict) and "Statement" not in policy:
            ((name, args),) = policy.items()
            out.append((name, args))
    return out


def grants_action(statement: dict[str, Any], action: str) -> bool:
    service = action.split(":")[0]
    return any(a in (action, f"{service}:*", "*") for a in as_list(statement.get("Action", [])))


def find_gsi(table: dict[str, Any], name: str) -> dict[str, Any]:
    for gsi in table["Properties"].get("GlobalSecondaryIndexes", []):
        if gsi["IndexName"] == name:
            return gsi
    raise AssertionError(f"GSI {name!r} missing")


# --------------------------------------------------------------------------- tables


@pytest.mark.parametrize("spec", TABLES, ids=[t["logical_id"] for t in TABLES])
def test_table_declares_same_attributes_keys_and_indexes_as_tables_json(resources, spec):
    table = resources.get(spec["logical_id"])
    assert table is not None, f"{spec['logical_id']} is not declared in template.yaml"
    assert table["Type"] == "AWS::DynamoDB::Table"
    props = table["Properties"]

    definitions = props["AttributeDefinitions"]
    declared = {d["AttributeName"]: d["AttributeType"] for d in definitions}
    assert len(declared) == len(definitions), "an attribute is defined twice"
    assert declared == spec["attributes"]

    assert props["KeySchema"] == [
        {"AttributeName": spec["key"]["hash"], "KeyType": "HASH"},
        *([{"AttributeName": spec["key"]["range"], "KeyType": "RANGE"}] if spec["key"].get("range") else []),
    ]

    gsis = props.get("GlobalSecondaryIndexes", [])
    assert sorted(g["IndexName"] for g in gsis) == sorted(g["name"] for g in spec["gsis"])
    for gsi_spec in spec["gsis"]:
        gsi = find_gsi(table, gsi_spec["name"])
        assert gsi["KeySchema"] == [
            {"AttributeName": gsi_spec["hash"], "KeyType": "HASH"},
            *([{"AttributeName": gsi_spec["range"], "KeyType": "RANGE"}] if gsi_spec.get("range") else []),
        ]
        assert gsi["Projection"] == {"ProjectionType": gsi_spec["projection"]}
        assert "ProvisionedThroughput" not in gsi


@pytest.mark.parametrize("spec", TABLES, ids=[t["logical_id"] for t in TABLES])
def test_table_ttl_matches_tables_json(resources, spec):
    ttl = resources[spec["logical_id"]]["Properties"].get("TimeToLiveSpecification")
    if spec["ttl"] is None:
        assert ttl is None or ttl.get("Enabled") is False, "TTL enabled on a table without ttl in tables.json"
    else:
        assert ttl == {"AttributeName": spec["ttl"], "Enabled": True}


@pytest.mark.parametrize("spec", TABLES, ids=[t["logical_id"] for t in TABLES])
def test_table_is_on_demand_with_point_in_time_recovery_and_encryption(resources, spec):
    props = resources[spec["logical_id"]]["Properties"]
    assert props["BillingMode"] == "PAY_PER_REQUEST"
    assert "ProvisionedThroughput" not in props
    assert props["PointInTimeRecoverySpecification"] == {"PointInTimeRecoveryEnabled": True}
    assert props["SSESpecification"]["SSEEnabled"] is True
    assert "TableName" not in props, "table names are left to CloudFormation and passed by Ref"


def test_template_declares_no_tables_beyond_tables_json(resources):
    declared = {k for k, v in resources.items() if v["Type"] in ("AWS::DynamoDB::Table", "AWS::Serverless::SimpleTable")}
    assert declared == {t["logical_id"] for t in TABLES}


FUNCTIONS = {
    "ApiFunction": "chainrun-api",
    "RunnerFunction": "chainrun-runner",
    "SweeperFunction": "chainrun-sweeper",
    "DeadLetterFunction": "chainrun-dead-letter",
}


@pytest.mark.parametrize("function", list(FUNCTIONS))
@pytest.mark.parametrize("spec", TABLES, ids=[t["logical_id"] for t in TABLES])
def test_function_gets_each_table_name_in_its_env_var(template, function, spec):
    env = effective_function_props(template, function)["Environment"]["Variables"]
    assert env[spec["env"]] == {"Ref": spec["logical_id"]}


# --------------------------------------------------------------------------- functions


@pytest.mark.parametrize(("function", "binary"), list(FUNCTIONS.items()))
def test_function_is_rust_on_provided_al2023_built_by_cargo_lambda_from_its_binary(template, resources, function, binary):
    resource = resources[function]
    props = effective_function_props(template, function)
    assert props["Runtime"] == "provided.al2023"
    assert props["Handler"] == "bootstrap"
    assert props["CodeUri"] == "."
    assert resource["Metadata"] == {"BuildMethod": "rust-cargolambda", "BuildProperties": {"Binary": binary}}


def test_only_the_api_runner_and_recovery_functions_are_declared(resources):
    assert set(functions(resources)) == set(FUNCTIONS)


def test_each_bin_target_of_the_workspace_is_a_declared_function():
    # cargo lambda watch serves every bin target as a function: the template must declare
    # each, and nothing else may be a bin (tools live in examples).
    out = subprocess.run(["cargo", "metadata", "--no-deps", "--format-version", "1", "--offline"], cwd=ROOT, capture_output=True, text=True, check=True)
    bins = {t["name"] for p in json.loads(out.stdout)["packages"] for t in p["targets"] if "bin" in t["kind"]}
    assert bins == set(FUNCTIONS.values())


def test_the_sweeper_runs_every_minute_without_retries_and_reads_only_the_runs_table(template):
    props = effective_function_props(template, "SweeperFunction")
    (event,) = props["Events"].values()
    assert event["Type"] == "ScheduleV2"
    assert event["Properties"]["ScheduleExpression"] == "rate(1 minute)"
    assert json.loads(event["Properties"]["Input"]) == {"source": "chainrun.schedule", "action": "sweep"}
    assert event["Properties"]["RetryPolicy"]["MaximumRetryAttempts"] == 0
    assert props["EventInvokeConfig"]["MaximumRetryAttempts"] == 0
    assert dynamodb_grants(props) == {"RunsTable": {"DynamoDBReadPolicy"}}
    assert props["Environment"]["Variables"]["CHAINRUN_RUNNER_FUNCTION"] == {"Ref": "RunnerFunction"}


def test_the_runs_table_has_a_sparse_keys_only_index_of_due_runs(resources):
    (index,) = [g for g in resources["RunsTable"]["Properties"]["GlobalSecondaryIndexes"] if g["IndexName"] == "by-sweep"]
    assert [k["AttributeName"] for k in index["KeySchema"]] == ["sweep_shard", "sweep_at"]
    assert index["Projection"] == {"ProjectionType": "KEYS_ONLY"}


def test_the_dead_letter_consumer_reads_the_runners_failure_queue_reporting_item_failures(template, resources):
    props = effective_function_props(template, "DeadLetterFunction")
    (event,) = props["Events"].values()
    assert event["Type"] == "SQS"
    dlq = resources["RunnerFunction"]["Properties"]["EventInvokeConfig"]["DestinationConfig"]["OnFailure"]["Destination"]
    assert event["Properties"]["Queue"] == dlq
    assert event["Properties"]["FunctionResponseTypes"] == ["ReportBatchItemFailures"]
    assert 1 <= event["Properties"]["BatchSize"] <= 10
    queue = resources[dlq["Fn::GetAtt"][0]]["Properties"]
    assert queue["VisibilityTimeout"] >= 6 * props["Timeout"], "a batch in progress would be delivered twice"
    crud = {"DynamoDBCrudPolicy"}
    assert dynamodb_grants(props) == {"RunsTable": crud, "EventsTable": crud, "ProgressTable": crud, "RollupsTable": crud}


def test_architecture_defaults_to_arm64_and_drives_every_function(template):
    param = template["Parameters"]["Architecture"]
    assert param["Default"] == "arm64"
    assert sorted(param["AllowedValues"]) == ["arm64", "x86_64"]
    for function in FUNCTIONS:
        assert effective_function_props(template, function)["Architectures"] == [{"Ref": "Architecture"}]


def test_parameters_have_documented_types_and_defaults(template):
    params = template["Parameters"]
    assert params["JwtIssuer"]["Type"] == "String"
    assert params["JwtAudience"]["Type"] == "CommaDelimitedList"
    assert params["BedrockModelIds"]["Type"] == "CommaDelimitedList"
    assert params["BedrockModelIds"]["Default"].split(",") == DEFAULT_MODEL_IDS
    assert params["ModelPricesJson"]["Type"] == "String"
    assert params["ModelPricesJson"]["Default"] == ""
    assert params["OwnerDailyCapUsd"]["Default"] == "" and params["OwnerDailyCapsJson"]["Default"] == ""
    assert params["RetentionDays"]["Type"] == "Number"
    assert int(params["RetentionDays"]["Default"]) == 30
    assert params["LogLevel"]["Default"] == "info"


@pytest.mark.parametrize("function", list(FUNCTIONS))
def test_function_gets_log_level_retention_and_price_override(template, function):
    env = effective_function_props(template, function)["Environment"]["Variables"]
    assert env["RUST_LOG"] == {"Ref": "LogLevel"}
    assert env["CHAINRUN_RETENTION_DAYS"] == {"Ref": "RetentionDays"}
    assert env["CHAINRUN_MODEL_PRICES"] == {"Ref": "ModelPricesJson"}


@pytest.mark.parametrize("function", list(FUNCTIONS))
def test_every_function_gets_the_daily_spend_caps(template, function):
    env = effective_function_props(template, function)["Environment"]["Variables"]
    assert env["CHAINRUN_OWNER_DAILY_CAP_USD"] == {"Ref": "OwnerDailyCapUsd"}
    assert env["CHAINRUN_OWNER_DAILY_CAPS"] == {"Ref": "OwnerDailyCapsJson"}


TENANT_LIMITS = {
    "CHAINRUN_TENANT_STARTS_PER_MINUTE": "TenantStartsPerMinute",
    "CHAINRUN_TENANT_CONCURRENT_RUNS": "TenantConcurrentRuns",
    "CHAINRUN_TENANT_TOKENS_PER_MINUTE": "TenantTokensPerMinute",
    "CHAINRUN_TENANT_TOKENS_PER_MINUTE_BY_MODEL": "TenantTokensPerMinuteByModelJson",
    "CHAINRUN_MAX_REQUEST_BYTES": "MaxRequestBytes",
    "CHAINRUN_MAX_DEFINITION_BYTES": "MaxDefinitionBytes",
    "CHAINRUN_PUBLIC_SHARDS": "PublicShards",
}


@pytest.mark.parametrize("function", list(FUNCTIONS))
def test_every_function_gets_the_tenant_limits_from_parameters(template, function):
    env = effective_function_props(template, function)["Environment"]["Variables"]
    for var, param in TENANT_LIMITS.items():
        assert env[var] == {"Ref": param}, var
        assert param in template["Parameters"], param


def test_tenant_limit_defaults_match_the_code(template):
    params = template["Parameters"]
    defaults = {name: str(params[name]["Default"]) for name in TENANT_LIMITS.values()}
    assert defaults == {
        "TenantStartsPerMinute": "300",
        "TenantConcurrentRuns": "100",
        "TenantTokensPerMinute": "0",
        "TenantTokensPerMinuteByModelJson": "",
        "MaxRequestBytes": "262144",
        "MaxDefinitionBytes": "131072",
        "PublicShards": "8",
    }


def test_runner_reserved_concurrency_is_a_parameter(template):
    props = effective_function_props(template, "RunnerFunction")
    assert props["ReservedConcurrentExecutions"] == {
        "Fn::If": ["ReservesRunnerConcurrency", {"Ref": "RunnerReservedConcurrency"}, {"Ref": "AWS::NoValue"}]
    }
    assert str(template["Parameters"]["RunnerReservedConcurrency"]["Default"]) == "-1"


def test_api_may_write_only_quota_keys_of_the_rollups_table(template):
    policies = template["Resources"]["ApiFunction"]["Properties"]["Policies"]
    statements = [st for p in policies if "Statement" in p for st in p["Statement"]]
    (quota,) = [st for st in statements if st.get("Sid") == "TenantQuotaCounters"]
    assert sorted(quota["Action"]) == ["dynamodb:GetItem", "dynamodb:UpdateItem"]
    assert quota["Condition"] == {"ForAllValues:StringLike": {"dynamodb:LeadingKeys": ["QUOTA#*"]}}


def test_the_daily_cap_parameter_takes_only_dollar_amounts(template):
    pattern = re.compile(template["Parameters"]["OwnerDailyCapUsd"]["AllowedPattern"])
    assert all(pattern.fullmatch(v) for v in ["", "5", "0.25"])
    assert not any(pattern.fullmatch(v) for v in ["-1", "five", "1e3"])


def test_api_function_dispatches_to_runner_and_trusts_api_gateway_jwt(template):
    props = effective_function_props(template, "ApiFunction")
    env = props["Environment"]["Variables"]
    assert env["CHAINRUN_RUNNER_FUNCTION"] == {"Ref": "RunnerFunction"}
    assert env["CHAINRUN_AUTH"] == "apigateway-jwt"
    assert props["Timeout"] <= 29, "HTTP API integrations time out at 30 s"


def test_runner_has_fifteen_minutes_and_512_mb(template):
    props = effective_function_props(template, "RunnerFunction")
    assert props["Timeout"] == 900
    assert props["MemorySize"] == 512


def test_runner_async_invokes_retry_boundedly_then_go_to_encrypted_sqs_queue(template, resources):
    config = effective_function_props(template, "RunnerFunction")["EventInvokeConfig"]
    assert 0 <= config["MaximumRetryAttempts"] <= 2
    assert 60 <= config["MaximumEventAgeInSeconds"] <= 21600
    on_failure = config["DestinationConfig"]["OnFailure"]
    assert on_failure["Type"] == "SQS"
    queue_id, attribute = on_failure["Destination"]["Fn::GetAtt"]
    assert attribute == "Arn"
    queue = resources[queue_id]
    assert queue["Type"] == "AWS::SQS::Queue"
    assert queue["Properties"].get("SqsManagedSseEnabled") is True or "KmsMasterKeyId" in queue["Properties"]
    assert queue["Properties"]["MessageRetentionPeriod"] == 14 * 24 * 3600


def test_each_function_has_a_log_group_with_retention(template, resources):
    resolver = Resolver(template)
    groups = {
        resolver.resolve(r["Properties"]["LogGroupName"]): r["Properties"].get("RetentionInDays")
        for r in resources.values()
        if r["Type"] == "AWS::Logs::LogGroup"
    }
    for function in FUNCTIONS:
        name = f"/aws/lambda/{resolver.resolve({'Ref': function})}"
        assert name in groups, f"no log group for {function}"
        assert groups[name], f"log group of {function} keeps logs forever"


# --------------------------------------------------------------------------- HTTP API


def test_http_api_requires_jwt_from_configured_issuer_and_audience_on_every_route_but_public(template, resources):
    api = resources["HttpApi"]
    assert api["Type"] == "AWS::Serverless::HttpApi"
    auth = api["Properties"]["Auth"]
    assert auth["DefaultAuthorizer"] == "JwtAuthorizer"
    authorizer = auth["Authorizers"]["JwtAuthorizer"]
    assert authorizer["IdentitySource"] == "$request.header.Authorization"
    assert authorizer["JwtConfiguration"] == {"issuer": {"Ref": "JwtIssuer"}, "audience": {"Ref": "JwtAudience"}}

    routes = set()
    for function, resource in functions(resources).items():
        for event in resource["Properties"].get("Events", {}).values():
            if event["Type"] != "HttpApi":
                continue
            props = event["Properties"]
            assert function == "ApiFunction", f"{function} is exposed on the HTTP API"
            assert props["ApiId"] == {"Ref": "HttpApi"}
            if props["Path"].startswith("/public/") or (props["Method"].upper(), props["Path"]) in OPEN:
                # The function serves everything under /public as anonymous (no token vouched for).
                assert props["Auth"] == {"Authorizer": "NONE"}, "the /public routes and the pages have no authorizer"
            else:
                assert "Auth" not in props, "a route overrides the default JWT authorizer"
            routes.add((props["Method"].upper(), props["Path"]))
    assert routes == {("ANY", "/"), ("ANY", "/{proxy+}"), ("ANY", "/public/{proxy+}")} | OPEN



def test_the_pages_and_the_api_documents_are_the_only_routes_besides_public_without_an_authorizer_and_only_for_get(resources):
    events = resources["ApiFunction"]["Properties"]["Events"]
    open_routes = {(e["Properties"]["Method"], e["Properties"]["Path"]) for e in events.values()
                   if e["Type"] == "HttpApi" and e["Properties"].get("Auth") == {"Authorizer": "NONE"}}
    assert open_routes == {("ANY", "/public/{proxy+}")} | OPEN
    # The pages' paths are routed by the function, which answers them with HTML.
    lib = (ROOT / "functions" / "api" / "src" / "lib.rs").read_text()
    for _, path in PAGES:
        assert f'.route("{path}", get(pages::' in lib, path
    openapi = (ROOT / "functions" / "api" / "src" / "openapi.rs").read_text()
    for _, path in DOCUMENTS:
        assert f'.route("{path}", get(' in openapi, path


# --------------------------------------------------------------------------- IAM


def dynamodb_tables_granted(props: dict[str, Any]) -> set[str]:
    tables = set()
    for name, args in policy_templates(props):
        assert name in ("DynamoDBCrudPolicy", "DynamoDBReadPolicy", "DynamoDBWritePolicy", "S3ReadPolicy", "S3WritePolicy"), (
            f"unexpected policy template {name}"
        )
        if name.startswith("DynamoDB"):
            tables.add(args["TableName"]["Ref"])
    return tables


def dynamodb_grants(props: dict[str, Any]) -> dict[str, set[str]]:
    """Table logical id -> the policy templates granting access to it."""
    grants: dict[str, set[str]] = {}
    for name, args in policy_templates(props):
        if name.startswith("DynamoDB"):
            grants.setdefault(args["TableName"]["Ref"], set()).add(name)
    return grants


def test_each_function_gets_only_the_table_access_it_needs(template):
    api = effective_function_props(template, "ApiFunction")
    runner = effective_function_props(template, "RunnerFunction")
    crud = {"DynamoDBCrudPolicy"}
    assert dynamodb_tables_granted(api) == {"RunsTable", "EventsTable", "ProgressTable", "WorkflowsTable", "RollupsTable"}
    assert dynamodb_tables_granted(runner) == {"RunsTable", "EventsTable", "ProgressTable", "RollupsTable", "WorkflowsTable"}
    # A run of a stored workflow follows the workflow's access: the runner reads its head.
    assert dynamodb_grants(runner)["WorkflowsTable"] == {"DynamoDBReadPolicy"}
    for table in ("RunsTable", "EventsTable", "ProgressTable"):
        assert dynamodb_grants(api)[table] == crud and dynamodb_grants(runner)[table] == crud
    # Cost rollups: only the runner writes them (when a run ends); the API only reads them.
    assert dynamodb_grants(api)["RollupsTable"] == {"DynamoDBReadPolicy"}
    # Writes rollups, daily spend counters and their holds (a settled hold is deleted);
    # reads a counter to report a refusal, and a run's holds when it is taken over.
    assert dynamodb_grants(runner)["RollupsTable"] == crud
    # The dead-letter consumer settles the holds of a run it ends.
    dead_letter = effective_function_props(template, "DeadLetterFunction")
    assert dynamodb_grants(dead_letter)["RollupsTable"] == crud
    for props in (api, runner):
        for statement in inline_statements(props):
            if statement.get("Sid") == "TenantQuotaCounters":
                # Narrower than any policy template: two actions, one table, QUOTA# keys only
                # (test_api_may_write_only_quota_keys_of_the_rollups_table).
                continue
            assert not any(str(a).startswith("dynamodb:") for a in as_list(statement["Action"])), (
                "DynamoDB access is granted only through table-scoped policy templates"
            )


def test_review_deadlines_are_one_time_schedules_whose_role_may_only_invoke_the_runner(template, resources):
    runner = effective_function_props(template, "RunnerFunction")
    env = runner["Environment"]["Variables"]
    assert env["CHAINRUN_DEADLINE_SCHEDULE_GROUP"] == {"Ref": "DeadlineScheduleGroup"}
    assert env["CHAINRUN_DEADLINE_ROLE_ARN"] == {"Fn::GetAtt": ["DeadlineSchedulerRole", "Arn"]}
    assert env["CHAINRUN_DEADLINE_TARGET_ARN"]["Fn::Sub"].endswith(":function:${AWS::StackName}-runner")
    assert resources["DeadlineScheduleGroup"]["Type"] == "AWS::Scheduler::ScheduleGroup"
    role = resources["DeadlineSchedulerRole"]["Properties"]
    (trust,) = role["AssumeRolePolicyDocument"]["Statement"]
    assert trust["Principal"] == {"Service": "scheduler.amazonaws.com"} and "aws:SourceAccount" in trust["Condition"]["StringEquals"]
    (policy,) = role["Policies"]
    (grant,) = policy["PolicyDocument"]["Statement"]
    assert grant["Action"] == "lambda:InvokeFunction" and grant["Resource"]["Fn::Sub"].endswith(":function:${AWS::StackName}-runner")
    statements = {s["Sid"]: s for s in inline_statements(runner)}
    assert statements["ScheduleReviewDeadlines"]["Action"] == "scheduler:CreateSchedule"
    assert "${DeadlineScheduleGroup}/*" in statements["ScheduleReviewDeadlines"]["Resource"]["Fn::Sub"]
    passing = statements["HandTheSchedulerItsRole"]
    assert passing["Resource"] == {"Fn::GetAtt": ["DeadlineSchedulerRole", "Arn"]}
    assert passing["Condition"] == {"StringEquals": {"iam:PassedToService": "scheduler.amazonaws.com"}}


def s3_grants(props: dict[str, Any]) -> set[str]:
    return {name for name, args in policy_templates(props) if name.startswith("S3") and args == {"BucketName": {"Ref": "OutputsBucket"}}}


def test_large_outputs_go_to_a_private_kms_encrypted_bucket_only_the_runner_writes(template, resources):
    bucket = resources["OutputsBucket"]
    assert bucket["Type"] == "AWS::S3::Bucket" and bucket["DeletionPolicy"] == "Retain"
    props = bucket["Properties"]
    (rule,) = props["BucketEncryption"]["ServerSideEncryptionConfiguration"]
    assert rule["ServerSideEncryptionByDefault"]["SSEAlgorithm"] == "aws:kms"
    assert all(props["PublicAccessBlockConfiguration"].values()) and len(props["PublicAccessBlockConfiguration"]) == 4
    denial = resources["OutputsBucketPolicy"]["Properties"]["PolicyDocument"]["Statement"][0]
    assert denial["Effect"] == "Deny" and denial["Condition"] == {"Bool": {"aws:SecureTransport": "false"}}
    assert template["Globals"]["Function"]["Environment"]["Variables"]["CHAINRUN_OUTPUTS_BUCKET"] == {"Ref": "OutputsBucket"}
    grants = {f: s3_grants(effective_function_props(template, f)) for f in FUNCTIONS}
    assert grants == {
        "ApiFunction": {"S3ReadPolicy"},
        "RunnerFunction": {"S3ReadPolicy", "S3WritePolicy"},
        "SweeperFunction": set(),
        "DeadLetterFunction": {"S3ReadPolicy"},
    }
    assert template["Outputs"]["OutputsBucketName"]["Value"] == {"Ref": "OutputsBucket"}


@pytest.mark.parametrize("function", list(FUNCTIONS))
def test_function_policies_use_no_managed_policies_and_no_star_resources(template, function):
    props = effective_function_props(template, function)
    resolver = Resolver(template)
    for policy in props.get("Policies", []):
        assert isinstance(policy, dict), f"{function} attaches a managed policy {policy!r}"
    assert "Role" not in props
    for statement in inline_statements(props):
        assert statement["Effect"] == "Allow"
        assert "*" not in as_list(statement["Action"])
        for resource in as_list(resolver.resolve(statement["Resource"])):
            assert resource != "*", f"{function}: {statement.get('Sid')} is granted on every resource"


def test_api_only_lambda_invoke_grant_targets_the_runner(template):
    props = effective_function_props(template, "ApiFunction")
    resolver = Resolver(template)
    invoke_targets = []
    for statement in inline_statements(props):
        if grants_action(statement, "lambda:InvokeFunction"):
            assert as_list(statement["Action"]) == ["lambda:InvokeFunction"]
            invoke_targets.extend(as_list(resolver.resolve(statement["Resource"])))
    for name, args in policy_templates(props):
        assert name != "LambdaInvokePolicy" or args["FunctionName"] == {"Ref": "RunnerFunction"}
    assert invoke_targets == ["<RunnerFunction.Arn>"]


def test_runner_may_reinvoke_itself_by_fixed_name_without_circular_reference(template):
    props = effective_function_props(template, "RunnerFunction")
    resolver = Resolver(template)
    own_name = resolver.resolve(props["FunctionName"])
    assert own_name == f"{STACK}-runner"
    assert len(own_name) <= 64

    invoke_targets = []
    for statement in inline_statements(props):
        if grants_action(statement, "lambda:InvokeFunction"):
            invoke_targets.extend(as_list(resolver.resolve(statement["Resource"])))
    assert invoke_targets == [f"arn:aws:lambda:{REGION}:{ACCOUNT}:function:{own_name}"]

    policies_text = json.dumps(props["Policies"])
    assert '"RunnerFunction"' not in policies_text and "RunnerFunction." not in policies_text, (
        "the runner's own policy refers to the runner resource (circular dependency)"
    )


def bedrock_grants(template: dict[str, Any], resolver: Resolver) -> dict[str, set[str]]:
    """Resource ARN -> bedrock actions granted to the runner, after resolving intrinsics."""
    grants: dict[str, set[str]] = {}
    for statement in inline_statements(effective_function_props(template, "RunnerFunction")):
        actions = {a for a in as_list(statement["Action"]) if a.startswith("bedrock:") or a == "*"}
        if not actions:
            continue
        for resource in as_list(resolver.resolve(statement["Resource"])):
            grants.setdefault(resource, set()).update(actions)
    return grants


@pytest.mark.parametrize("partition", ["aws", "aws-us-gov"])
@pytest.mark.parametrize(
    "model_ids",
    [None, "anthropic.claude-3-5-haiku-20241022-v1:0", "amazon.nova-pro-v1:0,meta.llama3-70b-instruct-v1:0,amazon.nova-micro-v1:0"],
    ids=["default", "one", "three"],
)
def test_runner_may_invoke_exactly_the_configured_foundation_models(template, partition, model_ids):
    params = {} if model_ids is None else {"BedrockModelIds": model_ids}
    resolver = Resolver(template, partition=partition, **params)
    expected_ids = DEFAULT_MODEL_IDS if model_ids is None else model_ids.split(",")
    # A batch job is authorized against its model as a call is, so the same models.
    model_actions = {"bedrock:InvokeModel", "bedrock:InvokeModelWithResponseStream", "bedrock:CreateModelInvocationJob"}
    jobs = f"arn:{partition}:bedrock:{REGION}:{ACCOUNT}:model-invocation-job/*"

    grants = bedrock_grants(template, resolver)
    for resource, actions in grants.items():
        assert resource != "*" and ":bedrock:" in resource, f"bedrock granted on {resource!r}"
        assert actions == (BATCH_JOB_ACTIONS if resource == jobs else model_actions), f"{resource}: {sorted(actions)}"

    models = sorted(r for r in grants if ":foundation-model/" in r)
    assert models == sorted(f"arn:{partition}:bedrock:*::foundation-model/{m}" for m in expected_ids)
    others = sorted(r for r in grants if ":foundation-model/" not in r)
    assert others == sorted([f"arn:{partition}:bedrock:*:{ACCOUNT}:inference-profile/*", jobs])


BATCH_JOB_ACTIONS = {
    "bedrock:CreateModelInvocationJob", "bedrock:GetModelInvocationJob", "bedrock:StopModelInvocationJob", "bedrock:TagResource",
}


def test_runner_runs_batch_jobs_with_a_role_only_bedrock_of_this_account_may_assume(template, resources):
    runner = effective_function_props(template, "RunnerFunction")
    env = runner["Environment"]["Variables"]
    assert env["CHAINRUN_BATCH_ROLE_ARN"] == {"Fn::GetAtt": ["BatchInferenceRole", "Arn"]}
    assert env["CHAINRUN_BATCH_POLL_SECONDS"] == {"Ref": "BatchPollSeconds"}
    assert env["CHAINRUN_BATCH_TIMEOUT_HOURS"] == {"Ref": "BatchTimeoutHours"}
    params = template["Parameters"]
    # The code's defaults and bounds (functions/runner/src/lib.rs).
    assert (int(params["BatchPollSeconds"]["Default"]), params["BatchPollSeconds"]["MinValue"], params["BatchPollSeconds"]["MaxValue"]) == (60, 1, 3600)
    assert (int(params["BatchTimeoutHours"]["Default"]), params["BatchTimeoutHours"]["MinValue"], params["BatchTimeoutHours"]["MaxValue"]) == (24, 24, 168)

    statements = {s["Sid"]: s for s in inline_statements(runner)}
    jobs = statements["RunBatchInferenceJobs"]
    assert set(as_list(jobs["Action"])) == BATCH_JOB_ACTIONS
    assert jobs["Resource"]["Fn::Sub"].endswith(":model-invocation-job/*")
    passing = statements["HandBedrockTheBatchRole"]
    assert passing["Action"] == "iam:PassRole" and passing["Resource"] == {"Fn::GetAtt": ["BatchInferenceRole", "Arn"]}
    assert passing["Condition"] == {"StringEquals": {"iam:PassedToService": "bedrock.amazonaws.com"}}

    role = resources["BatchInferenceRole"]["Properties"]
    (trust,) = role["AssumeRolePolicyDocument"]["Statement"]
    assert trust["Principal"] == {"Service": "bedrock.amazonaws.com"} and trust["Action"] == "sts:AssumeRole"
    assert trust["Condition"]["StringEquals"] == {"aws:SourceAccount": {"Ref": "AWS::AccountId"}}
    assert trust["Condition"]["ArnLike"]["aws:SourceArn"]["Fn::Sub"].endswith(":model-invocation-job/*")


def test_the_batch_role_reads_batch_inputs_and_writes_only_batch_outputs_of_the_outputs_bucket(template, resources):
    resolver = Resolver(template)
    (policy,) = resources["BatchInferenceRole"]["Properties"]["Policies"]
    granted: dict[str, set[str]] = {}
    for statement in policy["PolicyDocument"]["Statement"]:
        assert statement["Effect"] == "Allow"
        for action in as_list(statement["Action"]):
            for resource in as_list(resolver.resolve(statement["Resource"])):
                granted.setdefault(action, set()).add(resource)
                if action == "s3:ListBucket":
                    assert statement["Condition"] == {"StringLike": {"s3:prefix": "batches/*"}}
    assert granted == {
        "s3:GetObject": {"<OutputsBucket.Arn>/batches/*"},
        "s3:PutObject": {"<OutputsBucket.Arn>/batches/*/output/*"},
        "s3:ListBucket": {"<OutputsBucket.Arn>"},
    }


# --------------------------------------------------------------------------- outputs / samconfig


def test_outputs_expose_api_url_runner_tables_and_dead_letter_queue(template):
    resolver = Resolver(template)
    outputs = {name: resolver.resolve(o["Value"]) for name, o in template["Outputs"].items()}
    assert outputs["ApiUrl"] == f"https://<HttpApi>.execute-api.{REGION}.amazonaws.com"
    assert outputs["RunnerFunctionName"] == f"{STACK}-runner"
    for spec in TABLES:
        assert f"<{spec['logical_id']}>" in outputs.values(), f"no output for {spec['logical_id']}"
    dlq = template["Resources"]["RunnerFunction"]["Properties"]["EventInvokeConfig"]["DestinationConfig"]["OnFailure"]
    assert f"<{dlq['Destination']['Fn::GetAtt'][0]}>" in outputs.values(), "no output for the DLQ URL"


def test_samconfig_deploys_stack_chainrun_with_iam_capability_and_lints_on_validate():
    config = tomllib.loads(SAMCONFIG.read_text())
    assert config["version"] == 0.1
    deploy = config["default"]["deploy"]["parameters"]
    assert deploy["stack_name"] == "chainrun"
    assert deploy["capabilities"] == "CAPABILITY_IAM"
    assert deploy["confirm_changeset"] is True
    assert deploy["resolve_s3"] is True
    assert config["default"]["validate"]["parameters"]["lint"] is True
    assert "cached" in config["default"]["build"]["parameters"]


# --------------------------------------------------------------------------- operators' view

METRICS_CATALOG = json.loads((ROOT / "schemas" / "metrics.json").read_text())
# Metric name -> the dimension sets it is published under (schemas/metrics.json, generated
# from shared/src/telemetry/catalog.rs, which the functions' metric lines are built from).
PUBLISHED: dict[str, list[list[str]]] = {
    m["name"]: d["dimensions"] for d in METRICS_CATALOG["directives"] for m in d["metrics"]
}
ALARMS = {
    "DeadLetterQueueNotEmptyAlarm", "StuckRunsAlarm",
    "ApiErrorRateAlarm", "RunnerErrorRateAlarm", "SweeperErrorRateAlarm", "DeadLetterErrorRateAlarm",
}
ERROR_RATE_ALARMS = {
    "ApiFunction": "ApiErrorRateAlarm",
    "RunnerFunction": "RunnerErrorRateAlarm",
    "SweeperFunction": "SweeperErrorRateAlarm",
    "DeadLetterFunction": "DeadLetterErrorRateAlarm",
}
LAMBDA_LEVELS = ["TRACE", "DEBUG", "INFO", "WARN", "ERROR", "FATAL"]  # most verbose first


def alarms(resources: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {k: v["Properties"] for k, v in resources.items() if v["Type"] == "AWS::CloudWatch::Alarm"}


@pytest.mark.parametrize("function", list(FUNCTIONS))
def test_every_function_is_traced_by_xray(template, function):
    assert effective_function_props(template, function)["Tracing"] == "Active"


@pytest.mark.parametrize("function", list(FUNCTIONS))
def test_every_function_logs_json_into_its_default_log_group(template, resources, function):
    logging = effective_function_props(template, function)["LoggingConfig"]
    assert logging["LogFormat"] == "JSON"
    assert logging["SystemLogLevel"] == "WARN"
    # The default group, /aws/lambda/<function>, is the one the template creates with a
    # retention (test_each_function_has_a_log_group_with_retention): naming a group here
    # would need the function's name from the group that is named after the function.
    assert "LogGroup" not in logging
    assert logging["ApplicationLogLevel"] == {"Fn::FindInMap": ["ApplicationLogLevels", {"Ref": "LogLevel"}, "Level"]}


def test_lambdas_level_filter_follows_log_level_but_never_drops_metric_lines(template):
    levels = template["Mappings"]["ApplicationLogLevels"]
    assert set(levels) == set(template["Parameters"]["LogLevel"]["AllowedValues"])
    for rust_level, entry in levels.items():
        lambda_level = entry["Level"]
        # EMF lines have no "level": Lambda files them as INFO.
        assert LAMBDA_LEVELS.index(lambda_level) <= LAMBDA_LEVELS.index("INFO"), rust_level
        # What RUST_LOG lets through, Lambda does not drop.
        assert LAMBDA_LEVELS.index(lambda_level) <= LAMBDA_LEVELS.index(rust_level.upper()), rust_level


def test_the_alarms_are_the_dead_letter_queue_stuck_runs_and_each_functions_error_rate(resources):
    assert set(alarms(resources)) == ALARMS


def test_the_dead_letter_queue_alarm_fires_on_any_visible_message(resources):
    alarm = alarms(resources)["DeadLetterQueueNotEmptyAlarm"]
    assert (alarm["Namespace"], alarm["MetricName"]) == ("AWS/SQS", "ApproximateNumberOfMessagesVisible")
    assert alarm["Dimensions"] == [{"Name": "QueueName", "Value": {"Fn::GetAtt": ["RunnerDeadLetterQueue", "QueueName"]}}]
    dlq = resources["RunnerFunction"]["Properties"]["EventInvokeConfig"]["DestinationConfig"]["OnFailure"]["Destination"]
    assert dlq == {"Fn::GetAtt": ["RunnerDeadLetterQueue", "Arn"]}, "the alarm watches the runner's on-failure destination"
    assert (alarm["Statistic"], alarm["ComparisonOperator"], alarm["Threshold"]) == ("Maximum", "GreaterThanThreshold", 0)
    assert alarm["TreatMissingData"] == "notBreaching"


def test_the_stuck_runs_alarm_reads_the_sweepers_metric_and_a_silent_sweeper_breaches(resources):
    alarm = alarms(resources)["StuckRunsAlarm"]
    assert (alarm["Namespace"], alarm["MetricName"]) == (METRICS_CATALOG["namespace"], "StuckRuns")
    assert "Dimensions" not in alarm
    assert [] in PUBLISHED["StuckRuns"], "published without dimensions, as the alarm reads it"
    assert (alarm["Statistic"], alarm["ComparisonOperator"], alarm["Threshold"]) == ("Maximum", "GreaterThanThreshold", 0)
    assert alarm["Period"] == 60, "one sweep a minute"
    assert (alarm["DatapointsToAlarm"], alarm["EvaluationPeriods"]) == (3, 5)
    assert alarm["TreatMissingData"] == "breaching"


@pytest.mark.parametrize(("function", "name"), list(ERROR_RATE_ALARMS.items()))
def test_each_function_has_an_error_rate_alarm_of_errors_over_invocations(template, resources, function, name):
    alarm = alarms(resources)[name]
    queries = {q["Id"]: q for q in alarm["Metrics"]}
    for query_id, metric in (("errors", "Errors"), ("invocations", "Invocations")):
        stat = queries[query_id]["MetricStat"]
        assert stat["Metric"] == {"Namespace": "AWS/Lambda", "MetricName": metric,
                                  "Dimensions": [{"Name": "FunctionName", "Value": {"Ref": function}}]}
        assert (stat["Stat"], stat["Period"], queries[query_id]["ReturnData"]) == ("Sum", 300, False)
    (returned,) = [q for q in alarm["Metrics"] if q.get("ReturnData", True)]
    assert re.sub(r"\s", "", returned["Expression"]) == "IF(invocations>0,100*errors/invocations,0)"
    assert alarm["Threshold"] == {"Ref": "FunctionErrorRatePercent"}
    assert int(template["Parameters"]["FunctionErrorRatePercent"]["Default"]) == 5
    assert alarm["ComparisonOperator"] == "GreaterThanThreshold"
    assert alarm["TreatMissingData"] == "notBreaching", "no invocations is not an error"


@pytest.mark.parametrize("name", sorted(ALARMS))
def test_alarms_notify_the_topic_only_when_one_is_given(template, resources, name):
    alarm = alarms(resources)[name]
    assert template["Parameters"]["AlarmTopicArn"]["Default"] == ""
    for actions in ("AlarmActions", "OKActions"):
        without = Resolver(template).resolve(alarm[actions])
        assert without == {"Ref": "AWS::NoValue"}, f"{name}.{actions} without a topic: {without}"
        topic = f"arn:aws:sns:{REGION}:{ACCOUNT}:ops"
        assert Resolver(template, AlarmTopicArn=topic).resolve(alarm[actions]) == [topic]


def dashboard_body(template: dict[str, Any]) -> dict[str, Any]:
    """The dashboard's JSON with every ${…} substituted (resources as <Name> placeholders)."""
    body = template["Resources"]["OperationsDashboard"]["Properties"]["DashboardBody"]
    assert "Fn::Sub" in body and isinstance(body["Fn::Sub"], str)
    return json.loads(Resolver(template).resolve(body))


def dashboard_metrics(body: dict[str, Any]) -> list[tuple[str, str, tuple[str, ...], str]]:
    """(namespace, metric, dimension names, stat) of every metric the dashboard graphs,
    those its SEARCH expressions ask for included."""
    found = []
    for widget in body["widgets"]:
        for entry in widget["properties"].get("metrics", []):
            options = entry[-1] if isinstance(entry[-1], dict) else {}
            names = [e for e in entry if not isinstance(e, dict)]
            if names:
                namespace, metric, *dims = names
                assert namespace != ".", "no shorthand: every entry names its namespace"
                found.append((namespace, metric, tuple(dims[0::2]), options.get("stat", "")))
            for match in re.finditer(r"SEARCH\('\{([^}]*)\} MetricName=\"(\w+)\"', '(\w+)'", options.get("expression", "")):
                namespace, *dims = match.group(1).split(",")
                found.append((namespace, match.group(2), tuple(dims), match.group(3)))
    return found


def test_the_dashboard_body_is_json_and_names_only_metrics_the_code_publishes(template):
    body = dashboard_body(template)
    graphed = dashboard_metrics(body)
    ours = [(metric, dims) for namespace, metric, dims, _ in graphed if namespace == METRICS_CATALOG["namespace"]]
    assert ours, "the dashboard shows none of chainrun's metrics"
    for metric, dims in ours:
        assert metric in PUBLISHED, f"{metric} is not a metric the functions publish (schemas/metrics.json)"
        assert sorted(dims) in [sorted(s) for s in PUBLISHED[metric]], f"{metric} is not published by {list(dims)}"
    for namespace, _, _, _ in graphed:
        assert namespace in (METRICS_CATALOG["namespace"], "AWS/Lambda", "AWS/SQS"), namespace


def test_the_dashboard_shows_runs_cost_tokens_latency_recovery_the_queue_and_every_function(template):
    body = dashboard_body(template)
    graphed = {(ns, metric, stat) for ns, metric, _, stat in dashboard_metrics(body)}
    wanted = {
        ("chainrun", "Runs", "Sum"), ("chainrun", "RunCostPicoUsd", "Sum"),
        ("chainrun", "RunInputTokens", "Sum"), ("chainrun", "RunOutputTokens", "Sum"),
        ("chainrun", "StepLatency", "p50"), ("chainrun", "StepLatency", "p95"),
        ("chainrun", "Takeovers", "Sum"), ("chainrun", "BudgetRefusals", "Sum"), ("chainrun", "StuckRuns", "Maximum"),
        ("AWS/SQS", "ApproximateNumberOfMessagesVisible", "Maximum"),
    }
    assert wanted <= graphed, wanted - graphed
    by_workflow = {(metric, stat) for ns, metric, dims, stat in dashboard_metrics(body) if dims == ("Workflow",)}
    assert {("StepLatency", "p50"), ("StepLatency", "p95")} <= by_workflow, "step latency by workflow"
    for widget in body["widgets"]:
        for entry in widget["properties"].get("metrics", []):
            if entry[0] == "AWS/SQS":
                assert entry[2:4] == ["QueueName", "<RunnerDeadLetterQueue.QueueName>"]
    shown = {(metric, entry[3]) for widget in body["widgets"] for entry in widget["properties"].get("metrics", [])
             if entry[0] == "AWS/Lambda" for metric in [entry[1]]}
    for function in FUNCTIONS:
        name = Resolver(template).resolve({"Ref": function})
        assert {("Errors", name), ("Duration", name)} <= shown, f"{function}'s errors and durations"
    (alarm_widget,) = [w for w in body["widgets"] if w["type"] == "alarm"]
    assert set(alarm_widget["properties"]["alarms"]) == {f"<{a}.Arn>" for a in ALARMS}
    assert template["Outputs"]["OperationsDashboardName"]["Value"] == {"Ref": "OperationsDashboard"}


# --------------------------------------------------------------------------- linters and SAM transform


@pytest.fixture(scope="session")
def lint_run() -> subprocess.CompletedProcess[str]:
    """One run of infra/check_template.sh (creates .venv-sam on first use: ~1 minute)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    return subprocess.run(
        [str(CHECK_SCRIPT)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200, check=False
    )


def test_sam_validate_lint_and_cfn_lint_pass(lint_run):
    assert os.access(CHECK_SCRIPT, os.X_OK), "infra/check_template.sh is not executable"
    assert lint_run.returncode == 0, f"stdout:\n{lint_run.stdout}\nstderr:\n{lint_run.stderr}"
    assert "is a valid SAM Template" in lint_run.stdout


_TRANSFORM = r"""
import json, sys
from samtranslator.translator.transform import transform
from samtranslator.yaml_helper import yaml_parse

class NoManagedPolicies:
    def load(self):
        return {}

tpl = yaml_parse(open(sys.argv[1]).read())
for res in tpl["Resources"].values():
    if res["Type"] == "AWS::Serverless::Function":
        res["Properties"]["CodeUri"] = "s3://bucket/key"
print(json.dumps(transform(tpl, {}, NoManagedPolicies())))
"""


@pytest.fixture(scope="module")
def transformed(lint_run) -> dict[str, Any]:
    """template.yaml after the SAM transform (samtranslator from .venv-sam), offline."""
    if not SAM_PYTHON.exists():
        pytest.fail(f".venv-sam was not created by infra/check_template.sh:\n{lint_run.stderr}")
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env["AWS_DEFAULT_REGION"] = REGION
    out = subprocess.run(
        [str(SAM_PYTHON), "-c", _TRANSFORM, str(TEMPLATE)], env=env, capture_output=True, text=True, timeout=300, check=False
    )
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def role_statements(transformed: dict[str, Any], function: str) -> list[dict[str, Any]]:
    role_id = transformed["Resources"][function]["Properties"]["Role"]["Fn::GetAtt"][0]
    role = transformed["Resources"][role_id]["Properties"]
    statements = []
    for policy in role.get("Policies", []):
        statements.extend(as_list(policy["PolicyDocument"]["Statement"]))
    return statements


def test_deployed_roles_grant_lambda_invoke_only_on_runner_and_dlq_send_only_to_runner(transformed):
    resolver = Resolver(transformed)
    api = role_statements(transformed, "ApiFunction")
    runner = role_statements(transformed, "RunnerFunction")

    api_invoke = [r for s in api if grants_action(s, "lambda:InvokeFunction") for r in as_list(resolver.resolve(s["Resource"]))]
    assert api_invoke == ["<RunnerFunction.Arn>"]
    runner_invoke = [r for s in runner if grants_action(s, "lambda:InvokeFunction") for r in as_list(resolver.resolve(s["Resource"]))]
    assert runner_invoke == [f"arn:aws:lambda:{REGION}:{ACCOUNT}:function:{STACK}-runner"]

    runner_send = [r for s in runner if grants_action(s, "sqs:SendMessage") for r in as_list(resolver.resolve(s["Resource"]))]
    assert runner_send == ["<RunnerDeadLetterQueue.Arn>"], "the runner cannot deliver failed invokes to its DLQ"
    assert not any(grants_action(s, "sqs:SendMessage") for s in api)

    for statement in api + runner:
        for resource in as_list(resolver.resolve(statement["Resource"])):
            assert resource != "*", statement


@pytest.mark.parametrize("function", list(FUNCTIONS))
def test_deployed_functions_trace_actively_may_write_to_xray_and_log_json(transformed, function):
    props = transformed["Resources"][function]["Properties"]
    assert props["TracingConfig"] == {"Mode": "Active"}
    assert props["LoggingConfig"]["LogFormat"] == "JSON"
    role = transformed["Resources"][props["Role"]["Fn::GetAtt"][0]]["Properties"]
    assert any(str(arn).endswith(":policy/AWSXrayWriteOnlyAccess") for arn in role.get("ManagedPolicyArns", [])), role.get("ManagedPolicyArns")


def test_deployed_http_api_routes_all_require_the_jwt_authorizer_but_public_and_the_pages(transformed):
    body = transformed["Resources"]["HttpApi"]["Properties"]["Body"]
    assert set(body["paths"]) == {"/", "/{proxy+}", "/public/{proxy+}"} | {path for _, path in OPEN}
    for path, methods in body["paths"].items():
        for method, operation in methods.items():
            if (method.upper(), path) in OPEN:
                assert set(methods) == {"get"}, f"{path}: {set(methods)}"
            if path.startswith("/public/") or (method.upper(), path) in OPEN:
                assert operation.get("security", []) in ([], [{"NONE": []}]), f"{method} {path}: {operation.get('security')}"
                continue
            assert operation["security"] == [{"JwtAuthorizer": []}], f"{method} {path} is not JWT-protected"
            assert operation["x-amazon-apigateway-integration"]["payloadFormatVersion"] == "2.0"
    scheme = body["components"]["securitySchemes"]["JwtAuthorizer"]["x-amazon-apigateway-authorizer"]
    assert scheme["type"] == "jwt"


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-q"]))

"""A small SQS client over the JSON protocol (stdlib only), for the local stack's
on-failure destinations and its event-source-mapping emulation, both served by moto.

moto routes a request to its SQS backend by the `X-Amz-Target: AmazonSQS.<Action>`
header and the service in the Authorization credential scope; it checks no signature,
so the header names the service and carries a dummy signature.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.parse
import urllib.request

DEFAULT_ACCOUNT = "123456789012"


class SqsError(RuntimeError):
    def __init__(self, action: str, status: int | None, body: str):
        super().__init__(f"SQS {action} failed ({status}): {body[:300]}")
        self.status = status


class Sqs:
    """endpoint: the SQS endpoint (moto's URL); region goes into the credential scope."""

    def __init__(self, endpoint: str, region: str = "us-east-1", timeout: float = 30.0):
        self.endpoint = endpoint.rstrip("/") + "/"
        self.region = region
        self.timeout = timeout

    @classmethod
    def for_queue(cls, queue_url: str, region: str = "us-east-1") -> "Sqs":
        """A client for the endpoint a queue URL lives at."""
        u = urllib.parse.urlsplit(queue_url)
        return cls(f"{u.scheme}://{u.netloc}", region)

    def call(self, action: str, body: dict, timeout: float | None = None) -> dict:
        headers = {
            "Content-Type": "application/x-amz-json-1.0",
            "X-Amz-Target": f"AmazonSQS.{action}",
            "Authorization": (f"AWS4-HMAC-SHA256 Credential=test/20240101/{self.region}/sqs/aws4_request, "
                              "SignedHeaders=host, Signature=0"),
        }
        req = urllib.request.Request(self.endpoint, data=json.dumps(body).encode(), method="POST", headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=timeout or self.timeout) as r:
                data = r.read()
        except urllib.error.HTTPError as e:
            raise SqsError(action, e.code, e.read().decode("utf-8", "replace")) from None
        except OSError as e:
            raise SqsError(action, None, f"{type(e).__name__}: {e}") from None
        return json.loads(data) if data.strip() else {}

    # -- the calls the stack uses -------------------------------------------------------
    def create_queue(self, name: str, attributes: dict[str, str] | None = None) -> str:
        return self.call("CreateQueue", {"QueueName": name, "Attributes": attributes or {}})["QueueUrl"]

    def queue_arn(self, queue_url: str) -> str:
        return self.attributes(queue_url, ["QueueArn"])["QueueArn"]

    def attributes(self, queue_url: str, names=("All",)) -> dict[str, str]:
        return self.call("GetQueueAttributes", {"QueueUrl": queue_url, "AttributeNames": list(names)})["Attributes"]

    def send(self, queue_url: str, body: str, attributes: dict | None = None) -> str:
        req = {"QueueUrl": queue_url, "MessageBody": body}
        if attributes:
            req["MessageAttributes"] = attributes
        return self.call("SendMessage", req)["MessageId"]

    def receive(self, queue_url: str, max_messages: int = 10, wait_s: int = 0,
                visibility_timeout: int | None = None) -> list[dict]:
        req = {"QueueUrl": queue_url, "MaxNumberOfMessages": max_messages, "WaitTimeSeconds": wait_s,
               "MessageSystemAttributeNames": ["All"], "AttributeNames": ["All"], "MessageAttributeNames": ["All"]}
        if visibility_timeout is not None:
            req["VisibilityTimeout"] = visibility_timeout
        return self.call("ReceiveMessage", req, timeout=self.timeout + wait_s).get("Messages", [])

    def delete(self, queue_url: str, receipt_handles: list[str]) -> None:
        for i in range(0, len(receipt_handles), 10):
            entries = [{"Id": str(n), "ReceiptHandle": h} for n, h in enumerate(receipt_handles[i:i + 10])]
            out = self.call("DeleteMessageBatch", {"QueueUrl": queue_url, "Entries": entries})
            if out.get("Failed"):
                raise SqsError("DeleteMessageBatch", 200, json.dumps(out["Failed"]))

    def purge(self, queue_url: str) -> None:
        self.call("PurgeQueue", {"QueueUrl": queue_url})


def queue_arn_from_url(queue_url: str, region: str = "us-east-1") -> str:
    """arn:aws:sqs:REGION:ACCOUNT:NAME of a queue URL of the form …/ACCOUNT/NAME."""
    parts = urllib.parse.urlsplit(queue_url).path.strip("/").split("/")
    account, name = (parts[-2], parts[-1]) if len(parts) >= 2 else (DEFAULT_ACCOUNT, parts[-1])
    return f"arn:aws:sqs:{region}:{account}:{name}"

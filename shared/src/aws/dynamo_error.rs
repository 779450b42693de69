//! How a DynamoDB call failed, decided once for every DynamoDB adapter.
//!
//! Three outcomes, because they call for three different actions:
//! - *unavailable* — throttling, a 5xx, a timeout, no connection, a transaction that
//!   collided with another: a retry can succeed (the port's `Unavailable`);
//! - *rejected* — the request itself is refused: a missing table, missing permissions, an
//!   invalid request, an item over 400 KB. Retrying sends the same request to the same
//!   refusal, so it is terminal, and the message says what to fix (`Rejected`);
//! - *corrupt* — the call succeeded but a stored item does not read back. Decided where
//!   items are read ([`corrupt_item`]), never from an SDK error.
//!
//! Conditional-check failures are not classified here: each caller turns the ones it
//! expects into its domain outcome (lease lost, already exists, conflict) first.

use super::describe;
use crate::ports::{AnalyticsError, ProgressError, StoreError};
use aws_sdk_dynamodb::config::http::HttpResponse;
use aws_sdk_dynamodb::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_dynamodb::types::AttributeValue;
use std::collections::HashMap;

/// A failed DynamoDB call, classified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Failure {
    /// A retry can succeed.
    Unavailable(String),
    /// The request is refused; the message says what to fix.
    Rejected(String),
}

/// Error codes DynamoDB (or its HTTP front) uses for load and transient faults.
const TRANSIENT_CODES: &[&str] = &[
    "ProvisionedThroughputExceededException",
    "ThrottlingException",
    "RequestLimitExceeded",
    "LimitExceededException",
    "InternalServerError",
    "ServiceUnavailable",
    "TransactionInProgressException",
    "TransactionConflictException",
    // Lambda hands each invocation fresh credentials; the next attempt has valid ones.
    "ExpiredTokenException",
];

/// Error codes that mean the caller's credentials may not do this.
const ACCESS_CODES: &[&str] = &[
    "AccessDeniedException",
    "UnrecognizedClientException",
    "InvalidSignatureException",
    "MissingAuthenticationTokenException",
    "IncompleteSignatureException",
];

/// Classifies a failed call against `table` (named in the message, so an operator knows
/// which table or setting to look at).
pub(super) fn classify<E>(err: &SdkError<E, HttpResponse>, table: &str) -> Failure
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
{
    let (code, message) = describe(err);
    let code = code.unwrap_or_default();
    match err {
        SdkError::TimeoutError(_) => Failure::Unavailable(format!("DynamoDB did not answer in time (table {table}): {message}")),
        SdkError::DispatchFailure(_) => Failure::Unavailable(format!("could not reach DynamoDB (table {table}): {message}")),
        SdkError::ResponseError(_) => Failure::Unavailable(format!("unreadable response from DynamoDB (table {table}): {message}")),
        SdkError::ConstructionFailure(_) => {
            Failure::Rejected(format!("could not build a request for table {table} (a defect in chainrun; please report it): {message}"))
        }
        SdkError::ServiceError(service) => {
            let status = service.raw().status();
            service_failure(&code, &message, status.as_u16(), table)
        }
        // `SdkError` is non-exhaustive; an unknown kind of failure is not known to be permanent.
        _ => Failure::Unavailable(format!("DynamoDB call failed (table {table}): {message}")),
    }
}

fn service_failure(code: &str, message: &str, status: u16, table: &str) -> Failure {
    let rejected = |hint: &str| Failure::Rejected(format!("{code} on table {table}: {message} — {hint}"));
    if TRANSIENT_CODES.contains(&code) {
        return Failure::Unavailable(format!("{code} on table {table}: {message}"));
    }
    if ACCESS_CODES.contains(&code) {
        return rejected(&format!("the function's credentials may not use table {table}; grant its IAM role access to it (template.yaml)"));
    }
    match code {
        "ResourceNotFoundException" => rejected(&format!(
            "table {table} does not exist (or is not active) in this account and region; create it (infra/tables.json, template.yaml) or point the CHAINRUN_*_TABLE setting at the right table"
        )),
        "ValidationException" if is_item_size(message) => {
            rejected("an item is larger than DynamoDB's 400 KB item limit; make the stored document smaller")
        }
        "ValidationException" | "SerializationException" => {
            rejected("DynamoDB refused the request as invalid; this is a defect in chainrun, please report it")
        }
        "ItemCollectionSizeLimitExceededException" => rejected("the run's items exceed DynamoDB's 10 GB item collection limit"),
        "ConditionalCheckFailedException" => {
            rejected("a condition the request did not expect failed; this is a defect in chainrun, please report it")
        }
        "TransactionCanceledException" => transaction_failure(message, table),
        _ if status >= 500 || status == 429 => Failure::Unavailable(format!("{code} (HTTP {status}) on table {table}: {message}")),
        _ => rejected("DynamoDB refused the request"),
    }
}

/// A cancelled transaction lists one reason per item (`[None, ThrottlingError, …]`);
/// it may succeed on retry only when every reason is a transient one.
fn transaction_failure(message: &str, table: &str) -> Failure {
    const TRANSIENT_REASONS: &[&str] = &["ThrottlingError", "ProvisionedThroughputExceeded", "TransactionConflict"];
    const PERMANENT_REASONS: &[&str] = &["ValidationError", "ItemCollectionSizeLimitExceeded", "ConditionalCheckFailed"];
    let permanent = PERMANENT_REASONS.iter().find(|r| message.contains(*r));
    match permanent {
        None if TRANSIENT_REASONS.iter().any(|r| message.contains(r)) => {
            Failure::Unavailable(format!("transaction on table {table} collided or was throttled: {message}"))
        }
        Some(&"ValidationError") if is_item_size(message) => Failure::Rejected(format!(
            "transaction on table {table} cancelled: {message} — an item is larger than DynamoDB's 400 KB item limit; make the stored document smaller"
        )),
        _ => Failure::Rejected(format!(
            "transaction on table {table} cancelled: {message} — DynamoDB refused one of its items; this is a defect in chainrun, please report it"
        )),
    }
}

fn is_item_size(message: &str) -> bool {
    let m = message.to_ascii_lowercase();
    m.contains("item size") || m.contains("item collection size")
}

impl Failure {
    pub(super) fn store(self) -> StoreError {
        match self {
            Failure::Unavailable(m) => StoreError::Unavailable(m),
            Failure::Rejected(m) => StoreError::Rejected(m),
        }
    }

    pub(super) fn progress(self) -> ProgressError {
        match self {
            Failure::Unavailable(m) => ProgressError::Unavailable(m),
            Failure::Rejected(m) => ProgressError::Rejected(m),
        }
    }

    pub(super) fn analytics(self) -> AnalyticsError {
        match self {
            Failure::Unavailable(m) => AnalyticsError::Unavailable(m),
            Failure::Rejected(m) => AnalyticsError::Rejected(m),
        }
    }
}

/// `.map_err(store_err(table))`: a failed call against `table` as a [`StoreError`].
pub(super) fn store_err<E>(table: &str) -> impl FnOnce(SdkError<E, HttpResponse>) -> StoreError + '_
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
{
    move |err| classify(&err, table).store()
}

/// `.map_err(progress_err(table))`: a failed call against `table` as a [`ProgressError`].
pub(super) fn progress_err<E>(table: &str) -> impl FnOnce(SdkError<E, HttpResponse>) -> ProgressError + '_
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
{
    move |err| classify(&err, table).progress()
}

/// `.map_err(analytics_err(table))`: a failed call against `table` as an [`AnalyticsError`].
pub(super) fn analytics_err<E>(table: &str) -> impl FnOnce(SdkError<E, HttpResponse>) -> AnalyticsError + '_
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
{
    move |err| classify(&err, table).analytics()
}

/// Whether the call failed only because its condition (or a transaction item's) did not hold.
pub(super) fn is_condition_failure<E: ProvideErrorMetadata>(err: &SdkError<E, HttpResponse>) -> bool {
    matches!(err.code(), Some("ConditionalCheckFailedException"))
        || (err.code() == Some("TransactionCanceledException") && err.message().unwrap_or_default().contains("ConditionalCheckFailed"))
}

/// Whether the condition of the transaction's `index`-th item is one that failed. DynamoDB
/// lists a reason per item, in order, in the cancellation's message
/// (`… [None, ConditionalCheckFailed, None]`).
pub(super) fn failed_condition_at<E: ProvideErrorMetadata>(err: &SdkError<E, HttpResponse>, index: usize) -> bool {
    let message = err.message().unwrap_or_default();
    let reasons = message.rfind('[').and_then(|start| message[start + 1..].split(']').next());
    reasons.is_some_and(|list| list.split(',').nth(index).is_some_and(|reason| reason.trim() == "ConditionalCheckFailed"))
}

/// Another writer sent a different transaction with the same client token within the last
/// 10 minutes (the event log's token is the run and seq): that writer wrote the event.
pub(super) fn is_token_reuse<E: ProvideErrorMetadata>(err: &SdkError<E, HttpResponse>) -> bool {
    err.code() == Some("IdempotentParameterMismatchException")
}

/// A request this code failed to build or encode: a defect, never worth retrying.
pub(super) fn defect(what: &str, err: impl std::fmt::Display) -> String {
    format!("could not build {what} (a defect in chainrun; please report it): {err}")
}

/// The name of a stored item, for a `Corrupt` error: its table and key.
pub(super) fn item_name(table: &str, item: &HashMap<String, AttributeValue>) -> String {
    let key = |name: &str| match item.get(name) {
        Some(AttributeValue::S(v) | AttributeValue::N(v)) => Some(format!("{name}={v}")),
        Some(_) => Some(format!("{name}=<not a string or number>")),
        None => None,
    };
    let parts: Vec<String> = ["pk", "sk", "seq"].into_iter().filter_map(key).collect();
    if parts.is_empty() { format!("an item without a key in table {table}") } else { format!("item {} in table {table}", parts.join(", ")) }
}

/// The message of a `Corrupt` error about `item`: which item, and what is wrong with it.
pub(super) fn corrupt_item(table: &str, item: &HashMap<String, AttributeValue>, problem: impl std::fmt::Display) -> String {
    format!("{}: {problem}", item_name(table, item))
}

#[cfg(test)]
mod tests {
    use super::*;
    use aws_sdk_dynamodb::error::{ConnectorError, ErrorMetadata};
    use aws_sdk_dynamodb::operation::get_item::GetItemError;
    use aws_sdk_dynamodb::operation::transact_write_items::TransactWriteItemsError;
    use aws_smithy_types::body::SdkBody;

    fn service<E>(status: u16, code: &str, message: &str, build: impl FnOnce(ErrorMetadata) -> E) -> SdkError<E, HttpResponse> {
        let meta = ErrorMetadata::builder().code(code).message(message).build();
        let response = HttpResponse::new(status.try_into().expect("status"), SdkBody::empty());
        SdkError::service_error(build(meta), response)
    }

    fn get(status: u16, code: &str, message: &str) -> SdkError<GetItemError, HttpResponse> {
        service(status, code, message, GetItemError::generic)
    }

    fn tx(code: &str, message: &str) -> SdkError<TransactWriteItemsError, HttpResponse> {
        service(400, code, message, TransactWriteItemsError::generic)
    }

    fn unavailable(f: Failure) -> String {
        match f {
            Failure::Unavailable(m) => m,
            other => panic!("expected unavailable, got {other:?}"),
        }
    }

    fn rejected(f: Failure) -> String {
        match f {
            Failure::Rejected(m) => m,
            other => panic!("expected rejected, got {other:?}"),
        }
    }

    #[test]
    fn a_cancelled_transaction_says_which_item_failed_its_condition() {
        let lease_lost = tx(
            "TransactionCanceledException",
            "Transaction cancelled, please refer cancellation reasons for specific reasons [ConditionalCheckFailed, None, None]",
        );
        assert!(is_condition_failure(&lease_lost) && failed_condition_at(&lease_lost, 0) && !failed_condition_at(&lease_lost, 2));
        let seq_taken = tx(
            "TransactionCanceledException",
            "Transaction cancelled, please refer cancellation reasons for specific reasons [None, None, ConditionalCheckFailed]",
        );
        assert!(is_condition_failure(&seq_taken) && !failed_condition_at(&seq_taken, 0) && failed_condition_at(&seq_taken, 2));
        assert!(is_token_reuse(&tx("IdempotentParameterMismatchException", "token reused")));
        assert!(!is_token_reuse(&seq_taken));
    }

    #[test]
    fn throttling_server_errors_and_transport_failures_are_worth_retrying() {
        for code in ["ProvisionedThroughputExceededException", "ThrottlingException", "RequestLimitExceeded", "TransactionConflictException"] {
            let m = unavailable(classify(&get(400, code, "slow down"), "runs"));
            assert!(m.contains(code) && m.contains("runs"), "{m}");
        }
        unavailable(classify(&get(500, "InternalServerError", "oops"), "runs"));
        unavailable(classify(&get(503, "", "no body"), "runs"));
        unavailable(classify(&get(502, "SomethingNew", "gateway"), "runs"));
        unavailable(classify(&get(429, "SomethingNew", "too many"), "runs"));
        let io = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "connection refused");
        let dispatch: SdkError<GetItemError, HttpResponse> = SdkError::dispatch_failure(ConnectorError::io(Box::new(io)));
        assert!(unavailable(classify(&dispatch, "runs")).contains("could not reach DynamoDB (table runs)"));
        let timeout: SdkError<GetItemError, HttpResponse> = SdkError::timeout_error("operation timed out");
        assert!(unavailable(classify(&timeout, "runs")).contains("did not answer in time"));
    }

    #[test]
    fn a_missing_table_names_the_table_and_how_to_fix_it() {
        let m = rejected(classify(&get(400, "ResourceNotFoundException", "Requested resource not found"), "chainrun-runs"));
        assert!(m.contains("ResourceNotFoundException") && m.contains("table chainrun-runs does not exist"), "{m}");
        assert!(m.contains("CHAINRUN_*_TABLE"), "{m}");
        let store = store_err("chainrun-runs")(get(400, "ResourceNotFoundException", "Requested resource not found"));
        assert!(matches!(&store, StoreError::Rejected(_)) && !store.retryable(), "{store:?}");
    }

    #[test]
    fn missing_permissions_say_which_table_to_grant() {
        for code in ["AccessDeniedException", "UnrecognizedClientException"] {
            let m = rejected(classify(&get(400, code, "User: arn:… is not authorized to perform: dynamodb:GetItem"), "chainrun-events"));
            assert!(m.contains("may not use table chainrun-events") && m.contains("IAM role"), "{m}");
        }
    }

    #[test]
    fn invalid_requests_and_oversize_items_are_rejected_not_corrupt() {
        let m = rejected(classify(
            &get(400, "ValidationException", "Value provided in ExpressionAttributeValues unused in expressions: keys: {:x}"),
            "t",
        ));
        assert!(m.contains("defect") && m.contains(":x"), "{m}");
        let m = rejected(classify(&get(400, "ValidationException", "Item size has exceeded the maximum allowed size"), "t"));
        assert!(m.contains("400 KB"), "{m}");
        let progress = progress_err("events")(get(400, "ValidationException", "bad"));
        assert!(matches!(&progress, ProgressError::Rejected(_)) && !progress.retryable(), "{progress:?}");
        let analytics = analytics_err("rollups")(get(400, "ValidationException", "bad"));
        assert!(matches!(&analytics, AnalyticsError::Rejected(_)) && !analytics.retryable(), "{analytics:?}");
        rejected(classify(&get(400, "SomethingNew", "a 4xx we do not know"), "t"));
        let construction: SdkError<GetItemError, HttpResponse> = SdkError::construction_failure("missing key");
        assert!(rejected(classify(&construction, "t")).contains("defect"));
    }

    #[test]
    fn a_cancelled_transaction_is_retried_only_for_transient_reasons() {
        let m = |reasons: &str| format!("Transaction cancelled, please refer cancellation reasons for specific reasons [{reasons}]");
        unavailable(classify(&tx("TransactionCanceledException", &m("None, TransactionConflict")), "t"));
        unavailable(classify(&tx("TransactionCanceledException", &m("ThrottlingError, None")), "t"));
        let msg = rejected(classify(&tx("TransactionCanceledException", &m("ValidationError, ThrottlingError")), "t"));
        assert!(msg.contains("defect"), "{msg}");
        rejected(classify(&tx("TransactionCanceledException", &m("None, ItemCollectionSizeLimitExceeded")), "t"));
        let expected = tx("TransactionCanceledException", &m("ConditionalCheckFailed, None"));
        assert!(is_condition_failure(&expected));
        assert!(!is_condition_failure(&tx("TransactionCanceledException", &m("None, TransactionConflict"))));
        assert!(is_condition_failure(&get(400, "ConditionalCheckFailedException", "The conditional request failed")));
    }

    #[test]
    fn a_corrupt_item_is_named_by_table_and_key() {
        let item = HashMap::from([("pk".to_owned(), AttributeValue::S("RUN#01J".into())), ("seq".to_owned(), AttributeValue::N("7".into()))]);
        assert_eq!(corrupt_item("events", &item, "missing field `at`"), "item pk=RUN#01J, seq=7 in table events: missing field `at`");
        assert_eq!(item_name("events", &HashMap::new()), "an item without a key in table events");
    }
}

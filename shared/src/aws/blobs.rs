//! Documents too large for one DynamoDB item, kept in S3 and referenced from the item.
//!
//! A checkpoint (a step's or a map item's) or a run's META item that would exceed DynamoDB's
//! 400 KB item limit moves its largest documents (`output`, `text`, `detail`) to S3, largest
//! first, until it fits: each moved attribute `a` is replaced by `a_s3`, the object's key.
//! Reading puts them back before the item is decoded, so the engine, templates, the API
//! and the estimate see the same record whether it was offloaded or not.
//!
//! Keys are content-addressed, `runs/<run>/<sha256 of the document>`, which makes every put
//! idempotent: the SDK's retry of a put, the journal's retry of a checkpoint, and a runner
//! that lost its lease but still writes (its DynamoDB writes are fenced, its S3 puts are
//! not) can only ever write the same bytes under a key. An object is written before the
//! item that references it, so a reference never dangles; an object whose item was never
//! written (a crash in between) is unreferenced garbage, never read. The bucket encrypts
//! with KMS by default (`template.yaml`); reads check the digest, so a damaged or replaced
//! object reads as corrupt rather than as a wrong output.

use super::dynamo::{Item, item_size};
use super::{describe, transient};
use crate::ids::RunId;
use crate::ports::StoreError;
use aws_sdk_dynamodb::types::AttributeValue;
use aws_sdk_s3::Client;
use aws_sdk_s3::config::http::HttpResponse;
use aws_sdk_s3::error::SdkError;
use aws_sdk_s3::primitives::ByteStream;
use sha2::{Digest, Sha256};
use tracing::{debug, instrument};

/// The attributes that may move to S3: the documents a record holds (never keys or the
/// small fields the GSIs and conditions read).
const DOCUMENTS: [&str; 3] = ["output", "text", "detail"];

/// The suffix of the attribute that holds a moved document's key.
const REF_SUFFIX: &str = "_s3";

#[derive(Clone)]
pub struct S3Blobs {
    client: Client,
    bucket: String,
}

impl S3Blobs {
    pub fn new(client: Client, bucket: impl Into<String>) -> Self {
        Self { client, bucket: bucket.into() }
    }

    /// Moves `item`'s largest documents to S3 until `size(item)` is at most `limit`. `what`
    /// names the record in errors. An item that cannot fit even with every document moved
    /// is left for the caller's size check to refuse.
    #[instrument(skip_all, fields(run_id = %run))]
    pub(super) async fn offload(&self, run: &RunId, item: &mut Item, limit: usize, what: &str) -> Result<(), StoreError> {
        while item_size(item) > limit {
            let largest = DOCUMENTS
                .iter()
                .filter_map(|name| match item.get(*name) {
                    Some(AttributeValue::S(text)) => Some((*name, text.len())),
                    _ => None,
                })
                .max_by_key(|(_, len)| *len);
            let Some((name, bytes)) = largest else { return Ok(()) };
            let Some(AttributeValue::S(document)) = item.remove(name) else { return Ok(()) };
            let key = self.store(run, document, what).await?;
            debug!(attribute = name, bytes, key = %key, "document moved to S3");
            item.insert(format!("{name}{REF_SUFFIX}"), AttributeValue::S(key));
        }
        Ok(())
    }

    /// Puts back every document `item` references, so it decodes as if never offloaded.
    /// `name` names the item in errors.
    pub(super) async fn restore(&self, item: &mut Item, name: &str) -> Result<(), StoreError> {
        for document in DOCUMENTS {
            let reference = format!("{document}{REF_SUFFIX}");
            let Some(value) = item.remove(&reference) else { continue };
            let AttributeValue::S(key) = value else {
                return Err(StoreError::Corrupt(format!("{name}: {reference} is not a string")));
            };
            let text = self.get(&key, name).await?;
            item.insert(document.to_owned(), AttributeValue::S(text));
        }
        Ok(())
    }

    /// Stores one document of `run` (`what` names it in errors) and returns its key.
    pub(super) async fn store(&self, run: &RunId, document: String, what: &str) -> Result<String, StoreError> {
        let key = format!("runs/{run}/{}", digest(&document));
        self.put(&key, document, what).await?;
        Ok(key)
    }

    async fn put(&self, key: &str, document: String, what: &str) -> Result<(), StoreError> {
        self.client
            .put_object()
            .bucket(&self.bucket)
            .key(key)
            .content_type("application/json; charset=utf-8")
            .body(ByteStream::from(document.into_bytes()))
            .send()
            .await
            .map_err(|e| self.failure(&e, &format!("storing {what} in S3 ({key})")))?;
        Ok(())
    }

    async fn get(&self, key: &str, name: &str) -> Result<String, StoreError> {
        let out = match self.client.get_object().bucket(&self.bucket).key(key).send().await {
            Ok(out) => out,
            Err(e) if e.as_service_error().is_some_and(|s| s.is_no_such_key()) => {
                return Err(StoreError::Corrupt(format!("{name}: its document {key} is missing from bucket {}", self.bucket)));
            }
            Err(e) => return Err(self.failure(&e, &format!("reading {key} for {name}"))),
        };
        let bytes = out
            .body
            .collect()
            .await
            .map_err(|e| StoreError::Unavailable(format!("reading {key} from bucket {} for {name}: {e}", self.bucket)))?
            .into_bytes();
        let text = String::from_utf8(bytes.to_vec()).map_err(|_| StoreError::Corrupt(format!("{name}: {key} is not UTF-8 text")))?;
        if !key.ends_with(&digest(&text)) {
            return Err(StoreError::Corrupt(format!("{name}: {key} does not hold the document it was written with")));
        }
        Ok(text)
    }

    /// A failed S3 call: retryable when a retry can succeed, otherwise what to fix.
    fn failure<E>(&self, err: &SdkError<E, HttpResponse>, doing: &str) -> StoreError
    where
        E: aws_sdk_s3::error::ProvideErrorMetadata + std::error::Error + 'static,
    {
        let (code, message) = describe(err);
        let code = code.unwrap_or_default();
        if transient(err) || matches!(code.as_str(), "SlowDown" | "InternalError" | "ServiceUnavailable" | "RequestTimeout") {
            return StoreError::Unavailable(format!("{doing}: {code} {message}"));
        }
        let hint = match code.as_str() {
            "NoSuchBucket" => format!("bucket {} does not exist; create it (template.yaml) or set CHAINRUN_OUTPUTS_BUCKET", self.bucket),
            "AccessDenied" | "InvalidAccessKeyId" | "SignatureDoesNotMatch" => {
                format!("the function's role may not use bucket {} or its KMS key; grant it (template.yaml)", self.bucket)
            }
            c if c.starts_with("KMS") => format!("the KMS key of bucket {} refused the request", self.bucket),
            _ => "S3 refused the request".to_owned(),
        };
        StoreError::Rejected(format!("{doing}: {code} {message} — {hint}"))
    }
}

/// The lowercase hex SHA-256 of a document.
fn digest(document: &str) -> String {
    Sha256::digest(document.as_bytes()).iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_document_is_named_by_its_content() {
        assert_eq!(digest(""), "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
        assert_ne!(digest("a"), digest("b"));
    }
}

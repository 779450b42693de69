//! The saved-template contract, checked against the in-memory store and against the
//! DynamoDB store on a moto server (opt-in with `CHAINRUN_MOTO=1`, as in `store_contract.rs`).
#![cfg(feature = "aws")]
#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers: a panic is the failure report

use chainrun_core::aws::{DynamoTemplates, DynamoWorkflows};
use chainrun_core::ids::{Principal, UserId, WorkflowId};
use chainrun_core::memory::{MemoryTemplates, MemoryWorkflows};
use chainrun_core::ports::{StoreError, TemplateStore, WorkflowStore};
use chainrun_core::stored::{Pinned, StoredWorkflow, WorkflowVersion};
use chainrun_core::templates::{SavedTemplate, TemplateId};
use chrono::{DateTime, Utc};
use serde_json::json;
use std::sync::Arc;

#[path = "support/moto.rs"]
mod moto;

fn user(name: &str) -> UserId {
    name.parse().unwrap()
}

/// Times as the stores keep them: to the millisecond.
fn at(seconds: i64) -> DateTime<Utc> {
    DateTime::from_timestamp_millis(1_800_000_000_000 + seconds * 1000 + 7).unwrap()
}

fn template(owner: &str, title: &str, t: DateTime<Utc>) -> SavedTemplate {
    SavedTemplate {
        id: TemplateId::new(),
        owner: user(owner),
        title: title.into(),
        description: Some("why é ✓".into()),
        name: "triage".parse().unwrap(),
        source: Pinned { workflow_id: WorkflowId::new(), version: 3 },
        definition: json!({ "name": "triage", "steps": [{ "id": "a", "type": "llm", "prompt": "p é" }], "n": 1.5e300, "empty": "" }),
        created_at: t,
    }
}

async fn templates_contract(store: Arc<dyn TemplateStore>) {
    let saved = template("alice", "Triage", at(0));
    store.save(&saved).await.unwrap();

    // saved: reads back exactly, documents and numbers included
    assert_eq!(store.get(&saved.id).await.unwrap(), Some(saved.clone()));
    assert_eq!(store.get(&TemplateId::new()).await.unwrap(), None);
    store.save(&saved).await.expect("the same save again (a retry whose reply was lost) succeeds");
    let impostor = SavedTemplate { owner: user("mallory"), ..saved.clone() };
    assert!(matches!(store.save(&impostor).await, Err(StoreError::Rejected(_))), "an id is never overwritten");
    assert_eq!(store.get(&saved.id).await.unwrap().unwrap().owner, user("alice"));
    let bare = SavedTemplate { description: None, ..template("alice", "Bare", at(1)) };
    store.save(&bare).await.unwrap();
    assert_eq!(store.get(&bare.id).await.unwrap(), Some(bare.clone()), "no description reads back as none");

    // deleted: gone, once
    assert!(store.delete(&saved.id).await.unwrap());
    assert!(!store.delete(&saved.id).await.unwrap(), "a second delete finds nothing");
    assert_eq!(store.get(&saved.id).await.unwrap(), None);
}

async fn walk(store: &dyn TemplateStore, owner: &str, limit: u32) -> Vec<Vec<TemplateId>> {
    let mut pages = Vec::new();
    let mut after = None;
    loop {
        let page = store.list(&user(owner), limit, after.as_ref()).await.unwrap();
        pages.push(page.items.iter().map(|t| t.id.clone()).collect());
        match page.next {
            Some(next) => after = Some(next),
            None => return pages,
        }
    }
}

async fn listing_contract(store: Arc<dyn TemplateStore>) {
    let mut saved = Vec::new();
    for (title, t) in [("a", 1), ("b", 2), ("c", 3), ("d", 3)] {
        let one = template("alice", title, at(t));
        store.save(&one).await.unwrap();
        saved.push(one.id);
    }
    store.save(&template("bob", "bobs", at(4))).await.unwrap();
    // Saved in the same millisecond: the id orders them, stably, page after page.
    let (a, b, c, d) = (saved[0].clone(), saved[1].clone(), saved[2].clone(), saved[3].clone());
    let (first, second) = if d > c { (d, c) } else { (c, d) };

    // newest first, only the owner's, paged without gaps, repeats or empty pages
    assert_eq!(walk(&*store, "alice", 10).await, vec![vec![first.clone(), second.clone(), b.clone(), a.clone()]]);
    assert_eq!(walk(&*store, "alice", 2).await, vec![vec![first.clone(), second.clone()], vec![b.clone(), a.clone()]]);
    assert_eq!(walk(&*store, "alice", 3).await, vec![vec![first.clone(), second.clone(), b.clone()], vec![a.clone()]]);
    assert_eq!(walk(&*store, "nobody", 5).await, vec![Vec::<TemplateId>::new()]);

    // a delete takes one out
    assert!(store.delete(&b).await.unwrap());
    assert_eq!(walk(&*store, "alice", 10).await, vec![vec![first, second, a]]);
}

#[tokio::test]
async fn memory_template_store_saves_once_reads_back_exactly_and_deletes() {
    templates_contract(Arc::new(MemoryTemplates::new())).await;
}

#[tokio::test]
async fn memory_template_store_lists_an_owners_templates_newest_first() {
    listing_contract(Arc::new(MemoryTemplates::new())).await;
}

async fn dynamodb(test: &str) -> Option<(moto::Moto, aws_sdk_dynamodb::Client, chainrun_core::config::Tables)> {
    moto::moto_with_tables(test).await
}

#[tokio::test]
async fn dynamodb_template_store_saves_once_reads_back_exactly_and_deletes() {
    let Some((_moto, client, tables)) = dynamodb("dynamodb_template_store_saves_once_reads_back_exactly_and_deletes").await else { return };
    templates_contract(Arc::new(DynamoTemplates::new(client, tables))).await;
}

#[tokio::test]
async fn dynamodb_template_store_lists_an_owners_templates_newest_first() {
    let Some((_moto, client, tables)) = dynamodb("dynamodb_template_store_lists_an_owners_templates_newest_first").await else { return };
    listing_contract(Arc::new(DynamoTemplates::new(client, tables))).await;
}

/// Templates share the workflows table: an owner's list of workflows must not show them,
/// nor the templates list a workflow.
async fn separate_key_spaces_contract(workflows: Arc<dyn WorkflowStore>, templates: Arc<dyn TemplateStore>) {
    let head = StoredWorkflow::new(user("alice"), "triage".parse().unwrap(), at(0));
    let first = WorkflowVersion { version: 1, definition: json!({ "name": "triage" }), written_by: user("alice"), written_at: at(0) };
    workflows.create(&head, &first).await.unwrap();
    let saved = SavedTemplate { source: Pinned { workflow_id: head.id.clone(), version: 1 }, ..template("alice", "Triage", at(1)) };
    templates.save(&saved).await.unwrap();

    let listed = workflows.list(&[Principal::User("alice".into())], 10, None).await.unwrap();
    assert_eq!(listed.items.iter().map(|h| h.id.clone()).collect::<Vec<_>>(), vec![head.id.clone()]);
    let listed = templates.list(&user("alice"), 10, None).await.unwrap();
    assert_eq!(listed.items, vec![saved]);
    assert!(workflows.delete(&head.id, at(2)).await.unwrap());
    assert_eq!(templates.list(&user("alice"), 10, None).await.unwrap().items.len(), 1, "a template outlives the workflow it came from");
}

#[tokio::test]
async fn memory_templates_and_workflows_list_apart() {
    separate_key_spaces_contract(Arc::new(MemoryWorkflows::new()), Arc::new(MemoryTemplates::new())).await;
}

#[tokio::test]
async fn dynamodb_templates_and_workflows_share_a_table_but_list_apart() {
    let Some((_moto, client, tables)) = dynamodb("dynamodb_templates_and_workflows_share_a_table_but_list_apart").await else { return };
    separate_key_spaces_contract(Arc::new(DynamoWorkflows::new(client.clone(), tables.clone())), Arc::new(DynamoTemplates::new(client, tables)))
        .await;
}

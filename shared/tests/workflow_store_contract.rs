//! The stored-workflow contract, checked against the in-memory store and against the
//! DynamoDB store on a moto server (opt-in with `CHAINRUN_MOTO=1`, as in `store_contract.rs`).
#![cfg(feature = "aws")]
#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers: a panic is the failure report

use chainrun_core::aws::DynamoWorkflows;
use chainrun_core::ids::{Principal, UserId, WorkflowId, WorkflowName};
use chainrun_core::memory::MemoryWorkflows;
use chainrun_core::ports::{SaveOutcome, StoreError, WorkflowStore};
use chainrun_core::stored::{StoredWorkflow, WorkflowVersion};
use chrono::{DateTime, Utc};
use serde_json::{Value, json};
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

fn definition(name: &str, prompt: &str) -> Value {
    json!({ "name": name, "steps": [{ "id": "a", "type": "llm", "prompt": prompt }], "n": 1.5e300, "empty": "" })
}

fn version(n: u32, def: Value, by: &str, t: DateTime<Utc>) -> WorkflowVersion {
    WorkflowVersion { version: n, definition: def, written_by: user(by), written_at: t }
}

async fn new_workflow(store: &dyn WorkflowStore, owner: &str, name: &str, t: DateTime<Utc>) -> StoredWorkflow {
    let head = StoredWorkflow::new(user(owner), name.parse().unwrap(), t);
    store.create(&head, &version(1, definition(name, "v1 é ✓"), owner, t)).await.unwrap();
    head
}

async fn versions_contract(store: Arc<dyn WorkflowStore>) {
    let head = new_workflow(&*store, "alice", "triage", at(0)).await;

    // create: the head and version 1 read back exactly, documents included
    let (got, v1) = store.get(&head.id, None).await.unwrap().unwrap();
    assert_eq!(got, head);
    assert_eq!(v1, version(1, definition("triage", "v1 é ✓"), "alice", at(0)));
    assert_eq!(store.get(&head.id, Some(1)).await.unwrap().unwrap().1, v1);
    assert_eq!(store.get(&head.id, Some(2)).await.unwrap(), None, "no version 2 yet");
    assert_eq!(store.get(&WorkflowId::new(), None).await.unwrap(), None);
    store.create(&head, &v1).await.expect("the same create again (a retry whose reply was lost) succeeds");
    let impostor = StoredWorkflow { owner: user("mallory"), ..head.clone() };
    assert!(matches!(store.create(&impostor, &v1).await, Err(StoreError::Rejected(_))), "an id is never overwritten");
    assert_eq!(store.get(&head.id, None).await.unwrap().unwrap().0.owner, user("alice"));

    // a new version: only from the version the writer read
    let renamed: WorkflowName = "triage-2".parse().unwrap();
    let v2 = version(2, definition("triage-2", "v2"), "alice", at(10));
    let saved = store.save_version(&head.id, 1, &renamed, &v2).await.unwrap();
    let SaveOutcome::Saved(now) = saved else { panic!("expected saved, got {saved:?}") };
    assert_eq!((now.version, &now.name, now.updated_at, now.created_at), (2, &renamed, at(10), at(0)));

    // a lost update: a writer that read version 1 is refused and told the current version
    let late = version(2, definition("triage", "lost"), "alice", at(11));
    assert_eq!(store.save_version(&head.id, 1, &renamed, &late).await.unwrap(), SaveOutcome::Stale { current: 2 });
    assert_eq!(store.get(&head.id, None).await.unwrap().unwrap().1, v2, "the lost update wrote nothing");
    let skipping = version(4, definition("triage", "skip"), "alice", at(12));
    assert_eq!(store.save_version(&head.id, 3, &renamed, &skipping).await.unwrap(), SaveOutcome::Stale { current: 2 });

    // every version stays readable by number
    assert_eq!(store.get(&head.id, Some(1)).await.unwrap().unwrap().1, v1);
    let (latest_head, latest) = store.get(&head.id, None).await.unwrap().unwrap();
    assert_eq!((latest_head.version, latest), (2, v2.clone()));

    // delete: gone for every read and write, once
    assert!(store.delete(&head.id, at(20)).await.unwrap());
    assert!(!store.delete(&head.id, at(21)).await.unwrap(), "a second delete finds nothing");
    assert!(!store.delete(&WorkflowId::new(), at(21)).await.unwrap());
    assert_eq!(store.get(&head.id, None).await.unwrap(), None);
    assert_eq!(store.get(&head.id, Some(1)).await.unwrap(), None);
    let v3 = version(3, definition("triage", "v3"), "alice", at(22));
    assert_eq!(store.save_version(&head.id, 2, &renamed, &v3).await.unwrap(), SaveOutcome::NotFound);
    assert_eq!(store.save_version(&WorkflowId::new(), 1, &renamed, &v2).await.unwrap(), SaveOutcome::NotFound);
}

async fn walk(store: &dyn WorkflowStore, owner: &str, limit: u32) -> Vec<Vec<WorkflowId>> {
    let mut pages = Vec::new();
    let mut after = None;
    loop {
        let page = store.list(&[Principal::User(owner.into())], limit, after.as_ref()).await.unwrap();
        pages.push(page.items.iter().map(|h| h.id.clone()).collect());
        match page.next {
            Some(next) => after = Some(next),
            None => return pages,
        }
    }
}

async fn listing_contract(store: Arc<dyn WorkflowStore>) {
    let a = new_workflow(&*store, "alice", "a", at(1)).await;
    let b = new_workflow(&*store, "alice", "b", at(2)).await;
    let c = new_workflow(&*store, "alice", "c", at(3)).await;
    // Created in the same millisecond: the id orders them, stably, page after page.
    let d = new_workflow(&*store, "alice", "d", at(3)).await;
    new_workflow(&*store, "bob", "bobs", at(4)).await;
    let (c_then_d, d_then_c) = if d.id > c.id { (d.id.clone(), c.id.clone()) } else { (c.id.clone(), d.id.clone()) };

    // newest updated first, only the owner's, paged without gaps, repeats or empty pages
    assert_eq!(walk(&*store, "alice", 10).await, vec![vec![c_then_d.clone(), d_then_c.clone(), b.id.clone(), a.id.clone()]]);
    assert_eq!(walk(&*store, "alice", 2).await, vec![vec![c_then_d.clone(), d_then_c.clone()], vec![b.id.clone(), a.id.clone()]]);
    assert_eq!(walk(&*store, "alice", 3).await, vec![vec![c_then_d.clone(), d_then_c.clone(), b.id.clone()], vec![a.id.clone()]]);
    assert_eq!(walk(&*store, "nobody", 5).await, vec![Vec::<WorkflowId>::new()]);

    // a new version moves a workflow to the front; a delete takes it out
    let v2 = version(2, definition("a", "v2"), "alice", at(30));
    assert!(matches!(store.save_version(&a.id, 1, &"a".parse().unwrap(), &v2).await.unwrap(), SaveOutcome::Saved(_)));
    assert!(store.delete(&b.id, at(31)).await.unwrap());
    let page = store.list(&[Principal::User("alice".into())], 10, None).await.unwrap();
    assert_eq!(page.items.iter().map(|h| h.id.clone()).collect::<Vec<_>>(), vec![a.id.clone(), c_then_d, d_then_c]);
    assert_eq!((page.items[0].version, page.items[0].updated_at), (2, at(30)));
    assert_eq!(page.next, None);
}

fn ids(page: &chainrun_core::ports::WorkflowPage) -> Vec<WorkflowId> {
    page.items.iter().map(|h| h.id.clone()).collect()
}

/// Who sees a workflow in lists follows its access: set, changed, and kept through new
/// versions and deletes; a caller acting as several grantees sees each workflow once.
async fn access_contract(store: Arc<dyn WorkflowStore>) {
    use chainrun_core::access::{Access, Grantee, Role, Share, Visibility};
    let (alice, bob, support) = (Principal::User("alice".into()), Principal::User("bob".into()), Principal::Group("support".into()));
    let private = new_workflow(&*store, "alice", "private", at(0)).await;
    let shared = new_workflow(&*store, "alice", "shared", at(1)).await;
    let public = new_workflow(&*store, "alice", "public", at(2)).await;
    let to_bob_and_support = Access {
        visibility: Visibility::Shared,
        shares: vec![Share { to: Grantee::User(user("bob")), role: Role::Edit }, Share { to: Grantee::Group("support".into()), role: Role::View }],
    };
    assert!(store.set_access(&shared.id, &to_bob_and_support).await.unwrap());
    assert!(store.set_access(&public.id, &Access { visibility: Visibility::Public, shares: vec![] }).await.unwrap());
    assert!(!store.set_access(&WorkflowId::new(), &Access::private()).await.unwrap(), "no such workflow");
    assert_eq!(store.get(&shared.id, None).await.unwrap().unwrap().0.access, to_bob_and_support, "the head reads back its access");

    let list = |who: Vec<Principal>, limit: u32| {
        let store = store.clone();
        async move { store.list(&who, limit, None).await.unwrap() }
    };
    assert_eq!(ids(&list(vec![alice.clone()], 10).await), vec![public.id.clone(), shared.id.clone(), private.id.clone()]);
    assert_eq!(ids(&list(vec![bob.clone(), Principal::Public], 10).await), vec![public.id.clone(), shared.id.clone()]);
    assert_eq!(ids(&list(vec![support.clone()], 10).await), vec![shared.id.clone()]);
    assert_eq!(ids(&list(vec![Principal::Admin], 10).await).len(), 3, "admins see everything");
    // Acting as every grantee at once: each workflow once, in pages that lose nothing.
    let everyone = vec![alice.clone(), bob.clone(), support.clone(), Principal::Public, Principal::Admin];
    let first = store.list(&everyone, 2, None).await.unwrap();
    assert_eq!(ids(&first), vec![public.id.clone(), shared.id.clone()]);
    let second = store.list(&everyone, 2, first.next.as_ref()).await.unwrap();
    assert_eq!((ids(&second), second.next), (vec![private.id.clone()], None));

    // A new version moves the workflow up every list it is in, and keeps it out of others.
    let v2 = version(2, definition("shared", "v2"), "bob", at(50));
    assert!(matches!(store.save_version(&shared.id, 1, &"shared".parse().unwrap(), &v2).await.unwrap(), SaveOutcome::Saved(_)));
    assert_eq!(ids(&list(vec![bob.clone()], 10).await), vec![shared.id.clone()]);
    assert_eq!(list(vec![bob.clone()], 10).await.items[0].version, 2, "a grantee's list shows the latest version");
    assert_eq!(ids(&list(vec![alice.clone()], 10).await)[0], shared.id);

    // Narrowed: bob and support no longer see it; alice and admins still do.
    assert!(store.set_access(&shared.id, &Access::private()).await.unwrap());
    assert!(list(vec![bob.clone(), support.clone()], 10).await.items.is_empty());
    assert_eq!(ids(&list(vec![alice.clone()], 10).await).len(), 3);
    // Deleted: gone from every list.
    assert!(store.delete(&public.id, at(60)).await.unwrap());
    assert!(list(vec![Principal::Public], 10).await.items.is_empty());
    assert_eq!(ids(&list(vec![Principal::Admin], 10).await), vec![shared.id.clone(), private.id.clone()]);
}

#[tokio::test]
async fn memory_workflow_store_lists_what_each_grantee_may_see() {
    access_contract(Arc::new(MemoryWorkflows::new())).await;
}

#[tokio::test]
async fn memory_workflow_store_keeps_versions_and_refuses_lost_updates() {
    versions_contract(Arc::new(MemoryWorkflows::new())).await;
}

#[tokio::test]
async fn memory_workflow_store_lists_an_owners_workflows_newest_first() {
    listing_contract(Arc::new(MemoryWorkflows::new())).await;
}

/// The DynamoDB store on a fresh moto server, when the moto half runs (`CHAINRUN_MOTO=1`).
async fn dynamodb(test: &str) -> Option<(moto::Moto, Arc<dyn WorkflowStore>)> {
    let (moto, client, tables) = moto::moto_with_tables(test).await?;
    Some((moto, Arc::new(DynamoWorkflows::new(client, tables))))
}

#[tokio::test]
async fn dynamodb_workflow_store_keeps_versions_and_refuses_lost_updates() {
    let Some((_moto, store)) = dynamodb("dynamodb_workflow_store_keeps_versions_and_refuses_lost_updates").await else { return };
    versions_contract(store).await;
}

#[tokio::test]
async fn dynamodb_workflow_store_lists_an_owners_workflows_newest_first() {
    let Some((_moto, store)) = dynamodb("dynamodb_workflow_store_lists_an_owners_workflows_newest_first").await else { return };
    listing_contract(store).await;
}

#[tokio::test]
async fn dynamodb_workflow_store_lists_what_each_grantee_may_see() {
    let Some((_moto, store)) = dynamodb("dynamodb_workflow_store_lists_what_each_grantee_may_see").await else { return };
    access_contract(store).await;
}

async fn pinned_run_contract(runs: Arc<dyn chainrun_core::ports::RunStore>) {
    let definition = definition("triage", "v1");
    let mut run = chainrun_core::run::RunRecord::new(
        "triage".parse().unwrap(),
        definition,
        json!({}),
        user("alice"),
        vec![chainrun_core::ids::Principal::User("alice".into())],
        Utc::now(),
    );
    let pinned = chainrun_core::stored::Pinned { workflow_id: WorkflowId::new(), version: 7 };
    run.pinned = Some(pinned.clone());
    runs.create_run(&run).await.unwrap();
    assert_eq!(runs.get_run(&run.id).await.unwrap().unwrap().pinned, Some(pinned), "the run remembers the version it ran");
    let inline = chainrun_core::run::RunRecord { id: chainrun_core::ids::RunId::new(), pinned: None, ..run };
    runs.create_run(&inline).await.unwrap();
    assert_eq!(runs.get_run(&inline.id).await.unwrap().unwrap().pinned, None);
}

#[tokio::test]
async fn memory_run_store_keeps_the_workflow_version_a_run_pinned() {
    pinned_run_contract(Arc::new(chainrun_core::memory::MemoryStore::new())).await;
}

#[tokio::test]
async fn dynamodb_run_store_keeps_the_workflow_version_a_run_pinned() {
    let Some((_moto, client, tables)) = moto::moto_with_tables("dynamodb_run_store_keeps_the_workflow_version_a_run_pinned").await else { return };
    pinned_run_contract(Arc::new(chainrun_core::aws::DynamoStore::new(client, tables))).await;
}

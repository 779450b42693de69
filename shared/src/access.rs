//! Who may do what with a workflow and its runs.
//!
//! A stored workflow has an [`Access`]: a [`Visibility`] and, for `SHARED`, a bounded list
//! of [`Share`]s, each naming a user or group and a [`Role`]. Its runs inherit it; a run
//! may be started narrower (never wider, see [`Access::within`]), and inline runs take the
//! same options. Roles are cumulative, like GitHub's repository roles: each includes the
//! ones before it.
//!
//! | role | on the workflow | on its runs |
//! |---|---|---|
//! | `view` | read it | read them |
//! | `run` | + start and estimate runs | read them |
//! | `edit` | + write new versions | read them |
//! | `control` | + everything the owner does but delete and re-share | + cancel, pause, resume, retry, override |
//!
//! Besides the shares: the owner and members of the admin group hold `control` over the
//! workflow and every run (and only they change its access or delete it); a run's starter
//! holds `control` over the run; `AUTHED` gives every signed-in caller `run`, `PUBLIC`
//! gives everyone `run`, token or not (anonymous callers only read the runs they may see
//! and start runs; they steer nothing); `ADMIN_ONLY` leaves the admin group alone.
//!
//! The rules are pure and live here so the API (which enforces them) and the runner (which
//! writes a run's progress to everyone who may see it) agree.

use crate::ids::{Principal, UserId};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// At most this many shares per workflow or run: each is a progress row every event of a
/// run updates in one DynamoDB transaction (100 items, see `ports::MAX_OWNERS`), next to
/// the starter, the workflow's owner, reviewers and the shared feeds.
pub const MAX_SHARES: usize = 25;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Visibility {
    /// The owner (and the admin group).
    #[default]
    Private,
    /// The owner and the listed users and groups, each with its role.
    Shared,
    /// Any signed-in caller may view and run.
    Authed,
    /// Anyone, token or not, may view and run.
    Public,
    /// Only members of the admin group.
    AdminOnly,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    View,
    Run,
    Edit,
    Control,
}

/// Whom a share names: a user or a group (the shared feeds are visibilities, not shares).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Grantee {
    User(UserId),
    Group(String),
}

impl Grantee {
    pub fn principal(&self) -> Principal {
        match self {
            Grantee::User(u) => Principal::User(u.to_string()),
            Grantee::Group(g) => Principal::Group(g.clone()),
        }
    }
}

/// One share: `{ "user": "bob", "role": "run" }` or `{ "group": "support", "role": "view" }`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
pub struct Share {
    #[serde(flatten)]
    pub to: Grantee,
    pub role: Role,
}

/// A workflow's or a run's visibility and shares.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Access {
    #[serde(default)]
    pub visibility: Visibility,
    /// Only with `SHARED`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub shares: Vec<Share>,
}

/// Why an [`Access`] is refused; the message names the field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct InvalidAccess(pub String);

/// Who is asking: a user with groups, or nobody (no token).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Viewer<'a> {
    pub user: &'a UserId,
    pub groups: &'a [String],
    pub admin: bool,
}

impl Viewer<'_> {
    pub fn signed_in(&self) -> bool {
        !self.user.is_anonymous()
    }

    fn is(&self, grantee: &Grantee) -> bool {
        match grantee {
            Grantee::User(u) => self.signed_in() && u == self.user,
            Grantee::Group(g) => self.groups.contains(g),
        }
    }
}

impl Access {
    pub fn private() -> Self {
        Self::default()
    }

    /// Checks what a client sent: shares only with `SHARED`, at most [`MAX_SHARES`], each
    /// principal once, group names non-empty; `ADMIN_ONLY` only from an admin (anyone else
    /// would lock themselves out).
    pub fn validate(&self, by_admin: bool) -> Result<(), InvalidAccess> {
        match self.visibility {
            Visibility::Shared if self.shares.is_empty() => {
                return Err(InvalidAccess("shares: SHARED needs at least one share ({\"user\": …} or {\"group\": …} with a role)".into()));
            }
            Visibility::Shared => {}
            _ if !self.shares.is_empty() => {
                return Err(InvalidAccess(format!("shares: only a SHARED visibility has shares, not {}", self.visibility.name())));
            }
            Visibility::AdminOnly if !by_admin => {
                return Err(InvalidAccess("visibility: only members of the admin group may make something ADMIN_ONLY".into()));
            }
            _ => {}
        }
        if self.shares.len() > MAX_SHARES {
            return Err(InvalidAccess(format!("shares: at most {MAX_SHARES}, got {}", self.shares.len())));
        }
        let mut seen = std::collections::HashSet::new();
        for (i, share) in self.shares.iter().enumerate() {
            if let Grantee::Group(g) = &share.to
                && (g.trim().is_empty() || g.len() > 256 || g.chars().any(char::is_control))
            {
                return Err(InvalidAccess(format!("shares[{i}].group: 1 to 256 characters, no control characters")));
            }
            if let Grantee::User(u) = &share.to
                && u.is_anonymous()
            {
                return Err(InvalidAccess(format!("shares[{i}].user: {:?} is not a user", u.as_str())));
            }
            if !seen.insert(&share.to) {
                return Err(InvalidAccess(format!("shares[{i}]: {} is shared with twice", share.to.principal())));
            }
        }
        Ok(())
    }

    /// The role `viewer` holds through this access alone (not as owner or starter).
    pub fn role_of(&self, viewer: &Viewer) -> Option<Role> {
        if viewer.admin {
            return Some(Role::Control);
        }
        match self.visibility {
            Visibility::Private | Visibility::AdminOnly => None,
            Visibility::Public => Some(Role::Run),
            Visibility::Authed => viewer.signed_in().then_some(Role::Run),
            Visibility::Shared => self.shares.iter().filter(|s| viewer.is(&s.to)).map(|s| s.role).max(),
        }
    }

    /// Whether a run with this access may be started under `workflow`'s: its audience must
    /// be part of the workflow's. `Err` says why not.
    pub fn within(&self, workflow: &Access) -> Result<(), InvalidAccess> {
        use Visibility::*;
        let fits = match (self.visibility, workflow.visibility) {
            (Private | AdminOnly, _) => true,
            (Shared, Authed | Public) => true,
            (Shared, Shared) => self.shares.iter().all(|share| workflow.shares.iter().any(|w| w.to == share.to && w.role >= share.role)),
            (Authed, Authed | Public) => true,
            (Public, Public) => true,
            _ => false,
        };
        if fits {
            Ok(())
        } else {
            Err(InvalidAccess(format!(
                "options.visibility: a run may be narrower than its workflow, never wider; the workflow is {}{}",
                workflow.visibility.name(),
                if self.visibility == Shared && workflow.visibility == Shared {
                    " and a run's shares must be among its shares, with no higher role"
                } else {
                    ""
                }
            )))
        }
    }

    /// The shared feeds and groups whose progress rows show a run with this access (users
    /// named by shares included).
    pub fn feeds(&self) -> Vec<Principal> {
        let mut feeds = vec![Principal::Admin];
        match self.visibility {
            Visibility::Public => feeds.push(Principal::Public),
            Visibility::Authed => feeds.push(Principal::Authed),
            Visibility::Shared => feeds.extend(self.shares.iter().map(|s| s.to.principal())),
            Visibility::Private | Visibility::AdminOnly => {}
        }
        feeds
    }
}

impl Visibility {
    pub fn name(self) -> &'static str {
        match self {
            Visibility::Private => "PRIVATE",
            Visibility::Shared => "SHARED",
            Visibility::Authed => "AUTHED",
            Visibility::Public => "PUBLIC",
            Visibility::AdminOnly => "ADMIN_ONLY",
        }
    }
}

/// The role `viewer` holds on a run whose access is `access` (see [`effective`]), started
/// by `starter` from a workflow owned by `workflow_owner`, asking `people` (its reviewers
/// and answerers, who read it). On a run, `run` and `edit` come to `view`.
pub fn run_role(access: &Access, starter: &UserId, workflow_owner: Option<&UserId>, people: &[Principal], viewer: &Viewer) -> Option<Role> {
    if viewer.admin || (viewer.signed_in() && (viewer.user == starter || workflow_owner == Some(viewer.user))) {
        return Some(Role::Control);
    }
    let asked = viewer.signed_in()
        && people.iter().any(|p| match p {
            Principal::User(u) => u == viewer.user.as_str(),
            Principal::Group(g) => viewer.groups.contains(g),
            _ => false,
        });
    match access.role_of(viewer) {
        Some(Role::Control) => Some(Role::Control),
        Some(_) => Some(Role::View),
        None => asked.then_some(Role::View),
    }
}

/// Everyone whose progress feed shows a run: its starter (unless anonymous), its
/// workflow's owner, the people its person steps ask, and the feeds its access names — each
/// once, in that order.
pub fn run_owners(starter: &UserId, workflow_owner: Option<&UserId>, people: &[Principal], access: &Access) -> Vec<Principal> {
    let mut owners = Vec::new();
    if !starter.is_anonymous() {
        owners.push(Principal::User(starter.to_string()));
    }
    owners.extend(workflow_owner.map(|o| Principal::User(o.to_string())));
    owners.extend(people.iter().cloned());
    owners.extend(access.feeds());
    let mut seen = std::collections::HashSet::new();
    owners.retain(|o| seen.insert(o.clone()));
    owners
}

/// A run's access as it stands: its own (`None`: as its workflow's) bounded by its
/// workflow's now, so a workflow made narrower narrows its runs at once.
pub fn effective(run: Option<&Access>, workflow: Option<&Access>) -> Access {
    match (run, workflow) {
        (Some(run), Some(workflow)) if run.within(workflow).is_ok() => run.clone(),
        (Some(_), Some(_)) => Access::private(),
        (None, Some(workflow)) => workflow.clone(),
        (Some(run), None) => run.clone(),
        (None, None) => Access::private(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn user(u: &str) -> UserId {
        u.parse().unwrap()
    }

    fn shared(shares: &[(Grantee, Role)]) -> Access {
        Access { visibility: Visibility::Shared, shares: shares.iter().map(|(to, role)| Share { to: to.clone(), role: *role }).collect() }
    }

    #[test]
    fn shares_parse_as_users_or_groups_with_a_role() {
        let access: Access = serde_json::from_value(serde_json::json!({
            "visibility": "SHARED", "shares": [{ "user": "bob", "role": "run" }, { "group": "support", "role": "view" }]
        }))
        .unwrap();
        assert_eq!(access, shared(&[(Grantee::User(user("bob")), Role::Run), (Grantee::Group("support".into()), Role::View)]));
        assert!(serde_json::from_value::<Access>(serde_json::json!({ "visibility": "FRIENDS" })).is_err());
        assert!(
            serde_json::from_value::<Access>(serde_json::json!({ "visibility": "SHARED", "shares": [{ "user": "b", "role": "owner" }] })).is_err()
        );
    }

    #[test]
    fn invalid_accesses_name_the_field() {
        let bob = Grantee::User(user("bob"));
        assert!(shared(&[]).validate(false).unwrap_err().0.starts_with("shares:"));
        assert!(shared(&[(bob.clone(), Role::Run), (bob.clone(), Role::View)]).validate(false).unwrap_err().0.contains("twice"));
        let too_many: Vec<_> = (0..=MAX_SHARES).map(|i| (Grantee::Group(format!("g{i}")), Role::View)).collect();
        assert!(shared(&too_many).validate(false).unwrap_err().0.contains("at most"));
        let public_with_shares = Access { visibility: Visibility::Public, ..shared(&[(bob, Role::View)]) };
        assert!(public_with_shares.validate(false).is_err());
        let admin_only = Access { visibility: Visibility::AdminOnly, shares: vec![] };
        assert!(admin_only.validate(false).is_err());
        assert!(admin_only.validate(true).is_ok());
    }

    #[test]
    fn roles_come_from_the_visibility_and_the_best_matching_share() {
        let bob = user("bob");
        let anonymous = UserId::anonymous();
        let groups = ["support".to_owned()];
        let as_bob = Viewer { user: &bob, groups: &groups, admin: false };
        let nobody = Viewer { user: &anonymous, groups: &[], admin: false };
        let access = shared(&[(Grantee::User(bob.clone()), Role::View), (Grantee::Group("support".into()), Role::Edit)]);
        assert_eq!(access.role_of(&as_bob), Some(Role::Edit));
        assert_eq!(access.role_of(&nobody), None);
        let authed = Access { visibility: Visibility::Authed, shares: vec![] };
        assert_eq!(authed.role_of(&as_bob), Some(Role::Run));
        assert_eq!(authed.role_of(&nobody), None);
        let public = Access { visibility: Visibility::Public, shares: vec![] };
        assert_eq!(public.role_of(&nobody), Some(Role::Run));
        let admin_only = Access { visibility: Visibility::AdminOnly, shares: vec![] };
        assert_eq!(admin_only.role_of(&as_bob), None);
        assert_eq!(admin_only.role_of(&Viewer { admin: true, ..as_bob }), Some(Role::Control));
    }

    #[test]
    fn a_run_may_be_narrower_than_its_workflow_never_wider() {
        use Visibility::*;
        let of = |v| Access { visibility: v, shares: vec![] };
        let bob = Grantee::User(user("bob"));
        for (run, workflow, ok) in [
            (of(Private), of(Public), true),
            (of(Authed), of(Public), true),
            (of(Public), of(Authed), false),
            (of(Authed), of(Private), false),
            (shared(&[(bob.clone(), Role::View)]), shared(&[(bob.clone(), Role::Run)]), true),
            (shared(&[(bob.clone(), Role::Control)]), shared(&[(bob.clone(), Role::Run)]), false),
            (shared(&[(Grantee::Group("x".into()), Role::View)]), shared(&[(bob, Role::Run)]), false),
        ] {
            assert_eq!(run.within(&workflow).is_ok(), ok, "{run:?} within {workflow:?}");
        }
    }

    #[test]
    fn a_narrowed_workflow_narrows_its_runs() {
        use Visibility::*;
        let of = |v| Access { visibility: v, shares: vec![] };
        assert_eq!(effective(None, Some(&of(Public))), of(Public));
        assert_eq!(effective(Some(&of(Public)), Some(&of(Private))), of(Private));
        assert_eq!(effective(Some(&of(Authed)), Some(&of(Public))), of(Authed));
        assert_eq!(effective(Some(&of(Authed)), None), of(Authed));
    }
}

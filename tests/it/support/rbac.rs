//! A small RBAC authorizer over the store's Roles, ClusterRoles and their bindings, so a test
//! can prove that a binding it created grants (or that its absence refuses) what it should.

use serde_json::Value;

use super::objects::{Selector, Store};
use super::resources::{CLUSTER_ROLES, CLUSTER_ROLE_BINDINGS, ROLES, ROLE_BINDINGS};

/// What a request asks to do, in RBAC's terms.
#[derive(Debug)]
pub struct Attributes {
    pub verb: String,
    pub group: String,
    /// The plural, with `/subresource` when there is one (`pods/exec`).
    pub resource: String,
    /// Empty at the cluster scope.
    pub namespace: String,
    /// Empty for collections.
    pub name: String,
}

/// Whether any binding that names `user` or one of `groups` grants `attributes`.
pub fn allows(store: &Store, user: &str, groups: &[String], attributes: &Attributes) -> bool {
    let subject_matches = |subject: &Value, binding_namespace: &str| {
        let name = subject["name"].as_str().unwrap_or_default();
        match subject["kind"].as_str().unwrap_or_default() {
            "User" => name == user,
            "Group" => groups.iter().any(|g| g == name),
            "ServiceAccount" => {
                let namespace = subject["namespace"].as_str().unwrap_or(binding_namespace);
                user == format!("system:serviceaccount:{namespace}:{name}")
            }
            _ => false,
        }
    };
    let binds = |binding: &Value| {
        let namespace = binding["metadata"]["namespace"]
            .as_str()
            .unwrap_or_default();
        binding["subjects"]
            .as_array()
            .is_some_and(|subjects| subjects.iter().any(|s| subject_matches(s, namespace)))
    };
    let role_grants = |binding: &Value| {
        let role_ref = &binding["roleRef"];
        let name = role_ref["name"].as_str().unwrap_or_default();
        let role = match role_ref["kind"].as_str() {
            Some("ClusterRole") => store.get(&CLUSTER_ROLES, "", name),
            Some("Role") => {
                let namespace = binding["metadata"]["namespace"]
                    .as_str()
                    .unwrap_or_default();
                store.get(&ROLES, namespace, name)
            }
            _ => None,
        };
        role.and_then(|r| r["rules"].as_array().cloned())
            .is_some_and(|rules| rules.iter().any(|rule| rule_grants(rule, attributes)))
    };
    let (cluster_bindings, _) = store.list(&Selector::all(&CLUSTER_ROLE_BINDINGS));
    if cluster_bindings.iter().any(|b| binds(b) && role_grants(b)) {
        return true;
    }
    if attributes.namespace.is_empty() {
        return false;
    }
    let mut in_namespace = Selector::all(&ROLE_BINDINGS);
    in_namespace.namespace = Some(attributes.namespace.clone());
    let (bindings, _) = store.list(&in_namespace);
    bindings.iter().any(|b| binds(b) && role_grants(b))
}

fn rule_grants(rule: &Value, a: &Attributes) -> bool {
    let has = |field: &str, wanted: &str| {
        rule[field]
            .as_array()
            .is_some_and(|vs| vs.iter().any(|v| v == "*" || v == wanted))
    };
    let names_ok = match rule["resourceNames"].as_array() {
        Some(names) if !names.is_empty() => names.iter().any(|n| n == a.name.as_str()),
        _ => true,
    };
    has("verbs", &a.verb) && has("apiGroups", &a.group) && has("resources", &a.resource) && names_ok
}

/// The apiserver's refusal, word for word:
/// `pods is forbidden: User "u" cannot list resource "pods" in API group "" in the namespace "default"`.
pub fn forbidden_message(user: &str, a: &Attributes) -> String {
    let plural = a.resource.split('/').next().unwrap_or_default();
    let qualified = if a.group.is_empty() {
        plural.to_string()
    } else {
        format!("{plural}.{}", a.group)
    };
    let subject = if a.name.is_empty() {
        qualified
    } else {
        format!("{qualified} \"{}\"", a.name)
    };
    let scope = if a.namespace.is_empty() {
        "at the cluster scope".to_string()
    } else {
        format!("in the namespace \"{}\"", a.namespace)
    };
    format!(
        "{subject} is forbidden: User \"{user}\" cannot {} resource \"{}\" in API group \"{}\" {scope}",
        a.verb, a.resource, a.group
    )
}

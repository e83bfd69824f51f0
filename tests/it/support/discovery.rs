//! Discovery documents in the legacy (unaggregated) format. kubectl 1.32 asks for aggregated
//! discovery first, but client-go falls back when the response's content type is plain
//! `application/json`, so this is all `api-resources`, short names and REST mapping need.

use std::net::SocketAddr;

use serde_json::{json, Value};

use super::resources;

pub const GIT_VERSION: &str = "v1.32.0";

pub fn version() -> Value {
    json!({
        "major": "1",
        "minor": "32",
        "gitVersion": GIT_VERSION,
        "gitCommit": "0000000000000000000000000000000000000000",
        "gitTreeState": "clean",
        "buildDate": "2024-12-11T00:00:00Z",
        "goVersion": "go1.23.3",
        "compiler": "gc",
        "platform": "linux/amd64",
    })
}

pub fn core_versions(addr: SocketAddr) -> Value {
    json!({
        "kind": "APIVersions",
        "versions": ["v1"],
        "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": addr.to_string()}],
    })
}

const ALL_VERBS: [&str; 8] = [
    "create",
    "delete",
    "deletecollection",
    "get",
    "list",
    "patch",
    "update",
    "watch",
];

/// The subresources served, by group: (name, kind, verbs).
fn subresources(group: &str) -> Vec<(&'static str, &'static str, &'static [&'static str])> {
    match group {
        "" => vec![
            ("pods/attach", "PodAttachOptions", &["create", "get"]),
            ("pods/exec", "PodExecOptions", &["create", "get"]),
            ("pods/log", "Pod", &["get"]),
            (
                "pods/portforward",
                "PodPortForwardOptions",
                &["create", "get"],
            ),
            ("serviceaccounts/token", "TokenRequest", &["create"]),
        ],
        "apps" => vec![(
            "deployments/status",
            "Deployment",
            &["get", "patch", "update"],
        )],
        _ => vec![],
    }
}

/// The `APIResourceList` of one group version, from the resource table.
pub fn resource_list(group: &str, version: &str) -> Value {
    let mut entries: Vec<Value> = resources::in_group(group, version)
        .map(|r| {
            // Like the apiserver, namespaces cannot be deleted as a collection.
            let verbs: Vec<&str> = ALL_VERBS
                .iter()
                .copied()
                .filter(|v| *v != "deletecollection" || r.namespaced)
                .collect();
            let mut entry = json!({
                "name": r.plural, "singularName": r.singular(), "namespaced": r.namespaced,
                "kind": r.kind, "verbs": verbs,
            });
            if !r.short_names.is_empty() {
                entry["shortNames"] = json!(r.short_names);
            }
            if !r.categories.is_empty() {
                entry["categories"] = json!(r.categories);
            }
            entry
        })
        .collect();
    for (name, kind, verbs) in subresources(group) {
        entries.push(json!({"name": name, "singularName": "", "namespaced": true, "kind": kind, "verbs": verbs}));
    }
    let group_version = if group.is_empty() {
        version.to_string()
    } else {
        format!("{group}/{version}")
    };
    json!({
        "kind": "APIResourceList",
        "apiVersion": "v1",
        "groupVersion": group_version,
        "resources": entries,
    })
}

pub fn core_v1() -> Value {
    resource_list("", "v1")
}

/// OpenAPI v3's index: one document per group version. kubectl reads it to learn that the
/// server validates fields itself (`fieldValidation`); without it `kubectl apply` fails with
/// "failed to download openapi".
pub fn openapi_v3_index() -> Value {
    let mut paths = serde_json::Map::new();
    for gv in std::iter::once("api/v1".to_string())
        .chain(resources::GROUPS.iter().map(|g| format!("apis/{g}/v1")))
    {
        let url = format!("/openapi/v3/{gv}?hash=standin");
        paths.insert(gv, json!({"serverRelativeURL": url}));
    }
    json!({"paths": paths})
}

/// One group version's OpenAPI v3 document: only the PATCH operations, which is where kubectl
/// looks for the `fieldValidation` parameter.
pub fn openapi_v3(group: &str, version: &str) -> Option<Value> {
    let mut paths = serde_json::Map::new();
    for r in resources::in_group(group, version) {
        let path = if r.namespaced {
            format!(
                "{}/namespaces/{{namespace}}/{}/{{name}}",
                r.prefix(),
                r.plural
            )
        } else {
            format!("{}/{}/{{name}}", r.prefix(), r.plural)
        };
        let patch = json!({
            "operationId": format!("patch{}", r.kind),
            "x-kubernetes-action": "patch",
            "x-kubernetes-group-version-kind": {"group": r.group, "version": r.version, "kind": r.kind},
            "parameters": [
                {"name": "fieldValidation", "in": "query", "schema": {"type": "string", "uniqueItems": true}},
                {"name": "fieldManager", "in": "query", "schema": {"type": "string", "uniqueItems": true}},
            ],
            "responses": {"200": {"description": "OK"}},
        });
        paths.insert(path, json!({"patch": patch}));
    }
    if paths.is_empty() {
        return None;
    }
    Some(json!({
        "openapi": "3.0.0",
        "info": {"title": "Kubernetes", "version": GIT_VERSION},
        "paths": paths,
    }))
}

pub const AUTHENTICATION_GROUP: &str = "authentication.k8s.io";

pub fn groups() -> Value {
    let groups: Vec<Value> = resources::GROUPS
        .iter()
        .copied()
        .chain([AUTHENTICATION_GROUP])
        .map(group)
        .collect();
    json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": groups})
}

/// One `APIGroup`: the only version served is v1.
pub fn group(name: &str) -> Value {
    let version = json!({"groupVersion": format!("{name}/v1"), "version": "v1"});
    json!({"kind": "APIGroup", "apiVersion": "v1", "name": name, "versions": [version], "preferredVersion": version})
}

pub fn authentication_v1() -> Value {
    json!({
        "kind": "APIResourceList",
        "apiVersion": "v1",
        "groupVersion": format!("{AUTHENTICATION_GROUP}/v1"),
        "resources": [{
            "name": "selfsubjectreviews", "singularName": "selfsubjectreview", "namespaced": false,
            "kind": "SelfSubjectReview", "verbs": ["create"],
        }],
    })
}

//! Discovery documents in the legacy (unaggregated) format. kubectl 1.32 asks for aggregated
//! discovery first, but client-go falls back when the response's content type is plain
//! `application/json`, so this is all `api-resources`, short names and REST mapping need.

use std::net::SocketAddr;

use serde_json::{json, Value};

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

pub fn core_v1() -> Value {
    let subresource = |name: &str, kind: &str, verbs: &[&str]| json!({"name": name, "singularName": "", "namespaced": true, "kind": kind, "verbs": verbs});
    json!({
        "kind": "APIResourceList",
        "groupVersion": "v1",
        "resources": [
            {
                "name": "namespaces", "singularName": "namespace", "namespaced": false,
                "kind": "Namespace", "verbs": ["create", "delete", "get", "list", "patch", "update", "watch"],
                "shortNames": ["ns"],
            },
            {
                "name": "pods", "singularName": "pod", "namespaced": true, "kind": "Pod",
                "verbs": ALL_VERBS, "shortNames": ["po"], "categories": ["all"],
            },
            subresource("pods/attach", "PodAttachOptions", &["create", "get"]),
            subresource("pods/exec", "PodExecOptions", &["create", "get"]),
            subresource("pods/log", "Pod", &["get"]),
            subresource("pods/portforward", "PodPortForwardOptions", &["create", "get"]),
        ],
    })
}

pub const AUTHENTICATION_GROUP: &str = "authentication.k8s.io";

pub fn groups() -> Value {
    let version = json!({"groupVersion": format!("{AUTHENTICATION_GROUP}/v1"), "version": "v1"});
    json!({
        "kind": "APIGroupList",
        "apiVersion": "v1",
        "groups": [{"name": AUTHENTICATION_GROUP, "versions": [version], "preferredVersion": version}],
    })
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

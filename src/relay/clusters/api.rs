//! The management API's routes: ARM paths and methods, each to one handler.
//!
//! - `GET /subscriptions/{s}/providers/Microsoft.Kubernetes/connectedClusters` and the same
//!   under `/resourceGroups/{rg}`: the clusters the caller has a role on;
//! - `PUT|GET|DELETE .../connectedClusters/{name}`;
//! - `POST .../{name}/listClusterUserCredential`: a Send token for that cluster only;
//! - `POST .../{name}/listAgentCredential` (owners): the agent's Listen key, for the installer;
//! - `POST .../{name}/listKeys` and `.../regenerateKeys` (owners): the agent's Listen rule's
//!   primary and secondary keys, and a new value for one of them (or for the Send key behind
//!   user tokens); what an old value authorized is closed;
//! - `POST .../{name}/agentStatus`: the agent's heartbeat, signed with its registered key;
//! - `PUT|DELETE .../{name}/providers/Microsoft.Authorization/roleAssignments/{id}` (owners):
//!   grant or revoke the cluster user role;
//! - `GET .../{name}/providers/Microsoft.KubernetesConfiguration/extensions[/{ext}]` (readers)
//!   and `PUT|DELETE .../extensions/{ext}` (owners): the cluster's one extension.
//!
//! Every caller is authenticated from the request's headers before any body is read; only the
//! agent's report, which its signature over the body authenticates, reads a small body first.

use bytes::Bytes;
use http::{Method, Request, Response};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;

use super::caller::authenticate;
use super::error::ApiError;
use super::extensions;
use super::handlers::{self, Call, Reply};
use super::path::{self, Scope, Target};
use super::registry::Registry;
use super::reply::Body;
use super::report::{self, SignedReport};
use super::store::Store;
use crate::arm::ClusterId;
use crate::relay::rule::FindRule;

const MAX_BODY: usize = 1024 * 1024;
/// A status report is a few hundred bytes.
const MAX_REPORT: usize = 16 * 1024;

/// What a route's path looks like.
enum Path {
    List,
    Cluster,
    /// `POST .../{name}/{action}`, the action's name compared without case.
    Action(&'static str),
    RoleAssignment,
    Extensions,
    Extension,
}

/// Handlers block (they read and write the store): they run on one of the registry's
/// blocking workers, after authentication and with the whole body.
enum Handler {
    List(fn(&Call, &Scope) -> Reply),
    Cluster(fn(&Call, &ClusterId) -> Reply),
    RoleAssignment(fn(&Call, &ClusterId, &str) -> Reply),
    Extension(fn(&Call, &ClusterId, &str) -> Reply),
    /// Authenticated by its signature, not by a caller's credential.
    AgentReport(fn(&Store, &ClusterId, &SignedReport<'_>) -> Reply),
}

struct Route {
    method: Method,
    path: Path,
    handler: Handler,
}

const fn route(method: Method, path: Path, handler: Handler) -> Route {
    Route {
        method,
        path,
        handler,
    }
}

const ROUTES: &[Route] = &[
    route(Method::GET, Path::List, Handler::List(handlers::list)),
    route(Method::GET, Path::Cluster, Handler::Cluster(handlers::show)),
    route(Method::PUT, Path::Cluster, Handler::Cluster(handlers::put)),
    route(
        Method::DELETE,
        Path::Cluster,
        Handler::Cluster(handlers::delete),
    ),
    route(
        Method::POST,
        Path::Action("listClusterUserCredential"),
        Handler::Cluster(handlers::list_user_credential),
    ),
    route(
        Method::POST,
        Path::Action("listAgentCredential"),
        Handler::Cluster(handlers::list_agent_credential),
    ),
    route(
        Method::POST,
        Path::Action("listKeys"),
        Handler::Cluster(handlers::list_keys),
    ),
    route(
        Method::POST,
        Path::Action("regenerateKeys"),
        Handler::Cluster(handlers::regenerate_keys),
    ),
    route(
        Method::POST,
        Path::Action("agentStatus"),
        Handler::AgentReport(report::agent_status),
    ),
    route(
        Method::PUT,
        Path::RoleAssignment,
        Handler::RoleAssignment(handlers::grant_role),
    ),
    route(
        Method::DELETE,
        Path::RoleAssignment,
        Handler::RoleAssignment(handlers::revoke_role),
    ),
    route(
        Method::GET,
        Path::Extensions,
        Handler::Cluster(extensions::list),
    ),
    route(
        Method::GET,
        Path::Extension,
        Handler::Extension(extensions::show),
    ),
    route(
        Method::PUT,
        Path::Extension,
        Handler::Extension(extensions::put),
    ),
    route(
        Method::DELETE,
        Path::Extension,
        Handler::Extension(extensions::delete),
    ),
];

impl Path {
    fn matches(&self, target: &Target) -> bool {
        match (self, target) {
            (Path::List, Target::List(_))
            | (Path::Cluster, Target::Cluster(_))
            | (Path::RoleAssignment, Target::RoleAssignment(..))
            | (Path::Extensions, Target::Extensions(_))
            | (Path::Extension, Target::Extension(..)) => true,
            (Path::Action(name), Target::Action(_, action)) => name.eq_ignore_ascii_case(action),
            _ => false,
        }
    }
}

fn find(method: &Method, target: &Target) -> Option<&'static Route> {
    ROUTES
        .iter()
        .find(|r| r.method == method && r.path.matches(target))
}

/// `Some` when `path` is a management path; the relay's own routes otherwise.
pub(crate) async fn handle(
    registry: &Registry,
    rule: &FindRule<'_>,
    hosts: &[String],
    relay_host: Option<String>,
    req: Request<Incoming>,
) -> Option<Response<Body>> {
    let answer = match path::parse(req.uri().path())? {
        Ok(target) => serve(registry, rule, hosts, relay_host.as_deref(), req, target).await,
        Err(e) => Err(e),
    };
    Some(answer.unwrap_or_else(ApiError::into_response))
}

async fn serve(
    registry: &Registry,
    rule: &FindRule<'_>,
    hosts: &[String],
    relay_host: Option<&str>,
    req: Request<Incoming>,
    target: Target,
) -> Reply {
    let route = find(req.method(), &target);
    let (parts, body) = req.into_parts();
    if let (Some(Handler::AgentReport(report)), Target::Action(id, _)) =
        (route.map(|r| &r.handler), &target)
    {
        let (report, id) = (*report, id.clone());
        let body = read_body(body, MAX_REPORT).await?;
        return registry
            .blocking(move |store| {
                let signed = SignedReport {
                    path: parts.uri.path(),
                    headers: &parts.headers,
                    body: &body,
                };
                report(&store, &id, &signed)
            })
            .await?;
    }
    let caller = authenticate(registry.entra.as_ref(), rule, hosts, &parts.headers).await?;
    let body = read_body(body, MAX_BODY).await?;
    let Some(route) = route else {
        return Err(ApiError::MethodNotAllowed(parts.method));
    };
    let relay_host = relay_host.map(str::to_string);
    registry
        .blocking(move |store| {
            let call = Call {
                store,
                caller,
                relay_host,
                body,
            };
            dispatch(&route.handler, &call, &target, parts.method)
        })
        .await?
}

fn dispatch(handler: &Handler, call: &Call, target: &Target, method: Method) -> Reply {
    match (handler, target) {
        (Handler::List(f), Target::List(scope)) => f(call, scope),
        (
            Handler::Cluster(f),
            Target::Cluster(id) | Target::Action(id, _) | Target::Extensions(id),
        ) => f(call, id),
        (Handler::Extension(f), Target::Extension(id, name)) => f(call, id, name),
        (Handler::RoleAssignment(f), Target::RoleAssignment(id, assignment)) => {
            f(call, id, assignment)
        }
        // A route's path and handler agree (see the test below), so this is not reached.
        _ => Err(ApiError::MethodNotAllowed(method)),
    }
}

async fn read_body(body: Incoming, limit: usize) -> Result<Bytes, ApiError> {
    Ok(Limited::new(body, limit)
        .collect()
        .await
        .map_err(|_| ApiError::BodyTooLarge(limit))?
        .to_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_route_has_the_handler_its_path_takes() {
        for route in ROUTES {
            let agrees = matches!(
                (&route.path, &route.handler),
                (Path::List, Handler::List(_))
                    | (Path::Cluster, Handler::Cluster(_))
                    | (
                        Path::Action(_),
                        Handler::Cluster(_) | Handler::AgentReport(_)
                    )
                    | (Path::RoleAssignment, Handler::RoleAssignment(_))
                    | (Path::Extensions, Handler::Cluster(_))
                    | (Path::Extension, Handler::Extension(_))
            );
            assert!(agrees, "{} route with a mismatched handler", route.method);
        }
    }

    #[test]
    fn routes_match_method_and_path() {
        let id = ClusterId::new("s", "rg", "c").unwrap();
        let status = Target::Action(id.clone(), "AGENTSTATUS".into());
        assert!(matches!(
            find(&Method::POST, &status).map(|r| &r.handler),
            Some(Handler::AgentReport(_))
        ));
        assert!(find(&Method::GET, &status).is_none());
        assert!(find(&Method::POST, &Target::Action(id.clone(), "other".into())).is_none());
        assert!(find(&Method::PATCH, &Target::Cluster(id)).is_none());
    }
}

//! `clusterconnect token create`: a service-account bearer token for kubectl (or the proxy's
//! `--token-file`), printed alone on stdout so `TOKEN=$(clusterconnect token create ...)`
//! works. The role is always the caller's explicit choice, and the token expires unless
//! `--no-expiry` asks for a Secret-based one.

use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;

use super::kubeclient;
use crate::onboard::token::{self, TokenSpec};

/// Long enough for a working session through the proxy, short enough that a token left in a
/// shell history or a CI log is soon useless; `kubectl create token` defaults to the same.
const DEFAULT_DURATION: &str = "1h";

const CREATE_USAGE: &str = "clusterconnect token create --service-account <SERVICE_ACCOUNT> --cluster-role <ROLE> [OPTIONS]
       (no role is implied: choose the role to bind, e.g. --cluster-role view)";

#[derive(clap::Subcommand, Debug)]
pub enum Command {
    /// Make (or reuse) a service account bound to a cluster role and print a token for it: the
    /// service account, a ClusterRoleBinding <sa>-<role>-binding, and a token that expires
    /// after --duration (with --no-expiry, a kubernetes.io/service-account-token Secret
    /// <sa>-token instead).
    // The usage is spelled out so that the error for a missing --cluster-role (clap prints the
    // usage with it) says how to choose one.
    #[command(override_usage = CREATE_USAGE)]
    Create(CreateArgs),
}

#[derive(clap::Args, Debug)]
pub struct CreateArgs {
    /// The service account (created when missing).
    #[arg(long)]
    pub service_account: String,
    /// Its namespace (must exist).
    #[arg(short = 'n', long, default_value = "default")]
    pub namespace: String,
    /// The ClusterRole to bind it to; no default, choose the least that serves, e.g. view
    /// (read-only), edit, or cluster-admin for full control of the cluster.
    #[arg(long, value_name = "ROLE", required = true)]
    pub cluster_role: String,
    /// How long the token is valid (TokenRequest API, at least 10m).
    #[arg(long, default_value = DEFAULT_DURATION, value_parser = super::parse_duration)]
    pub duration: Duration,
    /// WARNING: issue a token that never expires instead: a kubernetes.io/service-account-token
    /// Secret <sa>-token whose token is valid until the Secret is deleted, for whoever holds a
    /// copy. Prefer --duration and issue a new token when it runs out.
    #[arg(long, conflicts_with = "duration")]
    pub no_expiry: bool,
    /// How long to wait for the token controller to fill the Secret (--no-expiry).
    #[arg(long, default_value = "30s", value_parser = super::parse_duration)]
    pub timeout: Duration,
    /// Kubeconfig with access to the cluster [default: $KUBECONFIG, ~/.kube/config].
    #[arg(long)]
    pub kubeconfig: Option<PathBuf>,
    /// Context in that kubeconfig.
    #[arg(long, visible_alias = "kube-context")]
    pub context: Option<String>,
}

pub async fn run(command: Command) -> anyhow::Result<()> {
    let Command::Create(args) = command;
    let (kube, _) = kubeclient::client(
        args.kubeconfig.as_deref(),
        args.context.as_deref(),
        "set KUBECONFIG or pass --kubeconfig",
    )
    .await?;
    let spec = TokenSpec {
        namespace: args.namespace.clone(),
        service_account: args.service_account.clone(),
        cluster_role: args.cluster_role.clone(),
        duration: (!args.no_expiry).then_some(args.duration),
        timeout: args.timeout,
    };
    let token = token::create(&kube, &spec).await.with_context(|| {
        format!(
            "cannot create a token for service account {}/{}",
            args.namespace, args.service_account
        )
    })?;
    let mut out = std::io::stdout().lock();
    writeln!(out, "{}", token.expose())
        .and_then(|()| out.flush())
        .context("cannot write the token to stdout")
}

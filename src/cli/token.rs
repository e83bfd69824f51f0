//! `clusterconnect token create`: a service-account bearer token for kubectl (or the proxy's
//! `--token-file`), printed alone on stdout so `TOKEN=$(clusterconnect token create ...)`
//! works.

use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;

use super::kubeclient;
use crate::onboard::token::{self, TokenSpec};

#[derive(clap::Subcommand, Debug)]
pub enum Command {
    /// Make (or reuse) a service account bound to a cluster role and print its token: the
    /// service account, a ClusterRoleBinding <sa>-<role>-binding and a
    /// kubernetes.io/service-account-token Secret <sa>-token.
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
    /// The ClusterRole to bind it to.
    #[arg(long, default_value = "cluster-admin")]
    pub cluster_role: String,
    /// Issue a token that expires after this long (TokenRequest API, at least 10m) instead of
    /// the long-lived Secret token.
    #[arg(long, value_parser = super::parse_duration)]
    pub duration: Option<Duration>,
    /// How long to wait for the token controller to fill the Secret.
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
        duration: args.duration,
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

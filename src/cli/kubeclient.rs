//! A Kubernetes client from the user's kubeconfig: `--kubeconfig`/`--context` when given,
//! else `$KUBECONFIG` or `~/.kube/config`, else the pod's service account.

use std::path::Path;

use anyhow::Context;
use kube::config::{KubeConfigOptions, Kubeconfig};

/// The client and the context's default namespace. `missing` finishes the error shown when
/// there is no configuration at all (what the user can pass instead).
pub async fn client(
    kubeconfig: Option<&Path>,
    context: Option<&str>,
    missing: &str,
) -> anyhow::Result<(kube::Client, String)> {
    let config = config(kubeconfig, context, missing).await?;
    let namespace = config.default_namespace.clone();
    let client = kube::Client::try_from(config).context("cannot build the Kubernetes client")?;
    Ok((client, namespace))
}

/// The configuration [`client`] builds its client from.
pub async fn config(
    kubeconfig: Option<&Path>,
    context: Option<&str>,
    missing: &str,
) -> anyhow::Result<kube::Config> {
    let options = KubeConfigOptions {
        context: context.map(str::to_string),
        ..Default::default()
    };
    let config = match (kubeconfig, context) {
        (Some(path), _) => {
            let file = Kubeconfig::read_from(path)
                .with_context(|| format!("cannot read kubeconfig {}", path.display()))?;
            kube::Config::from_custom_kubeconfig(file, &options)
                .await
                .with_context(|| format!("kubeconfig {} is not usable", path.display()))?
        }
        (None, Some(name)) => kube::Config::from_kubeconfig(&options)
            .await
            .with_context(|| format!("the kubeconfig context {name:?} is not usable"))?,
        (None, None) => kube::Config::infer()
            .await
            .with_context(|| format!("no cluster configuration: {missing}"))?,
    };
    Ok(config)
}

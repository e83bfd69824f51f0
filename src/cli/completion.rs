//! `clusterconnect completion SHELL` and `clusterconnect man [SUBCOMMAND]`: shell completions
//! and roff manual pages, generated from the same flag definitions the binary parses, so they
//! never drift from it.

use clap::CommandFactory;

use super::Cli;

#[derive(clap::Args, Debug)]
pub struct CompletionArgs {
    /// The shell to complete for. Install e.g. with
    /// `clusterconnect completion bash > /etc/bash_completion.d/clusterconnect`, or
    /// `source <(clusterconnect completion zsh)`.
    #[arg(value_enum)]
    pub shell: clap_complete::Shell,
}

#[derive(clap::Args, Debug)]
pub struct ManArgs {
    /// A subcommand's page (e.g. `connect`) instead of the main one. Install e.g. with
    /// `clusterconnect man > /usr/local/share/man/man1/clusterconnect.1`.
    pub subcommand: Option<String>,
}

pub fn completion(args: CompletionArgs) -> anyhow::Result<()> {
    let mut cmd = Cli::command();
    // Into memory first: the generator panics on a failed write (a closed pipe, say).
    let mut script = Vec::new();
    clap_complete::generate(args.shell, &mut cmd, "clusterconnect", &mut script);
    print(&script)
}

pub fn man(args: ManArgs) -> anyhow::Result<()> {
    let cmd = Cli::command();
    let (page, title) = match &args.subcommand {
        None => (cmd, "clusterconnect".to_string()),
        Some(name) => {
            let Some(sub) = cmd.find_subcommand(name).cloned() else {
                let names: Vec<_> = cmd
                    .get_subcommands()
                    .map(|c| c.get_name().to_string())
                    .collect();
                anyhow::bail!(
                    "no subcommand {name:?}; pages exist for: {}",
                    names.join(", ")
                );
            };
            (sub, format!("clusterconnect-{name}"))
        }
    };
    let mut roff = Vec::new();
    clap_mangen::Man::new(page).title(title).render(&mut roff)?;
    print(&roff)
}

/// Standard output; a reader that went away (`| head`) is not an error.
fn print(bytes: &[u8]) -> anyhow::Result<()> {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    match out.write_all(bytes).and_then(|()| out.flush()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(e.into()),
        _ => Ok(()),
    }
}

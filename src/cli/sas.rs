//! `clusterconnect sas`: new rule keys and SAS tokens, for operators and scripts.

use std::path::PathBuf;
use std::time::Duration;

use base64::Engine;
use clap::Subcommand;

use crate::tunnel::protocol::{validate_entity, RelayAddress};
use crate::tunnel::sas::SasKey;

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Print a new random key as "SharedAccessKeyName=<name>;SharedAccessKey=<key>", the form
    /// --key-file reads. Put the key in the relay's [[rules]] too.
    NewKey {
        /// Rule name (e.g. listen, send).
        #[arg(long)]
        name: String,
    },
    /// Mint a SAS token for one hybrid connection.
    Token {
        #[arg(long)]
        key_file: PathBuf,
        #[arg(long)]
        relay: String,
        #[arg(long)]
        connection: String,
        /// Lifetime, e.g. 1h.
        #[arg(long, default_value = "1h", value_parser = super::parse_duration)]
        ttl: Duration,
    },
}

pub fn run(cmd: Command) -> anyhow::Result<()> {
    match cmd {
        Command::NewKey { name } => {
            if name.is_empty() || name.contains([';', '=']) {
                anyhow::bail!("--name must be non-empty and contain no ';' or '='");
            }
            let key: [u8; 32] = rand::random();
            let key = base64::engine::general_purpose::STANDARD.encode(key);
            outln!("SharedAccessKeyName={name};SharedAccessKey={key}");
        }
        Command::Token {
            key_file,
            relay,
            connection,
            ttl,
        } => {
            if ttl < Duration::from_secs(1) {
                anyhow::bail!("--ttl must be at least 1s: a token that ends as it is made is refused by every relay (e.g. --ttl 1h)");
            }
            let relay = RelayAddress::parse(&relay)?;
            validate_entity(&connection)?;
            let key = SasKey::from_file(&key_file)?;
            outln!(
                "{}",
                key.mint(&relay.resource_uri(&connection), ttl).expose()
            );
        }
    }
    Ok(())
}

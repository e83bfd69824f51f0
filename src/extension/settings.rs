//! The extension's configuration settings, by the names `az k8s-extension create
//! --configuration-settings` takes for `Microsoft.AzureKeyVaultSecretsProvider`, with the
//! Arc extension's defaults. Unknown names are refused rather than ignored, so a typo does not
//! silently leave rotation off.

use std::collections::BTreeMap;
use std::time::Duration;

pub const ROTATION: &str = "secrets-store-csi-driver.enableSecretRotation";
pub const INTERVAL: &str = "secrets-store-csi-driver.rotationPollInterval";
pub const SYNC: &str = "secrets-store-csi-driver.syncSecret.enabled";
/// Installs the CSI provider DaemonSet (gRPC `Version`/`Mount` on a unix socket).
pub const CSI: &str = "csi.enabled";
/// clusterconnect's own: the image of the controller and provider.
pub const IMAGE: &str = "image";

const KNOWN: [&str; 5] = [ROTATION, INTERVAL, SYNC, CSI, IMAGE];

/// The CSI driver's default poll interval.
pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(120);
/// Key Vault throttles a vault at a few thousand requests per 10 seconds across all clients;
/// below a second a handful of classes would reach that.
pub const MIN_INTERVAL: Duration = Duration::from_secs(1);
/// A day: the longest poll worth having (a secret rotated less often than daily is better
/// served by a change to the class), and far below what would overflow a deadline computed
/// from it (`Instant + interval` panics on overflow).
pub const MAX_INTERVAL: Duration = Duration::from_secs(24 * 60 * 60);

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SettingsError {
    #[error("unknown configuration setting {0:?}; the settings are {known}", known = KNOWN.join(", "))]
    Unknown(String),
    #[error("configuration setting {name}={value:?}: use true or false")]
    NotABool { name: &'static str, value: String },
    #[error("configuration setting {INTERVAL}={value:?}: {reason} (examples: 2m, 90s, 1h)")]
    Interval { value: String, reason: String },
    #[error("configuration setting {0:?} must be KEY=VALUE")]
    NotKeyValue(String),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Settings {
    pub rotation: bool,
    pub interval: Duration,
    pub sync: bool,
    pub csi: bool,
    pub image: Option<String>,
}

/// `KEY=VALUE` from the command line.
pub fn parse_pair(s: &str) -> Result<(String, String), SettingsError> {
    match s.split_once('=') {
        Some((k, v)) if !k.trim().is_empty() => Ok((k.trim().to_string(), v.trim().to_string())),
        _ => Err(SettingsError::NotKeyValue(crate::secret::clip(s, 100))),
    }
}

fn flag(map: &BTreeMap<String, String>, name: &'static str) -> Result<bool, SettingsError> {
    match map.get(name).map(|v| v.to_ascii_lowercase()).as_deref() {
        None | Some("false") => Ok(false),
        Some("true") => Ok(true),
        Some(other) => Err(SettingsError::NotABool {
            name,
            value: crate::secret::clip(other, 50),
        }),
    }
}

/// A poll interval: Go-style durations as the CSI driver takes them (`2m`, `90s`, `1h30m`).
pub fn parse_interval(value: &str) -> Result<Duration, SettingsError> {
    let bad = |reason: String| SettingsError::Interval {
        value: crate::secret::clip(value, 50),
        reason,
    };
    let interval = humantime::parse_duration(value.trim()).map_err(|e| bad(e.to_string()))?;
    if interval < MIN_INTERVAL {
        return Err(bad(format!(
            "shorter than {}s, which Key Vault would throttle",
            MIN_INTERVAL.as_secs()
        )));
    }
    if interval > MAX_INTERVAL {
        return Err(bad(format!(
            "longer than the maximum of {}h",
            MAX_INTERVAL.as_secs() / 3600
        )));
    }
    Ok(interval)
}

impl Settings {
    pub fn parse(map: &BTreeMap<String, String>) -> Result<Settings, SettingsError> {
        if let Some(unknown) = map.keys().find(|k| !KNOWN.contains(&k.as_str())) {
            return Err(SettingsError::Unknown(crate::secret::clip(unknown, 100)));
        }
        let interval = match map.get(INTERVAL) {
            Some(v) => parse_interval(v)?,
            None => DEFAULT_INTERVAL,
        };
        Ok(Settings {
            rotation: flag(map, ROTATION)?,
            interval,
            sync: flag(map, SYNC)?,
            csi: flag(map, CSI)?,
            image: map.get(IMAGE).filter(|i| !i.is_empty()).cloned(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn settings_take_the_arc_names_and_defaults() {
        let s = Settings::parse(&BTreeMap::new()).unwrap();
        assert!(!s.rotation && !s.sync && !s.csi);
        assert_eq!(s.interval, DEFAULT_INTERVAL);
        let s = Settings::parse(&map(&[
            (ROTATION, "true"),
            (INTERVAL, "3m"),
            (SYNC, "True"),
            (CSI, "false"),
        ]))
        .unwrap();
        assert!(s.rotation && s.sync && !s.csi);
        assert_eq!(s.interval, Duration::from_secs(180));
        assert!(matches!(
            Settings::parse(&map(&[(
                "secrets-store-csi-driver.enableSecretRotaton",
                "true"
            )])),
            Err(SettingsError::Unknown(_))
        ));
        assert!(matches!(
            Settings::parse(&map(&[(SYNC, "yes")])),
            Err(SettingsError::NotABool { .. })
        ));
        assert!(matches!(
            Settings::parse(&map(&[(INTERVAL, "10ms")])),
            Err(SettingsError::Interval { .. })
        ));
        assert!(matches!(
            Settings::parse(&map(&[(INTERVAL, "soon")])),
            Err(SettingsError::Interval { .. })
        ));
        // Large enough to overflow `Instant::now() + interval`: refused, not a panic later.
        for huge in ["300000000000y", "25h", "1y"] {
            assert!(
                matches!(
                    Settings::parse(&map(&[(INTERVAL, huge)])),
                    Err(SettingsError::Interval { .. })
                ),
                "{huge}"
            );
        }
        assert_eq!(parse_interval("24h").unwrap(), MAX_INTERVAL);
        assert_eq!(
            parse_pair("a.b=c=d").unwrap(),
            ("a.b".to_string(), "c=d".to_string())
        );
        assert!(parse_pair("novalue").is_err());
    }
}

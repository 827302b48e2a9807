//! The image config (Docker/OCI image config JSON, with Docker's Healthcheck,
//! Shell and OnBuild extensions): what a frontend produces beside the LLB and
//! what the solver's exporters write.

use serde::{Deserialize, Deserializer, Serialize};

/// Reads a field that may be `null` (Docker's legacy builder and BuildKit
/// 0.8 write `"OnBuild": null`, `"Labels": null` and the like) as its
/// default, as Docker does.
fn nullable<'de, D: Deserializer<'de>, T: Default + Deserialize<'de>>(d: D) -> Result<T, D::Error> {
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
}
use std::collections::BTreeMap;

/// Health check settings.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct Healthcheck {
    /// `["NONE"]`, `["CMD", …]` or `["CMD-SHELL", cmd]`.
    #[serde(default, deserialize_with = "nullable")]
    pub test: Vec<String>,
    /// Nanoseconds.
    #[serde(default, deserialize_with = "nullable", skip_serializing_if = "is_zero")]
    pub interval: i64,
    /// Nanoseconds.
    #[serde(default, deserialize_with = "nullable", skip_serializing_if = "is_zero")]
    pub timeout: i64,
    /// Nanoseconds.
    #[serde(default, deserialize_with = "nullable", skip_serializing_if = "is_zero")]
    pub start_period: i64,
    /// Nanoseconds.
    #[serde(default, deserialize_with = "nullable", skip_serializing_if = "is_zero")]
    pub start_interval: i64,
    /// Retries before unhealthy.
    #[serde(default, deserialize_with = "nullable", skip_serializing_if = "is_zero")]
    pub retries: i64,
}

fn is_zero(v: &i64) -> bool {
    *v == 0
}

/// The `config` section: how a container of the image runs.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct RunConfig {
    /// `USER`.
    #[serde(default, deserialize_with = "nullable", skip_serializing_if = "String::is_empty")]
    pub user: String,
    /// `EXPOSE` ports as `80/tcp` keys.
    #[serde(default, deserialize_with = "nullable", skip_serializing_if = "BTreeMap::is_empty")]
    pub exposed_ports: BTreeMap<String, serde_json::Value>,
    /// `KEY=value` entries.
    #[serde(default, deserialize_with = "nullable", skip_serializing_if = "Vec::is_empty")]
    pub env: Vec<String>,
    /// `ENTRYPOINT`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub entrypoint: Option<Vec<String>>,
    /// `CMD`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cmd: Option<Vec<String>>,
    /// `VOLUME` paths as keys.
    #[serde(default, deserialize_with = "nullable", skip_serializing_if = "BTreeMap::is_empty")]
    pub volumes: BTreeMap<String, serde_json::Value>,
    /// `WORKDIR`.
    #[serde(default, deserialize_with = "nullable", skip_serializing_if = "String::is_empty")]
    pub working_dir: String,
    /// `LABEL`s.
    #[serde(default, deserialize_with = "nullable", skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// `STOPSIGNAL`.
    #[serde(default, deserialize_with = "nullable", skip_serializing_if = "String::is_empty")]
    pub stop_signal: String,
    /// `HEALTHCHECK`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub healthcheck: Option<Healthcheck>,
    /// `SHELL`.
    #[serde(default, deserialize_with = "nullable", skip_serializing_if = "Vec::is_empty")]
    pub shell: Vec<String>,
    /// `ONBUILD` triggers, as written after ONBUILD.
    #[serde(default, deserialize_with = "nullable", skip_serializing_if = "Vec::is_empty")]
    pub on_build: Vec<String>,
}

/// One history entry.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct History {
    /// What made the layer, e.g. `RUN /bin/sh -c make # buildkit`.
    #[serde(default, deserialize_with = "nullable", skip_serializing_if = "String::is_empty")]
    pub created_by: String,
    /// Comment.
    #[serde(default, deserialize_with = "nullable", skip_serializing_if = "String::is_empty")]
    pub comment: String,
    /// True when the step made no layer.
    #[serde(default, deserialize_with = "nullable", skip_serializing_if = "std::ops::Not::not")]
    pub empty_layer: bool,
}

/// An image config (the JSON document referenced by a manifest).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct ImageConfig {
    /// CPU architecture.
    #[serde(default, deserialize_with = "nullable")]
    pub architecture: String,
    /// Operating system.
    #[serde(default, deserialize_with = "nullable")]
    pub os: String,
    /// Variant.
    #[serde(default, deserialize_with = "nullable", skip_serializing_if = "String::is_empty")]
    pub variant: String,
    /// Run configuration.
    #[serde(default, deserialize_with = "nullable")]
    pub config: RunConfig,
    /// Build history.
    #[serde(default, deserialize_with = "nullable", skip_serializing_if = "Vec::is_empty")]
    pub history: Vec<History>,
}

impl ImageConfig {
    /// Value of an environment variable in `config.Env`.
    pub fn env(&self, key: &str) -> Option<&str> {
        self.config
            .env
            .iter()
            .rev()
            .find_map(|e| e.split_once('=').filter(|(k, _)| *k == key).map(|(_, v)| v))
    }

    /// Sets (or replaces) an environment variable, keeping order.
    pub fn set_env(&mut self, key: &str, value: &str) {
        let entry = format!("{key}={value}");
        match self
            .config
            .env
            .iter_mut()
            .find(|e| e.split_once('=').map(|(k, _)| k) == Some(key) || e.as_str() == key)
        {
            Some(e) => *e = entry,
            None => self.config.env.push(entry),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn configs_written_with_nulls_read_as_empty() {
        // As Docker's legacy builder and BuildKit 0.8 wrote them.
        let legacy = r#"{"architecture":"amd64","os":"linux","config":{"Hostname":"","User":"","ExposedPorts":null,
            "Env":["PATH=/bin"],"Cmd":["sh"],"Healthcheck":null,"Volumes":null,"WorkingDir":"","Entrypoint":null,
            "OnBuild":null,"Labels":null,"Shell":null,"StopSignal":null},"history":null}"#;
        let config: ImageConfig = serde_json::from_str(legacy).expect("a legacy config reads");
        assert_eq!(config.config.env, ["PATH=/bin"]);
        assert!(config.config.on_build.is_empty() && config.config.labels.is_empty() && config.history.is_empty());
        let no_config: ImageConfig = serde_json::from_str(r#"{"architecture":"amd64","os":"linux","config":null}"#).expect("null config");
        assert_eq!(no_config.config, RunConfig::default());
    }
}

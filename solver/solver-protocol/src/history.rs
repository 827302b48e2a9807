//! The state root's build history: one JSON file per build under
//! `ROOT/history/`, written by the solver when a build with
//! [`crate::BuildInfo`] ends, read by `kiln history`.

use std::collections::{BTreeMap, HashMap};

use serde::{Deserialize, Serialize};

use crate::{Explanation, PathStep};

/// Where the history lives below a state root.
pub const DIR: &str = "history";

/// One build.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct BuildRecord {
    /// Its id (the file's name without `.json`).
    pub id: String,
    /// When it started, in seconds since the epoch.
    pub started: u64,
    /// The definition file.
    pub definition: String,
    /// The target stage, if one was asked for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
    /// Its target platforms (empty: the one of the definition).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub platforms: Vec<String>,
    /// Wall time of the solve and export.
    pub duration_ms: u64,
    /// Steps that ran.
    pub ran: u32,
    /// Steps found in the cache.
    pub cached: u32,
    /// The image (or index) digest it made, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<String>,
    /// Why it failed, if it did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Every step it reached, in the order they started or were found.
    pub steps: Vec<StepRecord>,
}

/// What became of a step.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum StepStatus {
    /// It ran.
    Ran,
    /// Its result came from a cache.
    Cached,
    /// It ran and failed.
    Failed,
    /// A local source, used in place.
    Local,
}

/// One step of a build.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct StepRecord {
    /// The op digest.
    pub digest: String,
    /// Its name.
    pub name: String,
    /// `FILE:LINE` of the instruction that made it, when the definition says.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub location: Option<String>,
    /// What became of it.
    pub status: StepStatus,
    /// Its cache key.
    pub key: String,
    /// When it started (or was found), in ms since the solve began.
    pub start_ms: u64,
    /// How long it ran.
    pub duration_ms: u64,
    /// How long it waited for a job slot (`--jobs`).
    #[serde(default)]
    pub queued_ms: u64,
    /// The digests of its inputs.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub inputs: Vec<String>,
    /// The parts its key is made of, by name: short hashes, or readable
    /// values for what is not secret (an image reference, a pinned digest).
    /// Kept for steps that ran (a cached step's are in its cache record).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub parts: BTreeMap<String, String>,
    /// Why it ran instead of coming from the cache.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub explain: Option<Explanation>,
}

impl BuildRecord {
    /// The chain of steps that decided the build's wall time: from the step
    /// that finished last, back through the input that finished last, each
    /// time. First step first.
    pub fn critical_path(&self) -> Vec<PathStep> {
        let by_digest: HashMap<&str, &StepRecord> = self.steps.iter().map(|s| (s.digest.as_str(), s)).collect();
        let end = |s: &StepRecord| s.start_ms + s.duration_ms;
        let Some(mut at) = self.steps.iter().max_by_key(|s| end(s)) else {
            return Vec::new();
        };
        let mut path = Vec::new();
        let mut seen = std::collections::HashSet::new();
        loop {
            if !seen.insert(at.digest.as_str()) {
                break; // a malformed record with a cycle
            }
            path.push(PathStep {
                digest: at.digest.clone(),
                name: at.name.clone(),
                duration_ms: at.duration_ms,
            });
            let Some(next) = at.inputs.iter().filter_map(|d| by_digest.get(d.as_str())).max_by_key(|s| end(s)) else {
                break;
            };
            at = next;
        }
        path.reverse();
        path
    }

    /// The steps that waited for a job slot, longest wait first.
    pub fn longest_waits(&self, n: usize) -> Vec<&StepRecord> {
        let mut waited: Vec<&StepRecord> = self.steps.iter().filter(|s| s.queued_ms > 0).collect();
        waited.sort_by_key(|s| std::cmp::Reverse(s.queued_ms));
        waited.truncate(n);
        waited
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn step(digest: &str, start: u64, duration: u64, inputs: &[&str]) -> StepRecord {
        StepRecord {
            digest: digest.into(),
            name: digest.into(),
            location: None,
            status: StepStatus::Ran,
            key: String::new(),
            start_ms: start,
            duration_ms: duration,
            queued_ms: 0,
            inputs: inputs.iter().map(|s| s.to_string()).collect(),
            parts: BTreeMap::new(),
            explain: None,
        }
    }

    #[test]
    fn the_critical_path_follows_the_input_that_finished_last() {
        let record = BuildRecord {
            steps: vec![
                step("base", 0, 10, &[]),
                step("fast", 10, 100, &["base"]),
                step("slow", 10, 1000, &["base"]),
                step("copy", 1010, 5, &["fast", "slow"]),
            ],
            ..Default::default()
        };
        let names: Vec<String> = record.critical_path().into_iter().map(|p| p.name).collect();
        assert_eq!(names, ["base", "slow", "copy"]);
    }
}

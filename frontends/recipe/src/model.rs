//! The recipe document as typed data: the YAML parser reports type errors
//! and unknown keys where they are, values that later checks or lowering
//! may point at are [`Spanned`], and maps keep their YAML order.

use std::fmt;
use std::marker::PhantomData;

use serde::de::{self, Deserializer, MapAccess, Visitor};
use serde::Deserialize;

use crate::yaml::Spanned;

/// A whole recipe.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Recipe {
    /// Build arguments every stage may use (`ARG` before the first `FROM`).
    #[serde(default)]
    pub args: Ordered<Option<Scalar>>,
    /// Stages in order; the last is the default target.
    pub stages: Ordered<Stage>,
    /// The stage to build (overridden by `--target`).
    #[serde(default)]
    pub target: Option<Spanned<String>>,
}

/// One stage.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Stage {
    /// An image reference, `scratch`, or the name of an earlier stage.
    pub from: Spanned<String>,
    /// The stage's platform (`os/arch[/variant]`, build args expanded).
    #[serde(default)]
    pub platform: Option<Spanned<String>>,
    /// The steps, in order.
    #[serde(default)]
    pub steps: Vec<Spanned<Step>>,
    /// The image config this stage's image gets.
    #[serde(default)]
    pub image: Option<Spanned<ImageSpec>>,
}

/// One step: exactly one of `run`, `copy`, `env`, `workdir`, `user`, `args`,
/// with the options that go with it.
#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct Step {
    /// A shell command (a string) or a program and its arguments (a list).
    pub run: Option<Command>,
    /// Mounts of a `run` step.
    pub mounts: Option<Vec<MountSpec>>,
    /// Network of a `run` step: `default`, `none` or `host`.
    pub network: Option<Spanned<String>>,
    /// Paths to copy (one or a list).
    pub copy: Option<OneOrMany>,
    /// Destination of a `copy`.
    pub to: Option<String>,
    /// Where a `copy` reads from: a stage name (default: the build context).
    pub from: Option<Spanned<String>>,
    /// Owner of copied files (`user[:group]`).
    pub chown: Option<Spanned<String>>,
    /// Mode of copied files (octal, e.g. `"0755"`).
    pub chmod: Option<Spanned<Scalar>>,
    /// Environment variables for later steps and the image.
    pub env: Option<Ordered<Scalar>>,
    /// Working directory for later steps and the image.
    pub workdir: Option<Spanned<String>>,
    /// User for later steps and the image.
    pub user: Option<Spanned<String>>,
    /// Build arguments declared in this stage (null: no default).
    pub args: Option<Ordered<Option<Scalar>>>,
}

/// A mount of a `run` step: one of `cache`, `secret`, `ssh`, `bind`, `tmpfs`.
#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct MountSpec {
    /// A cache directory at this path.
    pub cache: Option<String>,
    /// A secret with this id.
    pub secret: Option<String>,
    /// An SSH agent with this id (`default`).
    pub ssh: Option<String>,
    /// A bind mount at this path.
    pub bind: Option<String>,
    /// A tmpfs at this path.
    pub tmpfs: Option<String>,
    /// Cache id.
    pub id: Option<String>,
    /// Cache sharing: `shared`, `private`, `locked`.
    pub sharing: Option<String>,
    /// The stage a bind or cache is seeded from.
    pub from: Option<Spanned<String>>,
    /// Path inside `from`.
    pub source: Option<String>,
    /// Where a secret or ssh socket is mounted.
    pub target: Option<String>,
    /// Secret as this environment variable instead of a file.
    pub env: Option<String>,
    /// Fail when the secret or agent is missing.
    pub required: Option<bool>,
    /// File mode (octal).
    pub mode: Option<Scalar>,
    /// Owner uid.
    pub uid: Option<u32>,
    /// Owner gid.
    pub gid: Option<u32>,
    /// Size of a tmpfs (bytes or with a unit, e.g. `64m`).
    pub size: Option<Scalar>,
    /// A writable bind (changes are discarded).
    pub readwrite: Option<bool>,
}

/// The image config of a stage.
#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct ImageSpec {
    /// Default command.
    pub cmd: Option<Command>,
    /// Entrypoint.
    pub entrypoint: Option<Command>,
    /// Labels.
    pub labels: Option<Ordered<Scalar>>,
    /// Exposed ports (`80`, `53/udp`).
    pub ports: Option<Vec<Scalar>>,
    /// Volumes.
    pub volumes: Option<Vec<String>>,
    /// Environment.
    pub env: Option<Ordered<Scalar>>,
    /// User.
    pub user: Option<String>,
    /// Working directory.
    pub workdir: Option<String>,
}

/// A command: shell form (string) or exec form (list).
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum Command {
    /// Run by `/bin/sh -c`.
    Shell(String),
    /// Run directly.
    Exec(Vec<String>),
}

/// One string or a list of them.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum OneOrMany {
    /// One.
    One(String),
    /// Several.
    Many(Vec<String>),
}

impl OneOrMany {
    /// As a list.
    pub fn to_vec(&self) -> Vec<String> {
        match self {
            OneOrMany::One(s) => vec![s.clone()],
            OneOrMany::Many(v) => v.clone(),
        }
    }
}

/// A string, number or boolean, kept as the text YAML wrote.
#[derive(Debug, Clone, PartialEq)]
pub struct Scalar(pub String);

impl<'de> Deserialize<'de> for Scalar {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Scalar, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Scalar;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string, number or boolean")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Scalar, E> {
                Ok(Scalar(v.to_string()))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Scalar, E> {
                Ok(Scalar(v.to_string()))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Scalar, E> {
                Ok(Scalar(v.to_string()))
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<Scalar, E> {
                Ok(Scalar(v.to_string()))
            }
            fn visit_bool<E: de::Error>(self, v: bool) -> Result<Scalar, E> {
                Ok(Scalar(v.to_string()))
            }
        }
        d.deserialize_any(V)
    }
}

/// A YAML mapping with its keys in document order (where a key is written:
/// [`crate::yaml::Document::key_place`]).
#[derive(Debug)]
pub struct Ordered<T>(pub Vec<(String, T)>);

impl<T> Default for Ordered<T> {
    fn default() -> Self {
        Ordered(Vec::new())
    }
}

impl<'de, T: Deserialize<'de>> Deserialize<'de> for Ordered<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Ordered<T>, D::Error> {
        struct V<T>(PhantomData<T>);
        impl<'de, T: Deserialize<'de>> Visitor<'de> for V<T> {
            type Value = Ordered<T>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a mapping")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Ordered<T>, A::Error> {
                let mut out: Vec<(String, T)> = Vec::new();
                while let Some(key) = map.next_key::<String>()? {
                    if out.iter().any(|(k, _)| *k == key) {
                        return Err(de::Error::custom(format!("duplicate key `{key}`")));
                    }
                    let value = map.next_value()?;
                    out.push((key, value));
                }
                Ok(Ordered(out))
            }
        }
        d.deserialize_map(V(PhantomData))
    }
}

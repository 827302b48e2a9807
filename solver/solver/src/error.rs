//! The solver's failures as one typed enum, and the one place they are
//! mapped to the protocol's error kinds, events and process exit codes.

use std::io;
use std::sync::Arc;

use kiln_solver_protocol::{ErrorKind, Event};

/// Process exit codes of `kiln-solver`.
pub mod exit {
    /// The build succeeded.
    pub const OK: i32 = 0;
    /// A build step failed.
    pub const VERTEX: i32 = 1;
    /// The request was malformed.
    pub const REQUEST: i32 = 2;
    /// Anything else: export, state root, runtime.
    pub const INTERNAL: i32 = 3;
}

/// What a vertex was doing when it failed (the protocol's type, so the
/// client sees the same stages).
pub(crate) use kiln_solver_protocol::FailureStage as Stage;

/// What went wrong below a vertex or an export: the causes a user acts on
/// differently, each with what it needs to be acted on.
#[derive(Debug, Clone, thiserror::Error)]
pub(crate) enum Failure {
    /// A file operation failed (a full disk, a missing path, a permission):
    /// `source.kind()` tells which.
    #[error("{}{path}: {source}", op.map(|o| format!("{o} ")).unwrap_or_default())]
    Io {
        /// What was being done, when it adds to the path.
        op: Option<&'static str>,
        /// The path as the user knows it (inside the step's filesystem when
        /// there is one).
        path: String,
        /// Why.
        #[source]
        source: Arc<io::Error>,
    },
    /// A filesystem could not be mounted (overlayfs refused, no tmpfs) or
    /// unmounted.
    #[error("{action} {what}: {source}")]
    Mount {
        /// "mounting" or "unmounting".
        action: &'static str,
        /// Which mount.
        what: String,
        /// Why.
        #[source]
        source: Arc<io::Error>,
    },
    /// The OCI runtime could not be started (not installed, not runnable).
    #[error("cannot start the OCI runtime {binary:?}: {source}")]
    Runtime {
        /// The runtime's binary.
        binary: String,
        /// Why.
        #[source]
        source: Arc<io::Error>,
    },
    /// The step's process ran and exited with a code the op does not accept.
    #[error("process \"{command}\" did not complete successfully: exit code: {code}")]
    Exit {
        /// The command line.
        command: String,
        /// Its exit code.
        code: i32,
    },
    /// An image could not be resolved, pulled or pushed.
    #[error("{image}: {message}")]
    Registry {
        /// The image reference.
        image: String,
        /// Why (the registry's answer, a digest mismatch, a missing platform).
        message: String,
    },
    /// An inconsistency of the solver itself (a task that ended early).
    #[error("{0}")]
    Internal(String),
    /// The op asks for something its inputs do not allow (no such path,
    /// user or input; a malformed pattern or option).
    #[error("{0}")]
    Invalid(String),
}

impl Failure {
    /// Maps an IO error on `path` (while doing `op`, if given).
    pub(crate) fn io(op: Option<&'static str>, path: impl std::fmt::Display) -> impl FnOnce(io::Error) -> Failure {
        move |e| Failure::Io {
            op,
            path: path.to_string(),
            source: Arc::new(e),
        }
    }

    /// Maps a mount error on `what`.
    pub(crate) fn mount(what: impl std::fmt::Display) -> impl FnOnce(io::Error) -> Failure {
        move |e| Failure::Mount {
            action: "mounting",
            what: what.to_string(),
            source: Arc::new(e),
        }
    }

    /// Maps an unmount error on `what`.
    pub(crate) fn unmount(what: impl std::fmt::Display) -> impl FnOnce(io::Error) -> Failure {
        move |e| Failure::Mount {
            action: "unmounting",
            what: what.to_string(),
            source: Arc::new(e),
        }
    }

    /// Maps an error making a new layer in `root`.
    pub(crate) fn new_layer(root: &crate::root::StateRoot) -> impl FnOnce(io::Error) -> Failure + '_ {
        Failure::io(Some("creating a layer in"), root.path().display())
    }

    /// Maps an error committing a finished layer in `root`.
    pub(crate) fn commit_layer(root: &crate::root::StateRoot) -> impl FnOnce(io::Error) -> Failure + '_ {
        Failure::io(Some("committing a layer in"), root.path().display())
    }

    /// An invalid request of the op.
    pub(crate) fn invalid(message: impl Into<String>) -> Failure {
        Failure::Invalid(message.into())
    }

    /// The exit code of the step's process, when that is the failure.
    pub(crate) fn exit_code(&self) -> Option<i32> {
        match self {
            Failure::Exit { code, .. } => Some(*code),
            _ => None,
        }
    }
}

/// Why a vertex failed, before it is tied to its digest.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{failure}")]
pub(crate) struct VertexError {
    /// What it was doing.
    pub(crate) stage: Stage,
    /// What went wrong.
    pub(crate) failure: Failure,
}

impl VertexError {
    /// A failure at `stage`.
    pub(crate) fn at(stage: Stage, failure: Failure) -> VertexError {
        VertexError { stage, failure }
    }

    /// Maps a failure to one at `stage`.
    pub(crate) fn during(stage: Stage) -> impl FnOnce(Failure) -> VertexError {
        move |failure| VertexError { stage, failure }
    }
}

/// A failed solve.
#[derive(Debug, Clone, thiserror::Error)]
pub(crate) enum SolveError {
    /// The request cannot be used (malformed, a dangling input, a missing secret).
    #[error("{0}")]
    Request(String),
    /// A vertex failed.
    #[error("{error}")]
    Vertex {
        /// The op's digest (the CLI maps it to the definition's lines).
        digest: String,
        /// Why.
        error: VertexError,
    },
    /// The state root cannot be opened or used.
    #[error("state root {path}: {message}")]
    StateRoot {
        /// Where.
        path: String,
        /// Why.
        message: String,
    },
    /// Writing or pushing an output failed.
    #[error("{what}: {failure}")]
    Export {
        /// Which output.
        what: String,
        /// Why.
        failure: Failure,
    },
    /// An inconsistency of the solver itself.
    #[error("{0}")]
    Internal(String),
    /// A step asks for a privilege the request did not grant.
    #[error("{message}")]
    Refused {
        /// The op's digest.
        digest: String,
        /// What it needs and the flag that grants it.
        message: String,
    },
}

impl SolveError {
    /// The protocol's class of this failure.
    pub(crate) fn kind(&self) -> ErrorKind {
        match self {
            SolveError::Request(_) | SolveError::Refused { .. } => ErrorKind::Request,
            SolveError::Vertex { .. } => ErrorKind::Vertex,
            SolveError::Export { .. } => ErrorKind::Export,
            SolveError::StateRoot { .. } | SolveError::Internal(_) => ErrorKind::Internal,
        }
    }

    /// The process exit code that reports it.
    pub(crate) fn exit_code(&self) -> i32 {
        match self.kind() {
            ErrorKind::Request => exit::REQUEST,
            ErrorKind::Vertex => exit::VERTEX,
            ErrorKind::Export | ErrorKind::Internal | ErrorKind::Interrupted => exit::INTERNAL,
        }
    }

    /// The protocol's last event of a failed solve.
    pub(crate) fn event(&self) -> Event {
        Event::Error {
            message: self.to_string(),
            digest: match self {
                SolveError::Vertex { digest, .. } | SolveError::Refused { digest, .. } => Some(digest.clone()),
                _ => None,
            },
            kind: self.kind(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_failure_has_one_kind_and_exit_code() {
        let step = SolveError::Vertex {
            digest: "sha256:1".into(),
            error: VertexError::at(
                Stage::Run,
                Failure::Exit {
                    command: "false".into(),
                    code: 2,
                },
            ),
        };
        assert_eq!((step.kind(), step.exit_code()), (ErrorKind::Vertex, exit::VERTEX));
        assert!(matches!(step.event(), Event::Error { digest: Some(d), .. } if d == "sha256:1"));
        let request = SolveError::Request("bad".into());
        assert_eq!((request.kind(), request.exit_code()), (ErrorKind::Request, exit::REQUEST));
        let root = SolveError::StateRoot {
            path: "/r".into(),
            message: "read-only".into(),
        };
        assert_eq!((root.kind(), root.exit_code()), (ErrorKind::Internal, exit::INTERNAL));
        assert_eq!(root.to_string(), "state root /r: read-only");
        let full = SolveError::Export {
            what: "type=oci".into(),
            failure: Failure::io(Some("writing"), "/out.tar")(io::Error::from(io::ErrorKind::StorageFull)),
        };
        assert_eq!(full.exit_code(), exit::INTERNAL);
        assert!(full.to_string().starts_with("type=oci: writing /out.tar: "), "{full}");
    }
}

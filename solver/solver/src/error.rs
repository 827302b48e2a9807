//! The solver's failures as one typed enum, and the one place they are
//! mapped to the protocol's error kinds, events and process exit codes.

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

/// Why a vertex failed, before it is tied to its digest.
#[derive(Debug, Clone)]
pub(crate) struct VertexError {
    /// What it was doing.
    pub(crate) stage: Stage,
    /// What went wrong.
    pub(crate) message: String,
    /// The exit code of its process, when it ran and exited non-zero.
    pub(crate) exit_code: Option<i32>,
}

impl VertexError {
    /// A failure at `stage` with no process exit code.
    pub(crate) fn at(stage: Stage, message: impl Into<String>) -> VertexError {
        VertexError {
            stage,
            message: message.into(),
            exit_code: None,
        }
    }
}

/// A failed solve.
#[derive(Debug, Clone, thiserror::Error)]
pub(crate) enum SolveError {
    /// The request cannot be used (malformed, a dangling input, a missing secret).
    #[error("{0}")]
    Request(String),
    /// A vertex failed.
    #[error("{}", .error.message)]
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
    #[error("{0}")]
    Export(String),
    /// An inconsistency of the solver itself.
    #[error("{0}")]
    Internal(String),
}

impl SolveError {
    /// The protocol's class of this failure.
    pub(crate) fn kind(&self) -> ErrorKind {
        match self {
            SolveError::Request(_) => ErrorKind::Request,
            SolveError::Vertex { .. } => ErrorKind::Vertex,
            SolveError::Export(_) => ErrorKind::Export,
            SolveError::StateRoot { .. } | SolveError::Internal(_) => ErrorKind::Internal,
        }
    }

    /// The process exit code that reports it.
    pub(crate) fn exit_code(&self) -> i32 {
        match self.kind() {
            ErrorKind::Request => exit::REQUEST,
            ErrorKind::Vertex => exit::VERTEX,
            ErrorKind::Export | ErrorKind::Internal => exit::INTERNAL,
        }
    }

    /// The protocol's last event of a failed solve.
    pub(crate) fn event(&self) -> Event {
        Event::Error {
            message: self.to_string(),
            digest: match self {
                SolveError::Vertex { digest, .. } => Some(digest.clone()),
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
            error: VertexError {
                stage: Stage::Run,
                message: "exit code 2".into(),
                exit_code: Some(2),
            },
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
        assert_eq!(SolveError::Export("x".into()).exit_code(), exit::INTERNAL);
    }
}

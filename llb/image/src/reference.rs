//! Docker image reference normalization (`alpine` → `docker.io/library/alpine:latest`).

/// A parsed image reference.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reference {
    /// Registry host (`docker.io` by default).
    pub domain: String,
    /// Repository path (`library/alpine`).
    pub path: String,
    /// Tag, if any.
    pub tag: Option<String>,
    /// Digest (`sha256:…`), if any.
    pub digest: Option<String>,
}

/// Why a reference is invalid.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid reference format {0:?}: {1}")]
pub struct ReferenceError(pub String, pub &'static str);

impl Reference {
    /// Parses and normalizes a reference as Docker does.
    pub fn parse(s: &str) -> Result<Reference, ReferenceError> {
        if s.is_empty() {
            return Err(ReferenceError(s.into(), "empty"));
        }
        let (rest, digest) = match s.split_once('@') {
            Some((r, d)) => {
                let valid = d
                    .split_once(':')
                    .is_some_and(|(alg, hex)| !alg.is_empty() && hex.len() >= 32 && hex.chars().all(|c| c.is_ascii_hexdigit()));
                if !valid {
                    return Err(ReferenceError(s.into(), "bad digest"));
                }
                (r, Some(d.to_string()))
            }
            None => (s, None),
        };
        let (name, tag) = match rest.rfind(':') {
            Some(i) if !rest[i + 1..].contains('/') => (&rest[..i], Some(rest[i + 1..].to_string())),
            _ => (rest, None),
        };
        if let Some(t) = &tag {
            if t.is_empty() || t.len() > 128 || !t.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-')) {
                return Err(ReferenceError(s.into(), "bad tag"));
            }
        }
        let (domain, path) = match name.split_once('/') {
            Some((first, rest)) if first.contains(['.', ':']) || first == "localhost" => (first.to_string(), rest.to_string()),
            _ => ("docker.io".to_string(), name.to_string()),
        };
        let path = if domain == "docker.io" && !path.contains('/') {
            format!("library/{path}")
        } else {
            path
        };
        let path_ok = !path.is_empty()
            && path.split('/').all(|c| {
                !c.is_empty()
                    && c.chars()
                        .all(|ch| ch.is_ascii_lowercase() || ch.is_ascii_digit() || matches!(ch, '.' | '_' | '-'))
            });
        if !path_ok {
            return Err(ReferenceError(s.into(), "repository name must be lowercase"));
        }
        let tag = if tag.is_none() && digest.is_none() {
            Some("latest".to_string())
        } else {
            tag
        };
        Ok(Reference { domain, path, tag, digest })
    }

    /// `domain/path`.
    pub fn name(&self) -> String {
        format!("{}/{}", self.domain, self.path)
    }

    /// The full normalized form.
    pub fn normalized(&self) -> String {
        let mut s = self.name();
        if let Some(t) = &self.tag {
            s.push(':');
            s.push_str(t);
        }
        if let Some(d) = &self.digest {
            s.push('@');
            s.push_str(d);
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalizes_like_docker() {
        let n = |s: &str| Reference::parse(s).map(|r| r.normalized());
        assert_eq!(n("alpine").as_deref(), Ok("docker.io/library/alpine:latest"));
        assert_eq!(n("tonistiigi/xx:1.9.0").as_deref(), Ok("docker.io/tonistiigi/xx:1.9.0"));
        assert_eq!(n("127.0.0.1:5000/busybox").as_deref(), Ok("127.0.0.1:5000/busybox:latest"));
        assert_eq!(n("localhost/x:1").as_deref(), Ok("localhost/x:1"));
        assert!(n("Alpine").is_err());
        assert!(n("alpine@sha256:zz").is_err());
    }
}

//! Paths as BuildKit normalizes them: Go's `path.Clean`, Dockerfile paths
//! joined to the working directory, file-action paths.

/// Go's `path.Clean` for absolute or relative slash paths.
pub fn clean_path(p: &str) -> String {
    let rooted = p.starts_with('/');
    let mut parts: Vec<&str> = Vec::new();
    for seg in p.split('/') {
        match seg {
            "" | "." => {}
            ".." => {
                if parts.last().is_some_and(|l| *l != "..") {
                    parts.pop();
                } else if !rooted {
                    parts.push("..");
                }
            }
            s => parts.push(s),
        }
    }
    let joined = parts.join("/");
    match (rooted, joined.is_empty()) {
        (true, _) => format!("/{joined}"),
        (false, true) => ".".into(),
        (false, false) => joined,
    }
}

/// BuildKit's `system.NormalizePath` for Linux: relative paths are joined to
/// `parent` and cleaned, absolute ones kept as written; `keep_slash` keeps a
/// trailing `/` or `/.`.
pub(super) fn normalize_path(parent: &str, p: &str, keep_slash: bool) -> String {
    let parent = if parent.is_empty() { "/" } else { parent };
    let parent = if parent.starts_with('/') {
        parent.to_string()
    } else {
        clean_path(&format!("/{parent}"))
    };
    let mut out = if p.is_empty() { parent.clone() } else { p.to_string() };
    if !out.starts_with('/') {
        out = clean_path(&format!("{parent}/{out}"));
    }
    if keep_slash {
        keep_trailing(p, &mut out);
    }
    out
}

/// The path normalization of BuildKit's LLB client for file actions: cleaned,
/// made absolute under `parent`, optionally keeping a trailing `/` or `/.`.
pub(super) fn fileop_path(parent: &str, p: &str, keep_slash: bool) -> String {
    let mut out = clean_path(p);
    if !out.starts_with('/') {
        out = clean_path(&format!("/{parent}/{out}"));
    }
    if keep_slash {
        keep_trailing(p, &mut out);
    }
    out
}

pub(super) fn keep_trailing(original: &str, p: &mut String) {
    if original.ends_with('/') && !p.ends_with('/') {
        p.push('/');
    } else if original.ends_with("/.") {
        if p != "/" {
            p.push('/');
        }
        p.push('.');
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_clean_like_go() {
        assert_eq!(clean_path("/a/../b/./c/"), "/b/c");
        assert_eq!(clean_path("/.."), "/");
        assert_eq!(normalize_path("/src", "app", false), "/src/app");
        assert_eq!(normalize_path("/src", "/abs/../x/", false), "/abs/../x/");
        assert_eq!(normalize_path("/src", "sub/", true), "/src/sub/");
        assert_eq!(normalize_path("", "./", true), "/");
        assert_eq!(fileop_path("/", "/abs/../x/", true), "/x/");
        assert_eq!(fileop_path("/", "/app/.", true), "/app/.");
    }
}

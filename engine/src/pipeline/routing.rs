//! Routing: which plugins a message goes to, by MIME type.

/// The MIME type without parameters, lower-cased: `Text/Plain; charset=x` → `text/plain`.
pub fn essence(kind: &str) -> String {
    kind.split(';')
        .next()
        .unwrap_or_default()
        .trim()
        .to_ascii_lowercase()
}

/// Whether `pattern` (`type/subtype`, `type/*`, `*/*` or `*`) matches `kind`.
pub fn mime_matches(pattern: &str, kind: &str) -> bool {
    let pattern = essence(pattern);
    let kind = essence(kind);
    if pattern == "*" || pattern == "*/*" {
        return true;
    }
    match pattern.strip_suffix("/*") {
        Some(major) => kind.split('/').next() == Some(major),
        None => pattern == kind,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns_match_as_expected() {
        assert!(mime_matches("image/png", "image/png"));
        assert!(mime_matches("image/png", "IMAGE/PNG; q=1"));
        assert!(mime_matches("image/*", "image/jpeg"));
        assert!(mime_matches("*/*", "text/plain"));
        assert!(!mime_matches("image/*", "text/plain"));
        assert!(!mime_matches("image/png", "image/pngx"));
        assert!(!mime_matches("text/*", "textual/plain"));
    }
}

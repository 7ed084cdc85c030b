//! `sandpipe new plugin NAME --lang rust|python|js`: a plugin project that
//! builds and passes its own test out of the box.
//!
//! Every language gets the same small plugin (it counts the words of a
//! `text/plain` data object, upserts the count into its table and logs
//! it), the `init.sql` that makes its table (the grant's `sql.init`), a
//! `build.sh`, a `test.sh` that runs the built component in the real
//! sandbox with `sandpipe exec --sql-init init.sql` on `tests/hello`, a
//! README and the WIT package. A Rust project also vendors the guest SDK (with its native
//! test fakes, which `cargo test` uses) and the SQLite policy they share
//! with the engine. The templates are `engine/scaffold/`; they and the
//! vendored sources are embedded at build time (`build.rs`).

use std::path::{Path, PathBuf};

use anyhow::{Context as _, bail};

mod embedded {
    include!(concat!(env!("OUT_DIR"), "/scaffold.rs"));
}

/// A plugin's language.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Lang {
    /// Rust, with the guest SDK (`cargo test` natively, wasm32-wasip2 build).
    Rust,
    /// Python, built with componentize-py.
    Python,
    /// JavaScript, built with componentize-js.
    Js,
}

impl Lang {
    fn template_dir(self) -> &'static str {
        match self {
            Self::Rust => "rust/",
            Self::Python => "python/",
            Self::Js => "js/",
        }
    }
}

/// Why `name` cannot name a plugin, if it cannot: it becomes the plugin's
/// name, its crate or package name and its `.wasm` file name.
pub fn name_problem(name: &str) -> Option<String> {
    let mut chars = name.chars();
    let first_ok = chars.next().is_some_and(|c| c.is_ascii_lowercase());
    let rest_ok = chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
    if !first_ok || !rest_ok || name.ends_with('-') || name.len() > 64 {
        return Some(format!(
            "`{name}` is not a plugin name: use 1 to 64 lowercase letters, digits and dashes, starting with a letter and not ending with a dash (e.g. `word-count`)"
        ));
    }
    None
}

/// The version of the WIT package this engine was built with.
pub fn wit_version() -> &'static str {
    let wit = embedded::VENDOR
        .iter()
        .find(|(path, _)| *path == "wit/sandpipe.wit")
        .map_or("", |(_, text)| text);
    wit.lines()
        .find_map(|l| l.strip_prefix("package sandpipe:connector@"))
        .and_then(|rest| rest.strip_suffix(';'))
        .unwrap_or("0.0.0")
}

/// Write a new plugin project `name` in `lang` into `dir` (which must not
/// exist, or be empty). Returns the files written, relative to `dir`.
pub fn new_plugin(name: &str, lang: Lang, dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    if let Some(problem) = name_problem(name) {
        bail!(problem);
    }
    if dir.exists() {
        let empty = std::fs::read_dir(dir)
            .with_context(|| format!("cannot read {}", dir.display()))?
            .next()
            .is_none();
        if !empty {
            bail!(
                "{} already exists and is not empty: choose another --dir or name",
                dir.display()
            );
        }
    }
    let crate_name = name.replace('-', "_");
    let wasm = match lang {
        Lang::Rust => format!("target/wasm32-wasip2/release/{crate_name}.wasm"),
        Lang::Python | Lang::Js => format!("{name}.wasm"),
    };
    // Where the scripts find it (a Rust build honours CARGO_TARGET_DIR).
    let wasm_path = match lang {
        Lang::Rust => {
            format!("\"${{CARGO_TARGET_DIR:-target}}/wasm32-wasip2/release/{crate_name}.wasm\"")
        }
        Lang::Python | Lang::Js => wasm.clone(),
    };
    let type_name: String = name
        .split('-')
        .map(|part| {
            let mut chars = part.chars();
            chars.next().map_or_else(String::new, |c| {
                c.to_ascii_uppercase().to_string() + chars.as_str()
            })
        })
        .collect();
    let values = [
        ("{{name}}", name.to_owned()),
        ("{{type_name}}", type_name),
        ("{{wasm_path}}", wasm_path),
        ("{{wasm}}", wasm),
        ("{{wit_version}}", wit_version().to_owned()),
        ("{{sdk_version}}", env!("CARGO_PKG_VERSION").to_owned()),
        (
            "{{test_prelude}}",
            if lang == Lang::Rust {
                "cargo test\n"
            } else {
                ""
            }
            .to_owned(),
        ),
    ];
    let fill = |text: &str| {
        values.iter().fold(text.to_owned(), |text, (key, value)| {
            text.replace(key, value)
        })
    };

    let mut files: Vec<(PathBuf, String)> = Vec::new();
    for (path, text) in embedded::TEMPLATES {
        let rel = if let Some(rel) = path.strip_prefix("common/") {
            rel
        } else if let Some(rel) = path.strip_prefix(lang.template_dir()) {
            rel
        } else {
            continue;
        };
        let (rel, text) = match rel.strip_suffix(".tmpl") {
            Some(rel) => (rel, fill(text)),
            None => (rel, (*text).to_owned()),
        };
        let rel = if rel == "gitignore" {
            ".gitignore"
        } else {
            rel
        };
        files.push((PathBuf::from(rel), text));
    }
    for (path, text) in embedded::VENDOR {
        let rel = match (lang, path.strip_prefix("guest-sdk/")) {
            (Lang::Rust, Some(rest)) => format!("vendor/sandpipe-sdk/{rest}"),
            (_, Some(_)) => continue,
            (Lang::Rust, None) => match path.strip_prefix("sqlite-policy/") {
                Some(rest) => format!("vendor/sandpipe-sqlite-policy/{rest}"),
                None => format!("vendor/{path}"),
            },
            // Python and JavaScript need only the WIT package.
            (_, None) if path.starts_with("wit/") => (*path).to_owned(),
            (_, None) => continue,
        };
        files.push((PathBuf::from(rel), (*text).to_owned()));
    }

    for (rel, text) in &files {
        let path = dir.join(rel);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)
                .with_context(|| format!("cannot create {}", parent.display()))?;
        }
        std::fs::write(&path, text).with_context(|| format!("cannot write {}", path.display()))?;
        if rel.extension().is_some_and(|e| e == "sh") {
            make_executable(&path)?;
        }
    }
    Ok(files.into_iter().map(|(rel, _)| rel).collect())
}

#[cfg(unix)]
fn make_executable(path: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755))
        .with_context(|| format!("cannot make {} executable", path.display()))
}

#[cfg(not(unix))]
fn make_executable(_: &Path) -> anyhow::Result<()> {
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_checked() {
        for good in ["a", "word-count", "x2", "image-meta-v2"] {
            assert_eq!(name_problem(good), None, "{good}");
        }
        for bad in ["", "Word", "2x", "-a", "a-", "a_b", "a b", "a/b", "..", "é"] {
            let problem = name_problem(bad).unwrap_or_default();
            assert!(problem.contains("not a plugin name"), "{bad}: {problem}");
        }
    }

    #[test]
    fn the_wit_version_is_the_packages() {
        // The embedded copy's version is the one the engine links first.
        let (major, minor) = crate::sandbox::compat::SUPPORTED[0];
        let version = wit_version();
        let prefix = match minor {
            Some(minor) => format!("{major}.{minor}."),
            None => format!("{major}."),
        };
        assert!(version.starts_with(&prefix), "{version} is not {prefix}x");
        assert!(
            include_str!("../../wit/sandpipe.wit")
                .contains(&format!("package sandpipe:connector@{version};"))
        );
    }

    #[test]
    fn each_language_gets_its_files_with_every_placeholder_filled() -> anyhow::Result<()> {
        for (lang, must) in [
            (
                Lang::Rust,
                &[
                    "Cargo.toml",
                    "src/lib.rs",
                    "vendor/sandpipe-sdk/src/lib.rs",
                    "vendor/sandpipe-sqlite-policy/src/lib.rs",
                    "vendor/wit/sandpipe.wit",
                ][..],
            ),
            (Lang::Python, &["app.py", "wit/sandpipe.wit"][..]),
            (
                Lang::Js,
                &["app.js", "package.json", "wit/sandpipe.wit"][..],
            ),
        ] {
            let dir = tempfile::tempdir()?;
            let project = dir.path().join("word-count");
            let written = new_plugin("word-count", lang, &project)?;
            for file in must.iter().chain(&[
                "build.sh",
                "test.sh",
                "init.sql",
                "README.md",
                ".gitignore",
                "tests/hello/message.json",
                "tests/hello/hello.txt",
            ]) {
                assert!(
                    written.contains(&PathBuf::from(file)),
                    "{lang:?}: {file} missing"
                );
                assert!(project.join(file).is_file(), "{lang:?}: {file} not written");
            }
            for rel in written.iter().filter(|p| !p.starts_with("vendor")) {
                let text = std::fs::read_to_string(project.join(rel))?;
                assert!(
                    !text.contains("{{"),
                    "{lang:?}: {} has an unfilled placeholder",
                    rel.display()
                );
                // Every address it names is true: no placeholder host.
                assert!(
                    !rel.ends_with("README.md") || !text.contains("example.invalid"),
                    "{lang:?}: {} links to a placeholder address",
                    rel.display()
                );
            }
            // Only the language's own files.
            let other = written.iter().any(|p| {
                let p = p.to_string_lossy();
                (lang != Lang::Rust && p.starts_with("vendor/"))
                    || (lang != Lang::Js && p == "app.js")
            });
            assert!(!other, "{lang:?}: {written:?}");
            // A second run refuses to overwrite it.
            let again = new_plugin("word-count", lang, &project)
                .err()
                .map(|e| e.to_string());
            assert!(again.is_some_and(|e| e.contains("already exists")));
        }
        Ok(())
    }
}

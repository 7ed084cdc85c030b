//! Embeds what `sandpipe new` writes: the templates in `scaffold/` and, for
//! Rust projects, the guest SDK, the SQLite policy and the WIT package,
//! vendored as they are in this checkout. Generates `$OUT_DIR/scaffold.rs`.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

fn files(root: &Path, dir: &Path, out: &mut Vec<PathBuf>) -> std::io::Result<()> {
    let mut entries: Vec<_> = std::fs::read_dir(dir)?.collect::<Result<_, _>>()?;
    entries.sort_by_key(|e| e.file_name());
    for entry in entries {
        let path = entry.path();
        if entry.file_type()?.is_dir() {
            files(root, &path, out)?;
        } else {
            out.push(path.strip_prefix(root).unwrap_or(&path).to_path_buf());
        }
    }
    Ok(())
}

fn list(source: &mut String, name: &str, root: &Path, dirs: &[&str]) -> std::io::Result<()> {
    let _ = writeln!(source, "pub static {name}: &[(&str, &str)] = &[");
    for dir in dirs {
        println!("cargo:rerun-if-changed={}", root.join(dir).display());
        let mut found = Vec::new();
        if root.join(dir).is_file() {
            found.push(PathBuf::from(dir));
        } else {
            files(root, &root.join(dir), &mut found)?;
        }
        for rel in found {
            let rel = rel.to_string_lossy().replace('\\', "/");
            let abs = root.join(&rel);
            let _ = writeln!(
                source,
                "    ({rel:?}, include_str!({:?})),",
                abs.display().to_string()
            );
        }
    }
    source.push_str("];\n");
    Ok(())
}

fn main() -> std::io::Result<()> {
    let engine = PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").unwrap_or_default());
    let workspace = engine.parent().map(Path::to_path_buf).unwrap_or_default();
    let mut source = String::new();
    list(
        &mut source,
        "TEMPLATES",
        &engine.join("scaffold"),
        &["common", "rust", "python", "js"],
    )?;
    list(
        &mut source,
        "VENDOR",
        &workspace,
        &[
            "guest-sdk/Cargo.toml",
            "guest-sdk/src",
            "sqlite-policy/Cargo.toml",
            "sqlite-policy/src",
            "wit",
        ],
    )?;
    let out = PathBuf::from(std::env::var_os("OUT_DIR").unwrap_or_default());
    std::fs::write(out.join("scaffold.rs"), source)
}

//! The guest components (connectors and test fixtures), built for
//! wasm32-wasip2 once per process and found by crate name. Shared by the
//! end-to-end tests and the benchmarks (`#[path]`-included by both).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

/// The workspace root.
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default()
}

/// A connector's SQL init script, `connectors/NAME/init.sql` (for its
/// grant's `sql: { init: ... }`; `just guests` copies it beside the
/// component as `NAME.init.sql`).
#[allow(dead_code)] // the micro-benchmarks include this file too
pub fn init_script(name: &str) -> PathBuf {
    root().join("connectors").join(name).join("init.sql")
}

/// Where the guest components are built (same rule as the justfile).
pub fn guest_target_dir() -> PathBuf {
    std::env::var_os("SANDPIPE_GUEST_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join("target").join("guests"))
}

/// Build every guest crate once per test process; returns the folder
/// holding the `.wasm` files (named after the crates, with underscores).
pub fn guests() -> &'static Path {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    BUILT.get_or_init(|| {
        let target = guest_target_dir();
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let status = Command::new(cargo)
            .current_dir(root())
            .env("CARGO_TARGET_DIR", &target)
            .args([
                "build",
                "--target",
                "wasm32-wasip2",
                "--profile",
                "guest",
                "--workspace",
                "--exclude",
                "sandpipe",
                "--exclude",
                "sandpipe-sqlite-policy",
                "--exclude",
                "sandpipe-config",
                "--exclude",
                "native-consumer",
                "--exclude",
                "native-sync",
            ])
            .status();
        assert!(
            matches!(status, Ok(s) if s.success()),
            "building the guest components failed: {status:?}"
        );
        target.join("wasm32-wasip2").join("guest")
    })
}

/// The built component of crate `name` (dashes allowed).
pub fn component(name: &str) -> PathBuf {
    guests().join(format!("{}.wasm", name.replace('-', "_")))
}

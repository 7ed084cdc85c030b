//! The benchmarks' independent baselines (bench/native-consumer,
//! bench/native-sync): built with this cargo and target directory, in the
//! bench profile. `#[path]`-included by the benchmarks.

use std::path::PathBuf;
use std::process::{Command, Stdio};

/// Build the binary of workspace package `package` (a binary of the same
/// name); its executable.
pub fn build_bench_binary(root: &std::path::Path, package: &str) -> PathBuf {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = Command::new(cargo)
        .current_dir(root)
        .args([
            "build",
            "--profile",
            "bench",
            "-p",
            package,
            "--message-format=json-render-diagnostics",
        ])
        .stderr(Stdio::inherit())
        .output()
        .unwrap_or_else(|e| panic!("cannot run cargo: {e}"));
    assert!(out.status.success(), "building {package} failed");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .filter(|m| m["reason"] == "compiler-artifact" && m["target"]["name"] == package)
        .find_map(|m| m["executable"].as_str().map(PathBuf::from))
        .unwrap_or_else(|| panic!("cargo named no {package} executable"))
}

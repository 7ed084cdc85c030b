//! `sandpipe new plugin NAME --lang rust|python|js`: each project builds and
//! passes its own test out of the box — `cargo test` (natively, on the
//! vendored SDK's fakes) for Rust, then for every language its `test.sh`,
//! which builds the component and runs it in the sandbox with `sandpipe
//! exec`. The Python and JavaScript toolchains are the ones the polyglot
//! tests install; where one cannot be installed the test says SKIPPED.

use std::path::Path;
use std::process::Command;

use crate::harness::guest_target_dir;

fn new(name: &str, lang: &str, dir: &Path) {
    let out = Command::new(env!("CARGO_BIN_EXE_sandpipe"))
        .args(["new", "plugin", name, "--lang", lang, "--dir"])
        .arg(dir)
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{said}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        said.starts_with(&format!("created {}", dir.display())),
        "{said}"
    );
}

/// Run `program` in `dir` with the engine binary as `sandpipe`; panics with
/// its output unless it succeeds.
fn run(dir: &Path, program: &str, args: &[&str], env: &[(&str, &Path)]) -> String {
    let mut command = Command::new(program);
    command
        .args(args)
        .current_dir(dir)
        .env("SANDPIPE", env!("CARGO_BIN_EXE_sandpipe"))
        // The project's Rust builds share one warm target directory.
        .env("CARGO_TARGET_DIR", guest_target_dir().join("scaffold"))
        .env_remove("RUSTFLAGS");
    for (key, value) in env {
        command.env(key, value);
    }
    let out = command.output().unwrap();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "{program} {args:?} failed in {}:\n{said}",
        dir.display()
    );
    said
}

#[test]
fn a_new_rust_plugin_passes_its_native_test_and_its_sandbox_test() {
    let dir = tempfile::tempdir().unwrap();
    let project = dir.path().join("word-count");
    new("word-count", "rust", &project);
    let said = run(&project, "cargo", &["test"], &[]);
    assert!(said.contains("test result: ok. 3 passed"), "{said}");
    let said = run(&project, "./test.sh", &[], &[]);
    assert!(
        said.contains("ok: word-count counted 6 words in the sandbox"),
        "{said}"
    );
}

#[test]
fn a_new_python_plugin_builds_and_passes_its_sandbox_test() {
    let test = "scaffold::a_new_python_plugin_builds_and_passes_its_sandbox_test";
    if !crate::polyglot::toolchain(test, true) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let project = dir.path().join("py-words");
    new("py-words", "python", &project);
    let tools = guest_target_dir().join("polyglot");
    let said = run(
        &project,
        "./test.sh",
        &[],
        &[("SANDPIPE_TOOLS_DIR", &tools)],
    );
    assert!(
        said.contains("ok: py-words counted 6 words in the sandbox"),
        "{said}"
    );
}

#[test]
fn a_new_javascript_plugin_builds_and_passes_its_sandbox_test() {
    let test = "scaffold::a_new_javascript_plugin_builds_and_passes_its_sandbox_test";
    if !crate::polyglot::toolchain(test, false) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let project = dir.path().join("js-words");
    new("js-words", "js", &project);
    // The examples' installed toolchain when there is one (the polyglot
    // build may have come from its cache without installing it); else the
    // project's build.sh installs its own with npm.
    let tool = crate::harness::root()
        .join("examples/plugins/js-validate/node_modules/.bin/componentize-js");
    let env: &[(&str, &Path)] = if tool.exists() {
        &[("COMPONENTIZE_JS", &tool)]
    } else {
        &[]
    };
    let said = run(&project, "./test.sh", &[], env);
    assert!(
        said.contains("ok: js-words counted 6 words in the sandbox"),
        "{said}"
    );
}

#[test]
fn a_bad_name_or_an_existing_folder_is_refused_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_sandpipe"))
        .args(["new", "plugin", "Bad_Name", "--lang", "rust", "--dir"])
        .arg(dir.path().join("x"))
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(said.contains("`Bad_Name` is not a plugin name"), "{said}");
    std::fs::write(dir.path().join("keep.txt"), "mine").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_sandpipe"))
        .args(["new", "plugin", "ok", "--lang", "js", "--dir"])
        .arg(dir.path())
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(said.contains("already exists and is not empty"), "{said}");
    assert_eq!(
        std::fs::read_to_string(dir.path().join("keep.txt")).unwrap(),
        "mine"
    );
}

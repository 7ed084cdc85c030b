//! The README's quickstart, as a test: the shipped sample data through both
//! connectors, with the counts the README promises.

use crate::harness::{Deployment, component, init_script, root};

fn copy_dir(from: &std::path::Path, to: &std::path::Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn quickstart_processes_the_sample_data() {
    let d = Deployment::new(&[], "");
    let qs = d.path("qs");
    copy_dir(&root().join("examples/quickstart"), &qs);
    std::fs::create_dir_all(qs.join("plugins")).unwrap();
    // As `just quickstart` puts them there: the components and their init
    // scripts.
    for name in ["image-meta", "text-stats"] {
        std::fs::copy(
            component(name),
            qs.join("plugins").join(format!("{name}.wasm")),
        )
        .unwrap();
        std::fs::copy(
            init_script(name),
            qs.join("plugins").join(format!("{name}.init.sql")),
        )
        .unwrap();
    }
    let (_tx, rx) = tokio::sync::watch::channel(false);
    let summary = sandpipe::app::run(&qs.join("sandpipe.yaml"), true, rx)
        .await
        .unwrap();
    let spool_json = std::fs::read_dir(root().join("examples/quickstart/spool"))
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .file_name()
                .to_string_lossy()
                .ends_with(".json")
        })
        .count() as u64;
    assert_eq!(summary.processed, spool_json);
    assert_eq!(summary.dead, 2, "{summary}");
    assert_eq!(summary.done, spool_json - 2, "{summary}");
    assert_eq!(summary.failed, 0, "{summary}");
    // The README promises this line.
    let readme = std::fs::read_to_string(root().join("README.md")).unwrap();
    assert!(
        readme.contains(&format!("\n{summary}\n")),
        "README.md does not show the quickstart's line `{summary}`"
    );

    let images = rusqlite::Connection::open(qs.join("state/plugins/image-meta.sqlite")).unwrap();
    let mut stmt = images
        .prepare("SELECT format, width, height, bytes FROM image_meta ORDER BY format")
        .unwrap();
    let rows: Vec<(String, i64, i64, i64)> = stmt
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    assert_eq!(
        rows,
        vec![
            ("gif".to_string(), 20, 10, 96),
            ("jpeg".to_string(), 32, 24, 715),
            ("png".to_string(), 16, 16, 83),
        ]
    );
    let texts = rusqlite::Connection::open(qs.join("state/plugins/text-stats.sqlite")).unwrap();
    let n: i64 = texts
        .query_row("SELECT count(*) FROM text_stats WHERE words > 0", [], |r| {
            r.get(0)
        })
        .unwrap();
    assert!(n >= 2);
    let emitted = std::fs::read_dir(qs.join("out/stats"))
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .file_name()
                .to_string_lossy()
                .ends_with(".json")
        })
        .count();
    assert_eq!(emitted as i64, n);
    let dead: Vec<String> = std::fs::read_dir(qs.join("spool/dead"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(
        dead.iter().filter(|n| n.ends_with(".error.json")).count(),
        2,
        "{dead:?}"
    );
}

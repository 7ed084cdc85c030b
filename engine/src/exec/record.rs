//! `exec --record DIR` and `replay DIR PLUGIN.wasm`.
//!
//! A recording is a folder: `message.json` (the message as given), `data`
//! (the data object, when there is one), `init.sql` (the SQL init script,
//! when there was one) and `recording.json` (format 1: the other inputs —
//! data location, metadata, config, the grant the run had, limits, the
//! HTTP exchanges (each request's method and URL with the response's
//! status, headers and body, read whole up to the plugin's quota; never
//! the request's headers, which may carry a secret) — and the whole
//! report, every host call with its result included). `replay` serves
//! those responses instead of the network. `replay` runs a build on the same inputs, with the same
//! in-memory capabilities, and compares the host calls (function,
//! arguments, results) and the outcome. Fuel and duration are shown, never
//! compared.

use std::io::{self, Write};
use std::path::Path;

use anyhow::Context as _;
use serde::{Deserialize, Serialize};
use serde_json::{Value as Json, json};

use super::report::{self, OutcomeInfo, Report};
use super::{Inputs, usage};
use crate::capability::journal::HostCall;

/// The recording format this engine writes and reads.
pub const FORMAT: u32 = 1;
/// The SQL init script's file in a recording.
const INIT_FILE: &str = "init.sql";
/// Differences printed at most (all are in `--json`).
const SHOWN: usize = 20;
/// Above this many differing calls (each side), calls are compared by
/// position rather than aligned.
const ALIGN_MAX: usize = 2000;

#[derive(Serialize, Deserialize)]
struct File {
    format: u32,
    inputs: Inputs,
    report: Report,
}

/// A loaded recording.
pub struct Recording {
    /// The inputs (message and data included).
    pub inputs: Inputs,
    /// What the recorded run did.
    pub report: Report,
}

/// Save `inputs` and `report` in `dir` (created if missing).
pub fn save(dir: &Path, inputs: &Inputs, report: &Report) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let write = |name: &str, bytes: &[u8]| {
        let path = dir.join(name);
        std::fs::write(&path, bytes).with_context(|| format!("cannot write {}", path.display()))
    };
    write("message.json", &inputs.message)?;
    match &inputs.data {
        Some(data) => write("data", data)?,
        None => {
            let _ = std::fs::remove_file(dir.join("data"));
        }
    }
    match &inputs.sql_init {
        Some(init) => write(INIT_FILE, init.text.as_bytes())?,
        None => {
            let _ = std::fs::remove_file(dir.join(INIT_FILE));
        }
    }
    // Replay with the grant this run had, whatever the next build imports.
    let mut inputs = inputs.clone();
    inputs.grants = Some(report.grants.clone());
    let file = File {
        format: FORMAT,
        inputs,
        report: report.clone(),
    };
    write("recording.json", &serde_json::to_vec_pretty(&file)?)
}

/// Load the recording in `dir`.
pub fn load(dir: &Path) -> anyhow::Result<Recording> {
    let path = dir.join("recording.json");
    let text = std::fs::read(&path).map_err(|e| {
        usage(format!(
            "{} is not a recording (made by `sandpipe exec --record DIR`): {e}",
            path.display()
        ))
    })?;
    let file: File = serde_json::from_slice(&text)
        .map_err(|e| usage(format!("{}: not a recording: {e}", path.display())))?;
    if file.format != FORMAT {
        return Err(usage(format!(
            "{}: recording format {} (this engine reads {FORMAT})",
            path.display(),
            file.format
        )));
    }
    let mut inputs = file.inputs;
    inputs.message = std::fs::read(dir.join("message.json"))
        .map_err(|e| usage(format!("{}/message.json: {e}", dir.display())))?;
    if inputs.data_location.is_some() {
        inputs.data = Some(
            std::fs::read(dir.join("data"))
                .map_err(|e| usage(format!("{}/data: {e}", dir.display())))?,
        );
    }
    if let Some(init) = &mut inputs.sql_init {
        init.file = dir.join(INIT_FILE);
        init.text = std::fs::read_to_string(&init.file)
            .map_err(|e| usage(format!("{}: {e}", init.file.display())))?;
    }
    Ok(Recording {
        inputs,
        report: file.report,
    })
}

/// One difference in the host calls.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "change", rename_all = "kebab-case")]
pub enum Change {
    /// The same position in both runs, different calls.
    Changed {
        /// Position in the recorded run (1-based).
        recorded_at: usize,
        /// Position in the replay (1-based).
        replayed_at: usize,
        /// The recorded call.
        recorded: HostCall,
        /// The replayed call.
        replayed: HostCall,
    },
    /// A recorded call the replay did not make.
    Missing {
        /// Position in the recorded run (1-based).
        recorded_at: usize,
        /// The call.
        call: HostCall,
    },
    /// A call only the replay made.
    Extra {
        /// Position in the replay (1-based).
        replayed_at: usize,
        /// The call.
        call: HostCall,
    },
}

/// The differences between a recorded run and its replay.
#[derive(Debug, Clone, Serialize)]
pub struct Comparison {
    /// The outcomes, when they differ: (recorded, replayed).
    pub outcome: Option<(OutcomeInfo, OutcomeInfo)>,
    /// Host call differences, in order.
    pub changes: Vec<Change>,
    /// A service's replies or response, when they differ: (recorded,
    /// replayed).
    pub answer: Option<(serde_json::Value, serde_json::Value)>,
}

impl Comparison {
    /// Whether nothing differs.
    pub fn is_same(&self) -> bool {
        self.outcome.is_none() && self.changes.is_empty() && self.answer.is_none()
    }
}

/// A service's replies and response (null for a plugin).
fn answer(report: &Report) -> serde_json::Value {
    json!({ "replies": report.replies, "response": report.response })
}

/// Compare two runs' outcomes and host calls.
pub fn compare(recorded: &Report, replayed: &Report) -> Comparison {
    let outcome = (recorded.outcome != replayed.outcome)
        .then(|| (recorded.outcome.clone(), replayed.outcome.clone()));
    let answer =
        (answer(recorded) != answer(replayed)).then(|| (answer(recorded), answer(replayed)));
    Comparison {
        outcome,
        changes: diff_calls(&recorded.calls, &replayed.calls),
        answer,
    }
}

enum Step {
    Same,
    Missing(usize),
    Extra(usize),
}

/// An edit script from `a` to `b`: common prefix and suffix, and in between
/// a longest-common-subsequence alignment (by position past `ALIGN_MAX`).
fn diff_calls(a: &[HostCall], b: &[HostCall]) -> Vec<Change> {
    let prefix = a.iter().zip(b).take_while(|(x, y)| x == y).count();
    let suffix = a[prefix..]
        .iter()
        .rev()
        .zip(b[prefix..].iter().rev())
        .take_while(|(x, y)| x == y)
        .count();
    let (am, bm) = (&a[prefix..a.len() - suffix], &b[prefix..b.len() - suffix]);
    let mut steps = Vec::new();
    if am.len() <= ALIGN_MAX && bm.len() <= ALIGN_MAX {
        // lcs[i][j]: the LCS length of am[i..] and bm[j..].
        let (n, m) = (am.len(), bm.len());
        let mut lcs = vec![vec![0u32; m + 1]; n + 1];
        for i in (0..n).rev() {
            for j in (0..m).rev() {
                lcs[i][j] = if am[i] == bm[j] {
                    lcs[i + 1][j + 1] + 1
                } else {
                    lcs[i + 1][j].max(lcs[i][j + 1])
                };
            }
        }
        let (mut i, mut j) = (0, 0);
        while i < n || j < m {
            if i < n && j < m && am[i] == bm[j] {
                steps.push(Step::Same);
                i += 1;
                j += 1;
            } else if j < m && (i == n || lcs[i][j + 1] >= lcs[i + 1][j]) {
                steps.push(Step::Extra(j));
                j += 1;
            } else {
                steps.push(Step::Missing(i));
                i += 1;
            }
        }
    } else {
        for k in 0..am.len().max(bm.len()) {
            if k < am.len() {
                steps.push(Step::Missing(k));
            }
            if k < bm.len() {
                steps.push(Step::Extra(k));
            }
        }
    }
    // Pair each run of missing calls with the run of extra calls next to
    // it: those are the calls that changed.
    let mut changes = Vec::new();
    let mut k = 0;
    while k < steps.len() {
        if matches!(steps[k], Step::Same) {
            k += 1;
            continue;
        }
        let mut missing = Vec::new();
        let mut extra = Vec::new();
        while k < steps.len() {
            match steps[k] {
                Step::Same => break,
                Step::Missing(i) => missing.push(i),
                Step::Extra(j) => extra.push(j),
            }
            k += 1;
        }
        let paired = missing.len().min(extra.len());
        for (&i, &j) in missing.iter().zip(&extra) {
            changes.push(Change::Changed {
                recorded_at: prefix + i + 1,
                replayed_at: prefix + j + 1,
                recorded: am[i].clone(),
                replayed: bm[j].clone(),
            });
        }
        for &i in &missing[paired..] {
            changes.push(Change::Missing {
                recorded_at: prefix + i + 1,
                call: am[i].clone(),
            });
        }
        for &j in &extra[paired..] {
            changes.push(Change::Extra {
                replayed_at: prefix + j + 1,
                call: bm[j].clone(),
            });
        }
    }
    changes
}

fn header(out: &mut dyn Write, recorded: &Report, replayed: &Report) -> io::Result<()> {
    let short = |s: &str| s[..s.len().min(12)].to_owned();
    writeln!(
        out,
        "recorded  {} ({}, sha256 {}): {}, {} host calls, fuel {}",
        recorded.plugin.name,
        recorded.plugin.file,
        short(&recorded.plugin.sha256),
        recorded.outcome,
        recorded.calls.len(),
        recorded.fuel.map_or("-".into(), |f| f.to_string())
    )?;
    writeln!(
        out,
        "replayed  {} ({}, sha256 {}): {}, {} host calls, fuel {}",
        replayed.plugin.name,
        replayed.plugin.file,
        short(&replayed.plugin.sha256),
        replayed.outcome,
        replayed.calls.len(),
        replayed.fuel.map_or("-".into(), |f| f.to_string())
    )
}

/// The comparison for people.
pub fn print(
    out: &mut dyn Write,
    c: &Comparison,
    recorded: &Report,
    replayed: &Report,
) -> io::Result<()> {
    header(out, recorded, replayed)?;
    if c.is_same() {
        return writeln!(
            out,
            "\nno difference: the outcome and all {} host calls match",
            recorded.calls.len()
        );
    }
    writeln!(out)?;
    if let Some((was, now)) = &c.outcome {
        writeln!(out, "outcome differs")?;
        writeln!(out, "  recorded: {was}")?;
        writeln!(out, "  replayed: {now}")?;
    }
    if let Some((was, now)) = &c.answer {
        writeln!(out, "the service's replies or response differ")?;
        writeln!(out, "  recorded: {}", super::report::compact(was, 200))?;
        writeln!(out, "  replayed: {}", super::report::compact(now, 200))?;
    }
    for change in c.changes.iter().take(SHOWN) {
        match change {
            Change::Changed {
                recorded_at,
                replayed_at,
                recorded,
                replayed,
            } => {
                let what = if recorded.name() != replayed.name() {
                    "a different call"
                } else if recorded.args != replayed.args && recorded.result != replayed.result {
                    "arguments and result differ"
                } else if recorded.args != replayed.args {
                    "arguments differ"
                } else {
                    "result differs"
                };
                let at = if recorded_at == replayed_at {
                    format!("call {recorded_at}")
                } else {
                    format!("call {recorded_at} (replay: {replayed_at})")
                };
                writeln!(out, "{at} {}: {what}", recorded.name())?;
                writeln!(out, "  recorded: {}", report::call_line(recorded))?;
                writeln!(out, "  replayed: {}", report::call_line(replayed))?;
            }
            Change::Missing { recorded_at, call } => {
                writeln!(out, "call {recorded_at} missing in the replay")?;
                writeln!(out, "  recorded: {}", report::call_line(call))?;
            }
            Change::Extra { replayed_at, call } => {
                writeln!(out, "call {replayed_at} of the replay is new")?;
                writeln!(out, "  replayed: {}", report::call_line(call))?;
            }
        }
    }
    if c.changes.len() > SHOWN {
        writeln!(
            out,
            "... and {} more host call differences (see --json)",
            c.changes.len() - SHOWN
        )?;
    }
    let n = c.changes.len() + usize::from(c.outcome.is_some()) + usize::from(c.answer.is_some());
    writeln!(out, "\n{n} difference{}", if n == 1 { "" } else { "s" })
}

/// The comparison as one JSON object.
pub fn print_json(
    out: &mut dyn Write,
    c: &Comparison,
    recorded: &Report,
    replayed: &Report,
) -> io::Result<()> {
    let value: Json = json!({
        "same": c.is_same(),
        "outcome": c.outcome.as_ref().map(|(was, now)| json!({ "recorded": was, "replayed": now })),
        "answer": c.answer.as_ref().map(|(was, now)| json!({ "recorded": was, "replayed": now })),
        "changes": c.changes,
        "recorded": report::summary(recorded),
        "replayed": report::summary(replayed),
    });
    serde_json::to_writer_pretty(&mut *out, &value)?;
    writeln!(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn call(function: &str, arg: i64) -> HostCall {
        HostCall {
            interface: "sql".into(),
            function: function.into(),
            args: json!({ "n": arg }),
            result: json!({ "ok": null }),
        }
    }

    #[test]
    fn identical_calls_have_no_changes() {
        let a = vec![call("execute", 1), call("query", 2)];
        assert!(diff_calls(&a, &a).is_empty());
    }

    #[test]
    fn a_changed_call_is_paired_and_an_insertion_does_not_shift_the_rest() {
        let a = vec![call("execute", 1), call("execute", 2), call("query", 3)];
        let b = vec![call("execute", 1), call("execute", 9), call("query", 3)];
        let changes = diff_calls(&a, &b);
        assert_eq!(changes.len(), 1);
        assert!(matches!(
            &changes[0],
            Change::Changed {
                recorded_at: 2,
                replayed_at: 2,
                ..
            }
        ));

        let b = vec![
            call("execute", 1),
            call("log", 0),
            call("execute", 2),
            call("query", 3),
        ];
        let changes = diff_calls(&a, &b);
        assert_eq!(
            changes,
            vec![Change::Extra {
                replayed_at: 2,
                call: call("log", 0)
            }]
        );
        let changes = diff_calls(&b, &a);
        assert!(matches!(
            &changes[..],
            [Change::Missing { recorded_at: 2, .. }]
        ));
    }
}

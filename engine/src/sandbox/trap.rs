//! Classifying what went wrong in a plugin invocation.

use std::fmt;

use wasmtime::Trap;

use crate::config::Limits;

/// The kind of failure of one plugin on one message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureKind {
    /// Fuel ran out.
    OutOfFuel,
    /// The wall-clock deadline passed.
    Deadline,
    /// Linear memory would have grown past the limit.
    MemoryLimit,
    /// The guest's stack overflowed.
    StackOverflow,
    /// The guest panicked (or reached `unreachable`).
    Panic,
    /// A host call was denied and the plugin failed with it.
    DeniedCall,
    /// Any other trap.
    Trap,
    /// The plugin returned an error value.
    PluginError,
    /// A long-lived instance failed and its replacement waits out a
    /// backoff (`sandbox::Session`).
    Restarting,
}

impl FailureKind {
    /// A short stable name for logs, metrics and the status log.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::OutOfFuel => "out-of-fuel",
            Self::Deadline => "deadline",
            Self::MemoryLimit => "memory-limit",
            Self::StackOverflow => "stack-overflow",
            Self::Panic => "panic",
            Self::DeniedCall => "denied-call",
            Self::Trap => "trap",
            Self::PluginError => "plugin-error",
            Self::Restarting => "restarting",
        }
    }
}

/// A typed failure of one plugin on one message.
#[derive(Debug, Clone)]
pub struct Failure {
    /// What kind of failure.
    pub kind: FailureKind,
    /// A human-readable explanation (the guest's panic message, the limit).
    pub message: String,
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.kind.as_str(), self.message)
    }
}

impl Failure {
    /// A failure of the given kind.
    pub fn new(kind: FailureKind, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
        }
    }
}

/// Turn a trap (or instantiation error) into a [`Failure`].
pub(super) fn classify(
    err: &wasmtime::Error,
    limits: &Limits,
    memory_hit: Option<usize>,
    denials: &[String],
    stderr: &str,
) -> Failure {
    if let Some(desired) = memory_hit {
        return Failure::new(
            FailureKind::MemoryLimit,
            format!(
                "memory limit of {} exceeded (the plugin asked for {} bytes)",
                limits.memory, desired
            ),
        );
    }
    let trap = err.downcast_ref::<Trap>().copied();
    let denied = || {
        denials
            .first()
            .map(|d| format!("{d}{}", with_stderr(stderr)))
    };
    match trap {
        Some(Trap::OutOfFuel) => Failure::new(
            FailureKind::OutOfFuel,
            format!(
                "plugin ran out of fuel (limit {})",
                limits.fuel.map_or("unmetered".into(), |f| f.to_string())
            ),
        ),
        Some(Trap::Interrupt) => Failure::new(
            FailureKind::Deadline,
            format!("plugin exceeded its deadline of {:?}", limits.timeout),
        ),
        Some(Trap::StackOverflow) => {
            Failure::new(FailureKind::StackOverflow, "plugin overflowed its stack")
        }
        Some(Trap::UnreachableCodeReached) => match denied() {
            Some(message) => Failure::new(FailureKind::DeniedCall, message),
            None => Failure::new(
                FailureKind::Panic,
                if stderr.is_empty() {
                    "plugin panicked (reached unreachable code; nothing on stderr)".to_owned()
                } else {
                    panic_message(stderr)
                },
            ),
        },
        _ => match denied() {
            Some(message) => Failure::new(FailureKind::DeniedCall, message),
            None => Failure::new(
                FailureKind::Trap,
                format!("{}{}", root_cause(err), with_stderr(stderr)),
            ),
        },
    }
}

fn with_stderr(stderr: &str) -> String {
    if stderr.is_empty() {
        String::new()
    } else {
        format!(" (stderr: {stderr})")
    }
}

/// Rust's panic output is `thread '<unnamed>' panicked at src/lib.rs:3:5:\n<message>`;
/// keep the message and the place. What the guest wrote before the panic
/// line (the Python or JavaScript runtimes print the script's traceback,
/// then panic) follows on the next lines, its last [`PRINTED_LINES`] lines.
fn panic_message(stderr: &str) -> String {
    let text = stderr.trim();
    let Some((before, _)) = text.split_once("panicked at ") else {
        return format!("plugin panicked: {text}");
    };
    let printed = before.rsplit_once('\n').map_or("", |(p, _)| p).trim();
    let message = rust_panic_message(text);
    if printed.is_empty() {
        return message;
    }
    let lines: Vec<&str> = printed.lines().collect();
    let tail = lines[lines.len().saturating_sub(PRINTED_LINES)..].join("\n");
    format!("{message}\n{tail}")
}

/// How many lines of what a guest printed before panicking are kept.
const PRINTED_LINES: usize = 20;

fn rust_panic_message(text: &str) -> String {
    match text.split_once("panicked at ") {
        Some((_, rest)) => match rest.split_once('\n') {
            Some((place, message)) => {
                let message = message
                    .lines()
                    .take_while(|l| !l.starts_with("note: "))
                    .collect::<Vec<_>>()
                    .join("\n");
                format!(
                    "plugin panicked: {} (at {})",
                    message.trim(),
                    place.trim_end_matches(':')
                )
            }
            None => format!("plugin panicked at {rest}"),
        },
        None => format!("plugin panicked: {text}"),
    }
}

/// What went wrong, without the wasm backtrace wasmtime wraps a host
/// error in (which hid e.g. WASI's "requested len ... exceeds limit").
fn root_cause(err: &wasmtime::Error) -> String {
    let causes: Vec<String> = err
        .chain()
        .filter_map(|cause| cause.to_string().lines().next().map(str::to_owned))
        .filter(|line| !line.starts_with("error while executing at wasm backtrace"))
        .collect();
    if causes.is_empty() {
        format!("{err:#}")
            .lines()
            .next()
            .unwrap_or_default()
            .to_owned()
    } else {
        causes.join(": ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rust_panic_output_becomes_message_and_place() {
        let stderr = "thread '<unnamed>' panicked at src/lib.rs:12:9:\nfixture panic: m1\nnote: run with `RUST_BACKTRACE=1`";
        assert_eq!(
            panic_message(stderr),
            "plugin panicked: fixture panic: m1 (at src/lib.rs:12:9)"
        );
    }

    #[test]
    fn a_traceback_printed_before_the_panic_follows_the_message() {
        let stderr = "Traceback (most recent call last):\n  File \"app.py\", line 3, in execute\nValueError: bad\nthread '<unnamed>' panicked at runtime/src/lib.rs:1:2:\nPython function threw an unexpected exception\n";
        assert_eq!(
            panic_message(stderr),
            "plugin panicked: Python function threw an unexpected exception (at runtime/src/lib.rs:1:2)\n\
             Traceback (most recent call last):\n  File \"app.py\", line 3, in execute\nValueError: bad"
        );
    }
}

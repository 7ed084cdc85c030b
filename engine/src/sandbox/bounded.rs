//! `execute`, with the text the guest returns copied out of its memory
//! only as far as the engine keeps it.
//!
//! The generated binding lifts a plugin's whole result into host strings:
//! a plugin under a 64 MiB memory limit that returns a 50 MiB reason made
//! the engine hold that 50 MiB again (and more, as it was formatted), once
//! per message in flight. Here each string of the result is a [`Reason`],
//! whose lift copies at most [`MAX_REASON`] bytes out of the guest's
//! memory and notes the whole length. The types mirror `outcome`, `error`
//! and `retry-after` of `wit/sandpipe.wit`; the component model checks
//! them against the component's own when the function is looked up.
//!
//! [`Reason`] implements the lift itself, with the items wasmtime's own
//! derive macros use (`wasmtime::component::__internal`, outside its
//! stability guarantees: wasmtime is pinned to one version, and the tests
//! `hostile::huge_reasons_*` and `polyglot::*` (UTF-8, and the encodings
//! the Python and JavaScript toolchains choose) hold it to its word).

use wasmtime::component::__internal::wasmtime_environ::component::StringEncoding;
use wasmtime::component::__internal::{CanonicalAbiInfo, InstanceType, InterfaceType, LiftContext};
use wasmtime::component::{ComponentType, Instance, Lift};
use wasmtime::{Store, ValRaw};

use super::InvocationState;
use super::bindings::{Message, Outcome, RetryAfter, WitError};

/// The most of one reason that is copied out of a guest: the status log's
/// limit (`pipeline::MAX_INFO`), less room for what the engine adds (the
/// failure's kind, the note of the whole length), so the status log keeps
/// the note that counts the guest's own text.
pub const MAX_REASON: usize = crate::pipeline::MAX_INFO - 512;

/// The compact UTF-16 encoding's tag in a string's length.
const UTF16_TAG: usize = 1 << 31;

/// A guest string, copied out of its memory at most [`MAX_REASON`] bytes
/// deep when lifted.
struct Reason(String);

// SAFETY: the same type information as wasmtime's own `String`/`WasmStr`
// (a pointer pair, type-checked as `string`).
#[allow(
    unsafe_code,
    reason = "wasmtime's lift traits are unsafe to implement; this one reads a bounded prefix"
)]
unsafe impl ComponentType for Reason {
    type Lower = [ValRaw; 2];
    const ABI: CanonicalAbiInfo = CanonicalAbiInfo::POINTER_PAIR;

    fn typecheck(ty: &InterfaceType, _types: &InstanceType<'_>) -> wasmtime::Result<()> {
        match ty {
            InterfaceType::String => Ok(()),
            _ => wasmtime::bail!("expected `string`"),
        }
    }
}

// SAFETY: reads only within the guest's memory, bounds-checked.
#[allow(
    unsafe_code,
    reason = "wasmtime's lift traits are unsafe to implement; this one reads a bounded prefix"
)]
unsafe impl Lift for Reason {
    fn linear_lift_from_flat(
        cx: &mut LiftContext<'_>,
        _ty: InterfaceType,
        src: &Self::Lower,
    ) -> wasmtime::Result<Self> {
        let (ptr, len) = (src[0].get_u32() as usize, src[1].get_u32() as usize);
        read(cx, ptr, len).map(Reason)
    }

    fn linear_lift_from_memory(
        cx: &mut LiftContext<'_>,
        _ty: InterfaceType,
        bytes: &[u8],
    ) -> wasmtime::Result<Self> {
        let word = |at: usize| {
            bytes
                .get(at..at + 4)
                .and_then(|b| <[u8; 4]>::try_from(b).ok())
                .map(|b| u32::from_le_bytes(b) as usize)
                .ok_or_else(|| wasmtime::format_err!("string pointer pair out of bounds"))
        };
        read(cx, word(0)?, word(4)?).map(Reason)
    }
}

/// At most `MAX_REASON` bytes of the string at `ptr` (`len` code units of
/// the component's encoding), with a note of its whole length when cut.
fn read(cx: &LiftContext<'_>, ptr: usize, len: usize) -> wasmtime::Result<String> {
    let memory = cx.memory();
    let (utf16, units) = match cx.options().string_encoding {
        StringEncoding::Utf8 => (false, len),
        StringEncoding::Utf16 => (true, len),
        StringEncoding::CompactUtf16 if len & UTF16_TAG == 0 => (false, len),
        StringEncoding::CompactUtf16 => (true, len ^ UTF16_TAG),
    };
    let latin1 = !utf16 && !matches!(cx.options().string_encoding, StringEncoding::Utf8);
    let width = if utf16 { 2 } else { 1 };
    let whole = units
        .checked_mul(width)
        .and_then(|n| ptr.checked_add(n).map(|end| (n, end)))
        .filter(|(_, end)| *end <= memory.len())
        .map(|(n, _)| n)
        .ok_or_else(|| wasmtime::format_err!("string pointer/length out of bounds of memory"))?;
    let taken = whole.min(MAX_REASON) / width * width;
    let bytes = &memory[ptr..ptr + taken];
    let mut text = if utf16 {
        let units = bytes
            .chunks_exact(2)
            .map(|b| u16::from_le_bytes([b[0], b[1]]));
        char::decode_utf16(units)
            .map(|c| c.unwrap_or(char::REPLACEMENT_CHARACTER))
            .collect()
    } else if latin1 {
        bytes.iter().map(|&b| char::from(b)).collect()
    } else {
        String::from_utf8_lossy(bytes).into_owned()
    };
    if taken < whole {
        text.push_str(&format!("… (cut, {whole} bytes in all)"));
    }
    Ok(text)
}

#[derive(ComponentType, Lift)]
#[component(record)]
struct RetryAfterRaw {
    #[component(name = "delay-ms")]
    delay_ms: u64,
    reason: Reason,
}

#[derive(ComponentType, Lift)]
#[component(variant)]
enum OutcomeRaw {
    #[component(name = "done")]
    Done,
    #[component(name = "skip")]
    Skip(Reason),
    #[component(name = "retry")]
    Retry(RetryAfterRaw),
    #[component(name = "dead-letter")]
    DeadLetter(Reason),
}

#[derive(ComponentType, Lift)]
#[component(variant)]
enum ErrorRaw {
    #[component(name = "access-denied")]
    AccessDenied(Reason),
    #[component(name = "limit-exceeded")]
    LimitExceeded(Reason),
    #[component(name = "not-found")]
    NotFound(Reason),
    #[component(name = "invalid")]
    Invalid(Reason),
    #[component(name = "unavailable")]
    Unavailable(Reason),
    #[component(name = "internal")]
    Internal(Reason),
}

/// Call the instance's `execute` on `message`; each string of the result
/// is copied up to `MAX_REASON` bytes.
pub async fn execute(
    instance: &Instance,
    store: &mut Store<InvocationState>,
    message: &Message,
) -> wasmtime::Result<Result<Outcome, WitError>> {
    let func = instance
        .get_typed_func::<(&Message,), (Result<OutcomeRaw, ErrorRaw>,)>(&mut *store, "execute")?;
    let (raw,) = func.call_async(&mut *store, (message,)).await?;
    Ok(match raw {
        Ok(OutcomeRaw::Done) => Ok(Outcome::Done),
        Ok(OutcomeRaw::Skip(Reason(s))) => Ok(Outcome::Skip(s)),
        Ok(OutcomeRaw::Retry(r)) => Ok(Outcome::Retry(RetryAfter {
            delay_ms: r.delay_ms,
            reason: r.reason.0,
        })),
        Ok(OutcomeRaw::DeadLetter(Reason(s))) => Ok(Outcome::DeadLetter(s)),
        Err(ErrorRaw::AccessDenied(Reason(s))) => Err(WitError::AccessDenied(s)),
        Err(ErrorRaw::LimitExceeded(Reason(s))) => Err(WitError::LimitExceeded(s)),
        Err(ErrorRaw::NotFound(Reason(s))) => Err(WitError::NotFound(s)),
        Err(ErrorRaw::Invalid(Reason(s))) => Err(WitError::Invalid(s)),
        Err(ErrorRaw::Unavailable(Reason(s))) => Err(WitError::Unavailable(s)),
        Err(ErrorRaw::Internal(Reason(s))) => Err(WitError::Internal(s)),
    })
}

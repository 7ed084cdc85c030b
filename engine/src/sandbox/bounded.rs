//! What a guest hands the engine, copied out of its memory only as far as
//! the engine keeps it.
//!
//! The generated bindings lift every argument and result whole into host
//! values before any host code runs: a plugin under a 64 MiB memory limit
//! that returned a 50 MiB reason, wrote a 50 MiB log line or emitted a
//! 50 MiB payload made the engine hold that 50 MiB again (and more, as it
//! was formatted), once per message in flight, only to refuse or cut it
//! afterwards. Here the values that can be that large have lifts of their
//! own, which read the guest's memory in place:
//!
//! - [`Text<MAX>`]: a `string`, of which at most `MAX` bytes (of UTF-8) are
//!   copied, with the note `… (cut, N bytes in all)` when it is longer; `N`,
//!   its whole length, is known without copying it. The reasons of
//!   `execute`'s result are `Text<MAX_REASON>` ([`execute`], called through
//!   a typed function whose result types mirror `outcome`, `error` and
//!   `retry-after` of `wit/sandpipe.wit`; the component model checks them
//!   against the component's own when the function is looked up); a log
//!   line is `Text<MAX_LINE>` (`capability::log`), and the `log_bytes`
//!   quota counts its whole length, so an oversized line is refused
//!   without being copied.
//! - [`Payload`]: an emitted `list<u8>`, copied only when it is no longer
//!   than the largest `emit_bytes` of any plugin context built in this
//!   process ([`allow_emits_up_to`], called by `PluginContext::new`);
//!   otherwise only its length is kept. A lift cannot know which plugin it
//!   serves (it sees the guest's memory, not the store's data), but the
//!   host function that runs next does: there the plugin's own
//!   `emit_bytes` refuses the payload with `limit-exceeded`, counted and
//!   worded as before. A payload larger than every plugin's limit can pass
//!   no plugin's quota, so not copying it changes no answer; one within
//!   the largest limit is copied (at most that limit) and checked as
//!   before. The cap only grows, so it is never below the limit of a plugin
//!   that can run. [`Headers`] are bounded the same way, by the sum of their
//!   keys' and values' lengths (which `emit_bytes` counts too).
//!
//! [`link`] redefines the imports whose arguments these are (`log.write`
//! and `emit.publish`, of the current WIT version and of 0.1) over the
//! generated ones, calling the same capability code.
//!
//! Lengths are in UTF-8 bytes, as the host would hold the text had it
//! copied it all: for a component using UTF-16 or latin1+UTF-16 strings
//! the whole length is counted by reading (not copying) the rest of the
//! string, and where only a bound is needed ([`Headers`]) the number of
//! code units, a lower bound, is used. Text that is not valid in its
//! encoding is copied with replacement characters where the generated
//! lift would have trapped.
//!
//! The lifts are written with the items wasmtime's own derive macros use
//! (`wasmtime::component::__internal`, outside its stability guarantees:
//! wasmtime is pinned to one version, and the tests `hostile::huge_*`,
//! `hostile::sixteen_*`, `limits::*` and `polyglot::*` (UTF-8, and the
//! encodings the Python and JavaScript toolchains choose) hold them to
//! their word).

use std::sync::atomic::{AtomicU64, Ordering};

use wasmtime::component::__internal::wasmtime_environ::component::StringEncoding;
use wasmtime::component::__internal::{CanonicalAbiInfo, InstanceType, InterfaceType, LiftContext};
use wasmtime::component::{
    ComponentNamedList, ComponentType, Instance, Lift, Linker, Lower, WasmList,
};
use wasmtime::{Store, StoreContextMut, ValRaw};

use super::InvocationState;
use super::bindings::sandpipe::connector as current;
use super::bindings::{Document, Message, Outcome, PageRequest, RetryAfter, WitError};
use crate::capability::log::Line;

/// The most of one reason that is copied out of a guest: the status log's
/// limit (`pipeline::MAX_INFO`), less room for what the engine adds (the
/// failure's kind, the note of the whole length), so the status log keeps
/// the note that counts the guest's own text.
pub const MAX_REASON: usize = crate::pipeline::MAX_INFO - 512;

/// A reason returned by `execute`.
type Reason = Text<MAX_REASON>;

/// The versions of the WIT package whose imports [`link`] redefines: the
/// current one (`wit/sandpipe.wit`), 0.2 and 0.1 (`wit-history/`), as the
/// generated bindings name their instances.
const VERSIONS: [&str; 3] = ["1.2.0", "0.2.0", "0.1.0"];

/// The compact UTF-16 encoding's tag in a string's length.
const UTF16_TAG: usize = 1 << 31;

/// The canonical ABI's size of a `tuple<string, string>` in a list.
const HEADER_SIZE: usize = 16;

/// A guest `string`, copied out of its memory at most `MAX` bytes deep
/// when lifted, knowing its whole length.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Text<const MAX: usize> {
    /// At most `MAX` bytes of the text, then `… (cut, N bytes in all)`
    /// when it is longer.
    text: String,
    /// The whole text's length in UTF-8 bytes.
    len: u64,
    /// Whether `text` is cut (and ends with the note).
    cut: bool,
}

impl<const MAX: usize> Text<MAX> {
    /// A host string held to the same bound (what a lift would give for
    /// it): for code that calls the host without the wasm boundary.
    pub fn new(text: String) -> Self {
        let len = text.len() as u64;
        Self {
            text: crate::capability::cut(text, MAX),
            len,
            cut: len > MAX as u64,
        }
    }

    /// The whole text's length in UTF-8 bytes, copied or not.
    pub fn whole_len(&self) -> u64 {
        self.len
    }

    /// Whether the text was longer than `MAX` bytes, and is cut.
    pub fn is_cut(&self) -> bool {
        self.cut
    }

    /// The text as kept.
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// The text as kept, with the note when it was cut.
    pub fn into_string(self) -> String {
        self.text
    }
}

// SAFETY: the same type information as wasmtime's own `String`/`WasmStr`
// (a pointer pair, type-checked as `string`).
#[allow(
    unsafe_code,
    reason = "wasmtime's lift traits are unsafe to implement; this one reads a bounded prefix"
)]
unsafe impl<const MAX: usize> ComponentType for Text<MAX> {
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
unsafe impl<const MAX: usize> Lift for Text<MAX> {
    fn linear_lift_from_flat(
        cx: &mut LiftContext<'_>,
        _ty: InterfaceType,
        src: &Self::Lower,
    ) -> wasmtime::Result<Self> {
        let (ptr, len) = flat_pair(src);
        read_text(cx, ptr, len)
    }

    fn linear_lift_from_memory(
        cx: &mut LiftContext<'_>,
        _ty: InterfaceType,
        bytes: &[u8],
    ) -> wasmtime::Result<Self> {
        let (ptr, len) = memory_pair(bytes, 0)?;
        read_text(cx, ptr, len)
    }
}

/// A pointer pair (a string's or a list's) passed in two flat values.
fn flat_pair(src: &[ValRaw; 2]) -> (usize, usize) {
    (src[0].get_u32() as usize, src[1].get_u32() as usize)
}

/// The little-endian word at `at` of `bytes`.
fn word(bytes: &[u8], at: usize) -> wasmtime::Result<usize> {
    at.checked_add(4)
        .and_then(|end| bytes.get(at..end))
        .and_then(|b| <[u8; 4]>::try_from(b).ok())
        .map(|b| u32::from_le_bytes(b) as usize)
        .ok_or_else(|| wasmtime::format_err!("pointer pair out of bounds"))
}

/// The pointer pair stored at `at` of `bytes`.
fn memory_pair(bytes: &[u8], at: usize) -> wasmtime::Result<(usize, usize)> {
    Ok((word(bytes, at)?, word(bytes, at + 4)?))
}

/// How a string of the component's encoding is laid out: whether it is
/// UTF-16, latin1, and how many code units it has.
fn string_layout(encoding: StringEncoding, len: usize) -> (bool, bool, usize) {
    match encoding {
        StringEncoding::Utf8 => (false, false, len),
        StringEncoding::Utf16 => (true, false, len),
        StringEncoding::CompactUtf16 if len & UTF16_TAG == 0 => (false, true, len),
        StringEncoding::CompactUtf16 => (true, false, len ^ UTF16_TAG),
    }
}

/// `units` code units of `width` bytes at `ptr` of `memory`, bounds-checked.
fn units_at(memory: &[u8], ptr: usize, units: usize, width: usize) -> wasmtime::Result<&[u8]> {
    units
        .checked_mul(width)
        .and_then(|n| ptr.checked_add(n))
        .and_then(|end| memory.get(ptr..end))
        .ok_or_else(|| wasmtime::format_err!("string pointer/length out of bounds of memory"))
}

fn decode_utf16(bytes: &[u8]) -> impl Iterator<Item = char> + '_ {
    let units = bytes
        .chunks_exact(2)
        .map(|b| u16::from_le_bytes([b[0], b[1]]));
    char::decode_utf16(units).map(|c| c.unwrap_or(char::REPLACEMENT_CHARACTER))
}

/// At most `MAX` bytes (UTF-8, on a character boundary) of the string at
/// `ptr` (`len` as the canonical ABI gives it for the component's
/// encoding), with a note of its whole length when cut.
fn read_text<const MAX: usize>(
    cx: &mut LiftContext<'_>,
    ptr: usize,
    len: usize,
) -> wasmtime::Result<Text<MAX>> {
    let (utf16, latin1, units) = string_layout(cx.options().string_encoding, len);
    let width = if utf16 { 2 } else { 1 };
    let string = units_at(cx.memory(), ptr, units, width)?;
    cx.consume_fuel(units.min(MAX) * width)?;
    Ok(bounded_text(string, utf16, latin1))
}

/// The [`Text`] of `string`, the bytes of a string in guest memory
/// (UTF-16, latin1, or else UTF-8), reading at most `MAX` code units of
/// it and counting the rest.
fn bounded_text<const MAX: usize>(string: &[u8], utf16: bool, latin1: bool) -> Text<MAX> {
    let width = if utf16 { 2 } else { 1 };
    let units = string.len() / width;
    // Every code unit is at least one byte of UTF-8: `MAX` units hold at
    // least `MAX` bytes of text when the string is that long.
    let mut taken = units.min(MAX);
    if taken < units && taken > 0 {
        // Do not copy the start of a character cut by the bound.
        if utf16 {
            let last = u16::from_le_bytes([string[2 * taken - 2], string[2 * taken - 1]]);
            if (0xD800..0xDC00).contains(&last) {
                taken -= 1;
            }
        } else if !latin1 {
            let mut back = 0;
            while back < 3 && taken > 0 && string[taken] & 0xC0 == 0x80 {
                taken -= 1;
                back += 1;
            }
        }
    }
    let head = &string[..taken * width];
    let (mut text, whole) = if utf16 {
        let text: String = decode_utf16(head).collect();
        let whole = if taken < units {
            decode_utf16(string).map(char::len_utf8).sum()
        } else {
            text.len()
        };
        (text, whole)
    } else if latin1 {
        let text: String = head.iter().map(|&b| char::from(b)).collect();
        let whole = units + string.iter().filter(|&&b| b >= 0x80).count();
        (text, whole)
    } else {
        let text = String::from_utf8_lossy(head).into_owned();
        let whole = if taken < units { units } else { text.len() };
        (text, whole)
    };
    if text.len() <= MAX && taken == units {
        let len = text.len() as u64;
        return Text {
            text,
            len,
            cut: false,
        };
    }
    let mut end = text.len().min(MAX);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text.truncate(end);
    text.push_str(&format!("… (cut, {whole} bytes in all)"));
    Text {
        text,
        len: whole as u64,
        cut: true,
    }
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
        Ok(OutcomeRaw::Skip(s)) => Ok(Outcome::Skip(s.into_string())),
        Ok(OutcomeRaw::Retry(r)) => Ok(Outcome::Retry(RetryAfter {
            delay_ms: r.delay_ms,
            reason: r.reason.into_string(),
        })),
        Ok(OutcomeRaw::DeadLetter(s)) => Ok(Outcome::DeadLetter(s.into_string())),
        Err(e) => Err(wit_error(e)),
    })
}

/// The error a guest returned, its reason copied as [`Reason`].
fn wit_error(error: ErrorRaw) -> WitError {
    match error {
        ErrorRaw::AccessDenied(s) => WitError::AccessDenied(s.into_string()),
        ErrorRaw::LimitExceeded(s) => WitError::LimitExceeded(s.into_string()),
        ErrorRaw::NotFound(s) => WitError::NotFound(s.into_string()),
        ErrorRaw::Invalid(s) => WitError::Invalid(s.into_string()),
        ErrorRaw::Unavailable(s) => WitError::Unavailable(s.into_string()),
        ErrorRaw::Internal(s) => WitError::Internal(s.into_string()),
    }
}

/// The most documents of one `get-docs` page a lift copies: the largest
/// `page_size` of any source prepared in this process. Only ever raised.
static PAGE_DOCS_CAP: AtomicU64 = AtomicU64::new(0);

/// The most bytes of strings (ids, timestamps, bodies; as UTF-8) of one
/// page a lift copies: the largest memory limit of any source prepared in
/// this process. A guest cannot hold more distinct text than its memory,
/// but it can point many documents at the same string: counted by length,
/// not by address, so what the engine copies for one page is never more
/// than the largest source memory limit. Only ever raised.
static PAGE_BYTES_CAP: AtomicU64 = AtomicU64::new(0);

/// Let pages of up to `docs` documents and `bytes` bytes of strings be
/// copied out of guests (called with each source's page size and memory
/// limit before it can run).
pub fn allow_pages_up_to(docs: u64, bytes: u64) {
    PAGE_DOCS_CAP.fetch_max(docs, Ordering::Relaxed);
    PAGE_BYTES_CAP.fetch_max(bytes, Ordering::Relaxed);
}

/// The canonical ABI's size of a `document` in a list: `id` (a pointer
/// pair at 0), `timestamp` (an `option<string>`: its case at 8, the pair at
/// 12), `body` (the pair at 20), `op` (one byte at 28), aligned to 4.
const DOCUMENT_SIZE: usize = 32;

/// A page's `list<document>`: copied when it is within the caps above,
/// otherwise only measured.
#[derive(Debug, Clone)]
pub enum Docs {
    /// The documents.
    Copied(Vec<Document>),
    /// A list of this many documents holding at least this many bytes of
    /// strings, over the caps, left in the guest's memory.
    TooLarge {
        /// Documents.
        count: u64,
        /// Bytes of their strings (code units: at least their UTF-8 length).
        bytes: u64,
    },
}

// SAFETY: the same type information as wasmtime's own `Vec<Document>`,
// to which the lift defers for the copy.
#[allow(
    unsafe_code,
    reason = "wasmtime's lift traits are unsafe to implement; this one measures a list first"
)]
unsafe impl ComponentType for Docs {
    type Lower = [ValRaw; 2];
    const ABI: CanonicalAbiInfo = CanonicalAbiInfo::POINTER_PAIR;

    fn typecheck(ty: &InterfaceType, types: &InstanceType<'_>) -> wasmtime::Result<()> {
        <Vec<Document> as ComponentType>::typecheck(ty, types)
    }
}

// SAFETY: reads only within the guest's memory, bounds-checked; the copy
// is wasmtime's own lift.
#[allow(
    unsafe_code,
    reason = "wasmtime's lift traits are unsafe to implement; this one measures a list first"
)]
unsafe impl Lift for Docs {
    fn linear_lift_from_flat(
        cx: &mut LiftContext<'_>,
        ty: InterfaceType,
        src: &Self::Lower,
    ) -> wasmtime::Result<Self> {
        let (ptr, len) = flat_pair(src);
        match docs_too_large(cx, ptr, len)? {
            Some((count, bytes)) => Ok(Docs::TooLarge { count, bytes }),
            None => <Vec<Document> as Lift>::linear_lift_from_flat(cx, ty, src).map(Docs::Copied),
        }
    }

    fn linear_lift_from_memory(
        cx: &mut LiftContext<'_>,
        ty: InterfaceType,
        bytes: &[u8],
    ) -> wasmtime::Result<Self> {
        let (ptr, len) = memory_pair(bytes, 0)?;
        match docs_too_large(cx, ptr, len)? {
            Some((count, bytes)) => Ok(Docs::TooLarge { count, bytes }),
            None => {
                <Vec<Document> as Lift>::linear_lift_from_memory(cx, ty, bytes).map(Docs::Copied)
            }
        }
    }
}

/// The number of the `count` documents at `ptr` and the code units of
/// their strings, when either is over its cap; `None` when the list may
/// be copied.
fn docs_too_large(
    cx: &LiftContext<'_>,
    ptr: usize,
    count: usize,
) -> wasmtime::Result<Option<(u64, u64)>> {
    if count as u64 > PAGE_DOCS_CAP.load(Ordering::Relaxed) {
        return Ok(Some((count as u64, 0)));
    }
    let list = count
        .checked_mul(DOCUMENT_SIZE)
        .and_then(|n| ptr.checked_add(n))
        .and_then(|end| cx.memory().get(ptr..end))
        .ok_or_else(|| wasmtime::format_err!("list pointer/length out of bounds of memory"))?;
    if !ptr.is_multiple_of(4) {
        wasmtime::bail!("list pointer is not aligned");
    }
    let encoding = cx.options().string_encoding;
    // The host holds strings as UTF-8: a UTF-16 unit may take 3 bytes, a
    // latin1 byte 2.
    let units = |at: usize, doc: &[u8]| -> wasmtime::Result<u64> {
        let (utf16, latin1, units) = string_layout(encoding, word(doc, at)?);
        let factor = if utf16 {
            3
        } else if latin1 {
            2
        } else {
            1
        };
        Ok(units as u64 * factor)
    };
    let mut size: u64 = 0;
    for doc in list.chunks_exact(DOCUMENT_SIZE) {
        size = size
            .saturating_add(units(4, doc)?)
            .saturating_add(units(24, doc)?);
        if doc[8] == 1 {
            size = size.saturating_add(units(16, doc)?);
        }
    }
    Ok((size > PAGE_BYTES_CAP.load(Ordering::Relaxed)).then_some((count as u64, size)))
}

/// A `page` whose documents lift as [`Docs`].
#[derive(ComponentType, Lift)]
#[component(record)]
pub struct PageRaw {
    /// The documents.
    pub docs: Docs,
    /// The next page's cursor.
    pub next: Option<String>,
    /// The sync cursor.
    #[component(name = "sync-cursor")]
    pub sync_cursor: Option<String>,
}

/// Call the instance's `get-docs` on `request`, the page's documents
/// copied only within the caps ([`allow_pages_up_to`]).
pub async fn get_docs(
    instance: &Instance,
    store: &mut Store<InvocationState>,
    request: &PageRequest,
) -> wasmtime::Result<Result<PageRaw, WitError>> {
    let func = instance
        .get_typed_func::<(&PageRequest,), (Result<PageRaw, ErrorRaw>,)>(&mut *store, "get-docs")?;
    let (raw,) = func.call_async(&mut *store, (request,)).await?;
    Ok(raw.map_err(wit_error))
}

/// The most bytes of one emitted payload (and, separately, of one emit's
/// headers) a lift copies: the largest `emit_bytes` of any plugin context
/// built in this process. Only ever raised.
static EMIT_CAP: AtomicU64 = AtomicU64::new(0);

/// Let payloads (and headers) of up to `bytes` be copied out of guests:
/// called with each plugin's `emit_bytes` before it can run (by
/// `PluginContext::new`), so no payload a plugin may emit is refused
/// uncopied.
pub fn allow_emits_up_to(bytes: u64) {
    EMIT_CAP.fetch_max(bytes, Ordering::Relaxed);
}

/// See [`EMIT_CAP`].
pub fn emit_cap() -> u64 {
    EMIT_CAP.load(Ordering::Relaxed)
}

/// An emitted `list<u8>`: copied when it is no longer than [`emit_cap`],
/// otherwise only measured.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Payload {
    /// The payload.
    Copied(Vec<u8>),
    /// A payload of this many bytes, larger than any plugin may emit,
    /// left in the guest's memory.
    TooLarge(u64),
}

impl Payload {
    /// The payload's length in bytes, copied or not.
    pub fn whole_len(&self) -> u64 {
        match self {
            Self::Copied(bytes) => bytes.len() as u64,
            Self::TooLarge(len) => *len,
        }
    }
}

// SAFETY: the same type information as wasmtime's own `WasmList<u8>` (a
// pointer pair, type-checked as `list<u8>`).
#[allow(
    unsafe_code,
    reason = "wasmtime's lift traits are unsafe to implement; this one reads a bounded list"
)]
unsafe impl ComponentType for Payload {
    type Lower = [ValRaw; 2];
    const ABI: CanonicalAbiInfo = CanonicalAbiInfo::POINTER_PAIR;

    fn typecheck(ty: &InterfaceType, types: &InstanceType<'_>) -> wasmtime::Result<()> {
        <WasmList<u8> as ComponentType>::typecheck(ty, types)
    }
}

// SAFETY: reads only within the guest's memory, bounds-checked.
#[allow(
    unsafe_code,
    reason = "wasmtime's lift traits are unsafe to implement; this one reads a bounded list"
)]
unsafe impl Lift for Payload {
    fn linear_lift_from_flat(
        cx: &mut LiftContext<'_>,
        _ty: InterfaceType,
        src: &Self::Lower,
    ) -> wasmtime::Result<Self> {
        let (ptr, len) = flat_pair(src);
        read_payload(cx, ptr, len)
    }

    fn linear_lift_from_memory(
        cx: &mut LiftContext<'_>,
        _ty: InterfaceType,
        bytes: &[u8],
    ) -> wasmtime::Result<Self> {
        let (ptr, len) = memory_pair(bytes, 0)?;
        read_payload(cx, ptr, len)
    }
}

/// The `len` bytes at `ptr`, copied when there are no more than
/// [`emit_cap`] of them.
fn read_payload(cx: &mut LiftContext<'_>, ptr: usize, len: usize) -> wasmtime::Result<Payload> {
    let bytes = ptr
        .checked_add(len)
        .and_then(|end| cx.memory().get(ptr..end))
        .ok_or_else(|| wasmtime::format_err!("list pointer/length out of bounds of memory"))?;
    if len as u64 > emit_cap() {
        return Ok(Payload::TooLarge(len as u64));
    }
    cx.consume_fuel(len)?;
    Ok(Payload::Copied(bytes.to_vec()))
}

/// An emit's `list<tuple<string, string>>` of headers: copied when their
/// keys and values come to no more than [`emit_cap`] bytes, otherwise only
/// measured.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Headers {
    /// The headers.
    Copied(Vec<(String, String)>),
    /// Headers whose keys and values come to at least this many bytes
    /// (exactly, for a component using UTF-8 strings), more than any
    /// plugin may emit, left in the guest's memory.
    TooLarge(u64),
}

impl Headers {
    /// The keys' and values' length in bytes (at least, when not copied).
    pub fn whole_len(&self) -> u64 {
        match self {
            Self::Copied(headers) => headers
                .iter()
                .map(|(k, v)| (k.len() + v.len()) as u64)
                .sum(),
            Self::TooLarge(len) => *len,
        }
    }
}

// SAFETY: the same type information as wasmtime's own
// `Vec<(String, String)>`, to which the lift defers for the copy.
#[allow(
    unsafe_code,
    reason = "wasmtime's lift traits are unsafe to implement; this one measures a list first"
)]
unsafe impl ComponentType for Headers {
    type Lower = [ValRaw; 2];
    const ABI: CanonicalAbiInfo = CanonicalAbiInfo::POINTER_PAIR;

    fn typecheck(ty: &InterfaceType, types: &InstanceType<'_>) -> wasmtime::Result<()> {
        <Vec<(String, String)> as ComponentType>::typecheck(ty, types)
    }
}

// SAFETY: reads only within the guest's memory, bounds-checked; the copy
// is wasmtime's own lift.
#[allow(
    unsafe_code,
    reason = "wasmtime's lift traits are unsafe to implement; this one measures a list first"
)]
unsafe impl Lift for Headers {
    fn linear_lift_from_flat(
        cx: &mut LiftContext<'_>,
        ty: InterfaceType,
        src: &Self::Lower,
    ) -> wasmtime::Result<Self> {
        let (ptr, len) = flat_pair(src);
        match headers_too_large(cx, ptr, len)? {
            Some(size) => Ok(Headers::TooLarge(size)),
            None => <Vec<(String, String)> as Lift>::linear_lift_from_flat(cx, ty, src)
                .map(Headers::Copied),
        }
    }

    fn linear_lift_from_memory(
        cx: &mut LiftContext<'_>,
        ty: InterfaceType,
        bytes: &[u8],
    ) -> wasmtime::Result<Self> {
        let (ptr, len) = memory_pair(bytes, 0)?;
        match headers_too_large(cx, ptr, len)? {
            Some(size) => Ok(Headers::TooLarge(size)),
            None => <Vec<(String, String)> as Lift>::linear_lift_from_memory(cx, ty, bytes)
                .map(Headers::Copied),
        }
    }
}

/// The size of the `count` headers at `ptr` (their keys' and values' code
/// units: at least their UTF-8 length) when it is over [`emit_cap`].
fn headers_too_large(
    cx: &LiftContext<'_>,
    ptr: usize,
    count: usize,
) -> wasmtime::Result<Option<u64>> {
    let list = count
        .checked_mul(HEADER_SIZE)
        .and_then(|n| ptr.checked_add(n))
        .and_then(|end| cx.memory().get(ptr..end))
        .ok_or_else(|| wasmtime::format_err!("list pointer/length out of bounds of memory"))?;
    if !ptr.is_multiple_of(4) {
        wasmtime::bail!("list pointer is not aligned");
    }
    let encoding = cx.options().string_encoding;
    let mut size: u64 = 0;
    for header in list.chunks_exact(HEADER_SIZE) {
        for at in [4, 12] {
            let (_, _, units) = string_layout(encoding, word(header, at)?);
            size = size.saturating_add(units as u64);
        }
    }
    Ok((size > emit_cap()).then_some(size))
}

/// Redefine, over the generated bindings in `linker`, the imports whose
/// arguments can be large: `log.write` (the message lifts as a
/// [`Line`](crate::capability::log::Line)) and `emit.publish` (the payload
/// as a [`Payload`], the headers as [`Headers`]), of every version in
/// [`VERSIONS`], each calling the same capability code as the generated
/// `Host` implementations. Fails if one of them was not defined before:
/// under another name the generated function would stay in use.
pub fn link(linker: &mut Linker<InvocationState>) -> wasmtime::Result<()> {
    for version in VERSIONS {
        // Every version's `log.level` has the same cases, and the component
        // model checks types by structure: one host type serves them all.
        redefine(
            linker,
            &format!("sandpipe:connector/log@{version}"),
            "write",
            |mut store: StoreContextMut<'_, InvocationState>,
             (level, line): (current::log::Level, Line)| {
                Box::new(async move { Ok((store.data_mut().write_line(level, line),)) })
            },
        )?;
        redefine(
            linker,
            &format!("sandpipe:connector/emit@{version}"),
            "publish",
            |mut store: StoreContextMut<'_, InvocationState>,
             (output, payload, headers): (String, Payload, Headers)| {
                Box::new(
                    async move { Ok((store.data_mut().publish_lifted(output, payload, headers),)) },
                )
            },
        )?;
    }
    Ok(())
}

/// Define `instance`'s function `name` as `func` in place of the existing
/// definition, which must exist.
fn redefine<P, R, F>(
    linker: &mut Linker<InvocationState>,
    instance: &str,
    name: &str,
    func: F,
) -> wasmtime::Result<()>
where
    F: Fn(
            StoreContextMut<'_, InvocationState>,
            P,
        ) -> Box<dyn Future<Output = wasmtime::Result<R>> + Send + '_>
        + Clone
        + Send
        + Sync
        + 'static,
    P: ComponentNamedList + Lift + 'static,
    R: ComponentNamedList + Lower + 'static,
{
    // Without shadowing, defining an existing function fails: that it
    // does is the check that there is one.
    linker.allow_shadowing(false);
    if linker
        .instance(instance)?
        .func_wrap_async(name, func.clone())
        .is_ok()
    {
        wasmtime::bail!(
            "`{instance}` has no function `{name}` to redefine: the generated bindings name it otherwise (see bounded::VERSIONS)"
        );
    }
    linker.allow_shadowing(true);
    let defined = linker.instance(instance)?.func_wrap_async(name, func);
    linker.allow_shadowing(false);
    defined
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The WIT package version `wit` declares.
    fn package_version(wit: &str) -> Option<&str> {
        wit.lines()
            .find_map(|l| l.trim().strip_prefix("package sandpipe:connector@"))
            .map(|v| v.trim_end_matches(';'))
    }

    #[test]
    fn the_redefined_imports_are_those_of_the_linked_wit_versions() {
        // A new version in wit/ makes the generated bindings register new
        // instance names, under which `link`'s functions would not be
        // found (and the whole copies would be back): this fails first.
        assert_eq!(
            package_version(include_str!("../../../wit/sandpipe.wit")),
            Some(VERSIONS[0])
        );
        assert_eq!(
            package_version(include_str!("../../../wit-history/0.2/sandpipe.wit")),
            Some(VERSIONS[1])
        );
        assert_eq!(
            package_version(include_str!("../../../wit-history/0.1/sandpipe.wit")),
            Some(VERSIONS[2])
        );
    }

    fn engine() -> wasmtime::Engine {
        let mut config = wasmtime::Config::new();
        config.wasm_component_model(true);
        wasmtime::Engine::new(&config).unwrap()
    }

    #[test]
    fn link_redefines_the_generated_imports_and_only_those() {
        let engine = engine();
        let mut linker = Linker::<InvocationState>::new(&engine);
        super::super::Plugin::add_to_linker::<_, wasmtime::component::HasSelf<_>>(
            &mut linker,
            |state: &mut InvocationState| state,
        )
        .unwrap();
        super::super::bindings::v0_2::Plugin::add_to_linker::<_, wasmtime::component::HasSelf<_>>(
            &mut linker,
            |state: &mut InvocationState| state,
        )
        .unwrap();
        super::super::bindings::v0_1::Plugin::add_to_linker::<_, wasmtime::component::HasSelf<_>>(
            &mut linker,
            |state: &mut InvocationState| state,
        )
        .unwrap();
        link(&mut linker).unwrap();
        // Nothing to redefine: the generated names are not these.
        let mut bare = Linker::<InvocationState>::new(&engine);
        let error = link(&mut bare).unwrap_err().to_string();
        assert!(
            error.contains("`sandpipe:connector/log@1.2.0` has no function `write`"),
            "{error}"
        );
    }

    #[test]
    fn a_host_string_is_held_to_the_same_bound() {
        let short = Text::<8>::new("12345678".into());
        assert_eq!(
            (short.as_str(), short.whole_len(), short.is_cut()),
            ("12345678", 8, false)
        );
        let long = Text::<8>::new("1234567é9".into());
        assert_eq!(long.whole_len(), 10);
        assert!(long.is_cut());
        assert_eq!(long.into_string(), "1234567… (cut, 10 bytes in all)");
    }

    fn utf16(text: &str) -> Vec<u8> {
        text.encode_utf16().flat_map(u16::to_le_bytes).collect()
    }

    #[test]
    fn utf8_is_cut_on_a_character_boundary_and_counted_whole() {
        let short = bounded_text::<8>(b"12345678", false, false);
        assert_eq!(
            (short.as_str(), short.whole_len(), short.is_cut()),
            ("12345678", 8, false)
        );
        // The cut falls inside `é`: it is not copied.
        let cut = bounded_text::<8>("1234567é9".as_bytes(), false, false);
        assert_eq!((cut.whole_len(), cut.is_cut()), (10, true));
        assert_eq!(cut.as_str(), "1234567… (cut, 10 bytes in all)");
        assert_eq!(cut, Text::<8>::new("1234567é9".into()));
        let huge = bounded_text::<4>(&[b'x'; 1000], false, false);
        assert_eq!(huge.into_string(), "xxxx… (cut, 1000 bytes in all)");
    }

    #[test]
    fn utf16_and_latin1_are_measured_in_utf8() {
        // Within the bound: as the host would have it, whatever the
        // encoding.
        let text = "aé€😀";
        let whole = bounded_text::<64>(&utf16(text), true, false);
        assert_eq!((whole.as_str(), whole.whole_len()), (text, 10));
        // 6 code units hold 12 bytes of UTF-8 here: cut to 6, after `€`
        // (a surrogate pair is never split).
        let cut = bounded_text::<6>(&utf16("aé€😀b"), true, false);
        assert_eq!(cut.as_str(), "aé€… (cut, 11 bytes in all)");
        let cut = bounded_text::<4>(&utf16("abc😀"), true, false);
        assert_eq!(cut.as_str(), "abc… (cut, 7 bytes in all)");
        let latin1 = bounded_text::<64>(&[b'a', 0xE9], false, true);
        assert_eq!((latin1.as_str(), latin1.whole_len()), ("aé", 3));
        let cut = bounded_text::<2>(&[b'a', 0xE9, b'b'], false, true);
        assert_eq!(cut.as_str(), "a… (cut, 4 bytes in all)");
        assert_eq!(cut.whole_len(), 4);
    }

    #[test]
    fn the_emit_cap_only_grows() {
        allow_emits_up_to(10);
        let cap = emit_cap();
        allow_emits_up_to(5);
        assert_eq!(emit_cap(), cap);
        assert!(cap >= 10);
    }
}

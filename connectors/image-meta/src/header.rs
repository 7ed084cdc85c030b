//! Streaming header parsers: read just enough of an image to know its
//! dimensions, from any [`Read`], skipping what is not needed without
//! keeping it.

use std::fmt;
use std::io::{self, Read};

/// An image format this connector understands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// PNG (`image/png`).
    Png,
    /// JPEG (`image/jpeg`).
    Jpeg,
    /// GIF (`image/gif`).
    Gif,
}

impl Format {
    /// The format for a MIME type (parameters such as `; q=1` and case are
    /// ignored), or `None` if it is not one this connector handles.
    pub fn from_mime(mime: &str) -> Option<Self> {
        let essence = mime.split(';').next().unwrap_or("").trim();
        if essence.eq_ignore_ascii_case("image/png") {
            Some(Self::Png)
        } else if essence.eq_ignore_ascii_case("image/jpeg") {
            Some(Self::Jpeg)
        } else if essence.eq_ignore_ascii_case("image/gif") {
            Some(Self::Gif)
        } else {
            None
        }
    }

    /// The name stored in the `format` column: `png`, `jpeg` or `gif`.
    pub fn name(self) -> &'static str {
        match self {
            Self::Png => "png",
            Self::Jpeg => "jpeg",
            Self::Gif => "gif",
        }
    }

    /// The name used in messages: `PNG`, `JPEG` or `GIF`.
    pub fn label(self) -> &'static str {
        match self {
            Self::Png => "PNG",
            Self::Jpeg => "JPEG",
            Self::Gif => "GIF",
        }
    }
}

/// An image's size in pixels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Dimensions {
    /// Width in pixels (at least 1).
    pub width: u32,
    /// Height in pixels (at least 1).
    pub height: u32,
}

/// Why the dimensions could not be read.
#[derive(Debug)]
pub enum ProbeError {
    /// The data is not a valid image of the expected format; the text says
    /// why. Retrying cannot help.
    Invalid(String),
    /// Reading failed (for a host reader: a host error, which may be
    /// transient).
    Io(io::Error),
}

impl fmt::Display for ProbeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Invalid(why) => f.write_str(why),
            Self::Io(err) => write!(f, "read error: {err}"),
        }
    }
}

fn invalid<T>(why: impl Into<String>) -> Result<T, ProbeError> {
    Err(ProbeError::Invalid(why.into()))
}

/// Read exactly `buf.len()` bytes; the end of the data is an invalid
/// (truncated) image, `what` saying where it ended.
fn read_exact(r: &mut impl Read, buf: &mut [u8], what: &str) -> Result<(), ProbeError> {
    r.read_exact(buf).map_err(|e| {
        if e.kind() == io::ErrorKind::UnexpectedEof {
            ProbeError::Invalid(format!("truncated: data ends in {what}"))
        } else {
            ProbeError::Io(e)
        }
    })
}

/// Read the file signature: `N` bytes that must equal one of `accepted`.
/// Data that differs from every signature is reported as `missing` (even if
/// it is shorter than a signature), and only a true prefix of one that ends
/// early as truncated.
fn read_signature<const N: usize>(
    r: &mut impl Read,
    accepted: &[[u8; N]],
    missing: &str,
) -> Result<[u8; N], ProbeError> {
    let mut buf = [0u8; N];
    let mut filled = 0;
    while filled < N {
        match r.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(ProbeError::Io(e)),
        }
    }
    if !accepted.iter().any(|sig| sig[..filled] == buf[..filled]) {
        return invalid(missing);
    }
    if filled < N {
        return invalid("truncated: data ends in the signature");
    }
    Ok(buf)
}

fn read_array<const N: usize>(r: &mut impl Read, what: &str) -> Result<[u8; N], ProbeError> {
    let mut buf = [0u8; N];
    read_exact(r, &mut buf, what)?;
    Ok(buf)
}

/// Read and discard exactly `n` bytes.
fn skip(r: &mut impl Read, n: u64, what: &str) -> Result<(), ProbeError> {
    let skipped = io::copy(&mut r.take(n), &mut io::sink()).map_err(ProbeError::Io)?;
    if skipped < n {
        return invalid(format!("truncated: data ends in {what}"));
    }
    Ok(())
}

fn checked(width: u32, height: u32) -> Result<Dimensions, ProbeError> {
    if width == 0 || height == 0 {
        return invalid(format!("image has no pixels ({width}x{height})"));
    }
    Ok(Dimensions { width, height })
}

/// Read the dimensions of an image of `format` from the start of `r`,
/// consuming as little as possible (for JPEG, skipping the segments before
/// the frame header without keeping them).
pub fn probe(format: Format, r: &mut impl Read) -> Result<Dimensions, ProbeError> {
    match format {
        Format::Png => probe_png(r),
        Format::Jpeg => probe_jpeg(r),
        Format::Gif => probe_gif(r),
    }
}

const PNG_SIGNATURE: [u8; 8] = [0x89, b'P', b'N', b'G', 0x0D, 0x0A, 0x1A, 0x0A];

/// PNG: the 8-byte signature, then the IHDR chunk, which must come first:
/// length 13, type `IHDR`, width and height (big-endian, 1..=2^31-1), bit
/// depth, colour type, compression, filter, interlace, and a CRC-32 over
/// type and data.
fn probe_png(r: &mut impl Read) -> Result<Dimensions, ProbeError> {
    read_signature(r, &[PNG_SIGNATURE], "missing PNG signature")?;
    let head: [u8; 8] = read_array(r, "the IHDR chunk header")?;
    let len = u32::from_be_bytes([head[0], head[1], head[2], head[3]]);
    if &head[4..8] != b"IHDR" {
        return invalid("first chunk is not IHDR");
    }
    if len != 13 {
        return invalid(format!("IHDR length is {len}, not 13"));
    }
    let mut body = [0u8; 17]; // "IHDR" + 13 data bytes, for the CRC.
    body[..4].copy_from_slice(b"IHDR");
    read_exact(r, &mut body[4..], "the IHDR chunk")?;
    let crc: [u8; 4] = read_array(r, "the IHDR CRC")?;
    if crc32(&body) != u32::from_be_bytes(crc) {
        return invalid("IHDR CRC mismatch");
    }
    let data = &body[4..];
    let width = u32::from_be_bytes([data[0], data[1], data[2], data[3]]);
    let height = u32::from_be_bytes([data[4], data[5], data[6], data[7]]);
    if width > i32::MAX as u32 || height > i32::MAX as u32 {
        return invalid(format!("dimensions {width}x{height} exceed 2^31-1"));
    }
    let (depth, colour) = (data[8], data[9]);
    let depth_ok = match colour {
        0 => matches!(depth, 1 | 2 | 4 | 8 | 16),
        3 => matches!(depth, 1 | 2 | 4 | 8),
        2 | 4 | 6 => matches!(depth, 8 | 16),
        _ => return invalid(format!("unknown colour type {colour}")),
    };
    if !depth_ok {
        return invalid(format!(
            "bit depth {depth} is not allowed for colour type {colour}"
        ));
    }
    checked(width, height)
}

/// GIF: `GIF87a` or `GIF89a`, then the logical screen descriptor's width and
/// height (little-endian 16-bit).
fn probe_gif(r: &mut impl Read) -> Result<Dimensions, ProbeError> {
    read_signature(
        r,
        &[*b"GIF87a", *b"GIF89a"],
        "missing GIF87a/GIF89a signature",
    )?;
    let screen: [u8; 4] = read_array(r, "the logical screen descriptor")?;
    let width = u16::from_le_bytes([screen[0], screen[1]]);
    let height = u16::from_le_bytes([screen[2], screen[3]]);
    checked(u32::from(width), u32::from(height))
}

/// JPEG: SOI, then marker segments up to the first frame header (SOF0 to
/// SOF15, except DHT `C4`, JPG `C8` and DAC `CC`, which share the range).
/// Segments before it (APPn, DQT, COM, ...) are skipped by their length;
/// fill bytes (`FF`) before a marker and standalone markers (RSTn, TEM) are
/// allowed. A scan (SOS) or EOI before any frame header is invalid.
fn probe_jpeg(r: &mut impl Read) -> Result<Dimensions, ProbeError> {
    read_signature(r, &[[0xFF, 0xD8]], "missing SOI marker")?;
    loop {
        let [first]: [u8; 1] = read_array(r, "a marker")?;
        if first != 0xFF {
            return invalid(format!("expected a marker, found byte 0x{first:02X}"));
        }
        let mut marker = 0xFF;
        while marker == 0xFF {
            [marker] = read_array(r, "a marker")?;
        }
        match marker {
            // Standalone markers: no length.
            0x01 | 0xD0..=0xD7 => continue,
            0x00 => return invalid("stuffed byte 0xFF00 outside a scan"),
            0xD8 => return invalid("second SOI marker before the frame header"),
            0xD9 => return invalid("EOI before any frame header"),
            0xDA => return invalid("scan (SOS) before any frame header"),
            _ => {}
        }
        let len_bytes: [u8; 2] = read_array(r, "a segment length")?;
        let len = u16::from_be_bytes(len_bytes);
        if len < 2 {
            return invalid(format!("segment 0x{marker:02X} has length {len}"));
        }
        let body_len = u64::from(len - 2);
        let is_sof = matches!(marker, 0xC0..=0xCF) && !matches!(marker, 0xC4 | 0xC8 | 0xCC);
        if !is_sof {
            skip(r, body_len, "a segment")?;
            continue;
        }
        if body_len < 6 {
            return invalid(format!("frame header (SOF{}) too short", marker - 0xC0));
        }
        let frame: [u8; 6] = read_array(r, "the frame header")?;
        let height = u16::from_be_bytes([frame[1], frame[2]]);
        let width = u16::from_be_bytes([frame[3], frame[4]]);
        if height == 0 {
            return invalid("frame height 0 (defined by a DNL marker) is not supported");
        }
        return checked(u32::from(width), u32::from(height));
    }
}

/// CRC-32 (ISO 3309, as used by PNG), bitwise: only ever run over 17 bytes.
fn crc32(data: &[u8]) -> u32 {
    let mut crc = 0xFFFF_FFFFu32;
    for &byte in data {
        crc ^= u32::from(byte);
        for _ in 0..8 {
            let mask = (crc & 1).wrapping_neg();
            crc = (crc >> 1) ^ (0xEDB8_8320 & mask);
        }
    }
    !crc
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A minimal valid PNG header (signature + IHDR) for `w`x`h`, 8-bit RGB.
    fn png_header(w: u32, h: u32) -> Vec<u8> {
        let mut ihdr = b"IHDR".to_vec();
        ihdr.extend_from_slice(&w.to_be_bytes());
        ihdr.extend_from_slice(&h.to_be_bytes());
        ihdr.extend_from_slice(&[8, 2, 0, 0, 0]);
        let mut out = PNG_SIGNATURE.to_vec();
        out.extend_from_slice(&13u32.to_be_bytes());
        out.extend_from_slice(&ihdr);
        out.extend_from_slice(&crc32(&ihdr).to_be_bytes());
        out
    }

    fn jpeg(w: u16, h: u16, sof: u8) -> Vec<u8> {
        let mut out = vec![0xFF, 0xD8];
        // APP0 JFIF
        out.extend_from_slice(&[0xFF, 0xE0, 0x00, 0x10]);
        out.extend_from_slice(b"JFIF\0\x01\x01\x00\x00\x01\x00\x01\x00\x00");
        // A large APP1 to skip (contains FF D9 / FF C0 bytes that must be
        // skipped, not parsed).
        let app1 = [0xFFu8, 0xC0, 0xFF, 0xD9].repeat(5000);
        out.extend_from_slice(&[0xFF, 0xE1]);
        out.extend_from_slice(&u16::try_from(app1.len() + 2).unwrap_or(0).to_be_bytes());
        out.extend_from_slice(&app1);
        // DHT (C4) must not be taken for a frame header.
        out.extend_from_slice(&[0xFF, 0xC4, 0x00, 0x08, 0, 1, 2, 3, 4, 5]);
        // Fill bytes, then the frame header.
        out.extend_from_slice(&[0xFF, 0xFF, 0xFF, sof, 0x00, 0x11, 0x08]);
        out.extend_from_slice(&h.to_be_bytes());
        out.extend_from_slice(&w.to_be_bytes());
        out.extend_from_slice(&[3, 1, 0x22, 0, 2, 0x11, 1, 3, 0x11, 1]);
        // SOS and some scan data.
        out.extend_from_slice(&[0xFF, 0xDA, 0x00, 0x02, 0x12, 0x34, 0xFF, 0xD9]);
        out
    }

    fn gif_bytes(w: u16, h: u16) -> Vec<u8> {
        let mut out = b"GIF89a".to_vec();
        out.extend_from_slice(&w.to_le_bytes());
        out.extend_from_slice(&h.to_le_bytes());
        out.extend_from_slice(&[0, 0, 0, 0x3B]);
        out
    }

    /// A reader that hands out at most one byte per call and counts what it
    /// handed out.
    struct Trickle<'a> {
        data: &'a [u8],
        read: usize,
    }

    impl Read for Trickle<'_> {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            if buf.is_empty() || self.read >= self.data.len() {
                return Ok(0);
            }
            buf[0] = self.data[self.read];
            self.read += 1;
            Ok(1)
        }
    }

    fn probe_bytes(format: Format, data: &[u8]) -> Result<Dimensions, String> {
        probe(format, &mut &data[..]).map_err(|e| e.to_string())
    }

    fn dims(width: u32, height: u32) -> Result<Dimensions, String> {
        Ok(Dimensions { width, height })
    }

    #[test]
    fn mime_types() {
        assert_eq!(Format::from_mime("image/png"), Some(Format::Png));
        assert_eq!(Format::from_mime("IMAGE/JPEG; q=1"), Some(Format::Jpeg));
        assert_eq!(Format::from_mime("image/gif"), Some(Format::Gif));
        assert_eq!(Format::from_mime("image/webp"), None);
        assert_eq!(Format::from_mime(""), None);
    }

    #[test]
    fn png() {
        assert_eq!(
            probe_bytes(Format::Png, &png_header(640, 480)),
            dims(640, 480)
        );
    }

    #[test]
    fn png_reads_only_the_header() {
        let mut data = png_header(3, 2);
        data.extend_from_slice(&[0u8; 1000]);
        let mut r = Trickle {
            data: &data,
            read: 0,
        };
        assert!(
            matches!(probe(Format::Png, &mut r), Ok(d) if d == Dimensions { width: 3, height: 2 })
        );
        assert_eq!(r.read, 33);
    }

    #[test]
    fn png_errors() {
        let good = png_header(10, 10);
        let mut bad_crc = good.clone();
        bad_crc[20] ^= 1;
        assert_eq!(
            probe_bytes(Format::Png, &bad_crc),
            Err("IHDR CRC mismatch".into())
        );
        assert_eq!(
            probe_bytes(Format::Png, b"GIF89a......"),
            Err("missing PNG signature".into())
        );
        assert_eq!(
            probe_bytes(Format::Png, &good[..20]),
            Err("truncated: data ends in the IHDR chunk".into())
        );
        assert_eq!(
            probe_bytes(Format::Png, &png_header(0, 5)),
            Err("image has no pixels (0x5)".into())
        );
        assert_eq!(
            probe_bytes(Format::Png, b""),
            Err("truncated: data ends in the signature".into())
        );
        assert_eq!(
            probe_bytes(Format::Png, &PNG_SIGNATURE[..5]),
            Err("truncated: data ends in the signature".into())
        );
        // Shorter than a signature, and not a prefix of one.
        assert_eq!(
            probe_bytes(Format::Png, b"text\n"),
            Err("missing PNG signature".into())
        );
    }

    #[test]
    fn gif() {
        assert_eq!(probe_bytes(Format::Gif, &gif_bytes(300, 2)), dims(300, 2));
        let mut old = gif_bytes(1, 1);
        old[4] = b'7';
        assert_eq!(probe_bytes(Format::Gif, &old), dims(1, 1));
        assert_eq!(
            probe_bytes(Format::Gif, b"GIF90a\x01\x00\x01\x00"),
            Err("missing GIF87a/GIF89a signature".into())
        );
        assert_eq!(
            probe_bytes(Format::Gif, b"GIF89a\x01\x00"),
            Err("truncated: data ends in the logical screen descriptor".into())
        );
        assert_eq!(
            probe_bytes(Format::Gif, b"GIF8"),
            Err("truncated: data ends in the signature".into())
        );
    }

    #[test]
    fn jpeg_skips_segments_and_ignores_dht() {
        for sof in [0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC7, 0xC9, 0xCB, 0xCD, 0xCF] {
            assert_eq!(
                probe_bytes(Format::Jpeg, &jpeg(1024, 768, sof)),
                dims(1024, 768)
            );
        }
    }

    #[test]
    fn jpeg_across_any_read_size() {
        let data = jpeg(7, 9, 0xC2);
        let mut r = Trickle {
            data: &data,
            read: 0,
        };
        assert!(
            matches!(probe(Format::Jpeg, &mut r), Ok(d) if d == Dimensions { width: 7, height: 9 })
        );
        // Stopped right after the frame header's dimensions, before the scan.
        assert!(r.read < data.len() - 10);
    }

    #[test]
    fn jpeg_errors() {
        assert_eq!(
            probe_bytes(Format::Jpeg, b"\x89PNG"),
            Err("missing SOI marker".into())
        );
        assert_eq!(
            probe_bytes(Format::Jpeg, &[0xFF, 0xD8, 0xFF, 0xDA, 0, 2]),
            Err("scan (SOS) before any frame header".into())
        );
        assert_eq!(
            probe_bytes(Format::Jpeg, &[0xFF, 0xD8, 0xFF, 0xD9]),
            Err("EOI before any frame header".into())
        );
        assert_eq!(
            probe_bytes(Format::Jpeg, &[0xFF, 0xD8, 0x12]),
            Err("expected a marker, found byte 0x12".into())
        );
        assert_eq!(
            probe_bytes(Format::Jpeg, &[0xFF, 0xD8, 0xFF, 0xE0, 0x00, 0x10, 1, 2]),
            Err("truncated: data ends in a segment".into())
        );
        let full = jpeg(5, 5, 0xC0);
        assert_eq!(
            probe_bytes(Format::Jpeg, &full[..full.len() - 21]),
            Err("truncated: data ends in the frame header".into())
        );
        assert_eq!(
            probe_bytes(Format::Jpeg, &jpeg(5, 0, 0xC0)),
            Err("frame height 0 (defined by a DNL marker) is not supported".into())
        );
    }

    #[test]
    fn io_errors_are_not_invalid() {
        struct Failing;
        impl Read for Failing {
            fn read(&mut self, _: &mut [u8]) -> io::Result<usize> {
                Err(io::Error::new(io::ErrorKind::PermissionDenied, "denied"))
            }
        }
        assert!(matches!(
            probe(Format::Gif, &mut Failing),
            Err(ProbeError::Io(_))
        ));
        assert!(matches!(
            probe(Format::Jpeg, &mut Failing),
            Err(ProbeError::Io(_))
        ));
    }

    /// Real encoder output: the quickstart's sample images (made with
    /// Pillow).
    #[test]
    fn quickstart_samples() {
        const PNG: &[u8] =
            include_bytes!("../../../examples/quickstart/data/images/red-square.png");
        const JPEG: &[u8] = include_bytes!("../../../examples/quickstart/data/images/gradient.jpg");
        const GIF: &[u8] = include_bytes!("../../../examples/quickstart/data/images/checker.gif");
        assert_eq!(probe_bytes(Format::Png, PNG), dims(16, 16));
        assert_eq!(probe_bytes(Format::Jpeg, JPEG), dims(32, 24));
        assert_eq!(probe_bytes(Format::Gif, GIF), dims(20, 10));
        // Text posing as a PNG.
        assert_eq!(
            probe_bytes(Format::Png, b"Plain text pretending to be a PNG.\n"),
            Err("missing PNG signature".into())
        );
    }

    #[test]
    fn crc_reference_value() {
        assert_eq!(crc32(b"123456789"), 0xCBF4_3926);
    }
}

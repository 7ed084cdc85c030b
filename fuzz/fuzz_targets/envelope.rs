//! The message envelope parser on arbitrary bytes.
//!
//! Invariants: parsing never panics; a refusal always carries a reason; an
//! accepted envelope has the required fields non-empty and round-trips its
//! inline metadata. The first byte picks the field mapping, so both the
//! sqAPI defaults and a custom mapping with every field required are fuzzed,
//! each with and without `mime_path` (then a missing type is looked up in
//! the metadata, which never panics either).
#![no_main]

use libfuzzer_sys::fuzz_target;
use sandpipe_config::envelope::{mime_from_metadata, parse};
use sandpipe_config::{FieldSpec, MessageFields};

fn fields(selector: u8) -> MessageFields {
    let mut fields = MessageFields::default();
    if selector & 1 == 1 {
        let spec = |key: &str| FieldSpec {
            key: key.to_owned(),
            required: true,
        };
        fields.uuid = spec("id");
        fields.kind = spec("mime");
        fields.data_location = spec("data");
        fields.meta_location = spec("meta");
        fields.metadata = spec("m");
    }
    if selector & 2 == 2 {
        fields.mime_path = Some("mime.type".into());
    }
    fields
}

fuzz_target!(|input: &[u8]| {
    let Some((&selector, body)) = input.split_first() else {
        return;
    };
    let fields = fields(selector);
    match parse(body, &fields) {
        Err(e) => assert!(!e.reason.is_empty(), "a refusal without a reason"),
        Ok(envelope) => {
            if fields.uuid.required {
                assert!(!envelope.id.is_empty(), "accepted without an id");
            }
            match &fields.mime_path {
                None => assert!(!envelope.kind.is_empty(), "accepted without a type"),
                Some(path) => {
                    if let Err(why) = mime_from_metadata(&envelope.metadata, path) {
                        assert!(!why.is_empty(), "a metadata type refused without a reason");
                    }
                }
            }
            if fields.data_location.required {
                assert!(envelope.data_location.is_some(), "accepted without data");
            }
            assert_ne!(envelope.data_location.as_deref(), Some(""));
            assert_ne!(envelope.meta_location.as_deref(), Some(""));
        }
    }
});

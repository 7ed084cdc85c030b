//! The envelope: a message's JSON, read with the configured
//! `message_fields` mapping (sqAPI style).

use serde_json::{Map, Value};

use crate::{FieldSpec, MessageFields};

/// A parsed envelope.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Envelope {
    /// The message id.
    pub id: String,
    /// The data's MIME type; empty when the message has none (the type
    /// field is optional, or `message_fields.mime_path` is set: then see
    /// [`mime_from_metadata`]).
    pub kind: String,
    /// The data object's location.
    pub data_location: Option<String>,
    /// The metadata's location.
    pub meta_location: Option<String>,
    /// Inline metadata.
    pub metadata: Map<String, Value>,
}

/// Why an envelope was refused; never retried.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{reason}")]
pub struct EnvelopeError {
    /// The message id, if it could be read.
    pub id: Option<String>,
    /// What is wrong.
    pub reason: String,
}

fn text_field(
    object: &Map<String, Value>,
    spec: &FieldSpec,
    role: &str,
) -> Result<Option<String>, String> {
    match object.get(&spec.key) {
        None | Some(Value::Null) if spec.required => Err(format!(
            "required field `{}` (message_fields.{role}) is missing",
            spec.key
        )),
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) if s.is_empty() && spec.required => Err(format!(
            "required field `{}` (message_fields.{role}) is empty",
            spec.key
        )),
        Some(Value::String(s)) if s.is_empty() => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(Value::Number(n)) if role == "uuid" => Ok(Some(n.to_string())),
        Some(other) => Err(format!(
            "field `{}` (message_fields.{role}) must be a string, not {}",
            spec.key,
            kind_of(other)
        )),
    }
}

fn kind_of(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// Parse `body` with `fields`.
pub fn parse(body: &[u8], fields: &MessageFields) -> Result<Envelope, EnvelopeError> {
    let value: Value = serde_json::from_slice(body).map_err(|e| EnvelopeError {
        id: None,
        reason: format!("message is not valid JSON: {e}"),
    })?;
    let Value::Object(object) = value else {
        return Err(EnvelopeError {
            id: None,
            reason: format!("message must be a JSON object, not {}", kind_of(&value)),
        });
    };
    let id = text_field(&object, &fields.uuid, "uuid")
        .map_err(|reason| EnvelopeError { id: None, reason })?;
    let fail = |reason: String| EnvelopeError {
        id: id.clone(),
        reason,
    };
    // With `mime_path`, a missing type may still be found in the metadata.
    let kind = if fields.mime_path.is_some() {
        let optional = FieldSpec {
            required: false,
            ..fields.kind.clone()
        };
        text_field(&object, &optional, "type").map_err(fail)?
    } else {
        text_field(&object, &fields.kind, "type").map_err(fail)?
    };
    let data_location =
        text_field(&object, &fields.data_location, "data_location").map_err(fail)?;
    let meta_location =
        text_field(&object, &fields.meta_location, "meta_location").map_err(fail)?;
    let metadata = match object.get(&fields.metadata.key) {
        None | Some(Value::Null) if fields.metadata.required => {
            return Err(fail(format!(
                "required field `{}` (message_fields.metadata) is missing",
                fields.metadata.key
            )));
        }
        None | Some(Value::Null) => Map::new(),
        Some(Value::Object(m)) => m.clone(),
        Some(other) => {
            return Err(fail(format!(
                "field `{}` (message_fields.metadata) must be an object, not {}",
                fields.metadata.key,
                kind_of(other)
            )));
        }
    };
    Ok(Envelope {
        // A missing optional id still needs a name in the status log.
        id: id.unwrap_or_default(),
        kind: kind.unwrap_or_default(),
        data_location,
        meta_location,
        metadata,
    })
}

/// The MIME type at `path` (`message_fields.mime_path`) in `metadata`: a
/// key spelled exactly so, else the dotted path through nested objects
/// (`mime.type` → `{"mime": {"type": "image/png"}}`). `None` when there is
/// nothing there (or an empty string); an error when it is not a string.
pub fn mime_from_metadata(
    metadata: &Map<String, Value>,
    path: &str,
) -> Result<Option<String>, String> {
    let found = metadata.get(path).or_else(|| {
        let mut parts = path.split('.');
        let first = metadata.get(parts.next()?)?;
        parts.try_fold(first, |value, key| value.as_object()?.get(key))
    });
    match found {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) if s.is_empty() => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(other) => Err(format!(
            "the metadata's `{path}` (message_fields.mime_path) must be a string, not {}",
            kind_of(other)
        )),
    }
}

/// Why a message has no MIME type, naming both places it was looked for.
pub fn no_mime_reason(fields: &MessageFields) -> String {
    match &fields.mime_path {
        Some(path) => format!(
            "no MIME type: the message has no `{}` field (message_fields.type) and its metadata has no `{path}` (message_fields.mime_path)",
            fields.kind.key
        ),
        None => format!(
            "no MIME type: the message has no `{}` field (message_fields.type)",
            fields.kind.key
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fields() -> MessageFields {
        MessageFields::default()
    }

    #[test]
    fn sqapi_message_parses() -> anyhow::Result<()> {
        let e = parse(
            br#"{"uuid_ref":"u1","data_type":"image/png","data_location":"a/b.png","meta_location":"m.json","metadata":{"k":1}}"#,
            &fields(),
        )?;
        assert_eq!(e.id, "u1");
        assert_eq!(e.kind, "image/png");
        assert_eq!(e.data_location.as_deref(), Some("a/b.png"));
        assert_eq!(e.meta_location.as_deref(), Some("m.json"));
        assert_eq!(e.metadata.get("k"), Some(&Value::from(1)));
        Ok(())
    }

    #[test]
    fn bad_json_and_missing_fields_give_reasons() {
        let err = parse(b"{not json", &fields())
            .err()
            .map(|e| e.reason)
            .unwrap_or_default();
        assert!(err.starts_with("message is not valid JSON"), "{err}");
        let err = parse(b"[1]", &fields())
            .err()
            .map(|e| e.reason)
            .unwrap_or_default();
        assert!(err.contains("JSON object"), "{err}");
        let err = parse(br#"{"uuid_ref":"u"}"#, &fields()).err();
        assert_eq!(
            err,
            Some(EnvelopeError {
                id: Some("u".into()),
                reason: "required field `data_type` (message_fields.type) is missing".into()
            })
        );
        let err = parse(br#"{"uuid_ref":"u","data_type":5}"#, &fields())
            .err()
            .map(|e| e.reason)
            .unwrap_or_default();
        assert!(err.contains("must be a string"), "{err}");
    }

    #[test]
    fn with_a_mime_path_the_type_field_may_be_missing() -> anyhow::Result<()> {
        let mut f = fields();
        f.mime_path = Some("mime.type".into());
        let e = parse(br#"{"uuid_ref":"u","data_location":"/data/a.png"}"#, &f)?;
        assert_eq!(e.kind, "");
        let e = parse(br#"{"uuid_ref":"u","data_type":""}"#, &f)?;
        assert_eq!(e.kind, "", "an empty type is no type");
        let e = parse(br#"{"uuid_ref":"u","data_type":"text/plain"}"#, &f)?;
        assert_eq!(e.kind, "text/plain", "the envelope's type comes first");
        // A type of the wrong kind is still refused.
        assert!(parse(br#"{"uuid_ref":"u","data_type":5}"#, &f).is_err());
        // Without a mime_path the default still requires the field.
        assert!(parse(br#"{"uuid_ref":"u"}"#, &fields()).is_err());
        Ok(())
    }

    #[test]
    fn the_mime_type_is_found_in_the_metadata_by_its_path() {
        let meta = |v: Value| v.as_object().cloned().unwrap_or_default();
        let nested = meta(serde_json::json!({"mime": {"type": "image/png", "path": "x"}}));
        assert_eq!(
            mime_from_metadata(&nested, "mime.type"),
            Ok(Some("image/png".into()))
        );
        let flat = meta(serde_json::json!({"mime.type": "text/plain", "mime": {"type": "no"}}));
        assert_eq!(
            mime_from_metadata(&flat, "mime.type"),
            Ok(Some("text/plain".into())),
            "a key spelled with the dots comes first"
        );
        let top = meta(serde_json::json!({"content_type": "text/csv"}));
        assert_eq!(
            mime_from_metadata(&top, "content_type"),
            Ok(Some("text/csv".into()))
        );
        for absent in [
            serde_json::json!({}),
            serde_json::json!({"mime": "image/png"}),
            serde_json::json!({"mime": {"kind": "image/png"}}),
            serde_json::json!({"mime": {"type": null}}),
            serde_json::json!({"mime": {"type": ""}}),
        ] {
            assert_eq!(
                mime_from_metadata(&meta(absent.clone()), "mime.type"),
                Ok(None),
                "{absent}"
            );
        }
        let err = mime_from_metadata(&meta(serde_json::json!({"mime": {"type": 7}})), "mime.type")
            .err()
            .unwrap_or_default();
        assert!(
            err.contains("`mime.type` (message_fields.mime_path) must be a string, not a number"),
            "{err}"
        );
        let mut f = fields();
        assert_eq!(
            no_mime_reason(&f),
            "no MIME type: the message has no `data_type` field (message_fields.type)"
        );
        f.mime_path = Some("mime.type".into());
        assert_eq!(
            no_mime_reason(&f),
            "no MIME type: the message has no `data_type` field (message_fields.type) and its metadata has no `mime.type` (message_fields.mime_path)"
        );
    }

    #[test]
    fn custom_field_names_are_honoured() -> anyhow::Result<()> {
        let mut f = fields();
        f.uuid.key = "id".into();
        f.kind.key = "mime".into();
        let e = parse(br#"{"id":7,"mime":"text/plain"}"#, &f)?;
        assert_eq!((e.id.as_str(), e.kind.as_str()), ("7", "text/plain"));
        Ok(())
    }
}

#[cfg(test)]
mod properties {
    use proptest::prelude::*;

    use super::*;

    proptest! {
        /// Whatever the bytes, parsing returns (never panics), and a
        /// refusal always says why.
        #[test]
        fn any_bytes_parse_or_are_refused_with_a_reason(body in proptest::collection::vec(any::<u8>(), 0..512)) {
            if let Err(e) = parse(&body, &MessageFields::default()) {
                prop_assert!(!e.reason.is_empty());
            }
        }

        /// A JSON object with string fields parses exactly when the required
        /// ones are present and non-empty, and keeps their values.
        #[test]
        fn objects_parse_exactly_when_required_fields_are_there(
            id in proptest::option::of("[a-z0-9-]{0,12}"),
            kind in proptest::option::of("[a-z]{1,8}/[a-z]{0,8}"),
            data in proptest::option::of("[a-z/]{0,16}"),
            extra in proptest::collection::btree_map("[a-z_]{1,10}", any::<i64>(), 0..4),
        ) {
            let mut object = serde_json::Map::new();
            for (k, v) in &extra {
                object.insert(k.clone(), Value::from(*v));
            }
            if let Some(id) = &id { object.insert("uuid_ref".into(), Value::from(id.clone())); }
            if let Some(kind) = &kind { object.insert("data_type".into(), Value::from(kind.clone())); }
            if let Some(data) = &data { object.insert("data_location".into(), Value::from(data.clone())); }
            let body = serde_json::to_vec(&Value::Object(object)).unwrap_or_default();
            let result = parse(&body, &MessageFields::default());
            let complete = id.as_ref().is_some_and(|s| !s.is_empty())
                && kind.as_ref().is_some_and(|s| !s.is_empty());
            prop_assert_eq!(result.is_ok(), complete, "{:?}", result);
            if let Ok(e) = result {
                prop_assert_eq!(Some(e.id), id);
                prop_assert_eq!(Some(e.kind), kind);
                prop_assert_eq!(e.data_location, data.filter(|d| !d.is_empty()));
            }
        }
    }
}

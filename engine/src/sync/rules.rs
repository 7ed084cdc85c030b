//! Basic sync rules, with the semantics of Elastic's connectors
//! (`connectors/filtering/basic_rule.py`): each rule has an id, a policy
//! (include or exclude), a field, a rule (`equals`, `contains`,
//! `starts_with`, `ends_with`, `regex`, `<`, `>`), a value and an order.
//! Rules apply by order; the first that matches a document decides; a
//! document no rule matches is included. A missing field matches no rule;
//! `regex` is anchored at the start (Python's `re.match`); `equals`, `<` and
//! `>` compare the value as the document's type (a number, a boolean, a
//! date when both read as one, else text).
//!
//! [`validate`] is Elastic's three validators: every field present and no
//! string empty, no match-all regex (`.*`, `(.*)`), and no two rules with
//! the same field, rule and value (both are reported).

use std::cmp::Ordering;

use crate::config::source::BasicRule;

/// What a rule does with a document it matches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Policy {
    Include,
    Exclude,
}

/// How a rule compares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    Equals,
    Contains,
    StartsWith,
    EndsWith,
    Regex,
    LessThan,
    GreaterThan,
}

impl Op {
    fn parse(name: &str) -> Option<Self> {
        Some(match name.to_ascii_lowercase().as_str() {
            "equals" => Self::Equals,
            "contains" => Self::Contains,
            "starts_with" => Self::StartsWith,
            "ends_with" => Self::EndsWith,
            "regex" => Self::Regex,
            "<" => Self::LessThan,
            ">" => Self::GreaterThan,
            _ => return None,
        })
    }
}

/// One checked rule.
#[derive(Debug, Clone)]
struct Rule {
    policy: Policy,
    field: String,
    op: Op,
    value: String,
    regex: Option<regex::Regex>,
}

/// A valid set of basic rules, in the order they apply.
#[derive(Debug, Clone, Default)]
pub struct BasicRules {
    rules: Vec<Rule>,
}

/// Why some rules are invalid: the rules' ids and what is wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuleProblem {
    /// The rules concerned.
    pub ids: Vec<String>,
    /// What is wrong.
    pub message: String,
}

impl std::fmt::Display for RuleProblem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "rule {}: {}", self.ids.join(", "), self.message)
    }
}

/// A rule's value as text (numbers and booleans as JSON writes them).
fn value_text(value: &serde_json::Value) -> Option<String> {
    match value {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Number(n) => Some(n.to_string()),
        serde_json::Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

/// Check `rules`: the valid set, or every problem found.
pub fn validate(rules: &[BasicRule]) -> Result<BasicRules, Vec<RuleProblem>> {
    let mut problems = Vec::new();
    let mut checked = Vec::new();
    for rule in rules {
        let problem = |message: String| RuleProblem {
            ids: vec![rule.id.clone()],
            message,
        };
        let mut empty: Vec<&str> = [
            ("id", rule.id.as_str()),
            ("policy", rule.policy.as_str()),
            ("field", rule.field.as_str()),
            ("rule", rule.rule.as_str()),
        ]
        .into_iter()
        .filter(|(_, v)| v.trim().is_empty())
        .map(|(k, _)| k)
        .collect();
        let value = value_text(&rule.value);
        if value.as_deref().is_none_or(|v| v.is_empty()) {
            empty.push("value");
        }
        if !empty.is_empty() {
            problems.push(problem(format!(
                "{} must be a non-empty string",
                empty.join(", ")
            )));
            continue;
        }
        let value = value.unwrap_or_default();
        let policy = match rule.policy.to_ascii_lowercase().as_str() {
            "include" => Policy::Include,
            "exclude" => Policy::Exclude,
            other => {
                problems.push(problem(format!(
                    "policy `{other}` is neither `include` nor `exclude`"
                )));
                continue;
            }
        };
        let Some(op) = Op::parse(&rule.rule) else {
            problems.push(problem(format!(
                "rule `{}` is none of equals, contains, starts_with, ends_with, regex, <, >",
                rule.rule
            )));
            continue;
        };
        let regex = if op == Op::Regex {
            if value == ".*" || value == "(.*)" {
                problems.push(problem(format!(
                    "the regex `{value}` matches everything: leave the rule out instead"
                )));
                continue;
            }
            // Anchored at the start, as Python's `re.match`.
            match regex::Regex::new(&format!("^(?:{value})")) {
                Ok(re) => Some(re),
                Err(e) => {
                    problems.push(problem(format!("`{value}` is not a valid regex: {e}")));
                    continue;
                }
            }
        } else {
            None
        };
        checked.push((
            rule.order,
            rule.id.clone(),
            Rule {
                policy,
                field: rule.field.clone(),
                op,
                value,
                regex,
            },
        ));
    }
    // Semantic duplicates: the same field, rule and value, whatever the
    // policy; both are invalid.
    for (i, (_, a_id, a)) in checked.iter().enumerate() {
        for (_, b_id, b) in checked.iter().skip(i + 1) {
            if a.field == b.field && a.op == b.op && a.value == b.value {
                problems.push(RuleProblem {
                    ids: vec![a_id.clone(), b_id.clone()],
                    message: format!(
                        "the same field, rule and value (`{}` {:?} `{}`) twice",
                        a.field, a.op, a.value
                    ),
                });
            }
        }
    }
    if !problems.is_empty() {
        return Err(problems);
    }
    checked.sort_by_key(|(order, _, _)| *order);
    Ok(BasicRules {
        rules: checked.into_iter().map(|(_, _, rule)| rule).collect(),
    })
}

impl BasicRules {
    /// Whether there are no rules (every document is included).
    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// Whether `doc` goes into the sink.
    pub fn includes(&self, doc: &serde_json::Value) -> bool {
        for rule in &self.rules {
            if let Some(value) = field(doc, &rule.field)
                && rule.matches(value)
            {
                return rule.policy == Policy::Include;
            }
        }
        true
    }
}

/// The document's `field`: a top-level key of that name, else the dotted
/// path.
fn field<'a>(doc: &'a serde_json::Value, field: &str) -> Option<&'a serde_json::Value> {
    if let Some(value) = doc.get(field) {
        return Some(value);
    }
    let mut at = doc;
    for part in field.split('.') {
        at = at.get(part)?;
    }
    Some(at)
}

/// A date, when `text` reads as one (RFC 3339, or a plain date).
fn date(text: &str) -> Option<chrono::DateTime<chrono::FixedOffset>> {
    chrono::DateTime::parse_from_rfc3339(text).ok().or_else(|| {
        chrono::NaiveDate::parse_from_str(text, "%Y-%m-%d")
            .ok()
            .and_then(|d| d.and_hms_opt(0, 0, 0))
            .map(|d| d.and_utc().fixed_offset())
    })
}

impl Rule {
    fn matches(&self, doc_value: &serde_json::Value) -> bool {
        let text = match doc_value {
            serde_json::Value::String(s) => s.clone(),
            serde_json::Value::Number(n) => n.to_string(),
            serde_json::Value::Bool(b) => b.to_string(),
            // Null, lists and objects match nothing.
            _ => return false,
        };
        match self.op {
            Op::Contains => text.contains(&self.value),
            Op::StartsWith => text.starts_with(&self.value),
            Op::EndsWith => text.ends_with(&self.value),
            Op::Regex => self.regex.as_ref().is_some_and(|re| re.is_match(&text)),
            Op::Equals => self.compare(doc_value, &text) == Some(Ordering::Equal),
            Op::LessThan => self.compare(doc_value, &text) == Some(Ordering::Less),
            Op::GreaterThan => self.compare(doc_value, &text) == Some(Ordering::Greater),
        }
    }

    /// The document's value against the rule's, as the document's type.
    fn compare(&self, doc_value: &serde_json::Value, text: &str) -> Option<Ordering> {
        match doc_value {
            serde_json::Value::Number(n) => {
                let ours: f64 = self.value.trim().parse().ok()?;
                n.as_f64()?.partial_cmp(&ours)
            }
            serde_json::Value::Bool(b) => {
                let ours = match self.value.trim().to_ascii_lowercase().as_str() {
                    "true" => true,
                    "false" => false,
                    _ => return None,
                };
                Some(b.cmp(&ours))
            }
            _ => match (date(text), date(&self.value)) {
                (Some(doc), Some(ours)) => Some(doc.cmp(&ours)),
                _ => Some(text.cmp(self.value.as_str())),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn rule(
        id: &str,
        policy: &str,
        field: &str,
        rule: &str,
        value: serde_json::Value,
        order: i64,
    ) -> BasicRule {
        BasicRule {
            id: id.into(),
            policy: policy.into(),
            field: field.into(),
            rule: rule.into(),
            value,
            order,
        }
    }

    #[test]
    fn the_first_matching_rule_by_order_decides_and_no_match_includes() {
        let rules = validate(&[
            rule("b", "include", "category", "equals", json!("shoes"), 2),
            rule("a", "exclude", "price", ">", json!(100), 1),
        ])
        .unwrap();
        // Order 1 first: an expensive shoe is excluded.
        assert!(!rules.includes(&json!({"category": "shoes", "price": 150})));
        assert!(rules.includes(&json!({"category": "shoes", "price": 50})));
        // Neither matches: included.
        assert!(rules.includes(&json!({"category": "hats", "price": 50})));
        // A missing field matches nothing.
        assert!(rules.includes(&json!({"category": "hats"})));
    }

    #[test]
    fn values_compare_as_the_documents_type() {
        let gt = validate(&[rule("n", "exclude", "n", ">", json!("9"), 1)]).unwrap();
        // As numbers, 10 > 9 (as text "10" < "9").
        assert!(!gt.includes(&json!({"n": 10})));
        assert!(gt.includes(&json!({"n": 8.5})));
        let eq = validate(&[rule("n", "exclude", "n", "equals", json!("2.0"), 1)]).unwrap();
        assert!(!eq.includes(&json!({"n": 2})));
        let flag = validate(&[rule("f", "exclude", "draft", "equals", json!("TRUE"), 1)]).unwrap();
        assert!(!flag.includes(&json!({"draft": true})));
        assert!(flag.includes(&json!({"draft": false})));
        let before = validate(&[rule("d", "exclude", "at", "<", json!("2026-01-01"), 1)]).unwrap();
        assert!(!before.includes(&json!({"at": "2025-12-31T23:00:00Z"})));
        assert!(before.includes(&json!({"at": "2026-01-01T00:00:01+00:00"})));
        // Text that is not a date compares as text.
        let text = validate(&[rule("t", "exclude", "name", "<", json!("m"), 1)]).unwrap();
        assert!(!text.includes(&json!({"name": "alpha"})));
        assert!(text.includes(&json!({"name": "zulu"})));
    }

    #[test]
    fn text_rules_and_a_regex_anchored_at_the_start() {
        let rules = validate(&[
            rule("1", "exclude", "path", "starts_with", json!("/tmp"), 1),
            rule("2", "exclude", "path", "ends_with", json!(".bak"), 2),
            rule("3", "exclude", "path", "contains", json!("secret"), 3),
            rule("4", "exclude", "path", "regex", json!("[0-9]+-draft"), 4),
        ])
        .unwrap();
        for path in ["/tmp/a", "/a.bak", "/x/secret/y", "12-draft.txt"] {
            assert!(!rules.includes(&json!({ "path": path })), "{path}");
        }
        // The regex does not match in the middle (re.match, not re.search).
        assert!(rules.includes(&json!({"path": "doc-12-draft"})));
        assert!(rules.includes(&json!({"path": "/home/a.txt"})));
    }

    #[test]
    fn fields_are_keys_else_dotted_paths() {
        let rules = validate(&[
            rule("1", "exclude", "author.name", "equals", json!("eve"), 1),
            rule("2", "exclude", "a.b", "equals", json!("flat"), 2),
        ])
        .unwrap();
        assert!(!rules.includes(&json!({"author": {"name": "eve"}})));
        assert!(!rules.includes(&json!({"a.b": "flat"})));
        assert!(rules.includes(&json!({"author": {"name": "bob"}})));
        // Lists and objects match nothing.
        assert!(rules.includes(&json!({"author": {"name": ["eve"]}})));
    }

    #[test]
    fn elastic_s_validators() {
        let problems = validate(&[
            rule("empty", "include", "", "equals", json!("x"), 1),
            rule("all", "include", "title", "regex", json!(".*"), 2),
            rule("all2", "exclude", "title", "regex", json!("(.*)"), 3),
            rule("bad", "maybe", "title", "equals", json!("x"), 4),
            rule("op", "include", "title", "like", json!("x"), 5),
            rule("re", "include", "title", "regex", json!("(unclosed"), 6),
            rule("d1", "include", "title", "contains", json!("x"), 7),
            rule("d2", "exclude", "title", "contains", json!("x"), 8),
            rule("ok", "include", "body", "contains", json!("y"), 9),
        ])
        .unwrap_err();
        let text: Vec<String> = problems.iter().map(ToString::to_string).collect();
        let has = |needle: &str| text.iter().any(|t| t.contains(needle));
        assert!(
            has("rule empty: field must be a non-empty string"),
            "{text:?}"
        );
        assert!(
            has("rule all: the regex `.*` matches everything"),
            "{text:?}"
        );
        assert!(
            has("rule all2: the regex `(.*)` matches everything"),
            "{text:?}"
        );
        assert!(has("rule bad: policy `maybe`"), "{text:?}");
        assert!(has("rule op: rule `like` is none of"), "{text:?}");
        assert!(has("rule re: `(unclosed` is not a valid regex"), "{text:?}");
        assert!(
            has("rule d1, d2: the same field, rule and value"),
            "{text:?}"
        );
        assert!(!has("rule ok"), "{text:?}");
        assert_eq!(problems.len(), 7, "{text:?}");
        // Names are case-insensitive, as Elastic reads them.
        assert!(validate(&[rule("x", "EXCLUDE", "a", "Equals", json!(1), 1)]).is_ok());
    }
}

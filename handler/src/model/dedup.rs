//! Deduplication: two records that describe the same thing become one shard.
//!
//! A rule names a target field and how values are matched:
//!
//! * `exact`: the trimmed value;
//! * `fuzzy`: case, punctuation and spacing ignored ("ACME, Inc." matches "acme inc"); accents
//!   are letters of their own ("Renée" is not "Renee");
//! * `phonetic`: American Soundex of each word ("Jon Smyth" matches "John Smith").
//!
//! Each rule turns a value into a match key; keys are stored on the shard (`dedupKeys`), so a
//! duplicate is found with one indexed lookup per batch instead of a scan. When a record
//! matches a shard that came from another record, the two are merged by the mapping's
//! strategy: `merge_fields` (the shard's data, overwritten by the record's non-empty fields),
//! `keep_first` (the shard's data as it is) or `keep_most_complete` (whichever has more
//! non-empty fields).

use std::collections::BTreeMap;

use serde::ser::SerializeMap;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::{Map, Value};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DedupRules {
    pub rules: Vec<DedupRule>,
    #[serde(default)]
    pub merge: MergeStrategy,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DedupRule {
    /// A target field of the mapping.
    pub field: String,
    #[serde(default)]
    pub matching: Matching,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Matching {
    #[default]
    Exact,
    Fuzzy,
    Phonetic,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MergeStrategy {
    #[default]
    MergeFields,
    KeepFirst,
    KeepMostComplete,
}

impl DedupRule {
    /// Where the key is stored on a shard: `dedupKeys.<this>`, an identifier a query can
    /// name (letters, digits and `_`, not led by a digit), whatever the field is called.
    pub fn key_name(&self) -> String {
        let matching = match self.matching {
            Matching::Exact => "exact",
            Matching::Fuzzy => "fuzzy",
            Matching::Phonetic => "phonetic",
        };
        let lead = if self.field.starts_with(|c: char| c.is_ascii_digit()) {
            "_"
        } else {
            ""
        };
        let field: String = self
            .field
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
            .collect();
        format!("{lead}{field}_{matching}")
    }

    /// The match key of a record's transformed data, if the field has a value.
    pub fn key(&self, data: &Map<String, Value>) -> Option<String> {
        let text = match data.get(&self.field)? {
            Value::String(s) => s.clone(),
            Value::Null => return None,
            other => other.to_string(),
        };
        let key = match self.matching {
            Matching::Exact => text.trim().to_string(),
            Matching::Fuzzy => fuzzy_key(&text),
            Matching::Phonetic => text
                .split(|c: char| !c.is_alphabetic())
                .filter_map(soundex)
                .collect::<Vec<_>>()
                .join(" "),
        };
        (!key.is_empty()).then_some(key)
    }
}

impl DedupRules {
    /// Every rule's key for a record's data, as stored in `dedupKeys`.
    pub fn keys(&self, data: &Map<String, Value>) -> DedupKeys {
        self.rules
            .iter()
            .filter_map(|r| r.key(data).map(|k| (r.key_name(), k)))
            .collect()
    }
}

/// A shard's match keys (`dedupKeys`): rule name → key, in name order, each name once.
///
/// A JSON object on the wire. Kept as a short sorted list rather than a map: a shard has a
/// key per rule, one or two, and a page holds thousands of shards.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DedupKeys(Vec<(String, String)>);

impl DedupKeys {
    pub fn get(&self, rule: &str) -> Option<&str> {
        self.position(rule).ok().map(|i| self.0[i].1.as_str())
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn iter(&self) -> impl Iterator<Item = (&String, &String)> {
        self.into_iter()
    }

    /// Sets the key of `rule`, replacing the one it had.
    pub fn insert(&mut self, rule: String, key: String) {
        match self.position(&rule) {
            Ok(i) => self.0[i].1 = key,
            Err(i) => {
                // One key per rule, and most mappings have one rule.
                self.0.reserve_exact(1);
                self.0.insert(i, (rule, key))
            }
        }
    }

    fn position(&self, rule: &str) -> Result<usize, usize> {
        self.0.binary_search_by(|(name, _)| name.as_str().cmp(rule))
    }
}

impl<'a> IntoIterator for &'a DedupKeys {
    type Item = (&'a String, &'a String);
    type IntoIter = std::iter::Map<
        std::slice::Iter<'a, (String, String)>,
        fn(&'a (String, String)) -> (&'a String, &'a String),
    >;

    fn into_iter(self) -> Self::IntoIter {
        self.0.iter().map(|(name, key)| (name, key))
    }
}

impl FromIterator<(String, String)> for DedupKeys {
    /// A rule named twice keeps its last key.
    fn from_iter<I: IntoIterator<Item = (String, String)>>(pairs: I) -> Self {
        let mut keys = DedupKeys::default();
        for (rule, key) in pairs {
            keys.insert(rule, key);
        }
        keys
    }
}

impl<const N: usize> From<[(String, String); N]> for DedupKeys {
    fn from(pairs: [(String, String); N]) -> Self {
        pairs.into_iter().collect()
    }
}

impl Serialize for DedupKeys {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(Some(self.0.len()))?;
        for (rule, key) in &self.0 {
            map.serialize_entry(rule, key)?;
        }
        map.end()
    }
}

impl<'de> Deserialize<'de> for DedupKeys {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let keys = BTreeMap::<String, String>::deserialize(deserializer)?;
        Ok(DedupKeys(keys.into_iter().collect()))
    }
}

fn fuzzy_key(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars().flat_map(char::to_lowercase) {
        if c.is_alphanumeric() {
            out.push(c);
        } else if !out.ends_with(' ') && !out.is_empty() {
            out.push(' ');
        }
    }
    out.trim_end().to_string()
}

/// American Soundex of one word ("Robert" → "R163"); `None` without ASCII letters.
pub fn soundex(word: &str) -> Option<String> {
    fn digit(c: char) -> Option<char> {
        Some(match c {
            'B' | 'F' | 'P' | 'V' => '1',
            'C' | 'G' | 'J' | 'K' | 'Q' | 'S' | 'X' | 'Z' => '2',
            'D' | 'T' => '3',
            'L' => '4',
            'M' | 'N' => '5',
            'R' => '6',
            _ => return None,
        })
    }
    let letters: Vec<char> = word
        .chars()
        .filter(char::is_ascii_alphabetic)
        .map(|c| c.to_ascii_uppercase())
        .collect();
    let first = *letters.first()?;
    let mut code = String::from(first);
    let mut last = digit(first);
    for &c in &letters[1..] {
        let d = digit(c);
        if let Some(d) = d
            && last != Some(d)
        {
            code.push(d);
            if code.len() == 4 {
                break;
            }
        }
        // H and W do not separate letters with the same code; vowels do.
        if !matches!(c, 'H' | 'W') {
            last = d;
        }
    }
    while code.len() < 4 {
        code.push('0');
    }
    Some(code)
}

fn filled(data: &Map<String, Value>) -> usize {
    data.values()
        .filter(|v| !matches!(v, Value::Null) && v.as_str().is_none_or(|s| !s.trim().is_empty()))
        .count()
}

/// The data of a shard that `existing` and `incoming` both describe.
pub fn merge(
    strategy: MergeStrategy,
    existing: &Map<String, Value>,
    incoming: &Map<String, Value>,
) -> Map<String, Value> {
    match strategy {
        MergeStrategy::KeepFirst => existing.clone(),
        MergeStrategy::KeepMostComplete => {
            if filled(incoming) > filled(existing) {
                incoming.clone()
            } else {
                existing.clone()
            }
        }
        MergeStrategy::MergeFields => {
            let mut out = existing.clone();
            for (k, v) in incoming {
                let empty = v.is_null() || v.as_str().is_some_and(|s| s.trim().is_empty());
                if !empty {
                    out.insert(k.clone(), v.clone());
                }
            }
            out
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn data(v: Value) -> Map<String, Value> {
        v.as_object().unwrap().clone()
    }

    #[test]
    fn match_keys_are_an_object_of_rule_names_in_order() {
        let keys: DedupKeys = [
            ("name_fuzzy".to_string(), "acme".to_string()),
            ("email_exact".to_string(), "old@x.test".to_string()),
            ("email_exact".to_string(), "ann@x.test".to_string()),
        ]
        .into();
        assert_eq!(
            keys.get("email_exact"),
            Some("ann@x.test"),
            "the last key of a rule"
        );
        assert_eq!(keys.get("phone_exact"), None);
        let text = serde_json::to_string(&keys).unwrap();
        assert_eq!(text, r#"{"email_exact":"ann@x.test","name_fuzzy":"acme"}"#);
        let back: DedupKeys =
            serde_json::from_str(r#"{"name_fuzzy":"acme","email_exact":"ann@x.test"}"#).unwrap();
        assert_eq!(back, keys);
        let names: Vec<&String> = back.iter().map(|(name, _)| name).collect();
        assert_eq!(names, ["email_exact", "name_fuzzy"]);
    }

    #[test]
    fn soundex_codes_match_the_reference_examples() {
        for (word, code) in [
            ("Robert", "R163"),
            ("Rupert", "R163"),
            ("Rubin", "R150"),
            ("Ashcraft", "A261"),
            ("Tymczak", "T522"),
            ("Pfister", "P236"),
            ("Honeyman", "H555"),
        ] {
            assert_eq!(soundex(word).as_deref(), Some(code), "{word}");
        }
        assert_eq!(soundex("123"), None);
    }

    #[test]
    fn each_matching_finds_its_kind_of_duplicate() {
        let exact = DedupRule {
            field: "email".into(),
            matching: Matching::Exact,
        };
        let fuzzy = DedupRule {
            field: "name".into(),
            matching: Matching::Fuzzy,
        };
        let phonetic = DedupRule {
            field: "name".into(),
            matching: Matching::Phonetic,
        };
        let a = data(json!({"email": " ann@acme.test ", "name": "ACME, Inc."}));
        let b = data(json!({"email": "ann@acme.test", "name": "acme inc"}));
        assert_eq!(exact.key(&a), exact.key(&b));
        assert_eq!(fuzzy.key(&a), fuzzy.key(&b));
        let c = data(json!({"name": "Jon Smyth"}));
        let d = data(json!({"name": "John Smith"}));
        assert_eq!(phonetic.key(&c), phonetic.key(&d));
        assert_ne!(fuzzy.key(&c), fuzzy.key(&d));
        assert_eq!(exact.key(&data(json!({"email": null}))), None);
        assert_eq!(exact.key_name(), "email_exact");
    }

    #[test]
    fn a_key_name_is_an_identifier_whatever_the_field_is_called() {
        for (field, name) in [
            ("2nd email", "_2nd_email_exact"),
            ("e-mail", "e_mail_exact"),
            ("courriel_électronique", "courriel__lectronique_exact"),
        ] {
            let rule = DedupRule {
                field: field.into(),
                matching: Matching::Exact,
            };
            assert_eq!(rule.key_name(), name);
        }
    }

    #[test]
    fn merge_strategies() {
        let existing = data(json!({"name": "Jane Smith", "email": "jane@co.test", "phone": "555"}));
        let incoming = data(
            json!({"name": "Jane M. Smith", "email": "jane@co.test", "phone": null, "title": "CTO"}),
        );
        assert_eq!(
            Value::Object(merge(MergeStrategy::MergeFields, &existing, &incoming)),
            json!({"name": "Jane M. Smith", "email": "jane@co.test", "phone": "555", "title": "CTO"})
        );
        assert_eq!(
            merge(MergeStrategy::KeepFirst, &existing, &incoming),
            existing
        );
        let fuller = data(json!({"a": 1, "b": 2, "c": 3, "d": 4}));
        assert_eq!(
            merge(MergeStrategy::KeepMostComplete, &existing, &fuller),
            fuller
        );
        assert_eq!(
            merge(MergeStrategy::KeepMostComplete, &existing, &incoming),
            existing
        );
    }
}

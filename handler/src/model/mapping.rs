//! Entity mappings: how an external record becomes a shard's `structuredData`.
//!
//! A mapping names the external entity, the shard type, whether unknown records create shards,
//! the field mappings, derived shards and deduplication rules. A field mapping is one of:
//!
//! * `rename` (the default): `source` → `target`;
//! * `split`: `source` → `targets`, splitting on `separator` (default whitespace); the last
//!   targets take the last parts and the first takes the rest, so `Name` → `first_name` +
//!   `last_name` turns "Mary Ann Smith" into "Mary Ann" + "Smith";
//! * `concat`: `sources` → `target`, joined with `separator` (default a space).
//!
//! Each may set a `default` for a missing value, a `type` to coerce to (`string`, `number`,
//! `integer`, `boolean`, `datetime`), a `valueMap` from source to target values, and
//! `required`. A record that breaks a mapping fails alone with a `VALIDATION_ERROR` naming the
//! field; the rest of its batch goes on.

use chrono::{DateTime, NaiveDate, SecondsFormat, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Number, Value};

use super::dedup::DedupRules;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EntityMapping {
    pub external_entity: String,
    pub shard_type_id: String,
    /// Whether a record with no shard yet creates one; if not, it is skipped.
    #[serde(default = "yes")]
    pub create_new: bool,
    /// An empty list copies every field as it is.
    #[serde(default)]
    pub field_mappings: Vec<FieldMapping>,
    /// The target field whose value names the shard; the external id otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name_field: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub derived_shards: Vec<DerivedShard>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deduplication: Option<DedupRules>,
    /// Provider-syntax filters for this entity (`Type = 'Customer'`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub filters: Vec<String>,
    /// Castiel's changes to these shards are written back to the provider (when the
    /// integration's `writeBack` is enabled), and the provider's changes are checked against
    /// them field by field.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub bidirectional: bool,
    /// The provider field (a Salesforce External ID field, a Dataverse column) that keeps the
    /// id of the shard a record was created from by write-back: a retried create finds the
    /// record by it, and an inbound sync lands the record in that shard.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idempotency_field: Option<String>,
}

fn yes() -> bool {
    true
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct FieldMapping {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub sources: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub targets: Vec<String>,
    #[serde(default)]
    pub transform: Transform,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub separator: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default: Option<Value>,
    #[serde(default, rename = "type", skip_serializing_if = "Option::is_none")]
    pub value_type: Option<ValueType>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value_map: Option<Map<String, Value>>,
    #[serde(default)]
    pub required: bool,
    /// For a `concat`: written back by splitting the target on the separator (the last
    /// sources take the last parts), which only the integration knows to be faithful.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub reversible: bool,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Transform {
    #[default]
    Rename,
    Split,
    Concat,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ValueType {
    String,
    Number,
    Integer,
    Boolean,
    Datetime,
}

/// A shard derived from the same record, linked to the primary shard.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DerivedShard {
    pub shard_type_id: String,
    /// Only when this holds for the source record.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub when: Option<Condition>,
    pub field_mappings: Vec<FieldMapping>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name_field: Option<String>,
}

/// `field` has a value, and, with `in`, one of those values.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Condition {
    pub field: String,
    #[serde(default, rename = "in", skip_serializing_if = "Option::is_none")]
    pub one_of: Option<Vec<Value>>,
}

impl Condition {
    pub fn holds(&self, record: &Map<String, Value>) -> bool {
        match lookup(record, &self.field) {
            None | Some(Value::Null) => false,
            Some(Value::String(s)) if s.is_empty() => false,
            Some(value) => self
                .one_of
                .as_ref()
                .is_none_or(|allowed| allowed.contains(value)),
        }
    }
}

/// Why a record could not be transformed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TransformError {
    pub field: String,
    pub message: String,
}

impl EntityMapping {
    /// Whether a record may land in a shard other than its own: one deduplication merged it
    /// into, or one write-back created it from.
    pub fn lands_elsewhere(&self) -> bool {
        self.deduplication.is_some() || self.idempotency_field.is_some()
    }

    /// The source fields the mapping reads, for the provider's query.
    pub fn source_fields(&self) -> Vec<String> {
        let mut fields: Vec<String> = Vec::new();
        let mappings = self.field_mappings.iter().chain(
            self.derived_shards
                .iter()
                .flat_map(|d| d.field_mappings.iter()),
        );
        for m in mappings {
            for f in m.source.iter().chain(m.sources.iter()) {
                if !fields.contains(f) {
                    fields.push(f.clone());
                }
            }
        }
        if let Some(f) = &self.idempotency_field
            && !self.field_mappings.is_empty()
            && !fields.contains(f)
        {
            fields.push(f.clone());
        }
        for d in &self.derived_shards {
            if let Some(c) = &d.when
                && !fields.contains(&c.field)
            {
                fields.push(c.field.clone());
            }
        }
        fields
    }

    pub fn validate(&self) -> Result<(), String> {
        for m in self.field_mappings.iter().chain(
            self.derived_shards
                .iter()
                .flat_map(|d| d.field_mappings.iter()),
        ) {
            m.validate()
                .map_err(|e| format!("{} → {}: {e}", self.external_entity, self.shard_type_id))?;
        }
        Ok(())
    }

    /// Refuses a deduplication rule on a field no mapping writes: it would never find a
    /// duplicate. (With no mappings, every field of the record is copied, whatever it is
    /// called.) Checked when an integration is registered; one stored before keeps syncing.
    pub fn check_deduplication(&self) -> Result<(), String> {
        let targets = || {
            self.field_mappings
                .iter()
                .flat_map(|m| m.target.iter().chain(&m.targets))
        };
        if !self.field_mappings.is_empty()
            && let Some(rules) = &self.deduplication
            && let Some(rule) = rules
                .rules
                .iter()
                .find(|r| !targets().any(|t| *t == r.field))
        {
            return Err(format!(
                "{} → {}: the deduplication rule's field `{}` is not a target of the field \
                 mappings (targets: {})",
                self.external_entity,
                self.shard_type_id,
                rule.field,
                targets().map(String::as_str).collect::<Vec<_>>().join(", ")
            ));
        }
        // A key's name spells its field in letters, digits and `_`: two rules whose fields
        // spell alike (`e-mail`, `e_mail`; two fields in another script) would keep one key.
        let rules = self.deduplication.iter().flat_map(|d| &d.rules);
        for (i, rule) in rules.clone().enumerate() {
            if let Some(other) = rules
                .clone()
                .skip(i + 1)
                .find(|o| o.key_name() == rule.key_name() && o.field != rule.field)
            {
                return Err(format!(
                    "{} → {}: the deduplication rules on `{}` and `{}` would keep one match key (`{}`); \
                     rename one of the fields",
                    self.external_entity,
                    self.shard_type_id,
                    rule.field,
                    other.field,
                    rule.key_name()
                ));
            }
        }
        Ok(())
    }
}

/// Applies `mappings` to a record's fields. An empty list copies every field but the
/// provider's bookkeeping (`attributes`).
pub fn transform(
    mappings: &[FieldMapping],
    record: &Map<String, Value>,
) -> Result<Map<String, Value>, TransformError> {
    if mappings.is_empty() {
        let mut out = record.clone();
        out.remove("attributes");
        return Ok(out);
    }
    let mut out = Map::new();
    for m in mappings {
        m.apply(record, &mut out)?;
    }
    Ok(out)
}

/// Applies `mappings` to a record's fields as [`transform`] does, giving the fields up: a field
/// that a rename reads, and no mapping after it, moves into the output instead of being copied
/// (a page's records are mapped once, and their fields are not read again).
pub fn transform_owned(
    mappings: &[FieldMapping],
    mut record: Map<String, Value>,
) -> Result<Map<String, Value>, TransformError> {
    if mappings.is_empty() {
        record.remove("attributes");
        return Ok(record);
    }
    let mut out = Map::new();
    for (i, m) in mappings.iter().enumerate() {
        match m.moved_source(&mappings[i + 1..]) {
            Some(source) => {
                let value = match record.remove(source) {
                    Some(value) => value,
                    None => lookup(&record, source).cloned().unwrap_or(Value::Null),
                };
                m.finish(source, m.target_name(), value, &mut out)?;
            }
            None => m.apply(&record, &mut out)?,
        }
    }
    Ok(out)
}

/// A source field: `name` itself, or a path into nested objects (`from.user.displayName`,
/// Salesforce's `Account.Name`) when the record has no field by that whole name.
fn lookup<'a>(record: &'a Map<String, Value>, name: &str) -> Option<&'a Value> {
    record.get(name).or_else(|| {
        let (first, rest) = name.split_once('.')?;
        rest.split('.')
            .try_fold(record.get(first)?, |value, part| value.get(part))
    })
}

fn is_blank(value: &Value) -> bool {
    match value {
        Value::Null => true,
        Value::String(s) => s.trim().is_empty(),
        _ => false,
    }
}

impl FieldMapping {
    fn validate(&self) -> Result<(), String> {
        match self.transform {
            Transform::Rename if self.source.is_none() || self.target.is_none() => {
                Err("a rename needs `source` and `target`".into())
            }
            Transform::Split if self.source.is_none() || self.targets.len() < 2 => {
                Err("a split needs `source` and at least two `targets`".into())
            }
            Transform::Concat if self.sources.is_empty() || self.target.is_none() => {
                Err("a concat needs `sources` and `target`".into())
            }
            _ => Ok(()),
        }
    }

    fn error(&self, field: &str, message: impl Into<String>) -> TransformError {
        TransformError {
            field: field.to_string(),
            message: message.into(),
        }
    }

    /// The field this mapping may take from the record rather than copy: a rename's source,
    /// when none of the `later` mappings reads it, or anything nested in it.
    fn moved_source(&self, later: &[FieldMapping]) -> Option<&str> {
        if self.transform != Transform::Rename {
            return None;
        }
        let source = self.source_name()?;
        let reads = |name: &String| {
            name.strip_prefix(source)
                .is_some_and(|rest| rest.is_empty() || rest.starts_with('.'))
        };
        let read_later = later
            .iter()
            .any(|m| m.source.iter().chain(m.sources.iter()).any(reads));
        (!read_later).then_some(source)
    }

    /// The field a rename or a split reads: `source`, or the first of `sources`.
    fn source_name(&self) -> Option<&str> {
        self.source
            .as_deref()
            .or(self.sources.first().map(String::as_str))
    }

    fn target_name(&self) -> &str {
        self.target.as_deref().unwrap_or_default()
    }

    fn apply(
        &self,
        record: &Map<String, Value>,
        out: &mut Map<String, Value>,
    ) -> Result<(), TransformError> {
        let source_name = self.source_name().unwrap_or_default();
        match self.transform {
            Transform::Rename => {
                let value = lookup(record, source_name).cloned().unwrap_or(Value::Null);
                self.finish(source_name, self.target_name(), value, out)?;
            }
            Transform::Concat => {
                let separator = self.separator.as_deref().unwrap_or(" ");
                let parts: Vec<String> = self
                    .sources
                    .iter()
                    .filter_map(|s| lookup(record, s))
                    .filter(|v| !is_blank(v))
                    .map(|v| match v {
                        Value::String(s) => s.trim().to_string(),
                        other => other.to_string(),
                    })
                    .collect();
                let value = if parts.is_empty() {
                    Value::Null
                } else {
                    Value::String(parts.join(separator))
                };
                self.finish(source_name, self.target_name(), value, out)?;
            }
            Transform::Split => {
                let text = match lookup(record, source_name) {
                    Some(Value::String(s)) => s.trim().to_string(),
                    Some(Value::Null) | None => String::new(),
                    Some(other) => other.to_string(),
                };
                let tokens: Vec<&str> = match self.separator.as_deref() {
                    Some(sep) => text
                        .split(sep)
                        .map(str::trim)
                        .filter(|t| !t.is_empty())
                        .collect(),
                    None => text.split_whitespace().collect(),
                };
                let n = self.targets.len();
                let mut values = vec![Value::Null; n];
                if tokens.len() >= n {
                    let head = tokens.len() - (n - 1);
                    let joiner = self.separator.as_deref().unwrap_or(" ");
                    values[0] = Value::String(tokens[..head].join(joiner));
                    for (i, token) in tokens[head..].iter().enumerate() {
                        values[i + 1] = Value::String(token.to_string());
                    }
                } else {
                    // Fewer parts than targets: the last targets take them, as they take the
                    // last parts of a longer text ("Cher" is a last name; written back through
                    // a reversible concat of first and last name, it goes to the last).
                    let first = n - tokens.len();
                    for (i, token) in tokens.iter().enumerate() {
                        values[first + i] = Value::String(token.to_string());
                    }
                }
                for (target, value) in self.targets.iter().zip(values) {
                    self.finish(source_name, target, value, out)?;
                }
            }
        }
        Ok(())
    }

    /// One output of the mapping: a blank replaced by the default, then mapped through the value
    /// map, coerced to the value type, checked if required, and stored under `target`.
    fn finish(
        &self,
        source_name: &str,
        target: &str,
        mut value: Value,
        out: &mut Map<String, Value>,
    ) -> Result<(), TransformError> {
        if is_blank(&value) {
            value = self.default.clone().unwrap_or(Value::Null);
        }
        if let (Some(map), false) = (&self.value_map, value.is_null()) {
            let key = match &value {
                Value::String(s) => s.clone(),
                other => other.to_string(),
            };
            if let Some(mapped) = map.get(&key) {
                value = mapped.clone();
            }
        }
        if let (Some(kind), false) = (self.value_type, value.is_null()) {
            value = coerce(&value, kind).map_err(|m| self.error(source_name, m))?;
        }
        if self.required && is_blank(&value) {
            return Err(self.error(
                source_name,
                format!("required field '{target}' is missing (from `{source_name}`)"),
            ));
        }
        out.insert(target.to_string(), value);
        Ok(())
    }
}

/// A shard's data mapped back to the provider's fields, for a write-back.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Reversed {
    pub fields: Map<String, Value>,
    /// Target fields that cannot be written back, and why: a concat not declared reversible, a
    /// value the value map cannot tell back, a source reached through a relationship.
    pub irreversible: Vec<(String, String)>,
}

impl Reversed {
    /// Leaves out of the write the provider fields of `read_only` (matched regardless of
    /// case) it would set, and those not `writable` where the provider names the few it lets
    /// be written, and returns the target fields mapped from them, with why they are not
    /// written back; but for a create (`creating`), those with no value, which it would not
    /// have set anyway.
    pub fn leave_out(
        &mut self,
        mappings: &[FieldMapping],
        read_only: &[String],
        writable: Option<&[&str]>,
        creating: bool,
    ) -> Vec<(String, String)> {
        let unwritable: Vec<String> = self
            .fields
            .keys()
            .filter(|f| {
                read_only.iter().any(|r| r.eq_ignore_ascii_case(f))
                    || writable.is_some_and(|w| !w.contains(&f.as_str()))
            })
            .cloned()
            .collect();
        let mut left_out: Vec<(String, String)> = Vec::new();
        for field in unwritable {
            match self.fields.remove(&field) {
                Some(Value::Null) if creating => continue,
                None => continue,
                Some(_) => {}
            }
            let why = format!("the provider does not let `{field}` be written");
            let mut targets: Vec<String> = mappings
                .iter()
                .filter(|m| {
                    m.source.as_deref() == Some(field.as_str()) || m.sources.contains(&field)
                })
                .flat_map(|m| m.target.iter().chain(m.targets.iter()).cloned())
                .collect();
            if mappings.is_empty() {
                targets.push(field.clone());
            }
            for target in targets {
                if !left_out.iter().any(|(t, _)| *t == target) {
                    left_out.push((target, why.clone()));
                }
            }
        }
        left_out
    }
}

/// Maps `data` (a shard's `structuredData`) back to the provider's fields through `mappings`:
/// a rename inverted, a split joined, a reversible concat split, a value map inverted. With
/// `only`, just the mappings that produce one of those target fields (an update's changed
/// fields). An empty mapping list copies every field, as it does inbound.
pub fn reverse(
    mappings: &[FieldMapping],
    data: &Map<String, Value>,
    only: Option<&[String]>,
) -> Reversed {
    let wanted = |target: &str| only.is_none_or(|fields| fields.iter().any(|f| f == target));
    let mut out = Reversed::default();
    if mappings.is_empty() {
        out.fields = data
            .iter()
            .filter(|(k, _)| wanted(k))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        return out;
    }
    for m in mappings {
        let targets: Vec<&str> = match m.transform {
            Transform::Split => m.targets.iter().map(String::as_str).collect(),
            _ => m.target.as_deref().into_iter().collect(),
        };
        if !targets.iter().any(|t| wanted(t)) {
            continue;
        }
        let refuse = |out: &mut Reversed, why: &str| {
            for t in &targets {
                out.irreversible.push((t.to_string(), why.to_string()));
            }
        };
        let value_of = |target: &str| -> Result<Value, String> {
            let value = data.get(target).cloned().unwrap_or(Value::Null);
            match (&m.value_map, &value) {
                (Some(map), v) if !v.is_null() => {
                    let mut keys = map.iter().filter(|(_, to)| *to == v).map(|(k, _)| k);
                    match (keys.next(), keys.next()) {
                        (Some(key), None) => Ok(Value::String(key.clone())),
                        (Some(_), Some(_)) => Err(format!(
                            "several source values map to {v}; the value map cannot tell which"
                        )),
                        // A value the map does not list came through unchanged.
                        (None, _) => Ok(value),
                    }
                }
                _ => Ok(value),
            }
        };
        let separator = m.separator.as_deref().unwrap_or(" ");
        match m.transform {
            Transform::Rename => {
                let source = m.source.clone().unwrap_or_default();
                if source.contains('.') && !data.contains_key(&source) {
                    refuse(&mut out, "its source is a field of a related record");
                    continue;
                }
                match value_of(targets[0]) {
                    Ok(v) => {
                        out.fields.insert(source, v);
                    }
                    Err(why) => refuse(&mut out, &why),
                }
            }
            Transform::Split => {
                let mut parts = Vec::new();
                for t in &targets {
                    match value_of(t) {
                        Ok(Value::Null) => {}
                        Ok(Value::String(s)) if s.trim().is_empty() => {}
                        Ok(Value::String(s)) => parts.push(s),
                        Ok(other) => parts.push(other.to_string()),
                        Err(why) => {
                            refuse(&mut out, &why);
                            parts.clear();
                            break;
                        }
                    }
                }
                let joined = if parts.is_empty() {
                    Value::Null
                } else {
                    Value::String(parts.join(separator))
                };
                out.fields
                    .insert(m.source.clone().unwrap_or_default(), joined);
            }
            Transform::Concat if !m.reversible => refuse(
                &mut out,
                "a concat is written back only when the mapping declares it `reversible`",
            ),
            Transform::Concat => match value_of(targets[0]) {
                Ok(value) => {
                    let split = FieldMapping {
                        transform: Transform::Split,
                        source: Some("value".into()),
                        targets: m.sources.clone(),
                        separator: m.separator.clone(),
                        ..FieldMapping::default()
                    };
                    let mut parts = Map::new();
                    let record: Map<String, Value> =
                        [("value".to_string(), value)].into_iter().collect();
                    match split.apply(&record, &mut parts) {
                        Ok(()) => out.fields.extend(parts),
                        Err(e) => refuse(&mut out, &e.message),
                    }
                }
                Err(why) => refuse(&mut out, &why),
            },
        }
    }
    out
}

/// Converts `value` to `kind`, or says why it cannot.
pub fn coerce(value: &Value, kind: ValueType) -> Result<Value, String> {
    let text = match value {
        Value::String(s) => s.trim().to_string(),
        other => other.to_string(),
    };
    let fail = || format!("`{text}` is not a valid {kind:?}").to_lowercase();
    Ok(match kind {
        ValueType::String => Value::String(match value {
            Value::String(s) => s.clone(),
            other => other.to_string(),
        }),
        ValueType::Number => match value {
            Value::Number(_) => value.clone(),
            _ => text
                .parse::<f64>()
                .ok()
                .and_then(Number::from_f64)
                .map(Value::Number)
                .ok_or_else(fail)?,
        },
        ValueType::Integer => match value {
            Value::Number(n) if n.is_i64() => value.clone(),
            _ => {
                let parsed = text.parse::<i64>().ok().or_else(|| {
                    text.parse::<f64>()
                        .ok()
                        .filter(|f| f.fract() == 0.0 && f.abs() < 9.0e15)
                        .map(|f| f as i64)
                });
                Value::from(parsed.ok_or_else(fail)?)
            }
        },
        ValueType::Boolean => match value {
            Value::Bool(_) => value.clone(),
            _ => match text.to_ascii_lowercase().as_str() {
                "true" | "1" | "yes" | "y" => Value::Bool(true),
                "false" | "0" | "no" | "n" => Value::Bool(false),
                _ => return Err(fail()),
            },
        },
        ValueType::Datetime => {
            let parsed = DateTime::parse_from_rfc3339(&text)
                .or_else(|_| DateTime::parse_from_str(&text, "%Y-%m-%dT%H:%M:%S%.f%z"))
                .map(|d| d.with_timezone(&Utc))
                .ok()
                .or_else(|| {
                    NaiveDate::parse_from_str(&text, "%Y-%m-%d")
                        .ok()
                        .and_then(|d| d.and_hms_opt(0, 0, 0))
                        .map(|d| d.and_utc())
                });
            Value::String(
                parsed
                    .ok_or_else(fail)?
                    .to_rfc3339_opts(SecondsFormat::Millis, true),
            )
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_shard_maps_back_through_renames_splits_reversible_concats_and_value_maps() {
        let m = mappings(json!([
            {"source": "Email", "target": "email"},
            {"source": "Name", "targets": ["first_name", "last_name"], "transform": "split"},
            {"sources": ["Street", "City"], "target": "address", "transform": "concat",
             "separator": ", ", "reversible": true},
            {"source": "Rating", "target": "tier", "valueMap": {"Hot": "A", "Warm": "B"}},
        ]));
        let record = json!({"Email": "ann@x.test", "Name": "Mary Ann Smith",
                            "Street": "1 Main St", "City": "Springfield", "Rating": "Hot"});
        let data = transform(&m, record.as_object().unwrap()).unwrap();
        let back = reverse(&m, &data, None);
        assert!(back.irreversible.is_empty(), "{:?}", back.irreversible);
        assert_eq!(
            Value::Object(back.fields),
            record,
            "the round trip is exact"
        );

        let only = ["tier".to_string()];
        let mut changed = data.clone();
        changed.insert("tier".into(), json!("B"));
        let back = reverse(&m, &changed, Some(&only));
        assert_eq!(Value::Object(back.fields), json!({"Rating": "Warm"}));
    }

    #[test]
    fn fields_the_provider_will_not_write_are_left_out_naming_the_targets_they_feed() {
        let m = mappings(json!([
            {"source": "Email", "target": "email"},
            {"source": "Name", "targets": ["first_name", "last_name"], "transform": "split"},
            {"source": "Name", "target": "full_name"},
        ]));
        let record = json!({"Email": "ann@x.test", "Name": "Ann Lee"});
        let data = transform(&m, record.as_object().unwrap()).unwrap();
        let mut back = reverse(&m, &data, None);
        let left_out = back.leave_out(&m, &["name".to_string(), "Id".to_string()], None, false);
        assert_eq!(Value::Object(back.fields), json!({"Email": "ann@x.test"}));
        let left: Vec<&str> = left_out.iter().map(|(t, _)| t.as_str()).collect();
        assert_eq!(left, ["first_name", "last_name", "full_name"]);
        assert!(left_out[0].1.contains("`Name`"));

        // A field with no value is left out of a create without a word; of an update, it is a
        // value cleared that cannot be written, and says so.
        let mut back = reverse(&m, &Map::new(), None);
        assert!(
            back.leave_out(&m, &["Name".to_string()], None, true)
                .is_empty()
        );
        assert!(!back.fields.contains_key("Name"));
        let mut back = reverse(&m, &Map::new(), None);
        assert_eq!(
            back.leave_out(&m, &["Name".to_string()], None, false).len(),
            3
        );

        // Where the provider names the few fields it lets be written, the others go too.
        let mut back = reverse(&m, &data, None);
        let left_out = back.leave_out(&m, &[], Some(&["Email"]), false);
        assert_eq!(Value::Object(back.fields), json!({"Email": "ann@x.test"}));
        assert_eq!(left_out.len(), 3);
    }

    #[test]
    fn a_one_word_name_written_back_through_a_concat_of_first_and_last_is_a_last_name() {
        let m = mappings(json!([
            {"sources": ["FirstName", "LastName"], "target": "name", "transform": "concat",
             "reversible": true},
        ]));
        let record = json!({"LastName": "Smith"});
        let mut data = transform(&m, record.as_object().unwrap()).unwrap();
        assert_eq!(data["name"], "Smith");
        data.insert("name".into(), json!("Cher"));
        let back = reverse(&m, &data, None);
        assert_eq!(
            Value::Object(back.fields),
            json!({"FirstName": null, "LastName": "Cher"})
        );
    }

    #[test]
    fn mapping_a_record_it_gives_up_yields_what_mapping_a_copy_does() {
        let m = mappings(json!([
            {"source": "Name", "targets": ["first_name", "last_name"], "transform": "split"},
            {"source": "Name", "target": "full_name"},
            {"source": "Account", "target": "account"},
            {"source": "Account.Name", "target": "company"},
            {"source": "Email", "target": "email", "required": true},
            {"source": "Email", "target": "contact"},
            {"source": "Score", "target": "score", "type": "integer"},
            {"source": "Missing", "target": "missing", "default": "none"},
            {"sources": ["Street", "City"], "target": "address", "transform": "concat"},
            {"source": "City", "target": "city"},
        ]));
        let record = json!({"Name": "Mary Ann Smith", "Account": {"Name": "Acme"},
                            "Email": "ann@x.test", "Score": "7", "Street": "1 Main St",
                            "City": "Springfield", "attributes": {"type": "Contact"}});
        let record = record.as_object().unwrap();
        let copied = transform(&m, record).unwrap();
        assert_eq!(transform_owned(&m, record.clone()).unwrap(), copied);
        assert_eq!(copied["company"], "Acme", "read after `Account` was mapped");
        assert_eq!(
            copied["contact"], "ann@x.test",
            "read after `Email` was mapped"
        );
        assert_eq!(
            transform_owned(&[], record.clone()).unwrap(),
            transform(&[], record).unwrap()
        );
        let blank = json!({"Name": "Ann", "Email": " "});
        assert_eq!(
            transform_owned(&m, blank.as_object().unwrap().clone()).unwrap_err(),
            transform(&m, blank.as_object().unwrap()).unwrap_err()
        );
    }

    #[test]
    fn what_cannot_be_mapped_back_is_named_not_written() {
        let m = mappings(json!([
            {"sources": ["FirstName", "LastName"], "target": "name", "transform": "concat"},
            {"source": "Account.Name", "target": "company"},
            {"source": "Stage", "target": "stage", "valueMap": {"New": "open", "Working": "open"}},
            {"source": "Phone", "target": "phone"},
        ]));
        let data = json!({"name": "Ann Smith", "company": "Acme", "stage": "open", "phone": "555"});
        let back = reverse(&m, data.as_object().unwrap(), None);
        assert_eq!(Value::Object(back.fields), json!({"Phone": "555"}));
        let refused: Vec<&str> = back.irreversible.iter().map(|(f, _)| f.as_str()).collect();
        assert_eq!(refused, ["name", "company", "stage"]);
        assert!(back.irreversible[0].1.contains("reversible"));
    }

    #[test]
    fn dotted_sources_read_nested_fields() {
        let record = json!({"from": {"user": {"displayName": "Robin Kline"}}, "a.b": 1})
            .as_object()
            .unwrap()
            .clone();
        let mappings: Vec<FieldMapping> = serde_json::from_value(json!([
            {"source": "from.user.displayName", "target": "author"},
            {"source": "a.b", "target": "whole_name_first"},
            {"source": "from.nobody.name", "target": "missing"}
        ]))
        .unwrap();
        let data = transform(&mappings, &record).unwrap();
        assert_eq!(data["author"], "Robin Kline");
        assert_eq!(data["whole_name_first"], 1);
        assert!(data.get("missing").is_none_or(Value::is_null), "{data:?}");
    }
    use serde_json::json;

    fn record(v: Value) -> Map<String, Value> {
        v.as_object().unwrap().clone()
    }

    fn mappings(v: Value) -> Vec<FieldMapping> {
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn a_name_splits_into_first_and_last() {
        let m = mappings(
            json!([{"source": "Name", "targets": ["first_name", "last_name"], "transform": "split"}]),
        );
        for (name, first, last) in [
            ("John Doe", json!("John"), json!("Doe")),
            ("Mary Ann Smith", json!("Mary Ann"), json!("Smith")),
            ("  Cher ", Value::Null, json!("Cher")),
            ("", Value::Null, Value::Null),
        ] {
            let out = transform(&m, &record(json!({"Name": name}))).unwrap();
            assert_eq!(
                (out["first_name"].clone(), out["last_name"].clone()),
                (first, last),
                "{name}"
            );
        }
    }

    #[test]
    fn renames_concats_defaults_types_and_value_maps() {
        let m = mappings(json!([
            {"source": "Email", "target": "email", "required": true},
            {"sources": ["FirstName", "LastName"], "target": "full_name", "transform": "concat"},
            {"source": "Employees", "target": "employees", "type": "integer"},
            {"source": "Revenue", "target": "revenue", "type": "number", "default": 0},
            {"source": "Active", "target": "active", "type": "boolean"},
            {"source": "Since", "target": "since", "type": "datetime"},
            {"source": "Type", "target": "tier", "valueMap": {"Customer - Direct": "direct", "Partner": "partner"}},
            {"source": "Missing", "target": "country", "default": "US"}
        ]));
        let out = transform(
            &m,
            &record(json!({
                "Email": "ann@acme.test", "FirstName": "Ann", "LastName": " Lee ",
                "Employees": "250", "Revenue": null, "Active": "true",
                "Since": "2024-05-02T10:00:00.000+0000", "Type": "Partner"
            })),
        )
        .unwrap();
        assert_eq!(
            Value::Object(out),
            json!({"email": "ann@acme.test", "full_name": "Ann Lee", "employees": 250, "revenue": 0,
                   "active": true, "since": "2024-05-02T10:00:00.000Z", "tier": "partner", "country": "US"})
        );
    }

    #[test]
    fn a_missing_required_field_or_a_bad_value_fails_the_record_with_the_field() {
        let m = mappings(json!([{"source": "Name", "target": "name", "required": true}]));
        let err = transform(&m, &record(json!({"Name": " "}))).unwrap_err();
        assert_eq!(err.field, "Name");
        assert_eq!(
            err.message,
            "required field 'name' is missing (from `Name`)"
        );

        let m =
            mappings(json!([{"source": "Employees", "target": "employees", "type": "integer"}]));
        let err = transform(&m, &record(json!({"Employees": "lots"}))).unwrap_err();
        assert_eq!(err.field, "Employees");
        assert!(
            err.message.contains("`lots` is not a valid integer"),
            "{}",
            err.message
        );
    }

    #[test]
    fn no_mappings_copy_the_record() {
        let out = transform(
            &[],
            &record(json!({"attributes": {"type": "Account"}, "Name": "A"})),
        )
        .unwrap();
        assert_eq!(Value::Object(out), json!({"Name": "A"}));
    }

    #[test]
    fn the_source_fields_are_what_the_query_needs() {
        let m: EntityMapping = serde_json::from_value(json!({
            "externalEntity": "Account", "shardTypeId": "c_company",
            "fieldMappings": [{"source": "Name", "target": "name"},
                              {"sources": ["City", "Country"], "target": "location", "transform": "concat"}],
            "derivedShards": [{"shardTypeId": "c_company_profile", "when": {"field": "Industry"},
                               "fieldMappings": [{"source": "Industry", "target": "industry"}]}]
        }))
        .unwrap();
        assert!(m.create_new);
        assert_eq!(m.source_fields(), ["Name", "City", "Country", "Industry"]);
        assert!(m.validate().is_ok());
    }

    #[test]
    fn a_deduplication_rule_must_match_on_a_field_the_mappings_write() {
        let mapping = |field: &str| -> EntityMapping {
            serde_json::from_value(json!({
                "externalEntity": "Contact", "shardTypeId": "c_contact",
                "fieldMappings": [{"source": "Name", "targets": ["first_name", "last_name"], "transform": "split"},
                                  {"source": "Email", "target": "email"}],
                "deduplication": {"rules": [{"field": field}]}
            }))
            .unwrap()
        };
        assert!(mapping("email").check_deduplication().is_ok());
        assert!(mapping("last_name").check_deduplication().is_ok());
        assert!(mapping("Email").validate().is_ok(), "a job still runs it");
        let refused = mapping("Email").check_deduplication().unwrap_err();
        assert!(
            refused.contains("`Email` is not a target")
                && refused.contains("first_name, last_name, email"),
            "{refused}"
        );
    }

    #[test]
    fn deduplication_rules_whose_fields_spell_one_key_are_refused() {
        let mapping = |fields: [&str; 2]| -> EntityMapping {
            serde_json::from_value(json!({
                "externalEntity": "Contact", "shardTypeId": "c_contact",
                "fieldMappings": [{"source": "A", "target": fields[0]},
                                  {"source": "B", "target": fields[1]}],
                "deduplication": {"rules": [{"field": fields[0]}, {"field": fields[1]}]}
            }))
            .unwrap()
        };
        let refused = mapping(["名前", "電話"]).check_deduplication().unwrap_err();
        assert!(refused.contains("would keep one match key"), "{refused}");
        assert!(mapping(["e-mail", "e_mail"]).check_deduplication().is_err());
        assert!(mapping(["email", "phone"]).check_deduplication().is_ok());
    }
}

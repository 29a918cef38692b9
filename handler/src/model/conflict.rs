//! Two-way sync of one record: which side's value each field takes, and what is a conflict.
//!
//! A shard that syncs both ways remembers, per mapped field, a fingerprint of the value both
//! sides agreed on at the last sync ([`value_hash`], kept on the shard's external
//! relationship). Against that base a field has changed in Castiel, at the provider, on both
//! sides, or on neither; wall clocks are not trusted to say so. A field changed on both sides
//! to different values is a **conflict**; both sides arriving at the same value is not.
//!
//! A field changed on one side only goes to the other side, under every strategy but the
//! record-level ones below. Conflicts are settled by the integration's strategy, or a field's
//! own:
//!
//! | strategy | a record with a conflict |
//! |---|---|
//! | `newest_wins` | the side modified last wins every field, its one-sided changes and all |
//! | `provider_wins` | the provider's version of the record wins every field |
//! | `castiel_wins` | Castiel's version of the record wins every field |
//! | `merge` | one-sided changes from both sides; each conflicting field from the side modified last |
//! | `field_priority` | one-sided changes from both sides; each conflicting field from its owner (newest when it has none) |
//! | `manual` | one-sided changes from both sides; conflicting fields keep both values until an operator chooses |
//!
//! [`reconcile`] is the whole decision, a pure function; the engine applies it on an inbound
//! sync (before overwriting a field edited in Castiel) and on a write-back (before writing a
//! field the provider changed).

use std::collections::BTreeMap;

use chrono::{DateTime, SubsecRound, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// A side of a two-way sync.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Side {
    Castiel,
    Provider,
}

/// How conflicts are settled.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Strategy {
    #[default]
    NewestWins,
    ProviderWins,
    CastielWins,
    Merge,
    FieldPriority,
    Manual,
}

impl Strategy {
    /// Whether the strategy picks a winning record rather than field by field.
    fn record_level(self) -> bool {
        matches!(
            self,
            Self::NewestWins | Self::ProviderWins | Self::CastielWins
        )
    }
}

/// An integration's conflict settings: `conflictResolution`, and optionally per field
/// `fieldStrategies` (a strategy of its own) and `fieldOwners` (for `field_priority`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ConflictPolicy {
    #[serde(default, rename = "conflictResolution")]
    pub strategy: Strategy,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub field_strategies: BTreeMap<String, Strategy>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub field_owners: BTreeMap<String, Side>,
}

impl ConflictPolicy {
    pub fn strategy_for(&self, field: &str) -> Strategy {
        self.field_strategies
            .get(field)
            .copied()
            .unwrap_or(self.strategy)
    }
}

/// A stable fingerprint of one field's value (`null` and a missing field are the same).
///
/// A value is fingerprinted as the provider will spell it back, not as it was written: a
/// whole number with or without a fraction (`5000` is Salesforce's currency `5000.0`), and a
/// date-time as its instant to the millisecond, whatever its offset or precision
/// (`2026-01-05T10:00:00Z` is Salesforce's `2026-01-05T10:00:00.000+0000`). Text that reads as
/// a date-time is compared so too: the same instant in another offset is no change. Otherwise a field written back and spelt
/// anew by the provider looks changed there, and Castiel's next edit of it, made before an
/// inbound sync, is taken for a conflict.
pub fn value_hash(value: Option<&Value>) -> String {
    match value {
        None | Some(Value::Null) => hash_text("null"),
        Some(v) => hash_text(&canonical(v).as_ref().unwrap_or(v).to_string()),
    }
}

fn hash_text(text: &str) -> String {
    let mut hash = super::digest::Fnv1a::new();
    std::io::Write::write_all(&mut hash, text.as_bytes()).expect("hashing does not fail");
    hash.hex()
}

/// A value's fingerprint, and the one it had as written where that differs: bases agreed
/// before values were fingerprinted as providers spell them are of the text as written.
struct Fingerprints {
    canonical: String,
    as_written: Option<String>,
}

impl Fingerprints {
    fn of(value: Option<&Value>) -> Self {
        let hash = hash_text;
        match value {
            None | Some(Value::Null) => Self {
                canonical: hash("null"),
                as_written: None,
            },
            Some(v) => match canonical(v) {
                Some(spelt) => Self {
                    canonical: hash(&spelt.to_string()),
                    as_written: Some(hash(&v.to_string())),
                },
                None => Self {
                    canonical: hash(&v.to_string()),
                    as_written: None,
                },
            },
        }
    }

    /// Whether this is the value `base` was taken of.
    fn is(&self, base: &str) -> bool {
        self.canonical == base || self.as_written.as_deref() == Some(base)
    }
}

/// `value` as a provider spells it back, where that differs from how it is written.
fn canonical(value: &Value) -> Option<Value> {
    match value {
        Value::Number(n) if n.is_f64() => {
            let f = n.as_f64()?;
            // Within f64's exact integers, so the integer is the same number.
            (f.fract() == 0.0 && f.abs() < 9_007_199_254_740_992.0).then(|| Value::from(f as i64))
        }
        Value::String(text) => {
            // Providers keep milliseconds at most (Salesforce, Dataverse); Graph's seven
            // digits of fraction are zeros past them.
            let spelt = instant(text)?
                .trunc_subsecs(3)
                .to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true);
            (spelt != *text).then_some(Value::String(spelt))
        }
        Value::Array(items) => {
            let spelt: Vec<Option<Value>> = items.iter().map(canonical).collect();
            spelt.iter().any(Option::is_some).then(|| {
                items
                    .iter()
                    .zip(spelt)
                    .map(|(item, spelt)| spelt.unwrap_or_else(|| item.clone()))
                    .collect()
            })
        }
        Value::Object(fields) => {
            let spelt: Vec<Option<Value>> = fields.values().map(canonical).collect();
            spelt.iter().any(Option::is_some).then(|| {
                Value::Object(
                    fields
                        .iter()
                        .zip(spelt)
                        .map(|((name, v), spelt)| {
                            (name.clone(), spelt.unwrap_or_else(|| v.clone()))
                        })
                        .collect(),
                )
            })
        }
        _ => None,
    }
}

/// The instant a date-time with an offset names: RFC 3339, or with the offset's colon left out
/// as Salesforce writes it. A date alone, or a time without an offset, names no instant.
fn instant(text: &str) -> Option<DateTime<Utc>> {
    let b = text.as_bytes();
    if !(20..=40).contains(&b.len()) || b[4] != b'-' || b[7] != b'-' || b[10] != b'T' {
        return None;
    }
    DateTime::parse_from_rfc3339(text)
        .or_else(|_| DateTime::parse_from_str(text, "%Y-%m-%dT%H:%M:%S%.f%z"))
        .ok()
        .map(|t| t.with_timezone(&Utc))
}

/// One mapped field of a record, seen from both sides.
#[derive(Debug, Clone, PartialEq)]
pub struct FieldSides<'a> {
    pub field: &'a str,
    /// The fingerprint agreed at the last sync; `None` before the first.
    pub base: Option<&'a str>,
    pub castiel: Option<&'a Value>,
    pub provider: Option<&'a Value>,
    /// Castiel says it changed the field (a write-back's `changedFields`): what tells a
    /// field without an agreed fingerprint (one-way until now, or newly mapped) apart.
    pub castiel_changed: bool,
}

/// A field changed on both sides to different values.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct FieldConflict {
    pub field: String,
    pub strategy: Strategy,
    /// Whose value the field took; `None` while it waits for an operator (`manual`).
    pub winner: Option<Side>,
}

/// What a record's fields do.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Reconciled {
    /// Fields whose provider value Castiel takes.
    pub to_castiel: Vec<String>,
    /// Fields whose Castiel value the provider takes.
    pub to_provider: Vec<String>,
    /// Fields changed on both sides, and how each was settled.
    pub conflicts: Vec<FieldConflict>,
}

impl Reconciled {
    /// Conflicts left for an operator.
    pub fn unresolved(&self) -> impl Iterator<Item = &FieldConflict> {
        self.conflicts.iter().filter(|c| c.winner.is_none())
    }
}

/// When each side last changed the record, for the strategies that ask which is newer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Modified {
    pub castiel: Option<DateTime<Utc>>,
    pub provider: Option<DateTime<Utc>>,
}

impl Modified {
    /// The side changed last; the provider when it cannot be told (it holds the record of
    /// truth for the external system, and its clock is the one the record carries), as when
    /// it does not say when its record changed (Zoom).
    pub fn newer(&self) -> Side {
        match (self.castiel, self.provider) {
            (Some(c), Some(p)) if c > p => Side::Castiel,
            _ => Side::Provider,
        }
    }
}

/// Decides every field of one record: what flows to Castiel, what flows to the provider, and
/// the conflicts with how each was settled under `policy`.
pub fn reconcile(
    fields: &[FieldSides<'_>],
    policy: &ConflictPolicy,
    modified: Modified,
) -> Reconciled {
    #[derive(PartialEq)]
    enum Change {
        None,
        Castiel,
        Provider,
        Both,
    }
    let changes: Vec<Change> = fields
        .iter()
        .map(|f| {
            let castiel = Fingerprints::of(f.castiel);
            let provider = Fingerprints::of(f.provider);
            if castiel.canonical == provider.canonical {
                return Change::None;
            }
            match f.base {
                // Never agreed on: Castiel's edit if it says so (a mapping made two-way, a field
                // newly mapped), else the provider's record is where the shard came from.
                None if f.castiel_changed => Change::Castiel,
                None => Change::Provider,
                Some(base) => match (!castiel.is(base), !provider.is(base)) {
                    (true, true) => Change::Both,
                    (true, false) => Change::Castiel,
                    (false, true) => Change::Provider,
                    (false, false) => Change::None,
                },
            }
        })
        .collect();

    // A record-level strategy on a conflicting field picks the side that wins every field.
    let record_winner = fields
        .iter()
        .zip(&changes)
        .filter(|(_, c)| **c == Change::Both)
        .map(|(f, _)| policy.strategy_for(f.field))
        .find(|s| s.record_level())
        .map(|s| match s {
            Strategy::ProviderWins => Side::Provider,
            Strategy::CastielWins => Side::Castiel,
            _ => modified.newer(),
        });

    let mut out = Reconciled::default();
    for (f, change) in fields.iter().zip(changes) {
        let take = |out: &mut Reconciled, side: Side| match side {
            Side::Provider => out.to_castiel.push(f.field.to_string()),
            Side::Castiel => out.to_provider.push(f.field.to_string()),
        };
        match change {
            Change::None => {}
            Change::Castiel | Change::Provider => {
                let changed = if change == Change::Castiel {
                    Side::Castiel
                } else {
                    Side::Provider
                };
                take(&mut out, record_winner.unwrap_or(changed));
            }
            Change::Both => {
                let strategy = policy.strategy_for(f.field);
                let winner = match strategy {
                    Strategy::Manual => None,
                    Strategy::FieldPriority => Some(
                        policy
                            .field_owners
                            .get(f.field)
                            .copied()
                            .unwrap_or_else(|| modified.newer()),
                    ),
                    Strategy::Merge => Some(modified.newer()),
                    _ => Some(record_winner.unwrap_or_else(|| modified.newer())),
                };
                if let Some(side) = winner {
                    take(&mut out, side);
                }
                out.conflicts.push(FieldConflict {
                    field: f.field.to_string(),
                    strategy,
                    winner,
                });
            }
        }
    }
    out
}

/// `c_syncConflict`: fields of one record changed on both sides that wait for an operator
/// (`manual`), with both values, until one side is taken.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ConflictRecord {
    pub integration_id: String,
    pub shard_id: String,
    pub shard_type_id: String,
    pub external_id: String,
    pub entity: String,
    pub fields: Vec<ConflictingField>,
    pub detected_at: DateTime<Utc>,
    pub status: ConflictStatus,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resolved_at: Option<DateTime<Utc>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resolved_by: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub taken: Option<Side>,
}

/// One field of a conflict record, with both sides' values.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ConflictingField {
    pub field: String,
    pub castiel: Value,
    pub provider: Value,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ConflictStatus {
    Open,
    Resolved,
}

impl ConflictRecord {
    /// The id of the conflict record of one shard and integration: one open record each,
    /// which later conflicts on the same shard add their fields to.
    pub fn id_for(shard_id: &str, integration_id: &str) -> String {
        format!("conflict~{integration_id}~{shard_id}")
    }

    /// Of the fields a detection found (`found`), those this record has not settled: a
    /// resolved record settled a field found with the very values it was resolved on (a
    /// detection made from what was read before the operator took a side).
    pub fn unsettled(&self, found: &[ConflictingField]) -> Vec<ConflictingField> {
        found
            .iter()
            .filter(|f| {
                self.status != ConflictStatus::Resolved
                    || !self.fields.iter().any(|settled| {
                        settled.field == f.field
                            && settled.castiel == f.castiel
                            && settled.provider == f.provider
                    })
            })
            .cloned()
            .collect()
    }

    /// Adds or refreshes the fields of a newer detection.
    pub fn absorb(&mut self, fields: Vec<ConflictingField>, at: DateTime<Utc>) {
        // A record already resolved keeps nothing for the operator: its fields were settled,
        // and taking a side now would write their old values.
        if self.status == ConflictStatus::Resolved {
            self.fields.clear();
        }
        for field in fields {
            self.fields.retain(|f| f.field != field.field);
            self.fields.push(field);
        }
        self.fields.sort_by(|a, b| a.field.cmp(&b.field));
        self.detected_at = at;
        self.status = ConflictStatus::Open;
        self.resolved_at = None;
        self.resolved_by = None;
        self.taken = None;
    }
}

/// [`reconcile`] over a whole record: every field the provider's record maps to, against the
/// agreed fingerprints `bases` and the shard's `castiel` values; `castiel_changed` are the
/// fields Castiel says it changed.
pub fn reconcile_record(
    bases: &BTreeMap<String, String>,
    castiel: &serde_json::Map<String, Value>,
    provider: &serde_json::Map<String, Value>,
    castiel_changed: &[String],
    policy: &ConflictPolicy,
    modified: Modified,
) -> Reconciled {
    let fields: Vec<FieldSides<'_>> = provider
        .keys()
        .map(|f| FieldSides {
            field: f,
            base: bases.get(f).map(String::as_str),
            castiel: castiel.get(f),
            provider: provider.get(f),
            castiel_changed: castiel_changed.iter().any(|c| c == f),
        })
        .collect();
    reconcile(&fields, policy, modified)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    /// Seed 001's example 4: John Doe edited in Castiel at 10:00, Jonathan Doe at Salesforce at
    /// 11:00, both name and email changed on both sides; plus a phone changed in Castiel only
    /// and a title changed at Salesforce only, which tell the strategies apart.
    struct Example {
        base: BTreeMap<&'static str, String>,
        castiel: Value,
        provider: Value,
    }

    fn example() -> Example {
        let agreed = json!({"name": "J. Doe", "email": "j@example.com", "phone": "555-0100",
                            "title": "Engineer"});
        Example {
            base: ["name", "email", "phone", "title"]
                .into_iter()
                .map(|f| (f, value_hash(agreed.get(f))))
                .collect(),
            castiel: json!({"name": "John Doe", "email": "john@example.com",
                            "phone": "555-0199", "title": "Engineer"}),
            provider: json!({"name": "Jonathan Doe", "email": "john.doe@example.com",
                             "phone": "555-0100", "title": "Senior Engineer"}),
        }
    }

    fn at(hour: u32) -> DateTime<Utc> {
        format!("2025-12-09T{hour:02}:00:00Z").parse().unwrap()
    }

    /// The record each side holds after the decision is applied.
    fn settle(policy: &ConflictPolicy) -> (Value, Value, Reconciled) {
        let e = example();
        let fields: Vec<FieldSides> = ["name", "email", "phone", "title"]
            .iter()
            .map(|f| FieldSides {
                field: f,
                base: Some(e.base[f].as_str()),
                castiel: e.castiel.get(*f),
                provider: e.provider.get(*f),
                castiel_changed: false,
            })
            .collect();
        let modified = Modified {
            castiel: Some(at(10)),
            provider: Some(at(11)),
        };
        let decided = reconcile(&fields, policy, modified);
        let (mut castiel, mut provider) = (e.castiel.clone(), e.provider.clone());
        for f in &decided.to_castiel {
            castiel[f] = e.provider[f].clone();
        }
        for f in &decided.to_provider {
            provider[f] = e.castiel[f].clone();
        }
        (castiel, provider, decided)
    }

    fn policy(strategy: Strategy) -> ConflictPolicy {
        ConflictPolicy {
            strategy,
            ..ConflictPolicy::default()
        }
    }

    #[test]
    fn newest_wins_takes_the_newer_record_whole() {
        let (castiel, provider, decided) = settle(&policy(Strategy::NewestWins));
        let salesforce = example().provider;
        assert_eq!(castiel, salesforce, "Salesforce is newer (11:00 > 10:00)");
        assert_eq!(provider, salesforce);
        let fields: Vec<&str> = decided.conflicts.iter().map(|c| c.field.as_str()).collect();
        assert_eq!(fields, ["name", "email"]);
        assert!(
            decided
                .conflicts
                .iter()
                .all(|c| c.winner == Some(Side::Provider))
        );
    }

    #[test]
    fn provider_wins_and_castiel_wins_take_their_sides_record() {
        let (castiel, provider, _) = settle(&policy(Strategy::ProviderWins));
        assert_eq!(
            (&castiel, &provider),
            (&example().provider, &example().provider)
        );
        let (castiel, provider, _) = settle(&policy(Strategy::CastielWins));
        assert_eq!(
            (&castiel, &provider),
            (&example().castiel, &example().castiel)
        );
    }

    #[test]
    fn merge_keeps_both_sides_one_sided_changes_and_settles_conflicts_by_newest() {
        let (castiel, provider, _) = settle(&policy(Strategy::Merge));
        let merged = json!({"name": "Jonathan Doe", "email": "john.doe@example.com",
                            "phone": "555-0199", "title": "Senior Engineer"});
        assert_eq!(castiel, merged);
        assert_eq!(provider, merged);
    }

    #[test]
    fn field_priority_gives_each_conflicting_field_to_its_owner() {
        let mut p = policy(Strategy::FieldPriority);
        p.field_owners = [("name".to_string(), Side::Castiel)].into();
        let (castiel, provider, decided) = settle(&p);
        // `email` has no owner: the newer side, Salesforce, has it.
        let expected = json!({"name": "John Doe", "email": "john.doe@example.com",
                              "phone": "555-0199", "title": "Senior Engineer"});
        assert_eq!(castiel, expected);
        assert_eq!(provider, expected);
        assert_eq!(decided.conflicts[0].winner, Some(Side::Castiel));
    }

    #[test]
    fn manual_overwrites_no_conflicting_field_on_either_side() {
        let (castiel, provider, decided) = settle(&policy(Strategy::Manual));
        assert_eq!(castiel["name"], "John Doe");
        assert_eq!(provider["name"], "Jonathan Doe");
        assert_eq!(castiel["email"], "john@example.com");
        assert_eq!(provider["email"], "john.doe@example.com");
        // One-sided changes still flow.
        assert_eq!(provider["phone"], "555-0199");
        assert_eq!(castiel["title"], "Senior Engineer");
        assert_eq!(decided.unresolved().count(), 2);
    }

    #[test]
    fn a_field_strategy_overrides_the_integrations() {
        let mut p = policy(Strategy::Merge);
        p.field_strategies = [("email".to_string(), Strategy::Manual)].into();
        let (castiel, provider, decided) = settle(&p);
        assert_eq!(castiel["name"], "Jonathan Doe");
        assert_ne!(castiel["email"], provider["email"]);
        let unresolved: Vec<&str> = decided.unresolved().map(|c| c.field.as_str()).collect();
        assert_eq!(unresolved, ["email"]);
    }

    #[test]
    fn a_field_never_agreed_on_is_castiels_where_castiel_says_it_changed_it() {
        // A mapping made two-way: its links keep no fingerprints yet. An edit in Castiel is
        // written back, not taken for the provider's change and undone.
        let (edited, theirs) = (json!("Ann Lee"), json!("Ann"));
        let field = |castiel_changed| FieldSides {
            field: "name",
            base: None,
            castiel: Some(&edited),
            provider: Some(&theirs),
            castiel_changed,
        };
        let modified = Modified {
            castiel: None,
            provider: None,
        };
        let decided = reconcile(&[field(true)], &policy(Strategy::Manual), modified);
        assert_eq!(decided.to_provider, ["name"]);
        assert!(decided.to_castiel.is_empty() && decided.conflicts.is_empty());
        let decided = reconcile(&[field(false)], &policy(Strategy::Manual), modified);
        assert_eq!(decided.to_castiel, ["name"], "where the shard came from");
    }

    #[test]
    fn a_provider_that_does_not_say_when_is_taken_for_the_newer() {
        let modified = |castiel, provider| Modified { castiel, provider }.newer();
        assert_eq!(modified(Some(at(10)), None), Side::Provider);
        assert_eq!(modified(Some(at(12)), Some(at(11))), Side::Castiel);
        assert_eq!(modified(Some(at(10)), Some(at(11))), Side::Provider);
    }

    #[test]
    fn a_value_is_fingerprinted_as_providers_spell_it_back() {
        let same = |a: Value, b: Value| value_hash(Some(&a)) == value_hash(Some(&b));
        assert!(same(json!(5000), json!(5000.0)));
        assert!(same(json!(-3), json!(-3.0)));
        assert!(!same(json!(5000), json!(5000.5)));
        assert!(same(
            json!("2026-01-05T10:00:00Z"),
            json!("2026-01-05T10:00:00.000+0000")
        ));
        assert!(same(
            json!("2026-01-05T11:00:00+01:00"),
            json!("2026-01-05T10:00:00.0000000Z")
        ));
        assert!(!same(
            json!("2026-01-05T10:00:00Z"),
            json!("2026-01-05T10:00:00.5Z")
        ));
        assert!(same(
            json!("2026-01-05T10:00:00.1234567Z"),
            json!("2026-01-05T10:00:00.123+0000")
        ));
        assert!(same(
            json!({"at": "2026-01-05T10:00:00Z", "n": [1]}),
            json!({"at": "2026-01-05T10:00:00.000+0000", "n": [1.0]})
        ));
        // Text that only looks like a time, or names no instant, is compared as written.
        assert!(!same(json!("2026-01-05"), json!("2026-01-05T00:00:00Z")));
        assert!(!same(
            json!("2026-01-05T10:00:00"),
            json!("2026-01-05T10:00:00Z")
        ));
        assert!(!same(json!("5000"), json!(5000)));
    }

    #[test]
    fn a_value_respelt_by_the_provider_is_not_a_change_there() {
        let fields = |base: &str, castiel: &Value, provider: &Value| {
            reconcile(
                &[FieldSides {
                    field: "amount",
                    base: Some(base),
                    castiel: Some(castiel),
                    provider: Some(provider),
                    castiel_changed: true,
                }],
                &policy(Strategy::Manual),
                Modified {
                    castiel: Some(at(10)),
                    provider: Some(at(11)),
                },
            )
        };
        // Written back as 5000, read back as 5000.0; then edited in Castiel again.
        let agreed = value_hash(Some(&json!(5000)));
        let decided = fields(&agreed, &json!(6000), &json!(5000.0));
        assert_eq!(decided.to_provider, ["amount"]);
        assert!(decided.conflicts.is_empty());

        // A base agreed before values were fingerprinted so, on the text as written, still
        // matches it.
        let as_written = {
            let mut hash = crate::model::digest::Fnv1a::new();
            std::io::Write::write_all(&mut hash, b"5000.0").unwrap();
            hash.hex()
        };
        let decided = fields(&as_written, &json!(6000), &json!(5000.0));
        assert_eq!(decided.to_provider, ["amount"]);
        assert!(decided.conflicts.is_empty());
        let decided = fields(&as_written, &json!(5000.0), &json!(7000.0));
        assert_eq!(decided.to_castiel, ["amount"]);
        assert!(decided.conflicts.is_empty());
    }

    #[test]
    fn no_conflict_when_both_sides_agree_or_only_one_changed_or_nothing_was_synced() {
        let base = value_hash(Some(&json!("a")));
        let same = json!("b");
        let fields = [
            FieldSides {
                field: "agreed",
                base: Some(&base),
                castiel: Some(&same),
                provider: Some(&same),
                castiel_changed: false,
            },
            FieldSides {
                field: "first",
                base: None,
                castiel: None,
                provider: Some(&same),
                castiel_changed: false,
            },
        ];
        let modified = Modified {
            castiel: None,
            provider: None,
        };
        let decided = reconcile(&fields, &policy(Strategy::Manual), modified);
        assert!(decided.conflicts.is_empty());
        assert_eq!(decided.to_castiel, ["first"]);
        assert!(decided.to_provider.is_empty());
        assert_eq!(value_hash(None), value_hash(Some(&Value::Null)));
    }

    #[test]
    fn a_new_conflict_on_a_resolved_record_brings_back_none_of_its_settled_fields() {
        let field = |name: &str, castiel: &str| ConflictingField {
            field: name.into(),
            castiel: json!(castiel),
            provider: json!("theirs"),
        };
        let mut record = ConflictRecord {
            integration_id: "int-1".into(),
            shard_id: "s1".into(),
            shard_type_id: "c_contact".into(),
            external_id: "003A".into(),
            entity: "Contact".into(),
            fields: vec![field("email", "old")],
            detected_at: at(9),
            status: ConflictStatus::Resolved,
            resolved_at: Some(at(10)),
            resolved_by: Some("ops".into()),
            taken: Some(Side::Castiel),
        };
        // Found again from values read before the resolution: settled. Found with others: new.
        assert!(record.unsettled(&[field("email", "old")]).is_empty());
        assert_eq!(
            record.unsettled(&[field("email", "older"), field("phone", "new")]),
            [field("email", "older"), field("phone", "new")]
        );
        record.absorb(vec![field("phone", "new")], at(11));
        let fields: Vec<&str> = record.fields.iter().map(|f| f.field.as_str()).collect();
        assert_eq!(fields, ["phone"]);
        assert_eq!(
            record.unsettled(&[field("phone", "new")]).len(),
            1,
            "an open record settles nothing"
        );
        assert_eq!(record.status, ConflictStatus::Open);

        record.absorb(vec![field("name", "newer")], at(12));
        let fields: Vec<&str> = record.fields.iter().map(|f| f.field.as_str()).collect();
        assert_eq!(
            fields,
            ["name", "phone"],
            "an open record gathers its fields"
        );
    }
}

//! `rank_pattern` / `alpha_pattern`: maps from a module-name pattern to a value, kept in the
//! order their keys were written, because PEFT tries the keys in that order and the first that
//! matches wins (`peft.utils.other.get_pattern_key`).

use serde::de::{MapAccess, Visitor};
use serde::ser::SerializeMap;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use super::selector::PyRegex;
use crate::error::{PeftError, Result};

/// An insertion-ordered map from a module-name pattern to a value (`rank_pattern`,
/// `alpha_pattern`). It reads and writes as a JSON object in its key order; `null` reads as
/// empty. Inserting an existing key replaces its value in place.
#[derive(Clone, Debug, PartialEq)]
pub struct PatternMap<V> {
    entries: Vec<(String, V)>,
}

impl<V> Default for PatternMap<V> {
    fn default() -> Self {
        Self {
            entries: Vec::new(),
        }
    }
}

impl<V> PatternMap<V> {
    /// An empty map.
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets `key` to `value`: in place when the key exists (returning the old value), else
    /// appended.
    pub fn insert(&mut self, key: String, value: V) -> Option<V> {
        match self.entries.iter_mut().find(|(k, _)| *k == key) {
            Some((_, v)) => Some(std::mem::replace(v, value)),
            None => {
                self.entries.push((key, value));
                None
            }
        }
    }

    /// The value stored under exactly `key` (no pattern matching).
    pub fn get(&self, key: &str) -> Option<&V> {
        self.entries.iter().find(|(k, _)| k == key).map(|(_, v)| v)
    }

    /// The entries in key order.
    pub fn iter(&self) -> impl Iterator<Item = (&String, &V)> {
        self.entries.iter().map(|(k, v)| (k, v))
    }

    /// The keys in order.
    pub fn keys(&self) -> impl Iterator<Item = &String> {
        self.entries.iter().map(|(k, _)| k)
    }

    /// Whether the map is empty.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The number of entries.
    pub fn len(&self) -> usize {
        self.entries.len()
    }
}

impl<V: Copy> PatternMap<V> {
    /// PEFT's `get_pattern_key`: the value of the first key `k`, in order, for which
    /// `^(.*\.)?(k)$` matches `module`; `field` names the map in errors.
    pub fn value_for(&self, module: &str, field: &str) -> Result<Option<V>> {
        for (key, value) in &self.entries {
            let re = PyRegex::new(&format!(r"^(.*\.)?({key})$"), field).map_err(|e| {
                let reason = match e {
                    PeftError::InvalidConfig { reason, .. } => reason,
                    other => other.to_string(),
                };
                PeftError::config(field, format!("key {key:?}: {reason}"))
            })?;
            if re.is_match(module, field)? {
                return Ok(Some(*value));
            }
        }
        Ok(None)
    }
}

impl<V> FromIterator<(String, V)> for PatternMap<V> {
    fn from_iter<I: IntoIterator<Item = (String, V)>>(iter: I) -> Self {
        let mut map = Self::new();
        for (k, v) in iter {
            map.insert(k, v);
        }
        map
    }
}

impl<V, const N: usize> From<[(String, V); N]> for PatternMap<V> {
    fn from(entries: [(String, V); N]) -> Self {
        entries.into_iter().collect()
    }
}

impl<'a, V> IntoIterator for &'a PatternMap<V> {
    type Item = (&'a String, &'a V);
    type IntoIter = std::iter::Map<
        std::slice::Iter<'a, (String, V)>,
        fn(&'a (String, V)) -> (&'a String, &'a V),
    >;

    fn into_iter(self) -> Self::IntoIter {
        self.entries.iter().map(|(k, v)| (k, v))
    }
}

impl<V: Serialize> Serialize for PatternMap<V> {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        let mut map = s.serialize_map(Some(self.entries.len()))?;
        for (k, v) in &self.entries {
            map.serialize_entry(k, v)?;
        }
        map.end()
    }
}

impl<'de, V: Deserialize<'de>> Deserialize<'de> for PatternMap<V> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct V_<V>(std::marker::PhantomData<V>);
        impl<'de, V: Deserialize<'de>> Visitor<'de> for V_<V> {
            type Value = PatternMap<V>;

            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("an object from module-name patterns to values")
            }

            fn visit_unit<E: serde::de::Error>(self) -> std::result::Result<Self::Value, E> {
                Ok(PatternMap::new())
            }

            fn visit_none<E: serde::de::Error>(self) -> std::result::Result<Self::Value, E> {
                Ok(PatternMap::new())
            }

            fn visit_some<D: Deserializer<'de>>(
                self,
                d: D,
            ) -> std::result::Result<Self::Value, D::Error> {
                d.deserialize_any(self)
            }

            fn visit_map<A: MapAccess<'de>>(
                self,
                mut access: A,
            ) -> std::result::Result<Self::Value, A::Error> {
                let mut map = PatternMap::new();
                while let Some((k, v)) = access.next_entry::<String, V>()? {
                    map.insert(k, v);
                }
                Ok(map)
            }
        }
        d.deserialize_option(V_(std::marker::PhantomData))
    }
}

/// PEFT's `get_pattern_key`: the value of the first pattern of `patterns` (in order) matching
/// `module`, if any. See [`PatternMap::value_for`].
pub fn pattern_value<V: Copy>(
    patterns: &PatternMap<V>,
    module: &str,
    field: &str,
) -> Result<Option<V>> {
    patterns.value_for(module, field)
}

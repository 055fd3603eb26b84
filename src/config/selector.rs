//! The values of the targeting fields: [`ModuleSelector`] (`target_modules` /
//! `exclude_modules`: names, one regex, or `"all-linear"`), [`OneOrMany`]
//! (`layers_to_transform`, `layers_pattern`), and the Python-syntax regexes PEFT matches with.
//! Reading a value of the wrong type is an error that says what the field expects.

use serde::de::{self, Deserializer, SeqAccess, Unexpected, Visitor};
use serde::{Deserialize, Serialize};

use crate::error::{PeftError, Result};

/// `target_modules: "all-linear"` (matched case-insensitively, as PEFT does).
pub const ALL_LINEAR: &str = "all-linear";

/// A regex with Python's `re` syntax and semantics for the patterns PEFT builds.
pub(crate) struct PyRegex(fancy_regex::Regex);

impl PyRegex {
    /// Compiles `pattern`; a bad pattern is a config error on `field`.
    pub(crate) fn new(pattern: &str, field: &str) -> Result<Self> {
        fancy_regex::Regex::new(pattern)
            .map(PyRegex)
            .map_err(|e| PeftError::config(field, format!("invalid regex {pattern:?}: {e}")))
    }

    /// `re.fullmatch(pattern, text)`.
    pub(crate) fn full(pattern: &str, field: &str) -> Result<Self> {
        Self::new(&format!("^(?:{pattern})$"), field).map_err(|_| {
            let reason = match fancy_regex::Regex::new(pattern) {
                Err(e) => format!("invalid regex {pattern:?}: {e}"),
                Ok(_) => format!("invalid regex {pattern:?}"),
            };
            PeftError::config(field, reason)
        })
    }

    /// Whether the regex matches `text` (a match anywhere unless the pattern is anchored).
    pub(crate) fn is_match(&self, text: &str, field: &str) -> Result<bool> {
        self.0
            .is_match(text)
            .map_err(|e| PeftError::config(field, format!("regex failed on `{text}`: {e}")))
    }

    /// The text of the named group `name` in the first match, if any.
    pub(crate) fn named_group(
        &self,
        text: &str,
        name: &str,
        field: &str,
    ) -> Result<Option<String>> {
        let caps = self
            .0
            .captures(text)
            .map_err(|e| PeftError::config(field, format!("regex failed on `{text}`: {e}")))?;
        Ok(caps.and_then(|c| c.name(name).map(|m| m.as_str().to_string())))
    }
}

/// `target_modules` / `exclude_modules`: a list of names or suffixes, or one regex (or, for
/// `target_modules`, `"all-linear"`).
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(untagged)]
pub enum ModuleSelector {
    /// Names or suffixes (`q_proj` matches `model.layers.0.self_attn.q_proj`).
    List(Vec<String>),
    /// One regex that must match the whole module name; `"all-linear"` (any case) selects every
    /// linear layer but the output layer.
    Regex(String),
}

impl ModuleSelector {
    /// A list selector of `names`.
    pub fn list<S: AsRef<str>>(names: &[S]) -> Self {
        ModuleSelector::List(names.iter().map(|s| s.as_ref().to_string()).collect())
    }

    /// `"all-linear"`.
    pub fn all_linear() -> Self {
        ModuleSelector::Regex(ALL_LINEAR.to_string())
    }

    /// Whether this is `"all-linear"` (PEFT compares it case-insensitively).
    pub fn is_all_linear(&self) -> bool {
        matches!(self, ModuleSelector::Regex(s) if s.to_lowercase() == ALL_LINEAR)
    }

    /// Does `module` (a full HF module path) match? `"all-linear"` matches every name here: which
    /// layers it means depends on the model ([`crate::config::Targeting::select`]).
    pub fn matches(&self, module: &str) -> Result<bool> {
        match self {
            ModuleSelector::List(names) => Ok(names.iter().any(|n| suffix_match(module, n))),
            _ if self.is_all_linear() => Ok(true),
            ModuleSelector::Regex(pattern) => {
                PyRegex::full(pattern, "target_modules")?.is_match(module, "target_modules")
            }
        }
    }
}

impl std::fmt::Display for ModuleSelector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ModuleSelector::List(names) => write!(f, "{names:?}"),
            _ if self.is_all_linear() => write!(f, "{ALL_LINEAR:?}"),
            ModuleSelector::Regex(p) => write!(f, "regex {p:?}"),
        }
    }
}

impl<'de> Deserialize<'de> for ModuleSelector {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = ModuleSelector;

            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a list of module names or a regex string")
            }

            fn visit_str<E: de::Error>(self, v: &str) -> std::result::Result<Self::Value, E> {
                Ok(ModuleSelector::Regex(v.to_string()))
            }

            fn visit_seq<A: SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> std::result::Result<Self::Value, A::Error> {
                let mut names = Vec::new();
                while let Some(name) = seq.next_element::<ModuleName>()? {
                    names.push(name.0);
                }
                Ok(ModuleSelector::List(names))
            }
        }
        d.deserialize_any(V)
    }
}

/// One entry of a module-name list, with an error that says what an entry must be.
struct ModuleName(String);

impl<'de> Deserialize<'de> for ModuleName {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = ModuleName;

            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("module names as strings")
            }

            fn visit_str<E: de::Error>(self, v: &str) -> std::result::Result<Self::Value, E> {
                Ok(ModuleName(v.to_string()))
            }
        }
        d.deserialize_any(V)
    }
}

/// `name == key` or `name` ends with `.key`.
pub(crate) fn suffix_match(name: &str, key: &str) -> bool {
    name == key
        || (name.len() > key.len()
            && name.ends_with(key)
            && name.as_bytes()[name.len() - key.len() - 1] == b'.')
}

/// An int or a list of ints (`layers_to_transform`), a string or a list of strings
/// (`layers_pattern`), as PEFT accepts them.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(untagged)]
pub enum OneOrMany<T> {
    /// A single value.
    One(T),
    /// A list.
    Many(Vec<T>),
}

impl<T: Clone> OneOrMany<T> {
    /// The values as a list.
    pub fn to_vec(&self) -> Vec<T> {
        match self {
            OneOrMany::One(v) => vec![v.clone()],
            OneOrMany::Many(v) => v.clone(),
        }
    }
}

impl<'de, T: Deserialize<'de>> Deserialize<'de> for OneOrMany<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        use serde::de::value::{BoolDeserializer, F64Deserializer, I64Deserializer};
        use serde::de::value::{StrDeserializer, U64Deserializer};
        struct V<T>(std::marker::PhantomData<T>);
        impl<'de, T: Deserialize<'de>> Visitor<'de> for V<T> {
            type Value = OneOrMany<T>;

            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                let what = std::any::type_name::<T>();
                if what.ends_with("String") {
                    f.write_str("a string or a list of strings")
                } else {
                    f.write_str("an integer or a list of integers")
                }
            }

            fn visit_bool<E: de::Error>(self, v: bool) -> std::result::Result<Self::Value, E> {
                T::deserialize(BoolDeserializer::<E>::new(v))
                    .map(OneOrMany::One)
                    .map_err(|_| E::invalid_type(Unexpected::Bool(v), &self))
            }

            fn visit_u64<E: de::Error>(self, v: u64) -> std::result::Result<Self::Value, E> {
                T::deserialize(U64Deserializer::<E>::new(v))
                    .map(OneOrMany::One)
                    .map_err(|_| E::invalid_value(Unexpected::Unsigned(v), &self))
            }

            fn visit_i64<E: de::Error>(self, v: i64) -> std::result::Result<Self::Value, E> {
                T::deserialize(I64Deserializer::<E>::new(v))
                    .map(OneOrMany::One)
                    .map_err(|_| E::invalid_value(Unexpected::Signed(v), &self))
            }

            fn visit_f64<E: de::Error>(self, v: f64) -> std::result::Result<Self::Value, E> {
                T::deserialize(F64Deserializer::<E>::new(v))
                    .map(OneOrMany::One)
                    .map_err(|_| E::invalid_type(Unexpected::Float(v), &self))
            }

            fn visit_str<E: de::Error>(self, v: &str) -> std::result::Result<Self::Value, E> {
                T::deserialize(StrDeserializer::<E>::new(v))
                    .map(OneOrMany::One)
                    .map_err(|_| E::invalid_type(Unexpected::Str(v), &self))
            }

            fn visit_seq<A: SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> std::result::Result<Self::Value, A::Error> {
                let mut out = Vec::new();
                while let Some(v) = seq.next_element::<T>()? {
                    out.push(v);
                }
                Ok(OneOrMany::Many(out))
            }
        }
        d.deserialize_any(V(std::marker::PhantomData))
    }
}

use std::collections::BTreeMap;

use serde_json::Value;

use crate::{BuildCx, DynMethod, KdError, Method, Result};

/// A registered method, type-erased. Built by [`register_method!`].
pub struct MethodEntry {
    pub name: &'static str,
    pub summary: &'static str,
    pub schedulable: &'static [&'static str],
    /// See [`Method::SPEC_PREFIXES`].
    pub spec_prefixes: &'static [(&'static str, &'static str)],
    default_config: fn() -> Value,
    build: fn(Value, &mut BuildCx) -> Result<Box<dyn DynMethod>>,
    check: fn(Value) -> Result<Value>,
}

inventory::collect!(MethodEntry);

impl MethodEntry {
    pub const fn of<M: Method>() -> Self {
        MethodEntry {
            name: M::NAME,
            summary: M::SUMMARY,
            schedulable: M::SCHEDULABLE,
            spec_prefixes: M::SPEC_PREFIXES,
            default_config: default_config::<M>,
            build: build_dyn::<M>,
            check: check_config::<M>,
        }
    }

    /// The config with every field at its default, as JSON.
    pub fn default_config(&self) -> Value {
        (self.default_config)()
    }

    /// Config fields with their defaults, in declaration order.
    pub fn fields(&self) -> Vec<ConfigField> {
        match self.default_config() {
            Value::Object(map) => map
                .into_iter()
                .map(|(name, default)| ConfigField { name, default })
                .collect(),
            _ => Vec::new(),
        }
    }

    /// Validates a user config (unknown keys, types) and returns it with every
    /// default filled in, without building anything.
    pub fn resolve_config(&self, cfg: Value) -> Result<Value> {
        (self.check)(cfg)
    }

    pub fn build(&self, cfg: Value, cx: &mut BuildCx) -> Result<Box<dyn DynMethod>> {
        (self.build)(cfg, cx)
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct ConfigField {
    pub name: String,
    pub default: Value,
}

fn default_config<M: Method>() -> Value {
    serde_json::to_value(M::Config::default()).unwrap_or(Value::Null)
}

/// Deserialises a method's config; an empty or null value means all defaults.
pub fn build_config<M: Method>(cfg: Value) -> Result<M::Config> {
    let cfg = if cfg.is_null() {
        Value::Object(Default::default())
    } else {
        cfg
    };
    serde_json::from_value(cfg).map_err(|e| KdError::Config {
        method: M::NAME.into(),
        msg: e.to_string(),
    })
}

fn check_config<M: Method>(cfg: Value) -> Result<Value> {
    let typed = build_config::<M>(cfg)?;
    serde_json::to_value(typed).map_err(|e| KdError::Config {
        method: M::NAME.into(),
        msg: e.to_string(),
    })
}

fn build_dyn<M: Method>(cfg: Value, cx: &mut BuildCx) -> Result<Box<dyn DynMethod>> {
    Ok(Box::new(M::build(build_config::<M>(cfg)?, cx)?))
}

/// Registers a [`Method`] with the global registry.
#[macro_export]
macro_rules! register_method {
    ($method:ty) => {
        $crate::inventory::submit! { $crate::MethodEntry::of::<$method>() }
    };
}

/// All linked methods, sorted by name.
pub struct Registry {
    entries: BTreeMap<&'static str, &'static MethodEntry>,
}

impl Registry {
    /// Every method linked into this binary. Fails if two share a name.
    pub fn global() -> Result<Registry> {
        Registry::from_entries(inventory::iter::<MethodEntry>())
    }

    pub fn from_entries(
        entries: impl IntoIterator<Item = &'static MethodEntry>,
    ) -> Result<Registry> {
        let mut map = BTreeMap::new();
        for e in entries {
            if map.insert(e.name, e).is_some() {
                return Err(KdError::DuplicateMethod(e.name.to_string()));
            }
        }
        Ok(Registry { entries: map })
    }

    pub fn get(&self, name: &str) -> Result<&'static MethodEntry> {
        self.entries
            .get(name)
            .copied()
            .ok_or_else(|| KdError::UnknownMethod {
                name: name.to_string(),
                nearest: self.nearest(name),
                valid: self.names().join(", "),
            })
    }

    /// The registered name nearest to `name` in edits, when it is near
    /// enough to be a typo (`att` → `at`, `kd` → `st` is not).
    pub fn nearest(&self, name: &str) -> Option<String> {
        let limit = (name.chars().count() / 3).max(1);
        self.names()
            .into_iter()
            .map(|n| (strsim::levenshtein(name, n), n))
            .filter(|(d, n)| *d <= limit && *d < n.len())
            .min()
            .map(|(_, n)| n.to_string())
    }

    /// The method a prefixed spec names (`python:losses.py:MyLoss`), with
    /// the config field the rest of the spec fills and that rest.
    pub fn for_spec<'s>(&self, spec: &'s str) -> Option<(&'static str, &'static str, &'s str)> {
        self.iter().find_map(|e| {
            e.spec_prefixes.iter().find_map(|(prefix, field)| {
                spec.strip_prefix(prefix).map(|rest| (e.name, *field, rest))
            })
        })
    }

    pub fn names(&self) -> Vec<&'static str> {
        self.entries.keys().copied().collect()
    }

    pub fn iter(&self) -> impl Iterator<Item = &'static MethodEntry> + '_ {
        self.entries.values().copied()
    }
}

#[cfg(test)]
mod tests {
    use serde::{Deserialize, Serialize};

    use super::*;
    use crate::{Losses, StepIo};

    #[derive(Default, Serialize, Deserialize)]
    #[serde(default, deny_unknown_fields)]
    struct Cfg {
        #[serde(rename = "T")]
        t: f64,
    }

    struct A;
    impl Method for A {
        const NAME: &'static str = "a";
        const SUMMARY: &'static str = "test";
        type Config = Cfg;
        fn build(_: Cfg, _: &mut BuildCx) -> Result<Self> {
            Ok(A)
        }
        fn losses(&mut self, _: &StepIo, _: &mut Losses) -> Result<()> {
            Ok(())
        }
    }

    static A1: MethodEntry = MethodEntry::of::<A>();
    static A2: MethodEntry = MethodEntry::of::<A>();

    #[test]
    fn duplicates_are_rejected() {
        let err = Registry::from_entries([&A1, &A2]).err().unwrap();
        assert_eq!(err.to_string(), "method `a` is registered twice");
    }

    #[test]
    fn unknown_field_names_valid_ones() {
        let err = A1
            .resolve_config(serde_json::json!({"tau": 1}))
            .unwrap_err()
            .to_string();
        assert!(err.contains("unknown field `tau`, expected `T`"), "{err}");
    }

    #[test]
    fn unknown_method_names_valid_ones() {
        let reg = Registry::from_entries([&A1]).unwrap();
        let err = reg.get("b").err().unwrap().to_string();
        assert_eq!(err, "unknown method `b`; registered methods: a");
    }
}

//! The per-channel mean and std images are normalised with: the data set's
//! own constants, a reference framework's by name, or explicit numbers.
//! The frameworks disagree in the fourth decimal on CIFAR-100, and a
//! faithful reproduction uses its source's.

use std::fmt;

use serde::de::{self, MapAccess, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::cifar::{
    CIFAR10_MEAN, CIFAR10_STD, CIFAR100_MEAN, CIFAR100_STD, KDZOO_CIFAR100_MEAN, KDZOO_CIFAR100_STD,
};
use crate::{DataError, DataSource, Splits};

/// Written in plans as `default`, `kdzoo`, `repdistiller`, or
/// `{mean: [r, g, b], std: [r, g, b]}` (in [0, 1] units).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub enum Normalize {
    /// The data set's own: CIFAR-10 (0.4914, 0.4822, 0.4465) /
    /// (0.2470, 0.2435, 0.2616), CIFAR-100 RepDistiller's, the synthetic
    /// set its training statistics, an ImageFolder set ImageNet's
    /// (0.485, 0.456, 0.406) / (0.229, 0.224, 0.225). What plans without
    /// the field meant.
    #[default]
    Default,
    /// Knowledge-Distillation-Zoo's `train_*.py`: CIFAR-100
    /// (0.5071, 0.4865, 0.4409) / (0.2673, 0.2564, 0.2762), CIFAR-10 as
    /// the default.
    Kdzoo,
    /// RepDistiller's `dataset/cifar100.py`: (0.5071, 0.4867, 0.4408) /
    /// (0.2675, 0.2565, 0.2761), CIFAR-100 only.
    Repdistiller,
    Explicit {
        mean: [f64; 3],
        std: [f64; 3],
    },
}

const NAMES: &str = "default, kdzoo, repdistiller, or {mean: [r, g, b], std: [r, g, b]}";

type Stats = ([f64; 3], [f64; 3]);

impl Normalize {
    /// The mean and std this choice gives `source`; `None` for the data
    /// set's own, which the synthetic set only knows once generated.
    pub fn stats(&self, source: &DataSource) -> Result<Option<Stats>, DataError> {
        let (name, cifar10, cifar100) = match self {
            Normalize::Default => return Ok(None),
            Normalize::Explicit { mean, std } => {
                let bad = mean.iter().any(|m| !m.is_finite())
                    || std.iter().any(|s| !(s.is_finite() && *s > 0.0));
                if bad {
                    return Err(DataError::Invalid(format!(
                        "normalize: mean must be finite and std finite and > 0, got mean {mean:?}, std {std:?}"
                    )));
                }
                return Ok(Some((*mean, *std)));
            }
            Normalize::Kdzoo => (
                "kdzoo",
                Some((CIFAR10_MEAN, CIFAR10_STD)),
                (KDZOO_CIFAR100_MEAN, KDZOO_CIFAR100_STD),
            ),
            Normalize::Repdistiller => ("repdistiller", None, (CIFAR100_MEAN, CIFAR100_STD)),
        };
        let (stats, data) = match source {
            DataSource::Cifar100 { .. } => (Some(cifar100), "CIFAR-100"),
            DataSource::Cifar10 { .. } => (cifar10, "CIFAR-10"),
            DataSource::Synthetic(_) => (None, "the synthetic set"),
            DataSource::Digits => (None, "the digits set"),
            DataSource::ImageFolder { .. } => (None, "an ImageFolder set"),
        };
        stats.map(Some).ok_or_else(|| {
            DataError::Invalid(format!(
                "normalize `{name}` has no constants for {data}; give `{{mean, std}}` or use `default`"
            ))
        })
    }
}

impl Splits {
    /// Normalises every split with `norm`'s constants for `source`.
    pub fn normalize_with(
        &mut self,
        norm: &Normalize,
        source: &DataSource,
    ) -> Result<(), DataError> {
        if let Some((mean, std)) = norm.stats(source)? {
            let sets = [
                Some(&mut self.train),
                self.val.as_mut(),
                Some(&mut self.test),
            ];
            for d in sets.into_iter().flatten() {
                (d.mean, d.std) = (mean, std);
            }
        }
        Ok(())
    }
}

impl Serialize for Normalize {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Normalize::Default => s.serialize_str("default"),
            Normalize::Kdzoo => s.serialize_str("kdzoo"),
            Normalize::Repdistiller => s.serialize_str("repdistiller"),
            Normalize::Explicit { mean, std } => Explicit {
                mean: *mean,
                std: *std,
            }
            .serialize(s),
        }
    }
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Explicit {
    mean: [f64; 3],
    std: [f64; 3],
}

impl std::str::FromStr for Normalize {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "default" => Ok(Normalize::Default),
            "kdzoo" => Ok(Normalize::Kdzoo),
            "repdistiller" => Ok(Normalize::Repdistiller),
            other => Err(format!("unknown normalize `{other}`; valid: {NAMES}")),
        }
    }
}

// By hand rather than `untagged`, whose error names no valid choice.
impl<'de> Deserialize<'de> for Normalize {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Normalize;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str(NAMES)
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Normalize, E> {
                v.parse().map_err(E::custom)
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Normalize, A::Error> {
                let e = Explicit::deserialize(de::value::MapAccessDeserializer::new(map))?;
                Ok(Normalize::Explicit {
                    mean: e.mean,
                    std: e.std,
                })
            }
        }
        d.deserialize_any(V)
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;

    fn c100() -> DataSource {
        DataSource::Cifar100 {
            path: PathBuf::from("x"),
        }
    }

    #[test]
    fn names_and_numbers_round_trip_through_json() {
        for (n, json) in [
            (Normalize::Default, r#""default""#),
            (Normalize::Kdzoo, r#""kdzoo""#),
            (Normalize::Repdistiller, r#""repdistiller""#),
            (
                Normalize::Explicit {
                    mean: [0.5, 0.25, 0.0],
                    std: [1.0, 2.0, 0.5],
                },
                r#"{"mean":[0.5,0.25,0.0],"std":[1.0,2.0,0.5]}"#,
            ),
        ] {
            assert_eq!(serde_json::to_string(&n).unwrap(), json);
            assert_eq!(serde_json::from_str::<Normalize>(json).unwrap(), n);
        }
        let e = serde_json::from_str::<Normalize>(r#""kd-zoo""#)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("unknown normalize `kd-zoo`; valid: default, kdzoo"),
            "{e}"
        );
        let e = serde_json::from_str::<Normalize>(r#"{"mean":[0,0,0],"sd":[1,1,1]}"#)
            .unwrap_err()
            .to_string();
        assert!(e.contains("unknown field `sd`"), "{e}");
    }

    #[test]
    fn presets_exist_only_where_their_framework_defines_them() {
        let (m, s) = Normalize::Kdzoo.stats(&c100()).unwrap().unwrap();
        assert_eq!((m, s), (KDZOO_CIFAR100_MEAN, KDZOO_CIFAR100_STD));
        assert_eq!(Normalize::Default.stats(&c100()).unwrap(), None);
        let synthetic = DataSource::default();
        let e = Normalize::Repdistiller
            .stats(&synthetic)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("`repdistiller` has no constants for the synthetic set"),
            "{e}"
        );
        let bad = Normalize::Explicit {
            mean: [0.0; 3],
            std: [1.0, 0.0, 1.0],
        };
        assert!(bad.stats(&synthetic).is_err());
    }
}
